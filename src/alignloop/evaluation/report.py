"""``report.html``: one self-contained page (opens offline) with every number and plot.

- Plots are drawn with matplotlib (the Agg canvas, no pyplot global state) and embedded as
  ``data:image/png;base64`` images; copies are written to ``plots/*.png`` next to the page.
- Every piece of text that came from outside (policy names, prompts, completions, run names,
  metric keys) goes through :func:`~alignloop.pages.esc`; the page carries the reports' shared
  Content-Security-Policy (:mod:`alignloop.pages`). Plot text is never parsed as markup (a ``$``
  in a policy name is drawn as typed) and long names are cut in plots, whole in the tables.

Sections: the summary table (mean and 95% interval per policy, paired differences against the
baseline with % change), before/after bars, over-optimization (proxy and gold vs sqrt(KL)),
training curves (reward, KL, entropy, losses from each run's ``metrics.jsonl``), and sample
completions side by side.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignloop.pages import esc, figure, html_page, plain_text, plot_label
from alignloop.pages import png as png_bytes

# metric key -> (label, which way is better: +1 higher, -1 lower, 0 neither)
METRICS: dict[str, tuple[str, int]] = {
    "reward": ("reward-model score", +1),
    "gold_score": ("gold judge score", +1),
    "gold_helpful": ("gold: helpful", +1),
    "gold_honest": ("gold: honest", +1),
    "gold_harmless": ("gold: harmless", +1),
    "f_rate": ("F rate (nonsense)", -1),
    "toxicity": ("toxicity (mean P(toxic))", -1),
    "expected_max_toxicity": ("expected max toxicity", -1),
    "toxicity_probability": ("toxicity probability", -1),
    "kl_per_token": ("KL to reference per token (nats)", 0),
    "kl_sequence": ("KL to reference per completion (nats)", 0),
    "rouge_l": ("ROUGE-L vs reference", +1),
    "distinct_1": ("distinct-1", +1),
    "distinct_2": ("distinct-2", +1),
    "mean_length": ("mean length (words)", 0),
}
FLAG_PREFIX = "rate_"
LOWER_IS_BETTER_FLAGS = -1

# training-log keys, grouped into one figure each (read defensively: only numbers are drawn)
CURVE_GROUPS: dict[str, tuple[str, ...]] = {
    # PPO logs score (proxy), heldout (a second reward, e.g. gold); DPO logs implicit rewards
    "reward": ("score", "reward", "heldout", "gold", "rewards/chosen", "rewards/rejected", "rewards/margin"),
    "KL": ("kl", "beta", "approx_kl"),
    "entropy": ("entropy",),
    "loss": ("loss", "policy_loss", "value_loss", "heldout/loss"),
    "accuracy": ("rewards/accuracy", "heldout/accuracy"),
}


def metric_label(key: str) -> str:
    if key in METRICS:
        return METRICS[key][0]
    if key.startswith(FLAG_PREFIX):
        return f"rate: {key[len(FLAG_PREFIX) :].replace('_', ' ')}"
    return key.replace("_", " ")


def metric_direction(key: str) -> int:
    if key in METRICS:
        return METRICS[key][1]
    return -1 if key.startswith(FLAG_PREFIX) else 0


# ----------------------------------------------------------------------------- plots


def read_training_log(run_folder: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl``; unreadable lines (a torn last line) are skipped."""
    path = Path(run_folder) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def training_series(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> dict[str, list[tuple[float, float]]]:
    """For each of ``keys`` present in the rows: ``[(step, value), ...]`` (numeric values only)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        step = _number(row.get("step"))
        x = step if step is not None else float(i)
        for k in keys:
            y = _number(row.get(k))
            if y is not None:
                out.setdefault(k, []).append((x, y))
    return out


@plain_text
def plot_training(runs: Mapping[str, str | Path]) -> list[tuple[str, bytes]]:
    """One figure per curve group that some run logged: ``[(title, png), ...]``."""
    return [(title, png_bytes(fig)) for title, fig in training_figures(runs)]


@plain_text
def training_figures(runs: Mapping[str, str | Path]) -> list[tuple[str, Any]]:
    """:func:`plot_training`'s figures, not yet drawn: ``[(title, Figure), ...]``."""
    logs = {name: read_training_log(folder) for name, folder in runs.items()}
    figures = []
    for group, keys in CURVE_GROUPS.items():
        lines = [
            (f"{plot_label(name, 30)}: {k}", pts)
            for name, rows in logs.items()
            for k, pts in training_series(rows, keys).items()
        ]
        if not lines:
            continue
        fig = figure()
        ax = fig.add_subplot(1, 1, 1)
        for label, pts in lines:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=label, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(group)
        ax.set_title(f"training: {group}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append((f"training: {group}", fig))
    return figures


@plain_text
def plot_bars(evaluation: Mapping[str, Any], metrics: Sequence[str] | None = None) -> bytes | None:
    """Before/after bars: one panel per metric, one bar per policy with its 95% interval."""
    fig = bars_figure(evaluation, metrics)
    return None if fig is None else png_bytes(fig)


@plain_text
def bars_figure(evaluation: Mapping[str, Any], metrics: Sequence[str] | None = None) -> Any:
    """:func:`plot_bars`'s figure (None when there is nothing to draw)."""
    policies = evaluation.get("policies") or {}
    names = list(policies)
    if not names:
        return None
    keys = list(metrics or evaluation.get("metric_names") or [])
    keys = [k for k in keys if any(_mean(policies[n], k) is not None for n in names)]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = figure(3.0 * cols, 2.6 * rows)
    colors = [f"C{i}" for i in range(len(names))]
    for j, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, j + 1)
        means, lo, hi = [], [], []
        for n in names:
            m = policies[n].get("metrics", {}).get(key) or {}
            mean = m.get("mean")
            means.append(mean if mean is not None else 0.0)
            lo.append(mean - m["ci_low"] if mean is not None and m.get("ci_low") is not None else 0.0)
            hi.append(m["ci_high"] - mean if mean is not None and m.get("ci_high") is not None else 0.0)
        ax.bar(range(len(names)), means, yerr=[lo, hi], color=colors, capsize=3)
        ax.set_xticks(range(len(names)))
        # names cut short and upright: neighbours are a bar apart, never on top of each other
        ax.set_xticklabels([plot_label(n, 18) for n in names], rotation=90, fontsize=7)
        ax.set_title(metric_label(key), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


@plain_text
def plot_overoptimization(over: Mapping[str, Any]) -> bytes | None:
    """Proxy (left) and gold (right) score against sqrt(KL), one line per method."""
    fig = overoptimization_figure(over)
    return None if fig is None else png_bytes(fig)


@plain_text
def overoptimization_figure(over: Mapping[str, Any]) -> Any:
    """:func:`plot_overoptimization`'s figure (None when there is nothing to draw)."""
    series: dict[str, list[dict[str, Any]]] = {}
    if over.get("best_of_n"):
        series["best-of-n"] = list(over["best_of_n"])
    for name, pts in (over.get("series") or {}).items():
        if pts:
            series[name] = list(pts)
    if not series:
        return None
    fig = figure(10.0, 3.8)
    for j, (key, title) in enumerate((("proxy", "proxy reward"), ("gold", "gold score"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, (name, pts) in enumerate(series.items()):
            xy = [
                (p["sqrt_kl"], p[key])
                for p in pts
                if _number(p.get(key)) is not None and _number(p.get("sqrt_kl")) is not None
            ]
            if not xy:
                continue
            xs, ys = zip(*sorted(xy), strict=True)
            ax.plot(xs, ys, marker="o", label=plot_label(name, 30), color=f"C{i}")
        ax.set_xlabel("sqrt(KL to reference)  (nats^0.5)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs sqrt(KL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _mean(policy: Mapping[str, Any], key: str) -> float | None:
    m = (policy.get("metrics") or {}).get(key) or {}
    return m.get("mean")


# ----------------------------------------------------------------------------- HTML

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.better{background:#e6f4ea}.worse{background:#fce8e6}
.ci{color:#777;font-size:.9em} .note{color:#555;font-size:.9em} .change{font-size:.9em}
#headline{font-size:1.05em;line-height:1.5;max-width:60em}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.9em;max-width:40em}
figure{margin:1em 0} img{max-width:100%}
th{overflow-wrap:anywhere;min-width:4em} p{overflow-wrap:anywhere} table{display:block;max-width:100%;overflow-x:auto}
"""


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return esc(x)


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}"><figcaption>{esc(title)}</figcaption></figure>'


def evaluation_table(evaluation: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The evaluation as ``(columns, rows)`` for the experiment trackers: one row per policy,
    ``["policy", metric, ...]`` with each metric's mean (None where a policy has none)."""
    metrics = list(evaluation.get("metric_names") or [])
    rows = [
        [name, *((pol.get("metrics") or {}).get(m, {}).get("mean") for m in metrics)]
        for name, pol in (evaluation.get("policies") or {}).items()
    ]
    return ["policy", *metrics], rows


# the metrics a reader asks about first, in this order (the rest is folded away)
KEY_METRICS = ("rate_toxic", "toxicity", "f_rate", "gold_score", "reward", "rate_harmful_compliance",
               "rate_myth_confirmed", "rouge_l", "kl_per_token")  # fmt: skip
# positive quantities on a ratio scale: a relative change means something (from a baseline >= 0.05);
# for rates the change is given in points, for scores that can be negative not at all
RELATIVE = ("toxicity", "expected_max_toxicity", "rouge_l", "distinct_1", "distinct_2", "mean_length")
SHORT_NAMES = {
    "rate_toxic": "the toxic rate", "toxicity": "mean toxicity", "f_rate": "the F rate (nonsense)",
    "gold_score": "the gold judge score", "reward": "the reward-model score",
}  # fmt: skip


def is_rate(key: str) -> bool:
    return key.startswith(FLAG_PREFIX) or key in ("f_rate", "toxicity_probability")


def show_value(key: str, v: Any) -> str:
    """A rate as a percentage (``28.4%``), anything else as a number."""
    if is_rate(key) and isinstance(v, (int, float)):
        return f"{100 * v:.1f}%"
    return _fmt(v)


def show_change(key: str, d: Mapping[str, Any], before: float | None) -> str:
    """A paired difference against the baseline: points for rates, the relative change only where
    it means something (:data:`RELATIVE`, from a baseline of at least 0.05)."""
    diff = d.get("diff")
    if diff is None:
        return ""
    scale, unit, digits = (100.0, " pts", 1) if is_rate(key) else (1.0, "", 3)
    lo, hi = d.get("ci_low"), d.get("ci_high")
    text = f"{diff * scale:+.{digits}f}{unit}"
    if lo is not None and hi is not None:
        text += f' <span class="ci">[{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]</span>'
    pct = d.get("pct_change")
    if key in RELATIVE and pct is not None and before is not None and abs(before) >= 0.05:
        text += f" ({pct:+.0f}%)"
    return text


def _significant(d: Mapping[str, Any]) -> bool:
    lo, hi = d.get("ci_low"), d.get("ci_high")
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def metric_table(evaluation: Mapping[str, Any], keys: Sequence[str]) -> str:
    """Rows = metrics, one column per policy: the mean [95% interval]; under a compared policy's
    mean its paired change against the baseline, shaded when the interval excludes 0."""
    policies = evaluation.get("policies") or {}
    names = list(policies)
    baseline = evaluation.get("baseline")
    diffs = evaluation.get("differences") or {}
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for key in keys:
        cells = [f"<td>{esc(metric_label(key))}</td>"]
        base_mean = _mean(policies.get(baseline) or {}, key)
        for n in names:
            m = (policies[n].get("metrics") or {}).get(key) or {}
            d = (diffs.get(n) or {}).get(key) or {}
            cls = ""
            if _significant(d) and metric_direction(key):
                cls = "better" if (d["ci_low"] > 0) == (metric_direction(key) > 0) else "worse"
            ci = ""
            if m.get("ci_low") is not None and m.get("ci_high") is not None:
                ci = f' <span class="ci">[{show_value(key, m["ci_low"])}, {show_value(key, m["ci_high"])}]</span>'
            change = show_change(key, d, base_mean) if n != baseline else ""
            cells.append(
                f'<td class="num {cls}">{show_value(key, m.get("mean"))}{ci}'
                + (f'<br><span class="change">{change}</span>' if change else "")
                + "</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def summary_table(evaluation: Mapping[str, Any]) -> str:
    """The key metrics (:data:`KEY_METRICS` that were measured), then every metric folded in a
    ``<details>``."""
    names = list(evaluation.get("metric_names") or [])
    key = [k for k in KEY_METRICS if k in names] or names[:6]
    out = metric_table(evaluation, key)
    if len(names) > len(key):
        out += (
            f"<details><summary>all {len(names)} metrics</summary>{metric_table(evaluation, names)}</details>"
        )
    return out


def _joined(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def hacking_flags(training_runs: Mapping[str, str | Path]) -> dict[str, dict[str, int]] | None:
    """``{run name: {warning kind: count}}`` from each training run's ``metrics.json`` (None when
    no run has one)."""
    found: dict[str, dict[str, int]] = {}
    seen = False
    for name, folder in training_runs.items():
        path = Path(folder) / "metrics.json"
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        seen = True
        warns = metrics.get("warnings") if isinstance(metrics, dict) else None
        if isinstance(warns, dict) and warns:
            found[name] = {str(k): v for k, v in warns.items() if isinstance(v, int)}
    return found if seen else None


def warning_log(training_runs: Mapping[str, str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every reward-hacking warning each training run logged, from its ``metrics.jsonl``:
    ``{run: {kind: {"count", "first", "last" (steps), "message" (the last one)}}}``; runs with no
    log are left out, runs that logged none map to ``{}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, folder in training_runs.items():
        rows = read_training_log(folder)
        if not rows:
            continue
        kinds: dict[str, dict[str, Any]] = {}
        for row in rows:
            msgs = row.get("warnings") if isinstance(row.get("warnings"), list) else []
            names = (
                row.get("warning_kinds")
                if isinstance(row.get("warning_kinds"), list)
                else ["warning"] * len(msgs)
            )
            for kind, msg in zip(names, msgs, strict=False):
                k = kinds.setdefault(str(kind), {"count": 0, "first": row.get("step"), "last": None})
                k["count"] += 1
                k["last"], k["message"] = row.get("step"), str(msg)
        out[name] = kinds
    return out


def warnings_section(log: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The report's "Warnings" section: one row per run and warning kind (count, first and last step)."""
    rows = [
        f"<tr><td>{esc(run)}</td><td>{esc(kind)}</td><td class='num'>{esc(w['count'])}</td>"
        f"<td class='num'>{esc(w['first'])}</td><td class='num'>{esc(w['last'])}</td><td>{esc(w['message'])}</td></tr>"
        for run, kinds in log.items()
        for kind, w in kinds.items()
    ]
    quiet = [run for run, kinds in log.items() if not kinds]
    html = '<section id="warnings"><h2>Warnings</h2>'
    if rows:
        head = "<th>run</th><th>warning</th><th>steps</th><th>first</th><th>last</th><th>last message</th>"
        html += f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    if quiet:
        html += f"<p>No reward-hacking warning during training of {esc(_joined(quiet))}.</p>"
    return html + "</section>"


def headline(
    evaluation: Mapping[str, Any], flags: Mapping[str, Mapping[str, int]] | None = None
) -> list[str]:
    """Two to five plain sentences from the numbers: per compared policy (at most three), what
    improved, what got worse and what stayed within noise, naming the toxic rate (or mean
    toxicity), the F rate and the main score before and after; then whether reward hacking was
    flagged during training (``flags`` from :func:`hacking_flags`; None: not known)."""
    policies = evaluation.get("policies") or {}
    baseline = evaluation.get("baseline")
    diffs = evaluation.get("differences") or {}
    names = list(evaluation.get("metric_names") or [])
    keys = [k for k in (("rate_toxic" if "rate_toxic" in names else "toxicity"), "f_rate",
                        ("gold_score" if "gold_score" in names else "reward")) if k in names]  # fmt: skip
    sentences = []
    compared = [n for n in policies if n in diffs]
    for n in compared[:3]:
        good, bad, same = [], [], []
        for key in keys:
            d = diffs[n].get(key) or {}
            before, after = d.get("mean_before", _mean(policies[baseline], key)), _mean(policies[n], key)
            if before is None or after is None:
                continue
            label, b, a = (
                SHORT_NAMES.get(key, metric_label(key)),
                show_value(key, before),
                show_value(key, after),
            )
            if not _significant(d):
                same.append(f"{label} within noise ({b} before, {a} after)")
                continue
            phrase = f"{'raised' if d['diff'] > 0 else 'lowered'} {label} from {b} to {a}"
            (good if (d["diff"] > 0) == (metric_direction(key) > 0) else bad).append(phrase)
        if not (good or bad or same):
            continue
        text = f"Compared with {baseline}, {n} "
        text += _joined(good) if good else "improved none of these"
        if bad:
            text += f", but {_joined(bad)}"
        if same:
            text += f", and left {_joined(same)}"
        sentences.append(text + ".")
    if len(compared) > 3:
        sentences.append(f"The table below has {len(compared) - 3} more compared policies.")
    if not compared and policies:
        n = next(iter(policies))
        vals = [f"{SHORT_NAMES.get(k, metric_label(k))} {show_value(k, _mean(policies[n], k))}" for k in keys]
        sentences.append(f"{n}: {_joined(vals)}." if vals else f"{n} was evaluated.")
        sentences.append("Only one policy was evaluated, so nothing is compared.")
    if flags:
        runs = [f"{r} ({', '.join(f'{k} x{c}' for k, c in kinds.items())})" for r, kinds in flags.items()]
        sentences.append(f"Reward hacking was flagged during training of {_joined(runs)}.")
    elif flags is not None:
        sentences.append("No reward-hacking warning fired during training.")
    return sentences[:5]


def family_table(by_family: Mapping[str, Any], names: Sequence[str]) -> str:
    """Per prompt family (world prompts): each metric per policy, mean [95% interval]."""
    keys: list[str] = []
    for fam in by_family.values():
        for per in (fam.get("policies") or {}).values():
            keys += [k for k in per if k not in keys]
    head = "<th>family</th><th>prompts</th><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for fam, data in by_family.items():
        per = data.get("policies") or {}
        for k in keys:
            if not any(k in per.get(n, {}) for n in names):
                continue
            cells = [
                f"<td>{esc(fam)}</td><td class='num'>{esc(data.get('prompts', ''))}</td><td>{esc(metric_label(k))}</td>"
            ]
            for n in names:
                m = per.get(n, {}).get(k) or {}
                cells.append(
                    f'<td class="num">{_fmt(m.get("mean"))} <span class="ci">[{_fmt(m.get("ci_low"))}, '
                    f"{_fmt(m.get('ci_high'))}]</span></td>"
                )
            rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def samples_table(samples: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """Prompt and each policy's completion side by side (all escaped, in ``<pre>``)."""
    if not samples:
        return '<p class="note">no samples</p>'
    head = "<th>prompt</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for s in samples:
        cells = [f"<td><pre>{esc(s.get('prompt', ''))}</pre></td>"]
        comps = s.get("completions") or {}
        for n in names:
            cells.append(f"<td><pre>{esc(comps.get(n, ''))}</pre></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _overopt_text(over: Mapping[str, Any]) -> str:
    parts = []
    for name, peak in (over.get("peaks") or {}).items():
        if peak:
            where = f"n = {peak['n']}" if "n" in peak else f"step {peak.get('step', '?')}"
            parts.append(
                f"<li>{esc(name)}: gold peaks at sqrt(KL) = {_fmt(peak.get('sqrt_kl'), 2)} ({esc(where)}), "
                f"gold {_fmt(peak.get('gold'))}, proxy {_fmt(peak.get('proxy'))}</li>"
            )
    return f"<ul>{''.join(parts)}</ul>" if parts else ""


def settings_table(settings: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v, default=str) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in settings.items()
    )
    return f"<table>{rows}</table>"


def write_report(
    out_dir: str | Path,
    evaluation: Mapping[str, Any],
    training_runs: Mapping[str, str | Path] | None = None,
    title: str = "alignloop evaluation",
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/plots/*.png``; return the page's path.

    Args:
        evaluation: what :func:`~alignloop.evaluation.evaluate_policies` returned (or its
            ``metrics.json``); any section may be missing.
        training_runs: ``{name: run folder}`` whose ``metrics.jsonl`` curves are drawn.
    """
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    names = list(evaluation.get("policies") or {})
    figures: list[tuple[str, str, bytes]] = []
    bars = plot_bars(evaluation)
    if bars:
        figures.append(
            ("before/after", "scores per policy (bars: 95% bootstrap intervals over prompts)", bars)
        )
    over = evaluation.get("overoptimization") or {}
    op = plot_overoptimization(over)
    if op:
        figures.append(("over-optimization", "proxy and gold score against sqrt(KL)", op))
    training = plot_training(training_runs or {})
    for t, png in training:
        figures.append(("training", t, png))
    for i, (_, t, png) in enumerate(figures):
        slug = "".join(c if c.isalnum() else "-" for c in t.lower())[:40].strip("-")
        (plots / f"{i:02d}-{slug}.png").write_bytes(png)

    settings = evaluation.get("settings") or {}
    body = [f"<h1>{esc(title)}</h1>"]
    sentences = headline(evaluation, hacking_flags(training_runs or {}))
    body.append('<p id="headline">' + " ".join(esc(x) for x in sentences) + "</p>")
    body.append(
        f'<p class="note">{esc(len(names))} policies on {esc(settings.get("prompts", "?"))} held-out prompts, '
        f"{esc(settings.get('samples_per_prompt', '?'))} samples per prompt, seeds {esc(settings.get('seeds', '?'))}. "
        "Intervals are 95% percentile-bootstrap intervals over prompts; differences are paired by prompt "
        "(shaded when the interval excludes 0: green = better, red = worse); rates change in points.</p>"
    )
    body.append("<h2>Summary</h2>")
    body.append(summary_table(evaluation))
    for note in evaluation.get("notes") or []:
        body.append(f'<p class="note">{esc(note)}</p>')
    sections = {
        "before/after": "Before / after",
        "over-optimization": "Over-optimization",
        "training": "Training curves",
    }
    for key, heading in sections.items():
        imgs = [(t, png) for k, t, png in figures if k == key]
        if not imgs:
            continue
        body.append(f"<h2>{esc(heading)}</h2>")
        if key == "over-optimization":
            body.append(_overopt_text(over))
        body.extend(_img(t, png) for t, png in imgs)
    log = warning_log(training_runs or {})
    if log:
        body.append(warnings_section(log))
    if evaluation.get("by_family"):
        body.append("<h2>By prompt family</h2>")
        body.append(family_table(evaluation["by_family"], names))
    body.append("<h2>Sample completions</h2>")
    body.append(samples_table(evaluation.get("samples") or [], names))
    if settings:
        body.append("<h2>Settings</h2>")
        body.append(settings_table(settings))
    page = html_page(title, STYLE, "\n".join(body))
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path

"""``report.html``: one self-contained page (opens offline) with every number and plot.

- Plots are drawn with matplotlib (the Agg canvas, no pyplot global state) and embedded as
  ``data:image/png;base64`` images; copies are written to ``plots/*.png`` next to the page.
- Every piece of text that came from outside (policy names, prompts, completions, run names,
  metric keys) goes through :func:`html.escape`; the page also carries a Content-Security-Policy
  that forbids scripts and any request except inline ``data:`` images, so even a mistake in
  escaping could neither run code nor call home.

Sections: the summary table (mean and 95% interval per policy, paired differences against the
baseline with % change), before/after bars, over-optimization (proxy and gold vs sqrt(KL)),
training curves (reward, KL, entropy, losses from each run's ``metrics.jsonl``), and sample
completions side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

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


def _figure(width: float = 7.0, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


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


def plot_training(runs: Mapping[str, str | Path]) -> list[tuple[str, bytes]]:
    """One figure per curve group that some run logged: ``[(title, png), ...]``."""
    logs = {name: read_training_log(folder) for name, folder in runs.items()}
    figures = []
    for group, keys in CURVE_GROUPS.items():
        lines = [
            (f"{name}: {k}", pts)
            for name, rows in logs.items()
            for k, pts in training_series(rows, keys).items()
        ]
        if not lines:
            continue
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        for label, pts in lines:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=label, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(group)
        ax.set_title(f"training: {group}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append((f"training: {group}", png_bytes(fig)))
    return figures


def plot_bars(evaluation: Mapping[str, Any], metrics: Sequence[str] | None = None) -> bytes | None:
    """Before/after bars: one panel per metric, one bar per policy with its 95% interval."""
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
    fig = _figure(3.0 * cols, 2.6 * rows)
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
        ax.set_xticklabels([_short(n) for n in names], rotation=20, fontsize=7)
        ax.set_title(metric_label(key), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def plot_overoptimization(over: Mapping[str, Any]) -> bytes | None:
    """Proxy (left) and gold (right) score against sqrt(KL), one line per method."""
    series: dict[str, list[dict[str, Any]]] = {}
    if over.get("best_of_n"):
        series["best-of-n"] = list(over["best_of_n"])
    for name, pts in (over.get("series") or {}).items():
        if pts:
            series[name] = list(pts)
    if not series:
        return None
    fig = _figure(10.0, 3.8)
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
            ax.plot(xs, ys, marker="o", label=name, color=f"C{i}")
        ax.set_xlabel("sqrt(KL to reference)  (nats^0.5)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs sqrt(KL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def _mean(policy: Mapping[str, Any], key: str) -> float | None:
    m = (policy.get("metrics") or {}).get(key) or {}
    return m.get("mean")


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ----------------------------------------------------------------------------- HTML

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.better{background:#e6f4ea}.worse{background:#fce8e6}
.ci{color:#777;font-size:.9em} .note{color:#555;font-size:.9em}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.9em;max-width:40em}
figure{margin:1em 0} img{max-width:100%}
"""


def esc(x: Any) -> str:
    """HTML-escape any value (quotes too), the one way text reaches the page."""
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return esc(x)


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}"><figcaption>{esc(title)}</figcaption></figure>'


def summary_table(evaluation: Mapping[str, Any]) -> str:
    """Rows = metrics; per policy the mean [95% interval]; per compared policy the paired
    difference against the baseline [interval] and % change, shaded when the interval excludes 0."""
    policies = evaluation.get("policies") or {}
    names = list(policies)
    baseline = evaluation.get("baseline")
    diffs = evaluation.get("differences") or {}
    compared = [n for n in names if n in diffs]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    head += "".join(f"<th>{esc(n)} − {esc(baseline)}</th><th>% change</th>" for n in compared)
    rows = []
    for key in evaluation.get("metric_names") or []:
        cells = [f"<td>{esc(metric_label(key))}</td>"]
        for n in names:
            m = (policies[n].get("metrics") or {}).get(key) or {}
            cells.append(
                f'<td class="num">{_fmt(m.get("mean"))} <span class="ci">[{_fmt(m.get("ci_low"))}, '
                f"{_fmt(m.get('ci_high'))}]</span></td>"
            )
        for n in compared:
            d = diffs[n].get(key) or {}
            cls = ""
            lo, hi = d.get("ci_low"), d.get("ci_high")
            if lo is not None and hi is not None and (lo > 0 or hi < 0) and metric_direction(key):
                cls = "better" if (lo > 0) == (metric_direction(key) > 0) else "worse"
            sign = "+" if (d.get("diff") or 0) > 0 else ""
            cells.append(
                f'<td class="num {cls}">{sign}{_fmt(d.get("diff"))} <span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span></td>'
            )
            pct = d.get("pct_change")
            cells.append(
                f'<td class="num {cls}">{"" if pct is None else ("+" if pct > 0 else "")}{_fmt(pct, 1)}'
                f'{"" if pct is None else "%"} <span class="ci">[{_fmt(d.get("pct_ci_low"), 1)}, '
                f"{_fmt(d.get('pct_ci_high'), 1)}]</span></td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


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
    body.append(
        f'<p class="note">{esc(len(names))} policies on {esc(settings.get("prompts", "?"))} held-out prompts, '
        f"{esc(settings.get('samples_per_prompt', '?'))} samples per prompt, seeds {esc(settings.get('seeds', '?'))}. "
        "Intervals are 95% percentile-bootstrap intervals over prompts; differences are paired by prompt "
        "(shaded when the interval excludes 0: green = better, red = worse).</p>"
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
    if evaluation.get("by_family"):
        body.append("<h2>By prompt family</h2>")
        body.append(family_table(evaluation["by_family"], names))
    body.append("<h2>Sample completions</h2>")
    body.append(samples_table(evaluation.get("samples") or [], names))
    if settings:
        body.append("<h2>Settings</h2>")
        body.append(settings_table(settings))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path

"""The feedback report: how much the labellers agree, and who disagrees with the rest.

:func:`feedback_report` returns a JSON-able dict (the labelling app's admin page calls it);
:func:`report_html` renders it as a self-contained HTML page with a plot of agreement per
labeller; :func:`write_report` writes ``report.json``, ``report.html`` and ``agreement.png``.
The page follows the reports' shared rules (:mod:`alignloop.pages`): a Content-Security-Policy,
every name escaped, plot text never parsed as markup, long names cut in the plot only.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from alignloop.pages import esc, figure, html_page, plain_text, plot_label
from alignloop.pages import png as png_bytes
from alignloop.preference.agreement import (
    FlagRule,
    Level,
    Scores,
    f_rate,
    flag_labellers,
    latest_rankings,
    leave_one_out_tau,
    model_agreement,
    pairwise_alpha,
    read_agreement,
    tie_rate,
)
from alignloop.records import CompletionSet, Ranking
from alignloop.runs import write_json_atomic


def _num(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def feedback_report(
    sets: list[CompletionSet],
    rankings: list[Ranking],
    *,
    rule: FlagRule | None = None,
    level: Level = "ordinal",
    scores: Scores | None = None,
    own: dict[str, Scores] | None = None,
    reward: str | None = None,
) -> dict[str, Any]:
    """Agreement numbers for a project.

    Returns::

        {"n_sets", "n_sets_labelled", "n_sets_multi" (>= 2 labellers), "n_rankings",
         "alpha": {"value", "level", "units", "values"},          # Krippendorff over pairs
         "labellers": [{"name", "n_labelled", "n_rank", "n_thumbs", "tau_b", "pairs",
                        "tie_rate", "f_rate", "flagged", "reason"}],   # sorted by name
         "flagged": [{"name", "reason"}], "rule": "<the flagging rule in words>",
         "unknown_sets": n}                 # rankings of sets not in ``sets`` (still counted)

    With ``scores`` (a pooled reward model's ``{(set_id, completion_id): reward}``, named by
    ``reward``; ``own``: a labeller-conditioned model's scores per labeller) each labeller row also
    holds ``"vs_model"``: :func:`~alignloop.preference.agreement.model_agreement`'s numbers plus
    ``"reading"`` (:func:`~alignloop.preference.agreement.read_agreement`), and the report
    ``"reward"``: the SPEC.

    ``tau_b`` is the labeller's leave-one-out Kendall tau-b against the mean rank of the
    other labellers (None when nobody else judged their sets); rates are None when the
    labeller gave no rank-mode ranking. Only each labeller's latest ranking of a set counts.
    """
    rule = rule or FlagRule()
    rankings = latest_rankings(rankings)
    set_ids = {s.set_id for s in sets}
    by_labeller: dict[str, list[Ranking]] = defaultdict(list)
    labellers_of_set: dict[str, set[str]] = defaultdict(set)
    for r in rankings:
        by_labeller[r.labeller].append(r)
        labellers_of_set[r.set_id].add(r.labeller)
    taus = leave_one_out_tau(rankings)
    flags = flag_labellers(rankings, rule)
    vs_model = model_agreement(rankings, scores, own) if scores is not None else {}
    readings = read_agreement(vs_model)
    rows = []
    for name in sorted(by_labeller):
        rs = by_labeller[name]
        t = taus.get(name)
        rows.append(
            {
                "name": name,
                "n_labelled": len(rs),
                "n_rank": sum(1 for r in rs if r.ranks),
                "n_thumbs": sum(1 for r in rs if r.thumbs),
                "tau_b": _num(t.tau_b) if t else None,
                "pairs": t.n if t else 0,
                "tie_rate": _num(tie_rate(rs)),
                "f_rate": _num(f_rate(rs)),
                "flagged": bool(flags.get(name)),
                "reason": flags.get(name),
            }
        )
        if scores is not None:
            m = vs_model[name]
            rows[-1]["vs_model"] = {k: _num(v) if isinstance(v, float) else v for k, v in m.items()} | {
                "reading": readings[name]
            }
    alpha = pairwise_alpha(rankings, level) if rankings else {"value": None, "level": level, "units": 0}
    out = {
        "n_sets": len(set_ids),
        "n_sets_labelled": len(labellers_of_set),
        "n_sets_multi": sum(1 for v in labellers_of_set.values() if len(v) >= 2),
        "n_rankings": len(rankings),
        "alpha": {**alpha, "value": _num(alpha["value"])},  # type: ignore[arg-type]
        "labellers": rows,
        "flagged": [{"name": r["name"], "reason": r["reason"]} for r in rows if r["flagged"]],
        "rule": rule.describe,
        "unknown_sets": sum(1 for s in labellers_of_set if s not in set_ids) if sets else 0,
    }
    if scores is not None:
        out["reward"] = reward
    return out


def reward_scores(spec: str, sets: list[CompletionSet]) -> tuple[Scores, dict[str, Scores]]:
    """Every completion of ``sets`` scored by the reward SPEC (its pooled output), and, when it is a
    labeller-conditioned model, by each labeller's output: ``(scores, {labeller: scores})``, keyed
    ``(set_id, completion_id)`` as :func:`feedback_report` takes them. Loads the model (torch)."""
    from alignloop.reward import load_reward
    from alignloop.reward.functions import conditioned_labellers

    keys = [(s.set_id, c.id) for s in sets for c in s.completions]
    prompts = [s.prompt for s in sets for c in s.completions]
    texts = [c.text for s in sets for c in s.completions]
    pooled = load_reward(spec)
    scores = dict(zip(keys, pooled(prompts, texts), strict=True))
    own = {}
    for name in conditioned_labellers(pooled.model) if pooled.model is not None else []:
        own[name] = dict(zip(keys, load_reward(f"{spec}:{name}")(prompts, texts), strict=True))
    return scores, own


@plain_text
def agreement_plot_png(report: dict[str, Any]) -> bytes:
    """A bar chart of each labeller's leave-one-out tau-b (flagged ones in red), as PNG bytes."""
    return png_bytes(agreement_figure(report))


@plain_text
def agreement_figure(report: dict[str, Any]) -> Any:
    """:func:`agreement_plot_png`'s figure: one horizontal bar a labeller, names (cut to 32
    characters) down the side, so that any number of names of any length never overlap."""
    rows = report["labellers"]
    names = [plot_label(r["name"], 32) for r in rows]
    vals = [r["tau_b"] if r["tau_b"] is not None else 0.0 for r in rows]
    colors = ["#c0392b" if r["flagged"] else "#2e86c1" for r in rows]
    fig = figure(7.0, 1.2 + 0.3 * max(len(rows), 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()  # first name on top, as in the table
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Kendall tau-b vs others")
    ax.set_title("Agreement per labeller (leave-one-out; red = flagged)")
    fig.tight_layout()
    return fig


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "&ndash;"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.3f}" if isinstance(x, float) else esc(x)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .3rem .6rem; }
td:first-child { overflow-wrap: anywhere; } img { max-width: 100%; }
table { display: block; max-width: 100%; overflow-x: auto; }
tr.flagged { background: #fdecea; } .big { font-size: 1.4rem; }
"""


def report_html(report: dict[str, Any], png: bytes | None = None) -> str:
    """A self-contained HTML page (the plot inlined as a data URI). All names are escaped."""
    if png is None:
        png = agreement_plot_png(report)
    img = base64.b64encode(png).decode()
    a = report["alpha"]
    rows = "\n".join(
        "<tr{cls}><td>{name}</td><td>{n}</td><td>{tau}</td><td>{pairs}</td><td>{tie}</td><td>{f}</td>"
        "<td>{reason}</td></tr>".format(
            cls=' class="flagged"' if r["flagged"] else "",
            name=esc(r["name"]),
            n=r["n_labelled"],
            tau=_fmt(r["tau_b"]),
            pairs=r["pairs"],
            tie=_fmt(r["tie_rate"], pct=True),
            f=_fmt(r["f_rate"], pct=True),
            reason=esc(r["reason"] or ""),
        )
        for r in report["labellers"]
    )
    flagged = ", ".join(esc(f["name"]) for f in report["flagged"]) or "none"
    vs = _vs_model_html(report)
    body = f"""<h1>Feedback report</h1>
<p class="big">Krippendorff's alpha ({esc(a["level"])}, over pairwise outcomes):
<b id="alpha">{_fmt(a["value"])}</b> on {a.get("units", 0)} pairs judged by two or more labellers.</p>
<p>{report["n_rankings"]} rankings of {report["n_sets_labelled"]} sets
({report["n_sets_multi"]} labelled by two or more people; {report["n_sets"]} sets in the project).</p>
<p>Flagged: <b id="flagged">{flagged}</b></p>
<img alt="agreement per labeller" src="data:image/png;base64,{img}">
<table><thead><tr><th>labeller</th><th>sets</th><th>tau-b vs others</th><th>pairs</th><th>ties</th>
<th>F</th><th>flag</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<p><small>Rule: {esc(report["rule"])}. Tau-b compares each labeller's ranking with the mean rank
the other labellers gave the same set (F counts as the lowest rank); alpha 1 = perfect agreement,
0 = chance. Rules of thumb: alpha &ge; 0.8 reliable, &ge; 0.667 tentative.</small></p>{vs}"""
    return html_page("alignloop feedback report", STYLE, body)


def _vs_model_html(report: dict[str, Any]) -> str:
    """The per-labeller table against the pooled reward model ("" when the report has none)."""
    if "reward" not in report:
        return ""
    rows = "\n".join(
        "<tr><td>{name}</td><td>{n}</td><td>{m}</td><td>{c}</td><td>{k}</td><td>{o}</td><td>{r}</td></tr>".format(
            name=esc(r["name"]),
            n=r["vs_model"]["pairs"],
            m=_fmt(r["vs_model"]["model"], pct=True),
            c=_fmt(r["vs_model"]["model_clear"], pct=True),
            k=_fmt(r["vs_model"]["consensus"], pct=True),
            o=_fmt(r["vs_model"]["own"], pct=True),
            r=esc(r["vs_model"]["reading"]),
        )
        for r in report["labellers"]
    )
    return f"""
<h2>Against the pooled reward model</h2>
<p>Reward model: <code>{esc(report["reward"] or "")}</code>. Share of each labeller's ordered pairs
the model scores the same way: all of them, those it is sure of (score gap at or above the
median), the others' consensus, and their own output of a labeller-conditioned model.</p>
<table id="vs-model"><thead><tr><th>labeller</th><th>pairs</th><th>pooled model</th><th>model, sure</th>
<th>others</th><th>own output</th><th>reading</th></tr></thead>
<tbody>
{rows}
</tbody></table>"""


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``agreement.png`` into folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = agreement_plot_png(report)
    (out / "agreement.png").write_bytes(png)
    write_json_atomic(out / "report.json", report)
    (out / "report.html").write_text(report_html(report, png), encoding="utf-8")
    return {"json": out / "report.json", "html": out / "report.html", "png": out / "agreement.png"}

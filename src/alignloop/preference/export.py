"""Rankings -> training pairs: TRL ``prompt/chosen/rejected`` rows or grouped sets.

TRL format (one pair a line; loads in TRL's RewardTrainer/DPOTrainer as an explicit-prompt
preference dataset)::

    {"prompt": str, "chosen": str, "rejected": str,   # a conversational set's: prompt its message
                                                       # list, chosen/rejected [{"role": "assistant", ...}]
     "weight": float,        # P(chosen > rejected) as the labellers see it, in [0.5, 1]
     "margin": float,        # only with margins=True: mean rank gap (see below)
     "labellers": [str],     # who judged this pair
     "source": "alignloop:<method>",
     "prompt_id": str, "chosen_id": str, "rejected_id": str,
     "failed": true}         # only on a pair whose rejected was marked F (kept as a loser: keep_failed)

``weight`` is a *soft label*, not a sample weight: a reward model should use
``-w log sigmoid(r_c - r_r) - (1 - w) log sigmoid(r_r - r_c)``. It is 1.0 for a unanimous
pair, the vote share under majority (2 of 3 -> 0.667), ``sigmoid(s_c - s_r)`` under
Bradley-Terry, 1.0 under ranked pairs, and exactly 0.5 for a soft tie (``"tie": true``; only
with ``soft_ties``) -- a trainer that reads ``weight`` as a sample weight must drop those.
``margin`` (Llama-2/TRL style, in TRL subtracted inside the sigmoid) is the mean over the
voters of the rejected's minus the chosen's fractional rank; it is left out by default
because TRL applies any ``margin`` column it finds.

Grouped format (one completion set a line; InstructGPT-style: all K-choose-2 pairs of a
prompt in one batch so each completion is encoded once)::

    {"prompt": str, "prompt_id": str,    # (or the set's message list)
     "completions": [str],          # the set's completions that take part in a pair
     "completion_ids": [str],
     "pairs": [[i_chosen, j_rejected, weight], ...],   # indices into "completions"
     "labellers": [str], "source": "alignloop:<method>"}

Methods: ``majority`` (default), ``tideman`` (ranked pairs), ``bradley-terry``, and
``none`` (every labeller's own pairs, one row per labeller and pair, weight 1).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

from alignloop.preference.agreement import latest_rankings
from alignloop.preference.consensus import (
    bradley_terry,
    bt_probability,
    failed_completions,
    majority,
    ranked_pairs,
    vote_table,
)
from alignloop.preference.pairs import labeller_pairs
from alignloop.records import CompletionSet, Ranking, adopt_text_convention

Method = Literal["majority", "tideman", "bradley-terry", "none"]
METHODS: tuple[str, ...] = ("majority", "tideman", "bradley-terry", "none")


def set_pairs(
    rankings: list[Ranking],
    method: Method = "majority",
    *,
    soft_ties: bool = False,
    keep_failed: bool = True,
) -> list[dict[str, Any]]:
    """The consensus pairs of ONE completion set's rankings.

    Returns ``[{"chosen", "rejected", "weight", "margin", "labellers", "tie"?, "failed"?}]`` with
    completion ids. Completions at least half of their labellers marked F are kept (by default,
    ``keep_failed``) as losers (weight 1) to every completion that survived, marked ``"failed":
    True``; with ``keep_failed=False`` they are dropped. Under ``none`` a labeller's own F
    completions lose to each completion that labeller ranked.
    """
    if method == "none":
        out = []
        for r in rankings:
            for c, j, w in labeller_pairs(r, soft_ties=soft_ties, keep_failed=keep_failed):
                row = {"chosen": c, "rejected": j, "weight": w, "margin": None, "labellers": [r.labeller]}
                if w == 0.5:
                    row["tie"] = True
                if r.ranks.get(j) == "F":
                    row["failed"] = True
                out.append(row)
        return out
    failed = failed_completions(rankings)
    table = vote_table(rankings, drop=failed)
    items = sorted({c for r in rankings for c in (r.ranks or r.thumbs)} - failed)
    who = {key: sorted(pv.labellers) for key, pv in table.items()}

    def gap(c: str, j: str) -> float:
        pv = table[(min(c, j), max(c, j))]
        return (pv.gap if c < j else -pv.gap) / pv.n

    pairs: list[tuple[str, str, float]]
    if method == "majority":
        pairs = majority(table, soft_ties=soft_ties)
    elif method == "tideman":
        _order, beats = ranked_pairs(table, items)
        pairs = [(c, j, 1.0) for c, j in sorted(beats)]
        if soft_ties:
            pairs += [(a, b, 0.5) for a, b in table if (a, b) not in beats and (b, a) not in beats]
    elif method == "bradley-terry":
        s = bradley_terry(table, items)
        pairs = []
        for a, b in sorted(table):
            p = bt_probability(s[a], s[b])
            if abs(p - 0.5) < 1e-9:
                if soft_ties:
                    pairs.append((a, b, 0.5))
            else:
                pairs.append((a, b, p) if p > 0.5 else (b, a, 1 - p))
    else:
        raise ValueError(f"unknown consensus method {method!r}; use one of {', '.join(METHODS)}")
    out = []
    for c, j, w in pairs:
        row = {
            "chosen": c,
            "rejected": j,
            "weight": round(w, 6),
            "margin": round(gap(c, j), 6),
            "labellers": who[(min(c, j), max(c, j))],
        }
        if w == 0.5:
            row["tie"] = True
        out.append(row)
    if keep_failed:
        all_labellers = sorted({r.labeller for r in rankings})
        for f in sorted(failed):
            for c in items:
                out.append(
                    {
                        "chosen": c,
                        "rejected": f,
                        "weight": 1.0,
                        "margin": None,
                        "labellers": all_labellers,
                        "failed": True,
                    }
                )
    return out


def export_pairs(
    sets: list[CompletionSet],
    rankings: list[Ranking],
    method: Method = "majority",
    *,
    exclude_labellers: set[str] | frozenset[str] = frozenset(),
    soft_ties: bool = False,
    keep_failed: bool = True,
    margins: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """TRL-format pair rows for every labelled set (see the module docstring for the format).

    Rankings by ``exclude_labellers`` are left out before the consensus. Only each labeller's
    latest ranking of a set counts. Returns ``(rows, counts)`` where ``counts`` has
    ``sets`` (sets that gave pairs), ``pairs``, ``failed_pairs`` (of those, pairs whose rejected
    is an F completion kept as a loser: ``keep_failed``, the default), ``unknown_sets`` (rankings whose set is not
    in ``sets``: skipped), ``unknown_completions`` (ids a set does not have: skipped) and
    ``empty_completions`` (pairs with an empty text, e.g. an F-marked completion that was only EOS,
    kept as a loser by ``keep_failed``: skipped), ``all_failed_sets`` (sets whose every completion
    was marked F by at least half its labellers: nothing is left to compare, skipped), ``identical``
    (pairs whose two completions have the same text, from sets imported before duplicates were
    collapsed: skipped, never written) and ``converted_texts`` (completions stored with the old text
    convention, written with their leading space: see :func:`alignloop.records.adopt_text_convention`).
    """
    by_id = {s.set_id: s for s in sets}
    by_set: dict[str, list[Ranking]] = defaultdict(list)
    for r in latest_rankings(rankings):
        if r.labeller not in exclude_labellers:
            by_set[r.set_id].append(r)
    counts = {
        "sets": 0,
        "pairs": 0,
        "failed_pairs": 0,
        "unknown_sets": 0,
        "unknown_completions": 0,
        "empty_completions": 0,
        "all_failed_sets": 0,
        "identical": 0,
    }
    rows: list[dict[str, Any]] = []
    source = f"alignloop:{method}"
    counts["unknown_sets"] = sum(1 for set_id in by_set if set_id not in by_id)
    # a stable order whatever order the rankings came in: the sets' order, labellers by name
    for set_id, s in by_id.items():
        rs = sorted(by_set.get(set_id, []), key=lambda r: r.labeller)
        if not rs:
            continue
        ranked = {c for r in rs for c in (r.ranks or r.thumbs)}
        if ranked and ranked <= failed_completions(rs):
            counts["all_failed_sets"] += 1
            continue
        text = {c.id: c.text for c in s.completions}
        n_before = len(rows)
        for p in set_pairs(rs, method, soft_ties=soft_ties, keep_failed=keep_failed):
            if p["chosen"] not in text or p["rejected"] not in text:
                counts["unknown_completions"] += 1
                continue
            if not text[p["chosen"]].strip() or not text[p["rejected"]].strip():
                counts["empty_completions"] += 1  # nothing to learn; pair readers refuse them
                continue
            if text[p["chosen"]] == text[p["rejected"]]:
                counts["identical"] += 1  # TRL would train on it: a pair that teaches nothing but noise
                continue
            row: dict[str, Any] = {
                "prompt": s.prompt,
                "chosen": _as_prompt_format(s.prompt, text[p["chosen"]]),
                "rejected": _as_prompt_format(s.prompt, text[p["rejected"]]),
                "weight": p["weight"],
            }
            if margins and p["margin"] is not None:
                row["margin"] = p["margin"]
            row.update(
                labellers=p["labellers"],
                source=source,
                prompt_id=s.prompt_id,
                chosen_id=p["chosen"],
                rejected_id=p["rejected"],
            )
            if p.get("tie"):
                row["tie"] = True
            if p.get("failed"):
                row["failed"] = True
            counts["failed_pairs"] += bool(p.get("failed"))
            rows.append(row)
        counts["sets"] += len(rows) > n_before
    counts["pairs"] = len(rows)
    counts["converted_texts"] = adopt_text_convention(list(enumerate(rows, 1)), "the exported pairs")
    return rows, counts


def _as_prompt_format(prompt: Any, completion: str) -> str | list[dict[str, str]]:
    """A completion in its prompt's format: after a conversation (a message list) the assistant turn
    ``[{"role": "assistant", "content": completion}]`` (TRL's conversational preference format), else
    the text."""
    return [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion


def group_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL-format rows (from :func:`export_pairs`) -> one grouped record per prompt id.

    Completions are listed once, in order of first appearance; ``pairs`` index into them.
    """
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(
            r["prompt_id"],
            {
                "prompt": r["prompt"],
                "prompt_id": r["prompt_id"],
                "completions": [],
                "completion_ids": [],
                "pairs": [],
                "labellers": [],
                "source": r["source"],
            },
        )
        idx = []
        for cid, txt in ((r["chosen_id"], r["chosen"]), (r["rejected_id"], r["rejected"])):
            if cid not in g["completion_ids"]:
                g["completion_ids"].append(cid)
                g["completions"].append(txt[0]["content"] if isinstance(txt, list) else txt)  # as in a set
            idx.append(g["completion_ids"].index(cid))
        g["pairs"].append([idx[0], idx[1], r["weight"]])
        for name in r["labellers"]:
            if name not in g["labellers"]:
                g["labellers"].append(name)
    for g in groups.values():
        g["labellers"].sort()
    return list(groups.values())

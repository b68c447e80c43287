"""One labeller's ranking -> pairwise comparisons (no torch).

The course notes: a ranking of N completions gives all N-choose-2 pairs; in each pair the
preferred completion comes first ("y_j") and gets label 1, the other label 0. Three
completions ranked 2, 1, 3 give three pairs: (2nd, 1st), (2nd, 3rd), (1st, 3rd).

Conventions used everywhere in :mod:`alignloop.preference`:

- A ranking is turned into *levels*: lower is better. Rank mode: the rank itself; "F" (fail)
  is a shared level below every ranked completion (``math.inf``). Thumbs mode: "up" = 1,
  "down" = 2, so up beats down and equal thumbs are ties.
- A *vote* is one labeller's outcome on one unordered pair ``(a, b)`` with ``a < b`` (ids
  sorted): ``+1`` a is better, ``0`` tie, ``-1`` b is better. Two F completions tie.
- Training pairs are stricter than votes: ties give no hard pair (optionally a soft 0.5
  pair) and F completions are dropped (optionally kept as losers to every ranked one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from alignloop.records import Ranking

FAIL = math.inf


@dataclass(frozen=True)
class Vote:
    """One labeller's judgement of one unordered pair of completions of one set.

    ``a < b`` (completion ids, sorted); ``outcome`` is +1 (a better), 0 (tie), -1 (b better).
    """

    set_id: str
    labeller: str
    a: str
    b: str
    outcome: int


def levels(ranking: Ranking) -> dict[str, float]:
    """``{completion_id: level}``, lower = better; F -> ``inf``; thumbs up -> 1, down -> 2."""
    if ranking.thumbs:
        return {cid: 1.0 if t == "up" else 2.0 for cid, t in ranking.thumbs.items()}
    return {cid: FAIL if r == "F" else float(r) for cid, r in ranking.ranks.items()}


def fractional_ranks(lv: dict[str, float]) -> dict[str, float]:
    """Positions 1..N with tied completions sharing the mean of their positions.

    ``{"a": 1, "b": 1, "c": inf}`` -> ``{"a": 1.5, "b": 1.5, "c": 3.0}``. This puts rankings
    with different rank scales (or F) on one scale so they can be averaged (Borda).
    """
    order = sorted(lv, key=lambda c: (lv[c], c))
    out: dict[str, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and lv[order[j + 1]] == lv[order[i]]:
            j += 1
        for c in order[i : j + 1]:
            out[c] = (i + j) / 2 + 1
        i = j + 1
    return out


def compare(x: float, y: float) -> int:
    """+1 if level x is better (lower) than y, -1 if worse, 0 if equal."""
    return (x < y) - (x > y)


def votes(rankings: list[Ranking]) -> list[Vote]:
    """Every labeller's outcome on every pair of completions they judged (ties and F included)."""
    out: list[Vote] = []
    for r in rankings:
        lv = levels(r)
        for a, b in combinations(sorted(lv), 2):
            out.append(Vote(r.set_id, r.labeller, a, b, compare(lv[a], lv[b])))
    return out


def ranking_to_pairs(
    ranks: dict[str, int | str], *, soft_ties: bool = False, keep_failed: bool = True
) -> list[tuple[str, str, float]]:
    """All N-choose-2 pairs of one ranking, preferred completion first.

    Args:
        ranks: ``{completion_id: rank | "F"}``, 1 = best, equal ranks = tie.
        soft_ties: a tie gives a ``0.5`` pair instead of nothing.
        keep_failed: an F completion is kept as the loser to every ranked completion
            (two F completions give nothing; the default); ``False`` drops F completions.

    Returns:
        ``[(chosen_id, rejected_id, label)]``: label 1.0 means chosen is preferred (the notes'
        reward ``[1, 0]``); 0.5 marks a soft tie. Ordered by the chosen's rank, then ids.
    """
    lv = {c: FAIL if r == "F" else float(r) for c, r in ranks.items()}
    out: list[tuple[str, str, float]] = []
    ordered = sorted(lv, key=lambda c: (lv[c], c))
    for i, j in combinations(range(len(ordered)), 2):
        a, b = ordered[i], ordered[j]  # lv[a] <= lv[b]
        if lv[b] == FAIL and (lv[a] == FAIL or not keep_failed):
            continue
        if lv[a] < lv[b]:
            out.append((a, b, 1.0))
        elif soft_ties:
            out.append((a, b, 0.5))
    return out


def thumbs_to_pairs(thumbs: dict[str, str], *, soft_ties: bool = False) -> list[tuple[str, str, float]]:
    """Thumbs up/down within one prompt: every "up" beats every "down".

    ``{"a": "up", "b": "down", "c": "down"}`` -> ``[("a", "b", 1.0), ("a", "c", 1.0)]``; two
    equal thumbs are a tie (a 0.5 pair with ``soft_ties``).
    """
    return ranking_to_pairs({c: 1 if t == "up" else 2 for c, t in thumbs.items()}, soft_ties=soft_ties)


def labeller_pairs(
    ranking: Ranking, *, soft_ties: bool = False, keep_failed: bool = True
) -> list[tuple[str, str, float]]:
    """:func:`ranking_to_pairs` or :func:`thumbs_to_pairs`, whichever mode the ranking is in."""
    if ranking.thumbs:
        return thumbs_to_pairs(ranking.thumbs, soft_ties=soft_ties)
    return ranking_to_pairs(ranking.ranks, soft_ties=soft_ties, keep_failed=keep_failed)

"""Consensus of several labellers on one completion set (no torch).

Three ways to combine the labellers' votes on a set (see :mod:`alignloop.preference.pairs`
for votes, levels and F):

- **majority per pair**: for each pair, the share of labellers preferring each side (a tie
  counts half to each); the side with more than half wins and the share is kept as the
  pair's weight, i.e. the soft target ``P(chosen > rejected)``.
- **ranked pairs** (Tideman 1987, as OpenAssistant): lock the pairwise majorities from the
  strongest margin down, skipping any that would close a cycle; the locked graph is the
  consensus order. A Condorcet cycle (a>b, b>c, c>a) is broken at its weakest link.
- **Bradley-Terry**: strengths ``p_i`` with ``P(i > j) = p_i / (p_i + p_j)``, fitted by
  Hunter's (2004) MM algorithm with a weak prior; the fitted probability is the weight.

Which completions are dropped as failures: those at least half of their labellers marked F
(:func:`failed_completions`). A labeller's F on a completion that survives counts as
their lowest rank in the votes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from alignloop.preference.pairs import compare, fractional_ranks, levels
from alignloop.records import Ranking


@dataclass
class PairVotes:
    """All labellers' votes on one unordered pair ``(a, b)``, ``a < b``."""

    a: str
    b: str
    wins_a: int = 0
    ties: int = 0
    wins_b: int = 0
    gap: float = 0.0  # sum over voters of (fractional rank of b - fractional rank of a)
    labellers: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.wins_a + self.ties + self.wins_b

    @property
    def share_a(self) -> float:
        """``(wins_a + ties / 2) / n``: the share of the vote for a."""
        return (self.wins_a + self.ties / 2) / self.n


def failed_completions(rankings: list[Ranking]) -> set[str]:
    """Completions that at least half of the labellers who judged them marked F."""
    marked: dict[str, int] = defaultdict(int)
    judged: dict[str, int] = defaultdict(int)
    for r in rankings:
        for cid in r.ranks or r.thumbs:
            judged[cid] += 1
            marked[cid] += r.ranks.get(cid) == "F"
    return {c for c in judged if marked[c] * 2 >= judged[c]}


def vote_table(rankings: list[Ranking], drop: set[str] = frozenset()) -> dict[tuple[str, str], PairVotes]:
    """Tally the votes of one set's rankings on every pair of completions not in ``drop``."""
    table: dict[tuple[str, str], PairVotes] = {}
    for r in rankings:
        lv = {c: v for c, v in levels(r).items() if c not in drop}
        pos = fractional_ranks(lv)
        for a, b in combinations(sorted(lv), 2):
            pv = table.setdefault((a, b), PairVotes(a, b))
            o = compare(lv[a], lv[b])
            pv.wins_a += o > 0
            pv.ties += o == 0
            pv.wins_b += o < 0
            pv.gap += pos[b] - pos[a]
            pv.labellers.append(r.labeller)
    return table


def majority(
    table: dict[tuple[str, str], PairVotes], soft_ties: bool = False
) -> list[tuple[str, str, float]]:
    """Majority per pair: ``[(chosen, rejected, vote_share)]``; a 50/50 pair only with ``soft_ties``."""
    out = []
    for (a, b), pv in sorted(table.items()):
        s = pv.share_a
        if s > 0.5:
            out.append((a, b, s))
        elif s < 0.5:
            out.append((b, a, 1 - s))
        elif soft_ties:
            out.append((a, b, 0.5))
    return out


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    stack, seen = [start], {start}
    while stack:
        x = stack.pop()
        if x == goal:
            return True
        for y in graph[x] - seen:
            seen.add(y)
            stack.append(y)
    return False


def ranked_pairs(
    table: dict[tuple[str, str], PairVotes], items: list[str]
) -> tuple[list[str], set[tuple[str, str]]]:
    """Tideman's ranked pairs on one set.

    1. For each pair with a non-zero margin ``m = wins_winner - wins_loser`` make an edge
       winner -> loser.
    2. Sort edges by margin, then the winner's votes (both descending), then by the mean
       rank the labellers gave the winner, then by ids (a deterministic tie-break).
    3. Lock each edge unless the loser already reaches the winner (it would close a cycle).

    Returns ``(order, beats)``: the consensus order best-first (a topological order of the
    locked graph, ties broken by mean rank then id) and ``beats``, the set of
    ``(x, y)`` with a locked path x -> y: the pairs the consensus actually orders.
    """
    mean_pos: dict[str, float] = defaultdict(float)
    for pv in table.values():  # gap > 0 means a is ranked above b on average
        mean_pos[pv.a] -= pv.gap
        mean_pos[pv.b] += pv.gap
    edges = []
    for pv in table.values():
        if pv.wins_a == pv.wins_b:
            continue
        w, lo, wv, lv = (
            (pv.a, pv.b, pv.wins_a, pv.wins_b)
            if pv.wins_a > pv.wins_b
            else (pv.b, pv.a, pv.wins_b, pv.wins_a)
        )
        edges.append((-(wv - lv), -wv, mean_pos[w], w, lo))
    graph: dict[str, set[str]] = {c: set() for c in items}
    for *_key, w, lo in sorted(edges):
        if not _reaches(graph, lo, w):
            graph[w].add(lo)
    beats = {(x, y) for x in items for y in items if x != y and _reaches(graph, x, y)}
    order: list[str] = []
    left = set(items)
    while left:  # Kahn's algorithm over the locked graph
        sources = [c for c in left if not any((o, c) in beats for o in left)]
        best = min(sources, key=lambda c: (mean_pos[c], c))
        order.append(best)
        left.remove(best)
    return order, beats


def bradley_terry(
    table: dict[tuple[str, str], PairVotes], items: list[str], prior: float = 1.0, iters: int = 500
) -> dict[str, float]:
    """Bradley-Terry log-strengths of one set's completions (mean 0).

    Model: ``P(i > j) = p_i / (p_i + p_j)``. A tie counts as half a win for each side.
    Hunter's (2004) MM update, with ``W_i`` the wins of i and ``n_ij`` the comparisons::

        p_i <- (W_i + prior) / (sum_j n_ij / (p_i + p_j) + 2 prior / (p_i + 1))

    The ``prior`` terms are one virtual win and one virtual loss (each of weight ``prior``)
    against a fixed virtual opponent of strength 1: they keep the fit finite when a
    completion wins (or loses) every comparison, shrinking strengths toward each other.
    """
    idx = {c: i for i, c in enumerate(items)}
    k = len(items)
    if k == 0:  # every completion was dropped (marked F): nothing to rank
        return {}
    wins = np.zeros((k, k))  # wins[i, j] = times i beat j (ties as halves)
    for pv in table.values():
        i, j = idx[pv.a], idx[pv.b]
        wins[i, j] += pv.wins_a + pv.ties / 2
        wins[j, i] += pv.wins_b + pv.ties / 2
    n = wins + wins.T
    w = wins.sum(axis=1)
    p = np.ones(k)
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(axis=1) + 2 * prior / (p + 1)
        new = (w + prior) / denom
        if np.max(np.abs(np.log(new) - np.log(p))) < 1e-10:
            p = new
            break
        p = new
    s = np.log(p)
    s -= s.mean()
    return {c: float(s[idx[c]]) for c in items}


def bt_probability(s_i: float, s_j: float) -> float:
    """``P(i > j) = sigmoid(s_i - s_j)`` for Bradley-Terry log-strengths."""
    return 1 / (1 + math.exp(s_j - s_i))

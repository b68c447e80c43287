"""Agreement between labellers: Krippendorff's alpha, leave-one-out Kendall tau-b, flagging.

Everything works on plain :class:`~alignloop.records.Ranking` records (rank or thumbs mode).
A ranking's F completions sit on a shared level below all ranked ones (see
:mod:`alignloop.preference.pairs`), so marking a good answer F counts as disagreement.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

from alignloop.preference.pairs import compare, fractional_ranks, levels, votes
from alignloop.records import Ranking

Level = Literal["nominal", "ordinal", "interval", "ratio"]


# --------------------------------------------------------------------------- Krippendorff's alpha
def coincidences(units: Iterable[Sequence[float]]) -> dict[tuple[float, float], float]:
    """Krippendorff's coincidence matrix ``o[c, k]``.

    Each unit is the list of values the coders gave it (missing values left out). A unit with
    ``m_u >= 2`` values adds ``1 / (m_u - 1)`` to ``o[c, k]`` for every ordered pair of its
    values taken from two different coders; units with one value are unpairable and ignored::

        o_ck = sum_u  #{(i, j), i != j : v_ui = c, v_uj = k} / (m_u - 1)
    """
    o: dict[tuple[float, float], float] = defaultdict(float)
    for vals in units:
        m = len(vals)
        if m < 2:
            continue
        for i, j in combinations(range(m), 2):
            o[(vals[i], vals[j])] += 1 / (m - 1)
            o[(vals[j], vals[i])] += 1 / (m - 1)
    return dict(o)


def _delta2(level: Level, values: list[float], n: dict[float, float]) -> dict[tuple[float, float], float]:
    """Squared difference functions of Krippendorff (2011), section E."""
    d: dict[tuple[float, float], float] = {}
    for c in values:
        for k in values:
            if level == "nominal":
                d[(c, k)] = float(c != k)
            elif level == "interval":
                d[(c, k)] = (c - k) ** 2
            elif level == "ratio":
                d[(c, k)] = ((c - k) / (c + k)) ** 2 if c + k else 0.0
            elif level == "ordinal":  # (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2
                lo, hi = min(c, k), max(c, k)
                between = sum(n[g] for g in values if lo <= g <= hi)
                d[(c, k)] = (between - (n[c] + n[k]) / 2) ** 2
            else:
                raise ValueError(f"unknown level of measurement {level!r}")
    return d


def alpha_from_coincidences(o: dict[tuple[float, float], float], level: Level = "nominal") -> float:
    """Krippendorff's alpha from a coincidence matrix.

    ``alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_ck o_ck d2_ck / sum_ck n_c n_k d2_ck``
    with ``n_c = sum_k o_ck`` and ``n = sum_c n_c`` (the pairable values). ``nan`` when there
    is no variation at all (``D_e = 0``) or fewer than two pairable values.
    """
    n_c: dict[float, float] = defaultdict(float)
    for (c, _k), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    values = sorted(n_c)
    if n < 2:
        return math.nan
    d2 = _delta2(level, values, n_c)
    observed = sum(w * d2[ck] for ck, w in o.items())
    expected = sum(n_c[c] * n_c[k] * d2[(c, k)] for c in values for k in values)
    if expected == 0:
        return math.nan
    return 1 - (n - 1) * observed / expected


def krippendorff_alpha(units: Iterable[Sequence[float]], level: Level = "nominal") -> float:
    """Krippendorff's alpha for reliability data given unit by unit (missing values omitted).

    Checked against the worked example of Krippendorff (2011), "Computing Krippendorff's
    Alpha-Reliability" (4 observers, 12 units): nominal 0.743, ordinal 0.815, interval 0.849,
    ratio 0.797.
    """
    return alpha_from_coincidences(coincidences(units), level)


def pairwise_alpha(rankings: list[Ranking], level: Level = "ordinal") -> dict[str, float | int | str]:
    """Alpha over pairwise outcomes for a whole project.

    Unit = one pair of completions of one set; each labeller who judged both gives a value
    ``+1`` (a better), ``0`` (tie), ``-1`` (b better). Which completion of a pair is called
    ``a`` is arbitrary, so the coincidence matrix is symmetrised over the two orientations
    (``o'[c, k] = (o[c, k] + o[-c, -k]) / 2``): the observed disagreement is unchanged and
    the expected disagreement no longer depends on the naming. The default level is
    ordinal (a>b < tie < b>a); with no ties at all it equals the nominal value.
    """
    by_unit: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for v in votes(rankings):
        by_unit[(v.set_id, v.a, v.b)].append(float(v.outcome))
    o = coincidences(by_unit.values())
    sym: dict[tuple[float, float], float] = defaultdict(float)
    for (c, k), w in o.items():
        sym[(c, k)] += w / 2
        sym[(-c + 0.0, -k + 0.0)] += w / 2
    pairable = sum(1 for vals in by_unit.values() if len(vals) >= 2)
    return {
        "value": alpha_from_coincidences(dict(sym), level),
        "level": level,
        "units": pairable,
        "values": int(round(sum(o.values()))),
    }


# --------------------------------------------------------------------------- Kendall tau-b
@dataclass
class TauCounts:
    """Pair counts for Kendall's tau-b, summed over any number of sets."""

    concordant: int = 0
    discordant: int = 0
    tied_x: int = 0  # tied in x only
    tied_y: int = 0  # tied in y only
    tied_xy: int = 0  # tied in both

    def add(self, x: dict[Hashable, float], y: dict[Hashable, float]) -> None:
        """Count the pairs of the items present in both ``x`` and ``y`` (lower = better)."""
        items = sorted(set(x) & set(y), key=str)
        for a, b in combinations(items, 2):
            sx, sy = compare(x[a], x[b]), compare(y[a], y[b])
            if sx == 0 and sy == 0:
                self.tied_xy += 1
            elif sx == 0:
                self.tied_x += 1
            elif sy == 0:
                self.tied_y += 1
            elif sx == sy:
                self.concordant += 1
            else:
                self.discordant += 1

    @property
    def tau_b(self) -> float:
        """``(C - D) / sqrt((C + D + T_x)(C + D + T_y))``; ``nan`` if either side is all ties."""
        c, d = self.concordant, self.discordant
        den = math.sqrt((c + d + self.tied_x) * (c + d + self.tied_y))
        return (c - d) / den if den else math.nan

    @property
    def n(self) -> int:
        return self.concordant + self.discordant + self.tied_x + self.tied_y + self.tied_xy


def kendall_tau_b(x: dict[Hashable, float], y: dict[Hashable, float]) -> float:
    """Kendall's tau-b between two scorings of the same items (lower = better; ties allowed)."""
    t = TauCounts()
    t.add(x, y)
    return t.tau_b


def others_consensus(rankings: list[Ranking], exclude: str) -> dict[str, float]:
    """Mean fractional rank (Borda) of one set's completions over every labeller but ``exclude``.

    Lower = better; completions only some of the others judged are averaged over those.
    Empty when nobody else labelled the set.
    """
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in rankings:
        if r.labeller == exclude:
            continue
        for cid, pos in fractional_ranks(levels(r)).items():
            sums[cid] += pos
            counts[cid] += 1
    return {c: sums[c] / counts[c] for c in sums}


def leave_one_out_tau(rankings: list[Ranking]) -> dict[str, TauCounts]:
    """Per labeller: Kendall tau-b counts against the consensus of the *other* labellers.

    For each set a labeller judged, the others' consensus is their mean fractional rank
    (:func:`others_consensus`); the pair counts are pooled over all the labeller's sets
    before the ratio (a stratified tau-b: sets with few completions do not get the same
    say as an all-pairs set, and an all-tie set adds nothing). If a labeller judged a set
    twice, the latest ranking (by ``created_at``, then order) counts.
    """
    by_set = _latest_by_set(rankings)
    out: dict[str, TauCounts] = defaultdict(TauCounts)
    for rs in by_set.values():
        for r in rs:
            others = others_consensus(rs, r.labeller)
            if others:
                out[r.labeller].add(levels(r), others)
            else:
                out[r.labeller]  # noqa: B018 -- a labeller alone on every set still appears
    return dict(out)


def _latest_by_set(rankings: list[Ranking]) -> dict[str, list[Ranking]]:
    latest: dict[tuple[str, str], tuple[int, Ranking]] = {}
    for i, r in enumerate(rankings):
        key = (r.set_id, r.labeller)
        if key not in latest or (r.created_at, i) >= (latest[key][1].created_at, latest[key][0]):
            latest[key] = (i, r)
    by_set: dict[str, list[Ranking]] = defaultdict(list)
    for _i, r in sorted(latest.values(), key=lambda t: t[0]):
        by_set[r.set_id].append(r)
    return dict(by_set)


def latest_rankings(rankings: list[Ranking]) -> list[Ranking]:
    """One ranking per (set, labeller): the latest one (by ``created_at``, then file order)."""
    return [r for rs in _latest_by_set(rankings).values() for r in rs]


# --------------------------------------------------------------------------- per-labeller rates
def tie_rate(rankings: list[Ranking]) -> float | None:
    """Share of pairs of ranked (non-F) completions given equal ranks, over rank-mode rankings."""
    ties = total = 0
    for r in rankings:
        ranked = [v for v in r.ranks.values() if v != "F"]
        for x, y in combinations(ranked, 2):
            total += 1
            ties += x == y
    return ties / total if total else None


def f_rate(rankings: list[Ranking]) -> float | None:
    """Share of completions marked F, over rank-mode rankings."""
    n = sum(len(r.ranks) for r in rankings)
    return sum(v == "F" for r in rankings for v in r.ranks.values()) / n if n else None


# --------------------------------------------------------------------------- flagging
@dataclass
class FlagRule:
    """When a labeller's agreement is "far below the rest".

    For each labeller L with at least ``min_pairs`` compared pairs:

    1. ``tau_L`` = L's leave-one-out tau-b (L against the consensus of everyone else).
    2. The baseline: drop L, and compute every other labeller's leave-one-out tau-b within
       the remaining panel -- how well the others agree among themselves, without L.
    3. Flag L when ``tau_L < median(baseline) - max(min_gap, k * 1.4826 * MAD(baseline))``.

    Step 2 matters in small panels: with three labellers a confused one drags down the
    careful ones' tau (their "others" include the confused one), so comparing against the
    plain leave-one-out taus of the others would hide the gap. The ``min_gap`` floor keeps
    labellers whose agreement differs by noise (MAD ~ 0 with two others) from being flagged.
    Needs at least ``min_others`` other labellers with enough pairs.
    """

    min_gap: float = 0.25
    k: float = 3.0
    min_pairs: int = 20
    min_others: int = 2
    describe: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.describe = (
            f"flag a labeller whose leave-one-out Kendall tau-b is below median(B) - "
            f"max({self.min_gap}, {self.k} x 1.4826 x MAD(B)), where B are the other labellers' "
            f"leave-one-out tau-b computed without that labeller; needs >= {self.min_pairs} compared "
            f"pairs and >= {self.min_others} other labellers"
        )


def _usable(t: TauCounts, rule: FlagRule) -> bool:
    return t.n >= rule.min_pairs and not math.isnan(t.tau_b)


def flag_labellers(rankings: list[Ranking], rule: FlagRule | None = None) -> dict[str, str | None]:
    """``{labeller: reason or None}`` under :class:`FlagRule`."""
    rule = rule or FlagRule()
    rankings = latest_rankings(rankings)
    taus = leave_one_out_tau(rankings)
    out: dict[str, str | None] = {}
    for name, t in sorted(taus.items()):
        out[name] = None
        if not _usable(t, rule):
            continue
        rest = leave_one_out_tau([r for r in rankings if r.labeller != name])
        base = [x.tau_b for x in rest.values() if _usable(x, rule)]
        if len(base) < rule.min_others:
            continue
        med = statistics.median(base)
        mad = statistics.median(abs(v - med) for v in base)
        gap = max(rule.min_gap, rule.k * 1.4826 * mad)
        if t.tau_b < med - gap:
            out[name] = (
                f"leave-one-out tau-b {t.tau_b:.2f} over {t.n} pairs is {med - t.tau_b:.2f} below "
                f"{med:.2f}, the median agreement of the other labellers among themselves "
                f"(threshold {gap:.2f}): may have misunderstood the instructions"
            )
    return out


# --------------------------------------------------------------------------- against a reward model
Scores = dict[tuple[str, str], float]  # {(set_id, completion_id): reward}


def _agrees(outcome: int, s_a: float, s_b: float) -> float:
    """1 when scores order a pair as the vote does (``outcome`` +1: a better), 1/2 on a score tie, else 0."""
    d = s_a - s_b
    return 0.5 if d == 0 else float(d * outcome > 0)


def model_agreement(
    rankings: list[Ranking], scores: Scores, own: dict[str, Scores] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Per labeller: how their choices sit against a pooled reward model, their own output and the others.

    A labeller's *ordered pairs* are their votes with an outcome (no ties; F below every ranked
    completion, :mod:`alignloop.preference.pairs`) on completions ``scores`` scores. For a pair
    ``(a, b)`` with outcome ``o`` and scores ``s``, ``agree = 1[(s_a - s_b) * o > 0]`` (1/2 when
    ``s_a = s_b``). Returned per labeller (every share is a mean of ``agree`` over its pairs)::

        {"pairs": n,          "model": share the pooled model orders as they did,
         "clear_pairs": n_c,  "model_clear": the same on the model's *clear* pairs: those with
                              |s_a - s_b| >= the median |s_a - s_b| over every labeller's pairs,
         "consensus_pairs": n_k, "consensus": share the others' mean rank (:func:`others_consensus`)
                              orders as they did, over the pairs the others order,
         "own_pairs": n_o,    "own": the same for ``own[labeller]`` (their output of a
                              labeller-conditioned model), None without one}

    Shares are None over no pairs. Only each labeller's latest ranking of a set counts.
    """
    own = own or {}
    by_set = _latest_by_set(rankings)
    rows: list[tuple[str, float, float, float | None, float | None]] = []  # (who, |gap|, model, others, own)
    for rs in by_set.values():
        for r in rs:
            others = others_consensus(rs, r.labeller)
            mine = own.get(r.labeller)
            lv = levels(r)
            for a, b in combinations(sorted(lv), 2):
                o = compare(lv[a], lv[b])
                ka, kb = (r.set_id, a), (r.set_id, b)
                if not o or ka not in scores or kb not in scores:
                    continue
                k = compare(others[a], others[b]) if a in others and b in others else 0
                rows.append(
                    (
                        r.labeller,
                        abs(scores[ka] - scores[kb]),
                        _agrees(o, scores[ka], scores[kb]),
                        float(k == o) if k else None,
                        _agrees(o, mine[ka], mine[kb]) if mine and ka in mine and kb in mine else None,
                    )
                )
    cut = statistics.median(x[1] for x in rows) if rows else 0.0

    def share(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    out: dict[str, dict[str, float | int | None]] = {}
    for name in sorted({r.labeller for r in rankings}):
        mine_rows = [x for x in rows if x[0] == name]
        clear = [m for _, g, m, _, _ in mine_rows if g >= cut and g > 0]
        cons = [c for *_, c, _ in mine_rows if c is not None]
        own_ = [w for *_, w in mine_rows if w is not None]
        model = [m for _, _, m, _, _ in mine_rows]
        out[name] = {
            "pairs": len(model),
            "model": share(model),
            "clear_pairs": len(clear),
            "model_clear": share(clear),
            "consensus_pairs": len(cons),
            "consensus": share(cons),
            "own_pairs": len(own_),
            "own": share(own_),
        }
    return out


@dataclass(frozen=True)
class ReadingRule:
    """How :func:`read_agreement` tells a different taste from misread instructions.

    - *misread*: on the pooled model's clear pairs the labeller agrees with it less than ``sure``,
      and (when others judged their sets) agrees with the others' consensus less than ``sure``:
      they disagree where the instructions leave little room.
    - *different taste*: not misread, and either their own output of a labeller-conditioned model
      beats the pooled model on their pairs by at least ``gap`` (consistent, but not the pool's),
      or (no own output) the pooled model agrees with them ``gap`` less than the other labellers'
      median while agreeing on its clear pairs: they differ on close calls only.
    - labellers with fewer than ``min_pairs`` ordered pairs are not read.
    """

    sure: float = 0.7
    gap: float = 0.03
    min_pairs: int = 20


def read_agreement(
    rows: dict[str, dict[str, float | int | None]], rule: ReadingRule | None = None
) -> dict[str, str]:
    """A plain reading of each labeller's :func:`model_agreement` row (see :class:`ReadingRule`)."""
    rule = rule or ReadingRule()
    out: dict[str, str] = {}
    for name, r in rows.items():
        n, model, clear, cons, own = r["pairs"], r["model"], r["model_clear"], r["consensus"], r["own"]
        if model is None or int(n or 0) < rule.min_pairs:
            out[name] = f"too few ordered pairs to read ({n})"
            continue
        typical = [
            float(x["model"])  # type: ignore[arg-type]
            for k, x in rows.items()
            if k != name and x["model"] is not None and int(x["pairs"] or 0) >= rule.min_pairs
        ]
        if clear is not None and clear < rule.sure and (cons is None or cons < rule.sure):
            with_others = f" and with the other labellers on {cons:.0%}" if cons is not None else ""
            out[name] = (
                f"agrees with the pooled model on only {clear:.0%} of the pairs it is sure of{with_others}: "
                "may have misread the instructions"
            )
        elif own is not None and own - model >= rule.gap:
            out[name] = (
                f"a different taste: their own output agrees with {own:.0%} of their pairs, "
                f"the pooled model with {model:.0%}"
            )
        elif own is None and typical and model < statistics.median(typical) - rule.gap:
            out[name] = (
                f"likely a different taste: the pooled model agrees with {model:.0%} of their pairs "
                f"(others' median {statistics.median(typical):.0%}) but with "
                f"{'n/a' if clear is None else f'{clear:.0%}'} of those it is sure of; "
                "per_labeller=true in reward training tells"
            )
        else:
            out[name] = "in line with the pooled model"
    return out

"""Ranking -> pairs, Krippendorff's alpha, Kendall tau-b, flagging: hand-computed cases."""

from __future__ import annotations

import math

import pytest

from alignloop.preference.agreement import (
    FlagRule,
    TauCounts,
    f_rate,
    flag_labellers,
    kendall_tau_b,
    krippendorff_alpha,
    leave_one_out_tau,
    pairwise_alpha,
    tie_rate,
)
from alignloop.preference.pairs import fractional_ranks, ranking_to_pairs, thumbs_to_pairs, votes
from alignloop.preference.report import feedback_report, report_html
from alignloop.records import CompletionSet, Ranking


def R(set_id, labeller, **ranks):
    return Ranking(set_id=set_id, labeller=labeller, ranks=ranks)


def test_course_notes_example_three_pairs_preferred_first():
    # the notes: three completions (purple, yellow, green) ranked 2, 1, 3
    pairs = ranking_to_pairs({"purple": 2, "yellow": 1, "green": 3})
    assert pairs == [("yellow", "purple", 1.0), ("yellow", "green", 1.0), ("purple", "green", 1.0)]
    assert len(pairs) == math.comb(3, 2)


def test_n_choose_2():
    ranks = {f"c{i}": i + 1 for i in range(6)}
    pairs = ranking_to_pairs(ranks)
    assert len(pairs) == 15 and all(ranks[a] < ranks[b] for a, b, _ in pairs)


def test_ties_give_no_hard_pair_or_a_soft_one():
    ranks = {"a": 1, "b": 1, "c": 2}
    assert ranking_to_pairs(ranks) == [("a", "c", 1.0), ("b", "c", 1.0)]
    assert ranking_to_pairs(ranks, soft_ties=True) == [("a", "b", 0.5), ("a", "c", 1.0), ("b", "c", 1.0)]


def test_f_dropped_or_kept_as_loser():
    ranks = {"a": 2, "b": "F", "c": 1, "d": "F"}
    assert ranking_to_pairs(ranks, keep_failed=False) == [("c", "a", 1.0)]
    kept = ranking_to_pairs(ranks)  # the default
    # F loses to both ranked completions; two F completions give nothing
    assert set(kept) == {("c", "a", 1.0), ("c", "b", 1.0), ("c", "d", 1.0), ("a", "b", 1.0), ("a", "d", 1.0)}


def test_thumbs_up_beats_down():
    pairs = thumbs_to_pairs({"a": "down", "b": "up", "c": "down", "d": "up"})
    assert set(pairs) == {("b", "a", 1.0), ("b", "c", 1.0), ("d", "a", 1.0), ("d", "c", 1.0)}
    assert len(thumbs_to_pairs({"a": "up", "b": "up"})) == 0
    assert thumbs_to_pairs({"a": "up", "b": "up"}, soft_ties=True) == [("a", "b", 0.5)]


def test_votes_and_fractional_ranks():
    assert fractional_ranks({"a": 1, "b": 1, "c": math.inf, "d": math.inf}) == {
        "a": 1.5,
        "b": 1.5,
        "c": 3.5,
        "d": 3.5,
    }
    v = votes([R("s", "x", a=2, b=1, c="F")])
    assert [(x.a, x.b, x.outcome) for x in v] == [("a", "b", -1), ("a", "c", 1), ("b", "c", 1)]


# Krippendorff (2011) "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units
_K = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


@pytest.mark.parametrize(
    "level,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)]
)
def test_alpha_matches_published_worked_example(level, published):
    units = [[v for v in col if v is not None] for col in zip(*_K, strict=True)]
    assert krippendorff_alpha(units, level) == pytest.approx(published, abs=5e-4)


def test_alpha_two_coders_binary_hand_computed():
    # 2 coders, 4 units: (1,1) (0,0) (1,0) (1,1): o11=4, o00=2, o01=o10=1; n1=5, n0=3, n=8
    # nominal: alpha = 1 - (n-1) * o01*2 / (2 * n0 * n1) = 1 - 7*2/30 = 0.5333
    units = [[1, 1], [0, 0], [1, 0], [1, 1]]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(1 - 14 / 30)


def test_pairwise_alpha_perfect_and_reversed():
    same = [R("s", "x", a=1, b=2, c=3), R("s", "y", a=1, b=2, c=3)]
    assert pairwise_alpha(same)["value"] == pytest.approx(1.0)
    rev = [R("s", "x", a=1, b=2, c=3), R("s", "y", a=3, b=2, c=1)]
    assert pairwise_alpha(rev)["value"] < 0
    # which completion is named "a" must not matter: rename ids so every pair flips
    flipped = [R("s", "x", z=1, y=2, w=3), R("s", "y", z=1, y=3, w=2)]
    orig = [R("s", "x", a=1, b=2, c=3), R("s", "y", a=1, b=3, c=2)]
    assert pairwise_alpha(flipped)["value"] == pytest.approx(pairwise_alpha(orig)["value"])


def test_kendall_tau_b_hand_computed():
    # x: a<b<c<d ; y: a<b tie c ... counts: pairs ab,ac,ad conc; bc tied_y; bd conc; cd disc
    x = {"a": 1, "b": 2, "c": 3, "d": 4}
    y = {"a": 1, "b": 2, "c": 2, "d": 1.5}
    # ab C, ac C, ad C, bc Ty, bd D (x: b<d, y: d<b), cd D
    t = TauCounts()
    t.add(x, y)
    assert (t.concordant, t.discordant, t.tied_y) == (3, 2, 1)
    assert kendall_tau_b(x, y) == pytest.approx((3 - 2) / math.sqrt(6 * 5))
    assert kendall_tau_b(x, x) == 1.0
    assert kendall_tau_b(x, {k: -v for k, v in x.items()}) == -1.0


def test_leave_one_out_rates_and_flag():
    rankings = []
    for s in range(10):
        rankings += [
            R(f"s{s}", "ann", a=1, b=2, c=3, d=4),
            R(f"s{s}", "bob", a=1, b=2, c=4, d=3),
            R(f"s{s}", "cat", a=1, b=2, c=3, d=4),
            R(f"s{s}", "zed", a=4, b=3, c="F", d=1),  # reversed and fails a decent answer
        ]
    taus = leave_one_out_tau(rankings)
    assert taus["zed"].tau_b < 0 < taus["bob"].tau_b
    flags = flag_labellers(rankings, FlagRule(min_pairs=20))
    assert flags["zed"] and "median agreement of the other labellers among themselves" in flags["zed"]
    assert not flags["ann"] and not flags["bob"] and not flags["cat"]
    # two labellers who disagree: nobody can tell which one is wrong -> no flag
    assert not any(flag_labellers([r for r in rankings if r.labeller in ("ann", "zed")]).values())
    assert tie_rate([R("s", "x", a=1, b=1, c=2)]) == pytest.approx(1 / 3)
    assert f_rate([R("s", "x", a=1, b="F", c=2, d="F")]) == 0.5


def test_feedback_report_is_json_and_html_escapes():
    import json

    sets = [
        CompletionSet(prompt_id=f"s{s}", prompt="p", completions=[{"id": c, "text": c} for c in "abcd"])
        for s in range(8)
    ]
    rankings = []
    for s in range(8):
        rankings += [
            R(f"s{s}", "ann", a=1, b=2, c=3, d=4),
            R(f"s{s}", "<b>bob</b>", a=1, b=2, c=4, d=3),
            R(f"s{s}", "cat", a=1, b=1, c=3, d=4),
            R(f"s{s}", "zed", a=4, b=3, c=2, d=1),
        ]
    rep = feedback_report(sets, rankings)
    json.dumps(rep, allow_nan=False)
    assert rep["n_sets"] == 8 and rep["n_sets_multi"] == 8 and rep["n_rankings"] == 32
    assert [f["name"] for f in rep["flagged"]] == ["zed"]
    cat = next(r for r in rep["labellers"] if r["name"] == "cat")
    assert cat["tie_rate"] == pytest.approx(1 / 6, abs=1e-4)
    page = report_html(rep, png=b"x")
    assert "&lt;b&gt;bob&lt;/b&gt;" in page and "<b>bob</b>" not in page


def test_flag_baseline_excludes_the_suspect():
    """Three labellers, one random: the careful ones' plain LOO tau is dragged down by the random
    one, but the baseline for judging the random one is how the careful two agree without it."""
    import random

    rng = random.Random(3)
    rankings = []
    for s in range(40):
        gold = [rng.gauss(0, 1) for _ in range(4)]
        for name, sd in (("ann", 0.3), ("bob", 0.6), ("zed", None)):
            sc = [rng.gauss(0, 1) for _ in gold] if sd is None else [g + rng.gauss(0, sd) for g in gold]
            order = sorted(range(4), key=lambda i: -sc[i])
            rankings.append(R(f"s{s}", name, **{f"c{i}": order.index(i) + 1 for i in range(4)}))
    flags = flag_labellers(rankings)
    assert flags["zed"] and not flags["ann"] and not flags["bob"]


def test_report_thumbs_and_relabelled_sets():
    rankings = []
    for s in range(12):
        rankings += [
            Ranking(set_id=f"s{s}", labeller="ann", thumbs={"a": "up", "b": "down", "c": "down"}),
            Ranking(set_id=f"s{s}", labeller="bob", thumbs={"a": "up", "b": "up", "c": "down"}),
            R(f"s{s}", "cyd", a=1, b=2, c=3),
        ]
    # a re-submission: only cyd's latest ranking of s0 counts
    rankings.append(R("s0", "cyd", a=3, b=2, c=1).model_copy(update={"created_at": "2030-01-01T00:00:00"}))
    rankings[2] = rankings[2].model_copy(update={"created_at": "2020-01-01T00:00:00"})
    rep = feedback_report([], rankings)
    assert rep["n_rankings"] == 36
    ann = next(r for r in rep["labellers"] if r["name"] == "ann")
    assert ann["n_thumbs"] == 12 and ann["tie_rate"] is None and ann["tau_b"] > 0.5
    assert rep["alpha"]["value"] is not None and 0 < rep["alpha"]["value"] < 1

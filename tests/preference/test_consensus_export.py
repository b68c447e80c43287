"""Consensus (majority, ranked pairs, Bradley-Terry) and the export formats, by hand."""

from __future__ import annotations

import pytest

from alignloop.preference.consensus import (
    bradley_terry,
    bt_probability,
    failed_completions,
    majority,
    ranked_pairs,
    vote_table,
)
from alignloop.preference.export import export_pairs, group_pairs, set_pairs
from alignloop.records import CompletionSet, Pair, Ranking


def R(labeller, set_id="s", **ranks):
    return Ranking(set_id=set_id, labeller=labeller, ranks=ranks)


def ballots(spec):
    """[(count, "ABC")] -> rankings, best first."""
    out = []
    for count, order in spec:
        for _ in range(count):
            out.append(R(f"v{len(out)}", **{c: i + 1 for i, c in enumerate(order)}))
    return out


def test_majority_keeps_vote_share_as_weight():
    rs = [R("x", a=1, b=2, c=3), R("y", a=2, b=1, c=3), R("z", a=1, b=1, c=2)]
    pairs = majority(vote_table(rs))
    # a vs b: x a, y b, z tie -> 1.5 / 3 = 0.5 -> no hard pair; a,b beat c unanimously
    assert pairs == [("a", "c", 1.0), ("b", "c", 1.0)]
    assert majority(vote_table(rs), soft_ties=True)[0] == ("a", "b", 0.5)
    rs2 = [R("x", a=1, b=2), R("y", a=1, b=2), R("z", a=2, b=1)]
    assert majority(vote_table(rs2)) == [("a", "b", pytest.approx(2 / 3))]


def test_ranked_pairs_breaks_a_condorcet_cycle_at_its_weakest_link():
    # 2: A>B>C, 3: B>C>A, 2: C>A>B  ->  margins A>B 1, B>C 3, C>A 3: a cycle A>B>C>A
    rs = ballots([(2, "ABC"), (3, "BCA"), (2, "CAB")])
    table = vote_table(rs)
    # plain majority per pair keeps all three edges of the cycle
    assert majority(table) == [
        ("A", "B", pytest.approx(4 / 7)),
        ("C", "A", pytest.approx(5 / 7)),
        ("B", "C", pytest.approx(5 / 7)),
    ]
    order, beats = ranked_pairs(table, ["A", "B", "C"])
    # lock B>C (3), C>A (3); A>B (1) would close the cycle -> skipped
    assert order == ["B", "C", "A"]
    assert beats == {("B", "C"), ("C", "A"), ("B", "A")}


def test_ranked_pairs_transitive_and_perfect_cycle_deterministic():
    rs = ballots([(3, "ABCD"), (2, "DCBA")])
    order, beats = ranked_pairs(vote_table(rs), list("ABCD"))
    assert order == list("ABCD") and len(beats) == 6
    cyc = ballots([(1, "ABC"), (1, "BCA"), (1, "CAB")])  # every margin 1: a tie everywhere
    o1, b1 = ranked_pairs(vote_table(cyc), list("ABC"))
    o2, b2 = ranked_pairs(vote_table(list(reversed(cyc))), list("CBA"))
    assert o1 == o2 and b1 == b2 and len(b1) == 3  # a total order, same whatever the input order


def test_bradley_terry_fit():
    # a beats b 3:1 and nothing else: the MLE without prior is p_a/p_b = 3; the prior shrinks it
    rs = [R("w", a=1, b=2), R("x", a=1, b=2), R("y", a=1, b=2), R("z", a=2, b=1)]
    s = bradley_terry(vote_table(rs), ["a", "b"], prior=1e-9)
    assert bt_probability(s["a"], s["b"]) == pytest.approx(0.75, abs=1e-4)
    s1 = bradley_terry(vote_table(rs), ["a", "b"], prior=1.0)
    assert 0.5 < bt_probability(s1["a"], s1["b"]) < 0.75
    # a unanimous winner stays finite
    s2 = bradley_terry(vote_table(rs[:3]), ["a", "b"])
    assert 0.5 < bt_probability(s2["a"], s2["b"]) < 1
    # order of a 3-item set follows the votes
    s3 = bradley_terry(vote_table(ballots([(3, "ABC"), (1, "BAC")])), list("ABC"))
    assert s3["A"] > s3["B"] > s3["C"]


def test_failed_by_majority_dropped_or_kept_as_loser():
    rs = [R("x", a=1, b="F", c=2), R("y", a=2, b="F", c=1), R("z", a=1, b=2, c="F")]
    assert failed_completions(rs) == {"b"}
    pairs = set_pairs(rs, "majority", keep_failed=False)
    # z's F on c counts as z's lowest rank: a beats c 2:1
    assert [(p["chosen"], p["rejected"], round(p["weight"], 3)) for p in pairs] == [("a", "c", 0.667)]
    kept = set_pairs(rs, "majority")  # the default: b (F by 2 of 3) loses to every survivor
    assert {(p["chosen"], p["rejected"]) for p in kept} == {("a", "c"), ("a", "b"), ("c", "b")}
    assert {(p["chosen"], p["rejected"]) for p in kept if p.get("failed")} == {("a", "b"), ("c", "b")}


def test_per_labeller_pairs_method_none_and_thumbs():
    rs = [
        R("x", a=2, b=1, c=3),
        Ranking(set_id="s", labeller="t", thumbs={"a": "up", "b": "down", "c": "down"}),
    ]
    pairs = set_pairs(rs, "none")
    assert [(p["chosen"], p["rejected"], p["labellers"]) for p in pairs] == [
        ("b", "a", ["x"]),
        ("b", "c", ["x"]),
        ("a", "c", ["x"]),
        ("a", "b", ["t"]),
        ("a", "c", ["t"]),
    ]


def _sets(space=" "):
    return [
        CompletionSet(
            prompt_id="p1",
            prompt="My house is too hot.",
            completions=[
                {"id": "c1", "text": space + "There is nothing you can do."},
                {"id": "c2", "text": space + "You can open the window."},
                {"id": "c3", "text": space + "It is not too hot."},
            ],
        )
    ]


def test_export_trl_rows_and_grouped():
    rs = [
        R("ann", "p1", c1=2, c2=1, c3=3),
        R("bob", "p1", c1=2, c2=1, c3=3),
        R("cyd", "p1", c1=3, c2=1, c3=2),
        R("old", "nope", a=1, b=2),
    ]
    rows, counts = export_pairs(_sets(), rs, "majority")
    assert counts == {
        "sets": 1,
        "pairs": 3,
        "failed_pairs": 0,
        "unknown_sets": 1,
        "unknown_completions": 0,
        "empty_completions": 0,
        "all_failed_sets": 0,
        "identical": 0,
        "converted_texts": 0,
    }
    first = rows[0]
    assert first["prompt"] == "My house is too hot." and first["source"] == "alignloop:majority"
    assert {(r["chosen_id"], r["rejected_id"]): r["weight"] for r in rows} == {
        ("c2", "c1"): 1.0,
        ("c2", "c3"): 1.0,
        ("c1", "c3"): pytest.approx(2 / 3, abs=1e-6),
    }
    assert all("margin" not in r for r in rows)
    for r in rows:
        Pair.model_validate(r)  # the record contract
    rows_m, _ = export_pairs(_sets(), rs, "majority", margins=True)
    assert next(r for r in rows_m if r["chosen_id"] == "c2" and r["rejected_id"] == "c3")[
        "margin"
    ] == pytest.approx((2 + 2 + 1) / 3)
    ex, _ = export_pairs(_sets(), rs, "majority", exclude_labellers={"cyd"})
    assert all("cyd" not in r["labellers"] for r in ex)
    (g,) = group_pairs(rows)
    assert g["prompt_id"] == "p1" and len(g["completions"]) == 3 and len(g["pairs"]) == 3
    for i, j, w in g["pairs"]:
        assert any(
            r["chosen"] == g["completions"][i] and r["rejected"] == g["completions"][j] and r["weight"] == w
            for r in rows
        )
    assert g["labellers"] == ["ann", "bob", "cyd"]


def test_export_never_writes_identical_texts_and_writes_trls_convention():
    rs = [R("ann", "p1", c1=2, c2=1, c3=3), R("bob", "p1", c1=2, c2=1, c3=3)]
    dup = _sets()
    dup[0].completions[2].text = dup[0].completions[0].text  # stored before import collapsed repeats
    rows, counts = export_pairs(dup, rs, "majority")
    assert counts["identical"] == 1 and counts["pairs"] == 2 == len(rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    # a database filled before the convention (no leading spaces) exports TRL's texts
    rows, counts = export_pairs(_sets(space=""), rs, "majority")
    assert counts["converted_texts"] == 6
    assert all(r["chosen"].startswith(" ") and r["rejected"].startswith(" ") for r in rows)


@pytest.mark.parametrize("method", ["majority", "tideman", "bradley-terry", "none"])
def test_every_method_exports_preferred_first(method):
    rs = [R("ann", "p1", c1=2, c2=1, c3=3), R("bob", "p1", c1=2, c2=1, c3=3)]
    rows, _ = export_pairs(_sets(), rs, method)
    got = {(r["chosen_id"], r["rejected_id"]) for r in rows}
    assert got == {("c2", "c1"), ("c2", "c3"), ("c1", "c3")}
    assert all(r["weight"] > 0.5 for r in rows)


def test_an_empty_f_completion_kept_as_loser_is_skipped_and_counted():
    """``keep_failed`` keeps F completions as losers; one that is empty (the model's EOS alone) would
    make an unreadable pair (``Pair`` refuses empty text), so it is skipped and counted instead."""
    s = CompletionSet(
        prompt_id="s", prompt="what is a dog ?",
        completions=[{"id": "a", "text": "a dog is an animal ."}, {"id": "b", "text": ""},
                     {"id": "c", "text": "a dog is a plant ."}],
    )  # fmt: skip
    rs = [R("x", a=1, b="F", c=2), R("y", a=1, b="F", c=2)]
    rows, counts = export_pairs([s], rs)  # keep_failed is the default
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows] == [("a", "c")]
    assert counts["empty_completions"] == 2 and counts["pairs"] == 1 and counts["failed_pairs"] == 0
    assert all(Pair(**{k: r[k] for k in ("prompt", "chosen", "rejected")}) for r in rows)


@pytest.mark.parametrize("method", ["majority", "none"])
def test_f_loses_to_every_ranked_completion_by_default_and_is_counted(method):
    rs = [R("ann", "p1", c1=2, c2=1, c3="F"), R("bob", "p1", c1=2, c2=1, c3="F")]
    rows, counts = export_pairs(_sets(), rs, method)
    failed = {(r["chosen_id"], r["rejected_id"]) for r in rows if r["rejected_id"] == "c3"}
    assert failed == {("c1", "c3"), ("c2", "c3")}
    # marked, so a reward model can treat these easy pairs apart (reward train's failed_label)
    assert all(r.get("failed") is (r["rejected_id"] == "c3" or None) for r in rows)
    per = 2 if method == "none" else 1  # one row per labeller under none
    assert counts["failed_pairs"] == 2 * per and counts["pairs"] == 3 * per == len(rows)
    off, off_counts = export_pairs(_sets(), rs, method, keep_failed=False)
    assert {(r["chosen_id"], r["rejected_id"]) for r in off} == {("c2", "c1")}
    assert off_counts["failed_pairs"] == 0 and off_counts["pairs"] == per

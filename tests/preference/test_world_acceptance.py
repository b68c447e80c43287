"""Acceptance in the embedded world: three simulated labellers (careful, noisy, confused) rank
completion sets; the confused one is flagged and the consensus pairs beat the best single labeller
against the gold judge.

Completions are drawn from the world's response mixture (``grammar.sample_response``: what the
shipped base model is trained to reproduce), so this needs no model; the labellers and the gold
judge are the world's own.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from alignloop import world
from alignloop.preference.export import export_pairs
from alignloop.preference.report import feedback_report
from alignloop.records import CompletionSet, Ranking
from alignloop.world import grammar

SEEDS = range(20)
N_SETS, K = 40, 4


def _labelled(seed: int):
    rng = random.Random(seed)
    panel = world.default_panel(seed)
    sets, rankings = [], []
    for rec in world.prompts("train", n=N_SETS, seed=seed):
        wp = world.parse_prompt(rec["prompt"])
        comps = [{"id": f"{rec['id']}-{i}", "text": grammar.sample_response(wp, rng)[1]} for i in range(K)]
        sets.append(CompletionSet(prompt_id=rec["id"], prompt=rec["prompt"], completions=comps))
        for p in panel:
            ranks = world.rank(p, rec["prompt"], comps, rng)
            rankings.append(Ranking(set_id=rec["id"], labeller=p.name, ranks=ranks))
    return panel, sets, rankings


def _gold_agreement(rows) -> tuple[int, int]:
    """(pairs whose chosen the gold judge scores higher, pairs the gold judge does not tie)."""
    hit = n = 0
    for r in rows:
        a, b = world.judge(r["prompt"], r["chosen"]).score, world.judge(r["prompt"], r["rejected"]).score
        if a != b:
            n += 1
            hit += a > b
    return hit, n


@pytest.fixture(scope="module")
def outcomes():
    out = []
    for seed in SEEDS:
        panel, sets, rankings = _labelled(seed)
        rep = feedback_report(sets, rankings)
        flagged = {f["name"] for f in rep["flagged"]}
        consensus, _ = export_pairs(sets, rankings, "majority", exclude_labellers=flagged)
        own, _ = export_pairs(sets, rankings, "none")
        singles = {p.kind: _gold_agreement([r for r in own if r["labellers"] == [p.name]]) for p in panel}
        out.append(
            {
                "kinds": {p.name: p.kind for p in panel},
                "flagged": flagged,
                "consensus": _gold_agreement(consensus),
                "singles": singles,
            }
        )
    return out


def test_confused_labeller_flagged_careful_ones_not(outcomes):
    confused_flagged = sum(any(o["kinds"][n] == "confused" for n in o["flagged"]) for o in outcomes)
    others = Counter(o["kinds"][n] for o in outcomes for n in o["flagged"] if o["kinds"][n] != "confused")
    assert confused_flagged >= 19, f"confused labeller flagged in only {confused_flagged}/20 seeds"
    assert all(v <= 1 for v in others.values()), f"careful/noisy labellers flagged: {dict(others)}"


def test_consensus_pairs_beat_the_best_single_labeller(outcomes):
    hit = sum(o["consensus"][0] for o in outcomes)
    n = sum(o["consensus"][1] for o in outcomes)
    single = {
        kind: sum(o["singles"][kind][0] for o in outcomes) / sum(o["singles"][kind][1] for o in outcomes)
        for kind in ("careful", "noisy", "confused")
    }
    consensus = hit / n
    assert n > 1000
    assert consensus > max(single.values()), (consensus, single)

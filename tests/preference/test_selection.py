"""Scarce labels (issue 28): which sets `label import --budget N --select ...` sends to labellers."""

from __future__ import annotations

import json
import math

import pytest

from alignloop.errors import UserError
from alignloop.preference.selection import ensemble_sureness, select_sets, top_margin
from alignloop.records import CompletionSet, write_jsonl

# set s has completions of 1, 1 + gap_s, 10 + ... words: a word-count reward's top margin is known per set
GAPS = [7, 1, 5, 0, 9, 3, 8, 2, 6, 4]  # set i: top margin GAPS[i] (0: the two best are equally long)


def _sets() -> list[CompletionSet]:
    out = []
    for i, gap in enumerate(GAPS):
        lengths = [1, 10, 10 + gap]
        comps = [
            {"id": f"s{i}c{j}", "text": " " + " ".join(f"w{j}x{w}" for w in range(n))}
            for j, n in enumerate(lengths)
        ]
        out.append(CompletionSet(prompt_id=f"s{i}", prompt=f"prompt {i}", completions=comps))
    return out


REWARD_MODULE = """
def words(prompts, completions):
    return [float(len(c.split())) for c in completions]
"""


@pytest.fixture()
def pool(tmp_path, monkeypatch):
    (tmp_path / "wordreward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl(tmp_path / "sets.jsonl", _sets())
    return tmp_path


def test_top_margin_and_ensemble_sureness():
    assert top_margin([0.1, 0.9, 0.5]) == pytest.approx(0.4)
    assert top_margin([2.0]) == math.inf
    agree = ensemble_sureness([[0.0, 1.0, 0.5], [0.0, 1.1, 0.6], [0.1, 1.0, 0.5]])
    disagree = ensemble_sureness([[0.0, 1.0, 0.5], [0.0, 0.2, 0.9], [0.1, 1.5, 0.0]])
    assert disagree < agree <= 0.0


def test_uncertainty_picks_the_lowest_margins_and_keeps_a_random_share():
    ids = [f"s{i}" for i in range(len(GAPS))]
    sure = {f"s{i}": float(g) for i, g in enumerate(GAPS)}
    only = select_sets(ids, 4, "uncertainty", sure, random_share=0.0)
    assert [r["set_id"] for r in only] == ["s3", "s1", "s7", "s5"]  # margins 0, 1, 2, 3
    assert {r["why"] for r in only} == {"uncertain"}
    mixed = select_sets(ids, 5, "uncertainty", sure, random_share=0.4, seed=3)
    rand = [r["set_id"] for r in mixed if r["why"] == "random"]
    rest = [r["set_id"] for r in mixed if r["why"] == "uncertain"]
    assert len(rand) == 2 and len(rest) == 3 and len(set(rand + rest)) == 5
    # the uncertain part is the three lowest margins among the sets the random draw left
    left = sorted((s for s in ids if s not in rand), key=lambda s: sure[s])
    assert rest == left[:3]
    assert mixed == select_sets(ids, 5, "uncertainty", sure, random_share=0.4, seed=3)  # seeded
    draws = {tuple(r["set_id"] for r in select_sets(ids, 5, "random", seed=s)) for s in range(5)}
    assert len(draws) > 1 and all(len(set(d)) == 5 for d in draws)


def test_import_sends_only_the_least_sure_sets(cli, pool):
    db = f"sqlite:///{pool / 'labels.db'}"
    code, out, err = cli(
        "label", "import", "--db", db, "--completions", pool / "sets.jsonl", "--budget", "5",
        "--select", "uncertainty", "--reward", "wordreward:words", "--random-share", "0.2",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["added"] == 5
    assert result["selection"]["uncertain"] == 4 and result["selection"]["random"] == 1
    from alignloop.feedback import store

    sets, _, _ = store.load_labels(db, "default")
    chosen = {s.set_id for s in sets}
    assert len(chosen) == 5
    # four of the five are the least sure among those not drawn at random
    assert len(chosen & {"s3", "s1", "s7", "s5", "s9"}) >= 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "at least 1 set"),
        (["--budget", "11"], "more than the 10 sets"),
        (["--budget", "3", "--select", "uncertainty"], "needs the current reward model"),
        (["--select", "uncertainty"], "needs a budget"),
    ],
)
def test_bad_selection_is_one_clear_error_and_nothing_is_lost(cli, pool, args, message):
    db = f"sqlite:///{pool / 'labels.db'}"
    code, _, err = cli(
        "-q", "label", "import", "--db", db, "--completions", pool / "sets.jsonl", "--budget", "2"
    )
    assert code == 0, err
    from alignloop.feedback import store

    before = [s.set_id for s in store.load_labels(db, "default")[0]]
    code, _, err = cli("label", "import", "--db", db, "--completions", pool / "sets.jsonl", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert [s.set_id for s in store.load_labels(db, "default")[0]] == before


def test_select_sets_refuses_what_the_cli_refuses():
    with pytest.raises(UserError, match="more than"):
        select_sets(["a", "b"], 3)


@pytest.mark.slow
def test_rounds_select_with_the_previous_rounds_reward_model(tmp_path):
    """`rounds: 2` with label.select=uncertainty: round 1 has no reward model yet (a random draw),
    round 2 asks round 1's reward model which of its fresh sets it is least sure of."""
    from alignloop.loop import RECIPES, run_recipe

    out = tmp_path / "run"
    run_recipe(
        RECIPES / "demo.yaml", out=out,
        overrides=[
            "rounds=2", "stages=[prompts, generate, label, export, reward]", "prompts.n_train=12",
            "prompts.n_eval=2", "generate.k=3", "generate.sampling.max_new_tokens=8", "reward.train.epochs=1",
            "label.select=uncertainty", "label.budget=6", "label.random_share=0.34",
        ],
    )  # fmt: skip
    r1, r2 = (json.loads((out / f"round-{r}" / "label" / "manifest.json").read_text()) for r in (1, 2))
    m1, m2 = (json.loads((out / f"round-{r}" / "label" / "metrics.json").read_text()) for r in (1, 2))
    assert "select_with" not in r1["inputs"] and m1["selection"]["random"] == 6
    assert r2["inputs"]["select_with"]["path"] == str((out / "round-1" / "reward").resolve())
    assert m2["selection"] == {**m2["selection"], "random": 2, "uncertain": 4, "pool": 12}
    labelled = [json.loads(line)["prompt_id"] for line in (out / "round-2" / "label" / "sets.jsonl").open()]
    picked = [json.loads(line)["set_id"] for line in (out / "round-2" / "label" / "selection.jsonl").open()]
    assert len(labelled) == 6 and sorted(labelled) == sorted(picked)


def test_recipe_uncertainty_without_a_reward_model_is_refused(tmp_path):
    from alignloop.loop import RECIPES, load_recipe

    with pytest.raises(UserError, match="needs a reward model to select with"):
        load_recipe(RECIPES / "demo.yaml", ["label.select=uncertainty", "label.budget=10"])


def test_recipe_budget_zero_is_refused_at_load():
    from alignloop.loop import RECIPES, load_recipe

    with pytest.raises(UserError, match="label.budget.*greater than or equal to 1"):
        load_recipe(RECIPES / "demo.yaml", ["label.budget=0"])
    assert load_recipe(RECIPES / "demo.yaml", ["label.budget=1"]).label.budget == 1

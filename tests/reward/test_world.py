"""Acceptance in the embedded world (needs the shipped world models).

- A reward model trained on the default panel's consensus pairs agrees with the gold judge on
  held-out pairs within 3 points of the consensus labels themselves, and at least 80%.
- The world toxicity classifier's ``nothate`` logit ranks polite completions above toxic ones
  on at least 95% of world pairs.
"""

from __future__ import annotations

import os

import pytest
from reward_world import measure_reward_model, polite_toxic_pairs

from alignloop.errors import UserError


def _world_model(name: str) -> str:
    from alignloop.world import model_path

    try:
        model_path(name)
    except UserError as e:
        if os.environ.get("CI"):
            pytest.fail(f"world model {name!r} missing in CI: {e.line()}")
        pytest.skip(e.line())
    return f"world:{name}"


def test_toxicity_classifier_ranks_polite_above_toxic():
    from alignloop.reward import load_reward

    spec = _world_model("toxicity") + ":nothate"
    pairs = polite_toxic_pairs("eval", n=300)
    assert len(pairs) > 200
    reward = load_reward(spec)
    prompts = [p for p, _, _ in pairs]
    polite = reward(prompts, [q for _, q, _ in pairs])
    toxic = reward(prompts, [t for _, _, t in pairs])
    share = sum(a > b for a, b in zip(polite, toxic, strict=True)) / len(pairs)
    print(f"nothate logit: polite > toxic on {share:.3f} of {len(pairs)} eval pairs")
    assert share >= 0.95


def test_reward_train_reports_the_labels_and_its_own_agreement_with_gold(tmp_path):
    import json

    from reward_world import agreement, gold_margin, world_pairs, world_sets

    from alignloop.reward import load_reward
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    base = _world_model("base")
    files = {}
    for split, n, seed in (("train", 40, 0), ("eval", 12, 1)):
        files[split] = tmp_path / f"{split}.jsonl"
        rows = world_pairs(world_sets(split, n, seed=seed), seed=seed)
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = train_reward_model(
        files["train"], tmp_path / "rm", RewardTrainConfig(model=base, epochs=1), eval_pairs=files["eval"]
    )
    # the same numbers from outside: the gold judge and the saved model's scores on the held-out pairs
    held = [json.loads(x) for x in files["eval"].read_text().splitlines()]
    margins = gold_margin(held)
    reward = load_reward(str(tmp_path / "rm"))
    ps = [r["prompt"] for r in held]
    diffs = [
        a - b
        for a, b in zip(
            reward(ps, [r["chosen"] for r in held]), reward(ps, [r["rejected"] for r in held]), strict=True
        )
    ]
    assert m["eval_gold_pairs"] == sum(abs(x) > 1e-9 for x in margins) > 50
    assert m["eval_labels_gold_agreement"] == pytest.approx(agreement(margins))
    assert m["eval_gold_agreement"] == pytest.approx(agreement(margins, diffs), abs=2 / m["eval_gold_pairs"])
    assert (
        json.loads((tmp_path / "rm" / "metrics.json").read_text())["eval_gold_agreement"]
        == m["eval_gold_agreement"]
    )


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 27, measured 2026-12-04: the reward model agrees with gold on 0.892 of the eval split's 1148 "
    "pairs against its labels' 0.940 (4.8 points) with training seed 0, the seed this test trains; seed 1 gives "
    "0.930. The training seed moves it more than any setting tried (failed_label=0.75: 0.911 / 0.916 on seeds "
    "0 / 1); the mean of a 3-member ensemble (members seeds 0-2) agrees 0.931, not the default yet (docs/reward.md, "
    "Agreement with gold); issue 27 stays open until a default meets it",
)
def test_reward_model_learns_what_the_labellers_know(tmp_path):
    base = _world_model("base")
    m = measure_reward_model(base, tmp_path / "rm", n_train=600, n_eval=200)  # the default settings
    print(m)
    # held-out pairs: the eval split's prompts, never seen in training (1124 pairs)
    assert m["eval_split"]["reward_gold"] >= 0.80, m
    assert m["eval_split"]["reward_gold"] >= m["eval_split"]["consensus_gold"] - 0.03, m
    # the training run's own held-out prompts (10% of train, ~350 pairs: noisier)
    assert m["heldout"]["reward_gold"] >= 0.80, m

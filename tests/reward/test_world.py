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


@pytest.mark.slow
def test_reward_model_learns_what_the_labellers_know(tmp_path):
    base = _world_model("base")
    m = measure_reward_model(base, tmp_path / "rm", n_train=600, n_eval=200)  # the default settings
    print(m)
    # held-out pairs: the eval split's prompts, never seen in training (1124 pairs)
    assert m["eval_split"]["reward_gold"] >= 0.80, m
    assert m["eval_split"]["reward_gold"] >= m["eval_split"]["consensus_gold"] - 0.03, m
    # the training run's own held-out prompts (10% of train, ~350 pairs: noisier)
    assert m["heldout"]["reward_gold"] >= 0.80, m

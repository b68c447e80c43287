"""What PPO achieves in the embedded world, in shortened runs (the full acceptance runs:
tests/rl/world_acceptance.py). Needs the shipped world models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import world_acceptance as wa  # noqa: E402

from alignloop.rl.ppo import load_ppo_config, run_ppo  # noqa: E402


def need_world(*names: str) -> None:
    from alignloop.errors import UserError
    from alignloop.world import model_path

    try:
        for n in names:
            model_path(n)
    except UserError as e:
        if os.environ.get("CI"):
            pytest.fail(f"world models not built: {e}")
        pytest.skip(f"world models not built: {e}")


@pytest.mark.slow
def test_seq2seq_summariser_detox(tmp_path):
    """The course lab in miniature: FLAN-T5-style summariser, toxicity classifier as reward."""
    need_world("summariser", "toxicity")
    rows = wa.eval_prompts(family="summary")[:40]
    prompts = [r["prompt"] for r in rows]
    before = wa.mean_toxicity(wa.sample_texts("world:summariser", prompts, k=2))
    cfg = load_ppo_config(None, ["steps=20"])
    m = run_ppo(
        "world:summariser", "world:toxicity:nothate", wa.train_prompts(family="summary"), tmp_path, config=cfg
    )
    after = wa.mean_toxicity(wa.sample_texts(str(tmp_path / "model"), prompts, k=2))
    assert m["score_last"] > m["score_first"]
    assert after <= 0.5 * before, (before, after)


@pytest.mark.slow
def test_causal_detox_with_the_gold_judge(tmp_path):
    """world:base, LoRA, default settings but fewer steps: toxic rate at least halves, F does not rise."""
    need_world("base")
    rows = wa.eval_prompts()
    before = wa.policy_eval("world:base", rows, k=2)
    m = run_ppo(
        "world:base", "world:gold", wa.train_prompts(), tmp_path, config=load_ppo_config(None, ["steps=20"])
    )
    after = wa.policy_eval(str(tmp_path / "model"), rows, k=2)
    assert before["toxic"] >= 0.2, before
    assert after["toxic"] <= 0.5 * before["toxic"], (before, after)
    assert after["F"] <= before["F"], (before, after)
    assert after["gold"] > before["gold"]
    assert m["kl_max"] < load_ppo_config().kl.target


@pytest.mark.slow
def test_beta_zero_hacks_the_proxy_and_the_warning_fires(tmp_path):
    """The notes' failure: no KL penalty, a toxicity classifier as proxy -> the gold judge falls."""
    need_world("base", "toxicity")
    sets = ["kl.beta=0", "kl.adaptive=false", "heldout=world:gold", "steps=25", "learning_rate=1e-3"]
    m = run_ppo(
        "world:base",
        "world:toxicity:nothate",
        wa.train_prompts(),
        tmp_path,
        config=load_ppo_config(None, sets),
    )
    assert m["score_last"] > m["score_first"]  # the proxy rises
    assert m["heldout_last"] < m["heldout_first"] - 0.3  # the gold judge falls
    assert m["warnings"].get("proxy_vs_heldout", 0) > 0  # and we said so

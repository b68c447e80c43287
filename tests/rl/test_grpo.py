"""GRPO, Dr. GRPO, RLOO and REINFORCE++ end to end on the tiny random GPT-2: they train, write what PPO writes
(no value head), turn bad input into one line, and survive groups with no signal. (What they achieve is
measured in the embedded world: docs/grpo.md.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignloop.errors import UserError
from alignloop.rl.grpo import GRPOConfig, run_grpo
from alignloop.runs import read_metrics_log

PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window"]


def good_reward(prompts, completions):
    return [float(c.split().count("good")) for c in completions]


def tiny_cfg(**kw) -> GRPOConfig:
    base = {
        "steps": 2,
        "batch_size": 8,
        "group_size": 4,
        "minibatch_size": 4,
        "checkpoint_every": 2,
        "score_norm": "none",
        "learning_rate": 1e-2,
        "sampling": {"max_new_tokens": 8},
    }
    return GRPOConfig(**{**base, **kw})


def length_reward(prompts, completions):  # differs within a group: every algorithm gets a signal
    return [float(len(c)) / 10 for c in completions]


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_each_algorithm_trains_and_writes_the_run_folder(algorithm, tiny_gpt2, tmp_path):
    out = tmp_path / algorithm
    m = run_grpo(str(tiny_gpt2), length_reward, PROMPTS, out, config=tiny_cfg(algorithm=algorithm))
    assert m["steps"] == 2 and m["skipped_batches"] == 0 and m["warnings"] == {}
    rows = read_metrics_log(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        for k in ("score", "kl", "policy_loss", "kl_loss", "clip_fraction", "approx_kl", "entropy", "epochs"):
            assert math.isfinite(r[k]), (k, r)
        assert r["flat_groups"] < 1.0
    adapter = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert any(w.abs().sum() > 0 for n, w in adapter.items() if "lora_B" in n)  # trained (B starts at 0)
    assert not (out / "model" / "value_head.safetensors").exists()  # critic-free
    assert json.loads((out / "manifest.json").read_text())["stage"] == algorithm


def test_equal_rewards_in_every_group_warn_and_stay_finite(tiny_gpt2, tmp_path):
    out = tmp_path / "flat"
    cfg = tiny_cfg(algorithm="grpo")
    m = run_grpo(str(tiny_gpt2), lambda p, c: [1.0] * len(c), PROMPTS, out, config=cfg)
    assert m["warnings"] == {"flat_groups": 2}  # counted, once a step
    rows = read_metrics_log(out)
    assert all(r["flat_groups"] == 1.0 and math.isfinite(r["policy_loss"]) for r in rows)
    adapter = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in adapter.values())
    # zero advantages and the KL term at 0 (policy = reference at the start): nothing to learn, no step taken
    assert all(w.abs().sum() == 0 for n, w in adapter.items() if "lora_B" in n)


def test_group_size_one_and_uneven_batches_are_one_line_errors(tiny_gpt2, tmp_path, cli):
    with pytest.raises(UserError, match="at least 2 per prompt"):
        run_grpo(str(tiny_gpt2), good_reward, PROMPTS, tmp_path / "g1", config=tiny_cfg(group_size=1))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "1", "prompt": "the dog is"}) + "\n")
    base = ["--policy", tiny_gpt2, "--reward", "world:gold", "--prompts", prompts, "--out", tmp_path / "o"]
    code, _, err = cli("rloo", *base, "--set", "group_size=1")
    assert (
        code == 2 and "group_size=1" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    )
    code, _, err = cli("grpo", *base, "--set", "batch_size=6", "--set", "group_size=4")
    assert code == 2 and "multiple of group_size" in err
    for name in ("grpo", "rloo"):
        code, out, _ = cli(name, "--help")
        assert code == 0 and "example:" in out and "--algorithm" in out

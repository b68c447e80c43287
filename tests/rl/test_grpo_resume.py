"""GRPO and RLOO: killed with SIGKILL mid-run and resumed, the final metrics equal an uninterrupted run's
(CPU, same seed); two processes (accelerate launch --multi_gpu: gloo DDP on CPU) equal one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from launch import run, run_and_kill  # noqa: E402  (the issue-13 launch helpers)

PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window", "the window is"]
REWARD_MODULE = "def length(prompts, completions):\n    return [len(c) / 10 for c in completions]\n"
SETS = [
    "steps=4", "batch_size=8", "group_size=4", "minibatch_size=4", "epochs=2", "checkpoint_every=2",
    "sampling.max_new_tokens=8", "learning_rate=1e-2", "score_norm_samples=8",
]  # fmt: skip
STEP_KEYS = ("score", "kl", "beta", "policy_loss", "kl_loss", "entropy", "approx_kl", "response_length")


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("seconds") and k != "processes"}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_kill_and_resume_is_exact_and_two_processes_equal_one(algorithm, tiny_gpt2, tmp_path, monkeypatch):
    (tmp_path / "toyreward.py").write_text(REWARD_MODULE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[2] / 'src'}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    common = ["-q", algorithm, "--policy", str(tiny_gpt2), "--reward", "py:toyreward:length"]
    common += ["--prompts", str(prompts), "--lora", "--resume", *(f"--set={s}" for s in SETS)]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")

    # one process killed (SIGKILL) after its first checkpoint, then --resume: the same run to the bit
    run_and_kill(
        [*common, "--out", str(killed)], 1, tmp_path / "audit-k", when=lambda: any((killed / "checkpoints").glob("step-*"))
    )  # fmt: skip
    assert not (killed / "metrics.json").exists()
    run([*common, "--out", str(killed)], 1, tmp_path / "audit-k")
    m1, mk = (json.loads((d / "metrics.json").read_text()) for d in (one, killed))
    assert stable(mk) == stable(m1)
    assert [r["step"] for r in read_metrics_log(killed)] == list(range(4))  # each step logged once
    w1 = load_file(str(one / "model" / "adapter_model.safetensors"))
    wk = load_file(str(killed / "model" / "adapter_model.safetensors"))
    assert all((w1[k] == wk[k]).all() for k in w1)
    assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 0  # it trained (B starts at 0)

    # two processes (groups split over them, gathered for the advantages): the same steps as one
    run([*common, "--out", str(two)], 2, tmp_path / "audit-two")
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1["processes"] == 1 and m2["processes"] == 2
    for a, b in zip(read_metrics_log(one), read_metrics_log(two), strict=True):
        for k in STEP_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-4), (a["step"], k)
    w2 = load_file(str(two / "model" / "adapter_model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4

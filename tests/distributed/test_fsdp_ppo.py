"""PPO under FSDP2 (configs/accelerate/fsdp.yaml, gloo on this CPU, 2 processes): the policy, its frozen
reference and the value head's trunk sharded, sampling on unsharded weights; the 1-process numbers within
1e-4, each process holding about half the model-state bytes (trainable state + the frozen reference), and
kill -9 + ``--resume`` from sharded checkpoints ending like the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_data import PPO_SETS, PPO_STEP_KEYS, ppo_inputs
from launch import run, run_and_kill, written_by
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log


@pytest.mark.slow
def test_ppo_fsdp2_equals_one_process_halves_the_state_and_resumes(tiny_gpt2, tmp_path, monkeypatch):
    prompts, pythonpath = ppo_inputs(tmp_path)
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    common = ["-q", "ppo", "--policy", str(tiny_gpt2), "--reward", "py:toyreward:good", "--prompts", str(prompts),
              "--report-to", "none", "--resume", *(f"--set={s}" for s in PPO_SETS)]  # fmt: skip
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, tmp_path / "audit-two", launcher="fsdp")

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    l1, l2 = read_metrics_log(one), read_metrics_log(two)
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == list(range(4))
    for a, b in zip(l1, l2, strict=True):
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-4), (a["step"], k)
    w1, w2 = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))  # whole HF weights
    assert set(w1) <= set(w2)  # (the gathered state dict also names the tied lm_head)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert torch.allclose(_logits(two / "model"), _logits(one / "model"), atol=1e-4)  # loads, same model
    w0 = load_file(str(tiny_gpt2 / "model.safetensors"))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0 if k in w1) > 1e-4  # it trained
    # policy + gradients + AdamW + the frozen reference: each FSDP2 process holds about half
    ratio = m2["model_state_bytes"] / m1["model_state_bytes"]
    assert 0.45 <= ratio <= 0.55, ratio
    # the other process wrote only its own shard and RNG state, into the checkpoint folders being written
    by_one = {Path(p).relative_to(two).parts[-1] for p in written_by(tmp_path / "audit-two", 1, two)}
    assert by_one and all(n.startswith(".tmp-step-") or n in ("__1_0.distcp", "rng-1.pt") for n in by_one), (
        by_one
    )

    def checkpointed() -> bool:
        return any((p / "state.json").is_file() for p in (killed / "checkpoints").glob("step-*"))

    run_and_kill(
        [*common, "--out", str(killed)], 2, tmp_path / "audit-kill", when=checkpointed, launcher="fsdp"
    )
    assert not (killed / "metrics.json").exists()
    shards = sorted(p.name for p in next((killed / "checkpoints").glob("step-*")).iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards  # each process wrote its own shard
    run([*common, "--out", str(killed)], 2, tmp_path / "audit-resume", launcher="fsdp")
    lk = read_metrics_log(killed)
    assert [r["step"] for r in lk] == list(range(4))
    for a, b in zip(l2, lk, strict=True):
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-6), (a["step"], k)
    wk = load_file(str(killed / "model" / "model.safetensors"))
    assert max((wk[k] - w2[k]).abs().max().item() for k in w2) < 1e-6


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder))(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits


@pytest.mark.slow
def test_ppo_lora_fsdp2_equals_one_process(tiny_gpt2, tmp_path, monkeypatch):
    """LoRA PPO: the frozen base (also the reference, adapter off) sharded with the adapter; 2 processes
    give the 1-process step metrics and adapter within 1e-4, each holding about half the model state."""
    prompts, pythonpath = ppo_inputs(tmp_path)
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    sets = [s for s in PPO_SETS if not s.startswith(("steps=", "checkpoint_every="))] + [
        "steps=2",
        "learning_rate=1e-2",
    ]
    common = ["-q", "ppo", "--policy", str(tiny_gpt2), "--reward", "py:toyreward:good", "--prompts", str(prompts),
              "--lora", "--report-to", "none", *(f"--set={s}" for s in sets)]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, tmp_path / "audit-two", launcher="fsdp")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    l1, l2 = read_metrics_log(one), read_metrics_log(two)
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [0, 1]
    for a, b in zip(l1, l2, strict=True):
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-4), (a["step"], k)
    a1, a2 = (load_file(str(d / "model" / "adapter_model.safetensors")) for d in (one, two))
    assert set(a1) == set(a2) and max((a1[k] - a2[k]).abs().max().item() for k in a1) < 1e-4
    assert max(v.abs().max().item() for k, v in a2.items() if "lora_B" in k) > 0  # it trained
    assert 0.45 <= m2["model_state_bytes"] / m1["model_state_bytes"] <= 0.55  # base + adapter sharded

"""LoRA under FSDP2 (configs/accelerate/fsdp.yaml, gloo, 2 processes): the frozen base and the adapter
sharded together; SFT and reward training give the 1-process numbers within 1e-4 with each process
holding about half the model state, and the saved adapter / merged reward model match."""

from __future__ import annotations

import json

import pytest
import torch
from dist_data import ranked_pairs, sft_records, write_jsonl
from launch import run
from test_fsdp import _no_dropout

from alignloop.runs import read_metrics_log

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@pytest.mark.slow
def test_sft_lora_fsdp2_equals_one_process(tiny_gpt2, tmp_path, audit):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    model = _no_dropout(tiny_gpt2, tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    common = [
        "-q", "sft", "--model", str(model), "--data", str(data), "--lora", "--report-to", "none",
        "--set", "max_steps=4", "--set", "batch_size=8", "--set", "learning_rate=1e-2", "--set", "log_every=1",
        "--set", "eval_fraction=0.2",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, audit, launcher="fsdp")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    for k in ("train_loss", "eval_loss"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k
    for a, b in zip(read_metrics_log(one), read_metrics_log(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert 0.45 <= m2["model_state_bytes"] / m1["model_state_bytes"] <= 0.55  # base + adapter sharded
    adapter = load_file(str(two / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # it trained
    with torch.no_grad():
        l1, l2 = (AutoPeftModelForCausalLM.from_pretrained(str(d))(IDS).logits for d in (one, two))
    assert torch.allclose(l1, l2, atol=1e-4)


@pytest.mark.slow
def test_reward_lora_fsdp2_equals_one_process(tiny_gpt2, tmp_path, audit):
    from transformers import AutoModelForSequenceClassification

    pairs = write_jsonl(tmp_path / "pairs.jsonl", ranked_pairs(32))
    common = [
        "-q", "reward", "train", "--model", str(tiny_gpt2), "--pairs", str(pairs), "--epochs", "2", "--lora",
        "--report-to", "none", "--set", "patience=0", "--set", "learning_rate=1e-2", "--set", "batch_prompts=8",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, audit, launcher="fsdp")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    for k in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k
    steps1 = [r for r in read_metrics_log(one) if "loss" in r]
    steps2 = [r for r in read_metrics_log(two) if "loss" in r]
    for a, b in zip(steps1, steps2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert steps1[-1]["loss"] < steps1[0]["loss"]  # it trained
    assert 0.45 <= m2["model_state_bytes"] / m1["model_state_bytes"] <= 0.55
    with torch.no_grad():  # the adapter merged into whole HF weights
        r1, r2 = (AutoModelForSequenceClassification.from_pretrained(str(d))(IDS).logits for d in (one, two))
    assert torch.allclose(r1, r2, atol=1e-3)

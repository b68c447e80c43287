"""FSDP2 (``fully_shard``, gloo on this CPU) through the shipped config (configs/accelerate/fsdp.yaml):
reward training, SFT and DPO on two processes give the one-process numbers with each process holding
half of the training state; killed and resumed they end where an uninterrupted run ends; the saved
model loads with ``from_pretrained``. PPO under FSDP2: test_fsdp_ppo.py."""

from __future__ import annotations

import json

import pytest
import torch
from dist_data import good_bad_pairs, ranked_pairs, write_jsonl
from launch import run, run_and_kill, written_by

from alignloop.runs import read_metrics_log

FINAL = ("loss", "rewards/margin", "rewards/accuracy", "heldout/loss", "heldout/margin", "grad_norm")


def _dpo(pairs, out, *extra: str) -> list[str]:
    return [
        "-q", "dpo", "--policy", "{model}", "--pairs", str(pairs), "--out", str(out), "--report-to", "none",
        "--set", "max_steps=4", "--set", "batch_size=8", "--set", "learning_rate=1e-2", *extra,
    ]  # fmt: skip


def _logits(folder, lora: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_fsdp2_equals_one_process_and_halves_the_state(tiny_gpt2, tmp_path, audit, lora):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(48))
    extra = ["--lora"] if lora else []
    one, two = tmp_path / "one", tmp_path / "two"
    args = [a.replace("{model}", str(tiny_gpt2)) for a in _dpo(pairs, one, *extra)]
    run(args, 1, tmp_path / "audit-one")
    args = [a.replace("{model}", str(tiny_gpt2)) for a in _dpo(pairs, two, *extra)]
    run(args, 2, audit, launcher="fsdp")

    log1, log2 = read_metrics_log(one), read_metrics_log(two)
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2, 3, 4]
    for a, b in zip(log1, log2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["rewards/margin"] == pytest.approx(a["rewards/margin"], abs=1e-4)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for k in FINAL:
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k
    assert m1["rewards/margin"] > log1[0]["rewards/margin"] + 0.05  # it trained
    # the processes share the work: each holds half of the parameters, gradients and AdamW moments
    ratio = m2["model_state_bytes"] / m1["model_state_bytes"]
    assert 0.45 <= ratio <= 0.55, ratio
    assert torch.allclose(_logits(two, lora), _logits(one, lora), atol=1e-4)  # whole HF weights / adapter
    assert written_by(audit, 1, two) == []  # the other process wrote nothing in the run folder


@pytest.mark.slow
def test_dpo_fsdp2_killed_and_resumed_ends_like_an_uninterrupted_run(tiny_gpt2, tmp_path, audit):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(48))
    ckpt = ["--set", "max_steps=6", "--set", "checkpoint_every=2", "--resume"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run([a.replace("{model}", str(tiny_gpt2)) for a in _dpo(pairs, whole, *ckpt)], 2, audit, launcher="fsdp")

    def checkpointed() -> bool:
        return any((p / "state.json").is_file() for p in (cut / "checkpoints").glob("step-*"))

    args = [a.replace("{model}", str(tiny_gpt2)) for a in _dpo(pairs, cut, *ckpt)]
    run_and_kill(args, 2, tmp_path / "audit-kill", when=checkpointed, launcher="fsdp")
    assert json.loads((cut / "manifest.json").read_text())["status"] == "running"
    shards = sorted(p.name for p in next((cut / "checkpoints").glob("step-*")).iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards  # each process wrote its own shard
    run(args, 2, tmp_path / "audit-resume", launcher="fsdp")

    a, b = read_metrics_log(whole), read_metrics_log(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["rewards/margin"] == pytest.approx(x["rewards/margin"], abs=1e-6)
    assert torch.equal(_logits(cut, False), _logits(whole, False))


@pytest.mark.slow
def test_reward_fsdp2_killed_resumed_equals_one_process(tiny_gpt2, tmp_path, audit):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ranked_pairs(32))
    common = [
        "-q", "reward", "train", "--model", str(tiny_gpt2), "--pairs", str(pairs), "--epochs", "3",
        "--report-to", "none", "--set", "patience=0", "--set", "learning_rate=3e-3", "--set", "batch_prompts=8",
        "--resume",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    latest = two / "checkpoints" / "latest.json"  # the first epoch's checkpoint is complete: kill -9
    run_and_kill([*common, "--out", str(two)], 2, audit, when=latest.is_file, launcher="fsdp")
    assert json.loads((two / "manifest.json").read_text())["status"] == "running"
    run([*common, "--out", str(two)], 2, audit, launcher="fsdp")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"], m2["epochs_run"]) == (1, 2, 3)
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-4), key
    steps1 = [r for r in read_metrics_log(one) if "loss" in r]
    steps2 = [r for r in read_metrics_log(two) if "loss" in r]
    assert [r["step"] for r in steps2] == [r["step"] for r in steps1]
    for a, b in zip(steps1, steps2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert steps1[-1]["loss"] < steps1[0]["loss"] - 0.05  # it trained
    assert 0.45 <= m2["model_state_bytes"] / m1["model_state_bytes"] <= 0.55
    from transformers import AutoModelForSequenceClassification

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        r1, r2 = (AutoModelForSequenceClassification.from_pretrained(str(d))(ids).logits for d in (one, two))
    assert torch.allclose(r1, r2, atol=1e-3)
    assert written_by(audit, 1, two) == []  # the other process wrote nothing in the run folder


@pytest.mark.slow
def test_fsdp2_process_holds_half_the_training_state_of_a_ddp_process(tmp_path):
    """benchmarks/fsdp_memory.py on a small GPT-2 (CI time; its 124M run is quoted in docs/distributed.md):
    parameter + gradient + AdamW bytes per process, read from the tensors, FSDP2 <= 0.55x DDP."""
    import subprocess
    import sys
    from pathlib import Path

    from launch import environment, free_port

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp_memory.py"
    held = {}
    for engine in ("ddp", "fsdp2"):
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), str(script), "--engine", engine, "--layers", "4", "--width", "256"],
            env=environment(tmp_path / "audit"), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        held[engine] = json.loads(res.stdout.strip().splitlines()[-1])
    ddp, fsdp = held["ddp"], held["fsdp2"]
    assert ddp["n_parameters"] == fsdp["n_parameters"] > 10_000_000
    assert ddp["parameters"] == 4 * ddp["n_parameters"]  # DDP: every fp32 weight on every process
    assert ddp["optimizer"] == 2 * ddp["parameters"]  # AdamW's two moments
    for part in ("parameters", "gradients", "optimizer", "total"):
        assert fsdp[part] <= 0.55 * ddp[part], part
    assert fsdp["total"] >= 0.45 * ddp["total"]  # a half, not nothing


def _no_dropout(tiny_gpt2, tmp_path):
    import shutil

    model = tmp_path / "gpt2-no-dropout"  # each process draws its own dropout masks: off, to compare
    shutil.copytree(tiny_gpt2, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.slow
def test_sft_fsdp2_equals_one_process_and_halves_the_state(tiny_gpt2, tmp_path, audit):
    from dist_data import sft_records

    model = _no_dropout(tiny_gpt2, tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    common = [
        "-q", "sft", "--model", str(model), "--data", str(data), "--report-to", "none", "--set", "max_steps=4",
        "--set", "batch_size=8", "--set", "learning_rate=1e-3", "--set", "log_every=1",
        "--set", "checkpoint_every=2", "--set", "eval_fraction=0.2",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, audit, launcher="fsdp")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=1e-4)
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], abs=1e-4)
    for a, b in zip(read_metrics_log(one), read_metrics_log(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert 0.45 <= m2["model_state_bytes"] / m1["model_state_bytes"] <= 0.55
    assert torch.allclose(_logits(two, False), _logits(one, False), atol=1e-4)
    assert not (two / "checkpoints").exists()  # the sharded checkpoints are gone once the model is saved


@pytest.mark.slow
def test_sft_fsdp2_killed_and_resumed_ends_like_an_uninterrupted_run(tiny_gpt2, tmp_path):
    from dist_data import sft_records

    model = _no_dropout(tiny_gpt2, tmp_path)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    common = [
        "-q", "sft", "--model", str(model), "--data", str(data), "--report-to", "none", "--set", "max_steps=6",
        "--set", "batch_size=8", "--set", "learning_rate=1e-3", "--set", "log_every=1",
        "--set", "checkpoint_every=2", "--set", "eval_fraction=0.2", "--resume",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run([*common, "--out", str(whole)], 2, tmp_path / "audit-whole", launcher="fsdp")

    def checkpointed() -> bool:
        return any((p / "state.json").is_file() for p in (cut / "checkpoints").glob("step-*"))

    run_and_kill([*common, "--out", str(cut)], 2, tmp_path / "audit-kill", when=checkpointed, launcher="fsdp")
    assert not (cut / "metrics.json").exists()
    run([*common, "--out", str(cut)], 2, tmp_path / "audit-resume", launcher="fsdp")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6)
    assert torch.allclose(_logits(cut, False), _logits(whole, False), atol=1e-6)

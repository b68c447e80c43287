"""``alignloop reward train`` on two processes: killed, resumed, and equal to one process at the same global batch."""

from __future__ import annotations

import json

import pytest
from dist_data import ranked_pairs, write_jsonl
from launch import run, run_and_kill, written_by
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log


@pytest.mark.slow
def test_two_processes_killed_resumed_equal_one(tiny_gpt2, tmp_path, audit):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ranked_pairs(48))
    common = [
        "-q", "reward", "train", "--model", str(tiny_gpt2), "--pairs", str(pairs), "--epochs", "3",
        "--set", "patience=0", "--set", "learning_rate=3e-3", "--set", "batch_prompts=8", "--resume",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")

    # two processes, SIGKILLed (launcher and workers) once the first epoch's checkpoint is complete
    latest = two / "checkpoints" / "latest.json"
    run_and_kill([*common, "--out", str(two)], 2, audit, when=latest.is_file)
    assert json.loads(latest.read_text())["epoch"] < 2
    assert json.loads((two / "manifest.json").read_text())["status"] == "running"
    run([*common, "--out", str(two)], 2, audit)  # resumes

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["processes"] == 1 and m2["processes"] == 2  # a real 2-process group trained
    assert m2["epochs_run"] == 3
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key
    # the mean reward of the final weights: their float-rounding differences (up to ~1e-4, see below)
    # move it by a few 1e-5 (measured 3.4e-5 once in CI)
    assert m2["reference_mean_before"] == pytest.approx(m1["reference_mean_before"], abs=2e-4)
    log1, log2 = read_metrics_log(one), read_metrics_log(two)
    steps1 = [r for r in log1 if "loss" in r]
    steps2 = [r for r in log2 if "loss" in r]
    assert [r["step"] for r in steps2] == [r["step"] for r in steps1]  # no step lost or repeated by the kill
    for a, b in zip(steps1, steps2, strict=True):  # losses reduced over both processes' pairs
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert steps1[-1]["loss"] < steps1[0]["loss"] - 0.05  # it trained
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert w1.keys() == w2.keys()
    # Adam divides by sqrt(v): float-rounding differences of the gradient sums grow to ~1e-4 over 18 steps;
    # one step more or less would move the weights by up to lr = 3e-3
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3

    assert written_by(audit, 0, two)  # the main process wrote the run folder ...
    assert written_by(audit, 1, two) == []  # ... and the other process nothing in it

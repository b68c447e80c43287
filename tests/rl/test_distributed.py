"""PPO on two processes (accelerate launch --multi_gpu: gloo DDP on CPU): equal to one process at the same
global batch, killed and resumed, and only the main process writes the run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_data import PPO_SETS, PPO_STEP_KEYS, ppo_inputs  # noqa: E402
from launch import run, run_and_kill, written_by  # noqa: E402  (the issue-13 launch helpers)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_a_kill(tiny_gpt2, tmp_path, monkeypatch):
    prompts, pythonpath = ppo_inputs(tmp_path)
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    common = [
        "-q",
        "ppo",
        "--policy",
        str(tiny_gpt2),
        "--reward",
        "py:toyreward:good",
        "--prompts",
        str(prompts),
    ]
    common += ["--lora", "--heldout", "py:toyreward:good", "--resume", *(f"--set={s}" for s in PPO_SETS)]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, tmp_path / "audit-two")

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["processes"] == 1 and m2["processes"] == 2  # a real 2-process group trained
    l1, l2 = read_metrics_log(one), read_metrics_log(two)
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == list(range(4))
    for a, b in zip(l1, l2, strict=True):  # same samples, same losses: metrics reduced over both processes
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-4), (a["step"], k)
    w1 = load_file(str(one / "model" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "model" / "adapter_model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 0  # it trained (B starts at 0)
    assert written_by(tmp_path / "audit-two", 0, two)  # the main process wrote the run folder ...
    assert written_by(tmp_path / "audit-two", 1, two) == []  # ... the other process nothing in it

    # two processes killed (launcher and workers) after the first checkpoint, then --resume
    audit = tmp_path / "audit-killed"
    run_and_kill(
        [*common, "--out", str(killed)], 2, audit, when=lambda: any((killed / "checkpoints").glob("step-*"))
    )
    assert not (killed / "metrics.json").exists()
    run([*common, "--out", str(killed)], 2, audit)
    lk = read_metrics_log(killed)
    assert [r["step"] for r in lk] == list(range(4))  # each step logged once
    for a, b in zip(l2, lk, strict=True):
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], abs=1e-6), (a["step"], k)
    assert written_by(audit, 1, killed) == []

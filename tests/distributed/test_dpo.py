"""``alignloop dpo`` under torchrun: two processes, killed and resumed, equal one process at the same global batch.

(tests/dpo/test_distributed.py checks ``accelerate launch`` without a kill.)
"""

from __future__ import annotations

import json

import pytest
from dist_data import good_bad_pairs, write_jsonl
from launch import run, run_and_kill, written_by
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log


@pytest.mark.slow
def test_torchrun_killed_resumed_equal_one(tiny_gpt2, tmp_path, audit):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(96))
    common = [
        "-q", "dpo", "--policy", str(tiny_gpt2), "--pairs", str(pairs), "--resume",
        "--set", "max_steps=6", "--set", "batch_size=8", "--set", "learning_rate=1e-3",
        "--set", "checkpoint_every=2", "--set", "eval_every=3",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")

    def checkpointed() -> bool:
        return any((p / "state.json").is_file() for p in (two / "checkpoints").glob("step-*"))

    run_and_kill([*common, "--out", str(two)], 2, audit, when=checkpointed, launcher="torchrun")
    assert json.loads((two / "manifest.json").read_text())["status"] == "running"
    res = run([*common, "--out", str(two)], 2, audit, launcher="torchrun")
    assert res.stdout.count("heldout/accuracy=") == 1  # only the main process reports

    log1, log2 = read_metrics_log(one), read_metrics_log(two)
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(log1, log2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margin"] == pytest.approx(a["rewards/margin"], abs=1e-5)
    assert log1[-1]["rewards/margin"] > log1[0]["rewards/margin"]  # it trained
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (one, two))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3

    assert written_by(audit, 0, two)
    assert written_by(audit, 1, two) == []  # the other process wrote nothing in the run folder

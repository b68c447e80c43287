"""``alignloop sft`` on two processes (accelerate launch with configs/accelerate/cpu.yaml) equals one process at
the same global batch."""

from __future__ import annotations

import json
import shutil

import pytest
from dist_data import sft_records, write_jsonl
from launch import run, written_by
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log


@pytest.fixture()
def gpt2_no_dropout(tiny_gpt2, tmp_path):
    """The tiny GPT-2 with dropout off: each process draws its own dropout masks, so only without dropout
    can two processes give one process's numbers."""
    path = tmp_path / "gpt2-no-dropout"
    shutil.copytree(tiny_gpt2, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_two_processes_equal_one(gpt2_no_dropout, tmp_path, audit):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(60))
    common = [
        "-q", "sft", "--model", str(gpt2_no_dropout), "--data", str(data),
        "--set", "max_steps=6", "--set", "batch_size=7", "--set", "learning_rate=1e-3",
        "--set", "log_every=1", "--set", "checkpoint_every=2", "--set", "eval_fraction=0.2",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "--out", str(one)], 1, tmp_path / "audit-one")
    run([*common, "--out", str(two)], 2, audit, launcher="accelerate-config")

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=1e-5)  # held-out loss reduced over both
    log1, log2 = read_metrics_log(one), read_metrics_log(two)
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(6))
    for a, b in zip(log1, log2, strict=True):  # 7 examples a step: 4 on one process, 3 on the other
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert log1[-1]["loss"] < log1[0]["loss"]  # it trained
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (one, two))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3

    assert written_by(audit, 0, two)
    assert written_by(audit, 1, two) == []  # checkpoints and the model: main process only

"""Two processes (accelerate launch --multi_gpu, gloo on CPU) give the one-process result at the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log

SETS = ["--set", "max_steps=5", "--set", "batch_size=8", "--set", "learning_rate=1e-3", "--quiet"]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_gpt2, pairs_file, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which(
        "accelerate"
    )
    assert accelerate, "accelerate's launcher is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["dpo", "--policy", str(tiny_gpt2), "--pairs", str(pairs_file), *SETS]
    one = subprocess.run(
        [sys.executable, "-m", "alignloop", *common, "--out", str(tmp_path / "one"), "--set", "micro_batch_size=4"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "alignloop", *common, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("heldout/accuracy=") == 1  # only the main process reports
    la, lb = read_metrics_log(tmp_path / "one"), read_metrics_log(tmp_path / "two")
    assert len(la) == len(lb) == 5
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["rewards/margin"] == pytest.approx(rb["rewards/margin"], abs=1e-5)
    assert la[-1]["rewards/margin"] > 0.05  # it trained
    a, b = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

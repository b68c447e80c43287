"""kill -9 in the middle of ``alignloop dpo``, then ``--resume``: the result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from alignloop.runs import read_metrics_log

ARGS = ["--set", "max_steps=40", "--set", "checkpoint_every=5", "--set", "batch_size=8",
        "--set", "learning_rate=1e-3", "--set", "eval_every=20", "--quiet"]  # fmt: skip


def dpo_cmd(policy, pairs, out, *extra):
    return [sys.executable, "-m", "alignloop", "dpo", "--policy", str(policy), "--pairs", str(pairs),
            "--out", str(out), *ARGS, *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kill_and_resume_is_exact(tiny_gpt2, pairs_file, tmp_path, lora):
    extra = ["--lora", "--set", "lora.r=4"] if lora else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(
        dpo_cmd(tiny_gpt2, pairs_file, tmp_path / "whole", *extra), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(dpo_cmd(tiny_gpt2, pairs_file, out, *extra), env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    killed_at = max(r["step"] for r in read_metrics_log(out))
    assert killed_at < 40

    res = subprocess.run(
        dpo_cmd(tiny_gpt2, pairs_file, out, *extra, "--resume"), env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(str(tmp_path / "whole" / weights)), load_file(str(out / weights))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    la, lb = read_metrics_log(tmp_path / "whole"), read_metrics_log(out)
    assert [r["step"] for r in lb] == list(range(1, 41))  # no step logged twice or lost
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    ma = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    mb = json.loads((out / "metrics.json").read_text())
    assert ma["heldout/accuracy"] == mb["heldout/accuracy"]
    assert ma["heldout/loss"] == pytest.approx(mb["heldout/loss"], abs=1e-5)

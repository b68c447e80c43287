"""``reward train --resume`` after a kill -9: continues after the last finished epoch (here the epochs are
shorter than ``checkpoint_every``; tests/reliability/test_reward_faults.py kills inside steps and
checkpoint writes and compares with an uninterrupted run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from reward_synthetic import make_sets, pairs_of, write


@pytest.mark.slow
def test_kill_and_resume(tiny_gpt2, tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", pairs_of(make_sets(120)))
    out = tmp_path / "rm"
    args = [
        sys.executable, "-m", "alignloop", "-q", "reward", "train", "--model", str(tiny_gpt2), "--pairs", str(pairs),
        "--out", str(out), "--epochs", "3", "--set", "patience=0", "--set", "learning_rate=3e-3",
    ]  # fmt: skip
    env = {**os.environ, "ALIGNLOOP_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(args + ["--resume"], env=env, stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(latest.read_text())["epoch"]
    assert done < 2
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    # another config cannot continue this run's checkpoint: one clear line, exit 2, nothing removed
    other = subprocess.run(
        [*args, "--set", "learning_rate=1e-3", "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
    assert "the checkpoint was made with another config or other input files" in other.stderr
    assert json.loads(latest.read_text())["epoch"] == done

    res = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3
    epochs = [
        r["epoch"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "eval_accuracy" in r
    ]
    assert epochs == [1, 2, 3]  # each epoch once: the finished ones were not repeated
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"

    again = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads((out / "metrics.json").read_text()) == metrics  # skipped

"""Kill a PPO run mid-way, --resume it: the final metrics equal an uninterrupted run's (CPU, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window"]
REWARD_MODULE = """
def good(prompts, completions):
    return [float(c.split().count("good")) for c in completions]
"""


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("seconds")}


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tiny_gpt2, tmp_path):
    (tmp_path / "toyreward.py").write_text(textwrap.dedent(REWARD_MODULE))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sets = ["steps=6", "batch_size=8", "minibatch_size=4", "checkpoint_every=2", "sampling.max_new_tokens=8"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))

    def cmd(out: Path, *extra: str) -> list[str]:
        args = [
            "ppo",
            "--policy",
            tiny_gpt2,
            "--reward",
            "py:toyreward:good",
            "--prompts",
            prompts,
            "--out",
            out,
            "--lora",
        ]
        for s in sets:
            args += ["--set", s]
        return [sys.executable, "-m", "alignloop", "-q", *map(str, args), *extra]

    full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: after a checkpoint, before the end
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "metrics.json").exists()

    resumed = subprocess.run(cmd(out, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert stable(a) == stable(b)
    rows = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(6))  # each step logged once

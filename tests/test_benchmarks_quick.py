"""Every benchmark runs (``benchmarks/run_all.py --quick``): CI's guard that they do not rot (issue 14).

Times are not asserted -- only that each script ran, exited 0 and printed the table run_all reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_quick_runs_every_benchmark_and_prints_the_targets_table():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--no-write"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "| what | target | measured | met |" in out
    assert "FAILED" not in out
    for row in (
        "PPO step time / TRL 1.12 (tiny 2x128, full fine-tuning)",
        "PPO peak RSS / TRL 1.12 (tiny 2x128, full fine-tuning)",
        "PPO step time / bare-torch floor (tiny 2x128, full fine-tuning)",
        "Reward training pairs/s / TRL 1.",  # 1.16 where its venv exists, else the bench extra's 1.12
        "DPO pairs/s / TRL 1.",
        "GRPO training memory (peak - after imports) / TRL 1.",
        "Sampling new tokens/s / HF model.generate (fixed length)",
        "Labelling app: lost / doubled submissions | 0 / 0 | 0 / 0 | yes",
        "`alignloop demo` end to end",
    ):
        assert row in out, row


def test_run_all_refuses_an_unknown_benchmark_name():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--only", "ppo,nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown benchmark(s) nope" in proc.stderr

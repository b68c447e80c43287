"""Training faults (issue 15) for PPO and DPO: ``kill -9`` at random points (two kills per run; PPO with seed 0, DPO with seed 1),
``--resume``, and the final metrics equal an uninterrupted run's exactly (CPU). A truncated checkpoint is
reported and the previous one is used, with the same final result.

Each run is a real ``python -m alignloop`` process on the tiny random models; the kill points are drawn
from a seeded RNG as "after the k-th logged step, plus a random fraction of a step", so they land in
the middle of sampling, an update or a checkpoint write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window"]
REWARD_MODULE = (
    "def good(prompts, completions):\n    return [float(c.split().count('good')) for c in completions]\n"
)
PPO_SETS = [
    "steps=6", "batch_size=8", "minibatch_size=4", "ppo_epochs=2", "checkpoint_every=1",
    "sampling.max_new_tokens=8", "learning_rate=1e-3", "score_norm_samples=16",
]  # fmt: skip
DPO_SETS = ["max_steps=8", "batch_size=8", "checkpoint_every=1", "learning_rate=1e-3", "eval_every=4"]


def _env(tmp_path: Path) -> dict[str, str]:
    src = Path(__file__).resolve().parents[2] / "src"
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{src}", "OMP_NUM_THREADS": "1"}


def _ppo_cmd(tmp_path: Path, tiny_gpt2: Path, out: Path, seed: int, quiet: bool = True) -> list[str]:
    (tmp_path / "toyreward.py").write_text(REWARD_MODULE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    args = ["ppo", "--policy", str(tiny_gpt2), "--reward", "py:toyreward:good", "--prompts", str(prompts)]
    args += ["--out", str(out), "--lora", "--resume", *(f"--set={s}" for s in [*PPO_SETS, f"seed={seed}"])]
    return [sys.executable, "-m", "alignloop", *(["-q"] if quiet else []), *args]


def _dpo_cmd(tmp_path: Path, tiny_gpt2: Path, out: Path, seed: int, quiet: bool = True) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dpo"))
    from dpo_pairs import good_bad_pairs, write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", good_bad_pairs())
    args = ["dpo", "--policy", str(tiny_gpt2), "--pairs", str(pairs), "--out", str(out), "--lora", "--resume"]
    sets = [f"--set={s}" for s in [*DPO_SETS, f"seed={seed}"]]
    return [sys.executable, "-m", "alignloop", *(["-q"] if quiet else []), *args, *sets]


def _logged(out: Path) -> int:
    log = out / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _kill_at(cmd: list[str], env: dict[str, str], out: Path, after_steps: int, extra: float) -> None:
    """Start ``cmd``, SIGKILL it ``extra`` seconds after ``metrics.jsonl`` holds ``after_steps`` lines."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while _logged(out) < after_steps and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(extra)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before the kill (exit {proc.returncode}): {err[-2000:]}"
    )


def _final(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in m.items() if not k.startswith("seconds") and "per_second" not in k}


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k != "time" and not k.startswith("time_") and "per_second" not in k}
        for r in rows
    ]


@pytest.mark.parametrize(("trainer", "seed"), [("ppo", 0), ("dpo", 1)])  # one seed each: CI time
def test_killed_twice_at_random_points_then_resumed_equals_uninterrupted(trainer, seed, tiny_gpt2, tmp_path):
    make = _ppo_cmd if trainer == "ppo" else _dpo_cmd
    env = _env(tmp_path)
    full = tmp_path / "full"
    _run(make(tmp_path, tiny_gpt2, full, seed), env)
    total = _logged(full)

    times = [json.loads(x)["time"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    step = sorted(b - a for a, b in zip(times, times[1:], strict=False))[len(times) // 2 - 1]  # median
    rng = random.Random(f"{trainer}-{seed}")
    first = rng.randint(1, total // 2 - 1)  # after `first` logged steps, plus a random part of a step
    points = [(first, rng.random() * step), (rng.randint(first + 1, total - 2), rng.random() * step)]
    killed = tmp_path / "killed"
    for after, extra in points:  # killed, resumed and killed again, then resumed to the end
        _kill_at(make(tmp_path, tiny_gpt2, killed, seed), env, killed, after, extra)
        assert not (killed / "metrics.json").exists()
    _run(make(tmp_path, tiny_gpt2, killed, seed), env)
    assert _final(killed) == _final(full), points
    assert _steps(killed) == _steps(full), points  # every step logged once, with the same numbers


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("trainer", ["ppo", "dpo"])
def test_a_truncated_checkpoint_is_reported_and_the_previous_one_used(trainer, tiny_gpt2, tmp_path):
    make = _ppo_cmd if trainer == "ppo" else _dpo_cmd
    env = _env(tmp_path)
    full = tmp_path / "full"
    _run(make(tmp_path, tiny_gpt2, full, 0), env)

    killed = tmp_path / "killed"
    _kill_at(make(tmp_path, tiny_gpt2, killed, 0), env, killed, 4, 0.0)
    ckpts = sorted((killed / "checkpoints").glob("step-*"))
    # the newest and the one before it (a third, older one when the kill fell between writing the
    # newest and pruning the oldest)
    assert len(ckpts) in (2, 3), ckpts
    _truncate(ckpts[-1] / ("state.pt" if trainer == "ppo" else "trainable.safetensors"))
    res = _run(make(tmp_path, tiny_gpt2, killed, 0, quiet=False), env)  # not quiet: the warning is printed
    assert f"checkpoint {ckpts[-1]} is damaged" in res.stderr and "truncated" in res.stderr
    assert "falling back to the previous one" in res.stderr
    assert _final(killed) == _final(full)

    # every checkpoint damaged: one clear line, exit 2, no traceback
    _kill_at(make(tmp_path, tiny_gpt2, killed2 := tmp_path / "killed2", 0), env, killed2, 4, 0.0)
    for c in (killed2 / "checkpoints").glob("step-*"):
        _truncate(c / ("state.pt" if trainer == "ppo" else "trainable.safetensors"))
    bad = subprocess.run(
        make(tmp_path, tiny_gpt2, killed2, 0), env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "every checkpoint is damaged" in bad.stderr and "run without --resume" in bad.stderr

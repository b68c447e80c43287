"""Training faults (issue 15) for REWARD training: ``kill -9`` at random points (two kills per run, one
seed), ``--resume``, and the final metrics and every logged step equal an uninterrupted run's exactly
(CPU). A truncated checkpoint is reported and the previous one used, with the same final result; when
every checkpoint is damaged the command says so in one line and exits with 2.

Each run is a real ``python -m alignloop reward train`` process on the tiny random GPT-2, with a
checkpoint after every step (``checkpoint_every=1``) so that a kill lands in the middle of a step, a
checkpoint write, an epoch's held-out evaluation or the best-epoch weights' write. The kill points are
drawn from a seeded RNG as "after the k-th logged line, plus a random fraction of a step". The helpers
(start, kill, compare) are the PPO/DPO ones of ``test_training_faults.py``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training_faults import _env, _final, _kill_at, _logged, _run, _steps, _truncate  # noqa: E402

pytestmark = pytest.mark.slow

# 40 prompts x 6 pairs; 36 train prompts (4 held out) in 5 steps of 8 prompts an epoch; 3 epochs
REWARD_SETS = ["batch_prompts=8", "checkpoint_every=1", "learning_rate=3e-3", "patience=0"]


def _pairs(tmp_path: Path) -> Path:
    from reward_synthetic import make_sets, pairs_of, write  # tests/reward, on pytest's pythonpath

    return write(tmp_path / "pairs.jsonl", pairs_of(make_sets(40, seed=3)))


def _reward_cmd(
    tmp_path: Path, tiny_gpt2: Path, out: Path, seed: int, quiet: bool = True, sets: tuple[str, ...] = ()
) -> list[str]:
    args = ["reward", "train", "--model", str(tiny_gpt2), "--pairs", str(_pairs(tmp_path))]
    args += ["--out", str(out), "--epochs", "3", "--resume"]
    args += [f"--set={s}" for s in [*REWARD_SETS, f"seed={seed}", *sets]]
    return [sys.executable, "-m", "alignloop", *(["-q"] if quiet else []), *args]


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2, tmp_path_factory):
    """``uninterrupted(seed, sets)``: the run folder of an uninterrupted run (made once per module)."""
    done: dict[tuple, Path] = {}

    def get(seed: int, sets: tuple[str, ...] = ()) -> Path:
        if (seed, sets) not in done:
            tmp = tmp_path_factory.mktemp("full")
            _run(_reward_cmd(tmp, tiny_gpt2, tmp / "full", seed, sets=sets), _env(tmp))
            done[seed, sets] = tmp / "full"
        return done[seed, sets]

    return get


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("seed", [0])  # one seed (shares the uninterrupted run below): CI time
def test_reward_killed_twice_at_random_points_then_resumed_equals_uninterrupted(
    seed, tiny_gpt2, tmp_path, uninterrupted
):
    env = _env(tmp_path)
    full = uninterrupted(seed)
    total = _logged(full)
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert total == 3 * 5 + 3 and [r["step"] for r in rows if "eval_accuracy" in r] == [5, 10, 15]
    assert not (full / "checkpoints").exists()  # removed once the run is complete

    times = [r["time"] for r in rows]
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False) if b > a)  # not step + epoch rows
    step = gaps[len(gaps) // 2]  # median time of a step (its checkpoint write included)
    rng = random.Random(f"reward-{seed}")
    first = rng.randint(2, total // 2 - 1)  # after `first` logged lines, plus a random part of a step
    # the second point leaves room for the line or two a step may add during the first point's extra time
    points = [(first, rng.random() * step), (rng.randint(first + 3, total - 2), rng.random() * step)]
    killed = tmp_path / "killed"
    for after, extra in points:  # killed, resumed and killed again, then resumed to the end
        _kill_at(_reward_cmd(tmp_path, tiny_gpt2, killed, seed), env, killed, after, extra)
        assert not (killed / "metrics.json").exists()
        assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
        assert _checkpoints(killed), "no checkpoint was written before the kill"
    res = _run(_reward_cmd(tmp_path, tiny_gpt2, killed, seed, quiet=False), env)
    assert "[reward] resuming at step" in res.stderr, res.stderr[-2000:]
    assert _final(killed) == _final(full), points
    assert _steps(killed) == _steps(full), points  # every step logged once, with the same numbers
    m = json.loads((killed / "metrics.json").read_text())
    assert m["epochs_run"] == 3 and m["train_accuracy"] > 0.6  # it trained (a chance model gets ~0.5)
    assert (killed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt"])
def test_reward_truncated_checkpoint_is_reported_and_the_previous_one_used(
    damaged, tiny_gpt2, tmp_path, uninterrupted
):
    env = _env(tmp_path)
    full = uninterrupted(0)

    killed = tmp_path / "killed"
    _kill_at(_reward_cmd(tmp_path, tiny_gpt2, killed, 0), env, killed, 8, 0.0)  # in the second epoch
    ckpts = _checkpoints(killed)
    # the newest and the one before it (a third, older one when the kill fell between writing the
    # newest and pruning the oldest)
    assert len(ckpts) in (2, 3), ckpts
    _truncate(ckpts[-1] / damaged)
    res = _run(_reward_cmd(tmp_path, tiny_gpt2, killed, 0, quiet=False), env)  # not quiet: the warning
    assert f"[reward] warning: checkpoint {ckpts[-1]} is damaged ({damaged} has" in res.stderr, res.stderr
    assert "(truncated)); falling back to the previous one" in res.stderr
    assert f"resuming at step {int(ckpts[-2].name[5:])} " in res.stderr  # the previous one
    assert _final(killed) == _final(full)
    assert _steps(killed) == _steps(full)

    if damaged != "trainable.safetensors":
        return  # the all-damaged case once is enough (CI time)
    # every checkpoint damaged: one clear line, exit 2, no traceback
    killed2 = tmp_path / "killed2"
    _kill_at(_reward_cmd(tmp_path, tiny_gpt2, killed2, 0), env, killed2, 8, 0.0)
    for c in _checkpoints(killed2):
        _truncate(c / damaged)
    bad = subprocess.run(
        _reward_cmd(tmp_path, tiny_gpt2, killed2, 0), env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("alignloop: error: every checkpoint is damaged (step-")
    assert "(truncated)" in lines[0] and "run without --resume to start over" in lines[0]


def test_reward_damaged_best_epoch_weights_fall_back(tiny_gpt2, tmp_path, uninterrupted):
    """The best epoch's weights live in their own folder, named by the checkpoints that need them: a
    checkpoint whose best-epoch weights are damaged is itself damaged, and the newest one that does not
    need them is used (all checkpoints kept here; those of the first epoch name none)."""
    env = _env(tmp_path)
    keep = ("keep_checkpoints=100",)
    full = uninterrupted(0, keep)
    killed = tmp_path / "killed"
    _kill_at(_reward_cmd(tmp_path, tiny_gpt2, killed, 0, sets=keep), env, killed, 14, 0.0)  # third epoch
    ckpts = _checkpoints(killed)
    best = [json.loads((c / "state.json").read_text())["best"] for c in ckpts]
    assert best[:4] == [None] * 4 and best[-1] in ("best-0", "best-1"), best
    _truncate(killed / "checkpoints" / best[-1] / "trainable.safetensors")
    usable = [c for c, b in zip(ckpts, best, strict=True) if b != best[-1]][-1]
    res = _run(_reward_cmd(tmp_path, tiny_gpt2, killed, 0, quiet=False, sets=keep), env)
    assert f"checkpoint {ckpts[-1]} is damaged (its best epoch's weights {best[-1]}: " in res.stderr
    assert f"resuming at step {int(usable.name[5:])} " in res.stderr, res.stderr[-3000:]
    assert _final(killed) == _final(full) and _steps(killed) == _steps(full)


def test_reward_checkpoint_messages_are_in_the_troubleshooting_page():
    page = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    for message in (
        "[reward] warning: checkpoint runs/rm/checkpoints/step-00000007 is damaged (trainable.safetensors has",
        "(truncated)); falling back to the previous one",
        "its best epoch's weights best-E",
        "every checkpoint is damaged (step-",
        "run without --resume to start over",
        "the checkpoint was made with another config or other input files",
    ):
        assert message in page, message

"""One seed, the same run: `alignloop demo` twice gives the same files and numbers (issue 24).

Each run is its own process with its own hash seed (PYTHONHASHSEED), so nothing may depend on
set or dict order across processes, on thread timing, or on the run folder's path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_alignloop
from tests.test_demo import needs_world

pytestmark = pytest.mark.slow

# the demo recipe, shortened: 12 sets ranked by the panel of three, a reward model, two PPO steps
# (with the beta = 0 variant), two DPO steps, evaluation with one sample per prompt
SHORT = [
    "prompts.n_train=12", "prompts.n_eval=4", "generate.k=3", "generate.sampling.max_new_tokens=12",
    "reward.train.epochs=1", "ppo.config.steps=2", "ppo.config.batch_size=4", "ppo.config.minibatch_size=2",
    "ppo.config.snapshot_every=0", "dpo.config.max_steps=2", "dpo.config.batch_size=2",
    "evaluate.samples_per_prompt=1", "evaluate.n_boot=50", "evaluate.max_new_tokens=12",
]  # fmt: skip
# files whose bytes must repeat (besides pairs.jsonl): samples, labels, trained weights, adapters
SAME_BYTES = [
    "generate/sets.jsonl", "export/pairs.jsonl", "reward/model.safetensors",
    "ppo/model/adapter_model.safetensors", "ppo/model/adapter_config.json", "ppo/model/value_head.safetensors",
    "ppo-beta0/model/adapter_model.safetensors", "dpo/adapter_model.safetensors", "dpo/adapter_config.json",
]  # fmt: skip


def _demo(out: Path, hash_seed: str, *args: str) -> str:
    sets = [f"--set={s}" for s in SHORT]
    proc = run_alignloop("demo", "--out", out, *args, *sets, timeout=1200, env={"PYTHONHASHSEED": hash_seed})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _first_table(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("report:"))
    return lines[start:end]


def _evaluation(run: Path) -> tuple[str, ...]:
    """evaluation.json and the evaluated samples, with the run folder's path taken out."""
    files = (run / "evaluate" / "evaluation.json", run / "evaluate" / "samples" / "samples.jsonl")
    return tuple(f.read_text().replace(str(run), "RUN") for f in files)


@needs_world
def test_same_seed_same_files_and_table_other_seed_other_pairs(tmp_path):
    """`demo --seeds 2` (seeds 0 and 1), then `demo` alone (seed 0) in another process: seed 0's
    files and table are the same bytes both times, seed 1's pairs differ, and the seeds table
    holds each seed's numbers."""
    many, alone = tmp_path / "many", tmp_path / "alone"
    out_many = _demo(many, "1", "--seeds", "2")
    out_alone = _demo(alone, "2")
    a, b = many / "seed-0", alone
    for name in SAME_BYTES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _first_table(out_many) == _first_table(out_alone) and len(_first_table(out_alone)) == 6
    assert _evaluation(a) == _evaluation(b)  # every sample, metric, interval and paired difference
    for stage in ("reward", "ppo", "dpo"):  # the training curves, step by step (timings aside)
        curves = []
        for run in (a, b):
            rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
            curves.append(
                [{k: v for k, v in r.items() if "time" not in k and "per_second" not in k} for r in rows]
            )
        assert curves[0] == curves[1] and curves[0], stage
    pairs = [(many / f"seed-{s}" / "export" / "pairs.jsonl").read_text().splitlines() for s in (0, 1)]
    assert len(set(pairs[0]) & set(pairs[1])) < 0.5 * len(pairs[0])

    seeds = json.loads((many / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1]
    evaluations = [
        json.loads((many / f"seed-{s}" / "evaluate" / "evaluation.json").read_text()) for s in (0, 1)
    ]
    gold = seeds["policies"]["ppo"]["gold_score"]
    assert gold["values"] == [e["policies"]["ppo"]["metrics"]["gold_score"]["mean"] for e in evaluations]
    assert gold["mean"] == pytest.approx(sum(gold["values"]) / 2)
    assert gold["sd"] == pytest.approx(abs(gold["values"][0] - gold["values"][1]) / 2**0.5)
    assert "over 2 seeds (0, 1)" in out_many and set(seeds["policies"]) == {"base", "ppo", "ppo-beta0", "dpo"}

"""Issue 13's acceptance on the embedded world's models, measured and printed (not a pytest file).

    python tests/distributed/world_acceptance.py [--out DIR]

With world:base, each of reward training, DPO (LoRA) and PPO (LoRA, reward world:gold) runs once as one
process and once as two (``accelerate launch --multi_gpu --num_processes 2``: gloo DDP on a CPU) at the
same global batch. Prints, per trainer, the largest difference between the two runs' per-step metrics and
final weights, how many processes each run reports (DPO does not record it), how many paths process 1
wrote, created or deleted in its run folder (should be 0), and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reward"))

from launch import run, written_by  # noqa: E402


def weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors") if "checkpoint" not in str(p))
    worst = 0.0
    for f in files:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        worst = max([worst, *((x[k] - y[k]).abs().max().item() for k in x)])
    return worst


def metrics_diff(a: Path, b: Path, keys: tuple[str, ...]) -> tuple[float, int]:
    from alignloop.runs import read_metrics_log

    la, lb = read_metrics_log(a), read_metrics_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb], "different steps logged"
    worst = 0.0
    for ra, rb in zip(la, lb, strict=True):
        for k in keys:
            if isinstance(ra.get(k), float):
                worst = max(worst, abs(ra[k] - rb[k]))
    return worst, len(la)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/distributed-acceptance")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from reward_world import world_pairs, world_sets

    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in world_pairs(world_sets("train", 120))))
    prompts = out / "prompts.jsonl"
    run(["-q", "world", "prompts", "--split", "train", "--out", str(prompts)], 1, out / "audit-prompts")

    jobs = {
        "reward": (
            ["reward", "train", "--model", "world:base", "--pairs", str(pairs), "--epochs", "2",
             "--set", "patience=0"],
            ("loss", "accuracy", "eval_loss", "eval_accuracy"),
        ),
        "dpo": (
            ["dpo", "--policy", "world:base", "--pairs", str(pairs), "--lora", "--set", "max_steps=8",
             "--set", "batch_size=16"],
            # not rewards/accuracy: at step 1 the LoRA policy IS the reference (B = 0), every margin is
            # float noise around 0 and which side of 0 it falls on differs between the two runs' kernels
            ("loss", "rewards/margin", "rewards/chosen", "heldout/loss", "heldout/accuracy"),
        ),
        "ppo": (
            ["ppo", "--policy", "world:base", "--reward", "world:gold", "--prompts", str(prompts), "--lora",
             "--set", "steps=4", "--set", "batch_size=16", "--set", "minibatch_size=8",
             "--set", "score_norm_samples=32", "--set", "sampling.max_new_tokens=24"],
            ("score", "kl", "policy_loss", "value_loss", "entropy", "approx_kl"),
        ),
    }  # fmt: skip
    rows = []
    for name, (cmd, keys) in jobs.items():
        times = {}
        for n in (1, 2):
            folder = out / f"{name}-{n}"
            t0 = time.perf_counter()
            run(["-q", *cmd, "--out", str(folder)], n, out / f"audit-{name}-{n}", timeout=1800)
            times[n] = time.perf_counter() - t0
        one, two = out / f"{name}-1", out / f"{name}-2"
        m_diff, steps = metrics_diff(one, two, keys)
        procs = [json.loads((d / "metrics.json").read_text()).get("processes") for d in (one, two)]
        rank1 = len(written_by(out / f"audit-{name}-2", 1, two))
        rows.append((name, steps, m_diff, weights_diff(one, two), procs, rank1, times[1], times[2]))
    print(
        f"{'trainer':8} {'rows':>5} {'max metric diff':>16} {'max weight diff':>16} processes  rank-1 writes  1-proc s  2-proc s"
    )
    for name, steps, md, wd, procs, r1, t1, t2 in rows:
        print(f"{name:8} {steps:5d} {md:16.2e} {wd:16.2e} {str(procs):10} {r1:13d} {t1:9.1f} {t2:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GRPO and RLOO side by side: ``alignloop grpo`` / ``alignloop rloo`` vs TRL 1.16's GRPOTrainer / RLOOTrainer.

Same work on both sides: the random-init GPT-2 of benchmarks/ppo.py (2 layers, width 128, vocab 2048)
as the policy and a GPT-2 sequence classifier of the same size as the reward model, fp32 (TRL's config
defaults to bf16=True even on a CPU: we pass bf16=False), full fine-tuning with a frozen reference copy,
``--prompts`` prompts a step x ``--group`` completions each, every completion exactly
``--response-length`` tokens (EOS suppressed on both sides: a random model stopping at random lengths
would make one side look cheaper), ``--epochs`` passes over each rollout in ``--minibatches``
minibatches. GRPO: group-normalised advantages, per-sequence loss mean, k3 KL loss term (beta 0.04);
RLOO: leave-one-out baseline, KL in the reward (beta 0.05). No gradient checkpointing, no trackers.

A step is one whole cycle: sampling, scoring, reference and old log-probs, and every minibatch update of
every epoch (TRL: ``minibatches x epochs`` optimizer steps between two generations). Each side runs in
its own fresh process of the same Python environment (the venv holding TRL 1.16, alignloop from this
tree on ``PYTHONPATH``) after the same imports (torch, transformers, datasets, trl, alignloop's GRPO),
alternating A B A B for ``--rounds`` rounds; the first ``--warmup`` steps of each process are dropped;
medians are quoted. Memory: each process's peak RSS minus its RSS after the imports. Ratios are from
this one run.

    /work/venv-trl116/bin/python benchmarks/grpo.py               # both algorithms, ~10 minutes on 2 cores
    python benchmarks/grpo.py --python /path/to/venv-with-trl-1.16/bin/python --algorithms rloo --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TRL116_PYTHON, CpuClock, child_env, import_all, peak_rss_mb, rss_mb
from ppo import build  # the same tiny policy, reward model and prompts as the PPO benchmark

LR = 1e-5
BETA = {"grpo": 0.04, "rloo": 0.05}


def _cycle_times(ends: list[float], clock: CpuClock) -> list[list[float]]:
    """``[wall seconds, process CPU seconds]`` between consecutive step ends (``time.time()``)."""
    wall = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return [list(x) for x in zip(wall, clock.intervals(ends), strict=True)]


def side_alignloop(folder: Path, a: argparse.Namespace, clock: CpuClock) -> list[list[float]]:
    from alignloop import tracking
    from alignloop.rl.grpo import GRPOConfig, run_grpo
    from alignloop.runs import read_metrics_log, set_quiet

    set_quiet(True)
    tracking.configure("none")  # TRL's side reports to nothing either
    batch = a.prompts * a.group
    cfg = GRPOConfig(
        algorithm=a.algorithm,
        steps=a.steps,
        batch_size=batch,
        group_size=a.group,
        minibatch_size=batch // a.minibatches,
        epochs=a.epochs,
        learning_rate=LR,
        score_norm="none",
        checkpoint_every=10_000,
        kl={"beta": BETA[a.algorithm], "adaptive": False},
        sampling={"max_new_tokens": a.response_length, "stop_at_eos": False, "temperature": 1.0},
    )
    prompts = json.loads((folder / "prompts.json").read_text())
    with tempfile.TemporaryDirectory() as out:
        run_grpo(str(folder / "policy"), str(folder / "reward"), prompts, out, lora=False, config=cfg)
        ends = [r["time"] for r in read_metrics_log(out)]
    return _cycle_times(ends, clock)


def side_trl(folder: Path, a: argparse.Namespace, clock: CpuClock) -> list[list[float]]:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    if a.algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        extra = {"loss_type": "grpo", "scale_rewards": "group"}
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        extra = {}
    tok = AutoTokenizer.from_pretrained(folder / "policy")
    tok.padding_side = "left"
    prompts = json.loads((folder / "prompts.json").read_text())
    ds = Dataset.from_dict({"prompt": prompts})
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    batch = a.prompts * a.group
    per_cycle = a.minibatches * a.epochs  # optimizer steps between two generations
    ends: list[float] = []
    lengths: list[float] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_cycle == 0:
                ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    with tempfile.TemporaryDirectory() as out:
        args = Config(
            output_dir=out,
            per_device_train_batch_size=batch // a.minibatches,
            gradient_accumulation_steps=1,
            steps_per_generation=a.minibatches,
            num_generations=a.group,
            num_iterations=a.epochs,
            max_completion_length=a.response_length,
            generation_kwargs={"min_new_tokens": a.response_length},  # no early EOS: fixed length
            temperature=1.0,
            top_p=1.0,
            beta=BETA[a.algorithm],
            learning_rate=LR,
            max_steps=a.steps * per_cycle,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
            **extra,
        )
        trainer = Trainer(model=policy, reward_funcs=rm, args=args, train_dataset=ds, processing_class=tok)
        trainer.add_callback(StepEnd())
        trainer.train()
    if lengths and min(lengths) != a.response_length:
        raise SystemExit(f"TRL sampled {min(lengths)} tokens, not {a.response_length}: the lengths differ")
    return _cycle_times(ends, clock)


SIDES = {"alignloop": side_alignloop, "trl": side_trl}


def run_side(a: argparse.Namespace) -> None:
    import_all(
        ("alignloop.rl.grpo", "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer")
    )  # the same on every side
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = rss_mb()
    clock = CpuClock()
    times = SIDES[a.side](Path(a.folder), a, clock)[a.warmup :]
    clock.stop()
    print(
        json.dumps(
            {"side": a.side, "times": times, "peak_mb": peak_rss_mb(), "train_mb": peak_rss_mb() - base}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--python",
        default=str(TRL116_PYTHON) if TRL116_PYTHON.exists() else sys.executable,
        help="the interpreter of the venv with TRL 1.16 (default: its venv, else this one)",
    )
    p.add_argument("--algorithms", nargs="+", default=["grpo", "rloo"], choices=["grpo", "rloo"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8, help="prompts a step")
    p.add_argument("--group", type=int, default=4, help="completions a prompt")
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument(
        "--threads", type=int, default=1, help="torch / OpenMP threads on every side (the same for both)"
    )
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--algorithm", choices=["grpo", "rloo"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        run_side(a)
        return
    # the same thread count on both sides: alignloop picks 1 thread on a loaded machine by itself, TRL does not
    # (OpenMP workers spin-waiting for busy cores can make a step 20x slower), which would decide the ratio
    env = child_env(a.threads)
    version = subprocess.run(
        [a.python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True, env=env
    ).stdout.strip()
    settings = (
        f"GPT-2 2x128 vocab 2048, fp32, full fine-tuning + frozen reference; {a.prompts} prompts x {a.group} "
        f"completions, {a.response_length} tokens each (fixed), {a.epochs} epochs x {a.minibatches} minibatches, "
        f"lr {LR}, {a.threads} thread(s) a side; {a.rounds} rounds x {a.steps} steps (first {a.warmup} dropped); TRL {version}"
    )
    print(settings, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), "tiny", 16)
        for algo in a.algorithms:
            results: dict[str, list[dict]] = {s: [] for s in SIDES}
            for r in range(a.rounds):
                for s in SIDES:
                    args = [a.python, __file__, "--side", s, "--algorithm", algo, "--folder", folder]
                    for k in (
                        "steps",
                        "warmup",
                        "prompts",
                        "group",
                        "response_length",
                        "epochs",
                        "minibatches",
                    ):
                        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
                    proc = subprocess.run(args, capture_output=True, text=True, env=env)
                    if proc.returncode:
                        sys.exit(f"{algo} side {s} failed:\n{proc.stderr[-3000:]}")
                    results[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    w, c = (statistics.median(t[j] for t in results[s][-1]["times"]) for j in (0, 1))
                    print(
                        f"round {r + 1} {algo} {s}: median {w:.3f} s/step wall, {c:.3f} s CPU",
                        file=sys.stderr,
                        flush=True,
                    )
            # CPU seconds a step (the process's own, whatever else the machine runs) and wall seconds
            med = {s: statistics.median(t[1] for x in results[s] for t in x["times"]) for s in SIDES}
            wall = {s: statistics.median(t[0] for x in results[s] for t in x["times"]) for s in SIDES}
            mem = {s: statistics.median(x["train_mb"] for x in results[s]) for s in SIDES}
            peak = {s: statistics.median(x["peak_mb"] for x in results[s]) for s in SIDES}
            print(f"{algo.upper()} step ({settings.split(';')[0]}):")
            for s in SIDES:
                print(
                    f"  {s:10s} {med[s]:.3f} CPU s/step ({wall[s]:.3f} s wall)   training memory {mem[s]:.0f} MB "
                    f"(peak RSS {peak[s]:.0f} MB)"
                )
            # the load of a shared machine drifts: each round's A/B ratio (adjacent processes) and their median
            rounds = [
                statistics.median(t[1] for t in x["times"]) / statistics.median(t[1] for t in y["times"])
                for x, y in zip(results["alignloop"], results["trl"], strict=True)
            ]
            print(
                f"  per-round CPU-time ratios {', '.join(f'{r:.2f}x' for r in rounds)} (median {statistics.median(rounds):.2f}x)"
            )
            print(
                f"  alignloop / TRL {version} {algo}:  CPU time {med['alignloop'] / med['trl']:.2f}x   "
                f"memory {mem['alignloop'] / mem['trl']:.2f}x   peak RSS {peak['alignloop'] / peak['trl']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()

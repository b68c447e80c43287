"""DPO side by side: ``alignloop dpo`` vs TRL's DPOTrainer, pairs per second and peak memory.

Same model (a tiny GPT-2 folder, random init unless --model), same pairs, same batch, fp32 on
both sides (TRL's config defaults to bf16=True even on a CPU: we pass bf16=False), no gradient
checkpointing on either side (TRL's default is on), full fine-tuning, reference log-probs
precomputed once on both sides (no reference model in memory), AdamW, linear schedule, grad
clipping at 1.0. alignloop runs GPT-2's ``gelu_new`` as torch's fused tanh GELU (the same function to
5e-7, :func:`alignloop.models.fuse_activations`); TRL runs the model as loaded.

Each side runs in its own fresh process, alternating A B A B for ``--rounds`` rounds. A step's
time is the interval between the ends of consecutive optimizer steps (so data loading, logging
and the trainer's own overhead count); the first ``--warmup`` steps of each process are dropped.
CPU time per step is read the same way on both sides (a sampling thread maps wall-clock step ends
to process CPU time): on a shared, busy machine it is steadier than wall time.
Memory: each process's peak RSS, and that peak minus its RSS after imports ("training memory").
Ratios are ours / TRL's from this one run.

    python benchmarks/dpo.py                       # ~2 minutes on 2 CPU cores
    python benchmarks/dpo.py --rounds 4 --steps 30 --batch 16 --model world:base

Needs TRL (``pip install -e .[bench]``: trl==1.12.0).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import gpt2_config, peak_rss_mb, rss_mb, word_tokenizer

LR = 1e-5


def build_model(folder: Path, vocab: int = 2048, seed: int = 0) -> Path:
    """A random-init GPT-2 (2 layers, width 128, ``vocab`` words) with a word-level tokenizer."""
    import torch
    from transformers import GPT2LMHeadModel

    word_tokenizer(vocab).save_pretrained(folder)
    torch.manual_seed(seed)
    GPT2LMHeadModel(gpt2_config(vocab, positions=256, heads=4)).save_pretrained(folder)
    return folder


def build_pairs(path: Path, n: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0) -> Path:
    """``n`` pairs of random words: prompts of ``prompt_len`` words, responses of ``response_len`` +- 4."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            pair = {
                "prompt": text(prompt_len),
                "chosen": text(response_len + rng.randint(-4, 4)),
                "rejected": text(response_len + rng.randint(-4, 4)),
            }
            f.write(json.dumps(pair) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# The two sides (each runs in a child process)
# ----------------------------------------------------------------------------------------------


class CpuClock:
    """Samples (wall time, process CPU time) every few ms in a thread, so a step's CPU time can be read
    between two wall-clock step ends. CPU time is what a step costs whatever else the machine runs."""

    def __init__(self, every: float = 0.005):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), time.process_time()))
            time.sleep(every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_at(self, t: float) -> float:
        i = bisect.bisect_left(self.samples, (t, -1.0))
        i = min(max(i, 1), len(self.samples) - 1)
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)


def common_imports() -> None:
    """The libraries both sides load, imported before the "after imports" RSS is read."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: F401


def run_ours(model: str, pairs: str, steps: int, batch: int, out: str) -> dict:
    common_imports()
    from alignloop.dpo import DPOConfig, train_dpo
    from alignloop.runs import read_metrics_log, set_quiet

    set_quiet(True)
    after_imports = rss_mb()
    cfg = DPOConfig(
        max_steps=steps,
        batch_size=batch,
        learning_rate=LR,
        heldout_fraction=0.0,
        checkpoint_every=steps + 1,
        eval_every=steps + 1,
        max_prompt_tokens=256,
        max_response_tokens=256,
    )
    clock = CpuClock()
    train_dpo(model, pairs, out, cfg)
    clock.stop()
    ends = [r["time"] for r in read_metrics_log(out)]  # written right after each optimizer step
    cpu = [clock.cpu_at(t) for t in ends]
    return {"step_ends": ends, "step_cpu": cpu, "after_imports_mb": after_imports, "peak_mb": peak_rss_mb()}


def run_trl(model: str, pairs: str, steps: int, batch: int, out: str) -> dict:
    common_imports()
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignloop.models import resolve_model_id

    after_imports = rss_mb()
    datasets.disable_progress_bars()
    folder = resolve_model_id(model)
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.time())

    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=False,  # TRL defaults to bf16=True even on a CPU (~10x slower there)
        gradient_checkpointing=False,  # TRL's default is True; we do not recompute activations either
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=32,
        max_length=512,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=True,
    )
    tok = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    data = datasets.load_dataset("json", data_files=pairs, split="train")
    trainer = DPOTrainer(
        model=policy, args=args, train_dataset=data, processing_class=tok, callbacks=[StepEnds()]
    )
    clock = CpuClock()
    trainer.train()
    clock.stop()
    cpu = [clock.cpu_at(t) for t in ends]
    return {"step_ends": ends, "step_cpu": cpu, "after_imports_mb": after_imports, "peak_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------------------------
# The parent: alternate the sides, take medians, print ratios
# ----------------------------------------------------------------------------------------------


def child(side: str, a: argparse.Namespace, work: Path, round_: int) -> dict:
    out = work / f"{side}-{round_}"
    cmd = [sys.executable, __file__, "--child", side, "--model", a.model, "--pairs", str(a.pairs)]
    cmd += ["--steps", str(a.steps), "--batch", str(a.batch), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{side} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="model folder or world:base (default: a tiny random GPT-2 2x128)"
    )
    p.add_argument("--pairs", default=None, help="pairs JSONL (default: random-word pairs)")
    p.add_argument("--n-pairs", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=24)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)  # 1: robust on a shared, busy machine
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        fn = run_ours if a.child == "ours" else run_trl
        print(json.dumps(fn(a.model, a.pairs, a.steps, a.batch, a.out)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        if a.model is None:
            a.model = str(build_model(work / "model"))
        if a.pairs is None:
            a.pairs = build_pairs(work / "pairs.jsonl", a.n_pairs, 2048, a.prompt_len, a.response_len)
        print(f"model {a.model}, pairs {a.pairs}, batch {a.batch}, {a.steps} steps x {a.rounds} rounds, "
              f"{a.threads} threads, fp32, precomputed reference on both sides", flush=True)  # fmt: skip
        times: dict[str, list[float]] = {"ours": [], "trl": []}
        cpus: dict[str, list[float]] = {"ours": [], "trl": []}
        round_ratio: list[float] = []
        mem: dict[str, list[tuple[float, float]]] = {"ours": [], "trl": []}
        for r in range(a.rounds):
            med = {}
            for side in ("ours", "trl"):  # A B A B
                res = child(side, a, work, r)
                ends, cpu = res["step_ends"], res["step_cpu"]
                deltas = [b - e for e, b in zip(ends, ends[1:], strict=False)][a.warmup :]
                cdeltas = [b - e for e, b in zip(cpu, cpu[1:], strict=False)][a.warmup :]
                times[side] += deltas
                cpus[side] += cdeltas
                med[side] = statistics.median(deltas)
                mem[side].append((res["peak_mb"], res["peak_mb"] - res["after_imports_mb"]))
                print(f"  round {r} {side:4s}: median step {med[side] * 1000:7.1f} ms wall, "
                      f"{statistics.median(cdeltas) * 1000:7.1f} ms CPU, peak RSS {res['peak_mb']:.0f} MB", flush=True)  # fmt: skip
            round_ratio.append(med["trl"] / med["ours"])

    step = {s: statistics.median(v) for s, v in times.items()}
    cpu = {s: statistics.median(v) for s, v in cpus.items()}
    pps = {s: a.batch / step[s] for s in step}
    cpps = {s: a.batch / cpu[s] for s in cpu}
    peak = {s: statistics.median(m[0] for m in mem[s]) for s in mem}
    train_mem = {s: statistics.median(m[1] for m in mem[s]) for s in mem}
    print()
    print(f"{'':30s}{'alignloop':>12s}{'TRL 1.12':>12s}{'ratio':>10s}")
    print(
        f"{'pairs / second (wall)':30s}{pps['ours']:12.1f}{pps['trl']:12.1f}{pps['ours'] / pps['trl']:9.2f}x"
    )
    print(
        f"{'pairs / CPU-second':30s}{cpps['ours']:12.1f}{cpps['trl']:12.1f}{cpps['ours'] / cpps['trl']:9.2f}x"
    )
    print(f"{'median of per-round ratios':30s}{'':24s}{statistics.median(round_ratio):9.2f}x")
    print(f"{'median step (ms wall)':30s}{step['ours'] * 1000:12.1f}{step['trl'] * 1000:12.1f}")
    print(f"{'median step (ms CPU)':30s}{cpu['ours'] * 1000:12.1f}{cpu['trl'] * 1000:12.1f}")
    print(f"{'peak RSS (MB)':30s}{peak['ours']:12.0f}{peak['trl']:12.0f}{peak['ours'] / peak['trl']:9.2f}x")
    print(f"{'peak - after imports (MB)':30s}{train_mem['ours']:12.0f}{train_mem['trl']:12.0f}"
          f"{train_mem['ours'] / train_mem['trl']:9.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

"""DPO side by side: ``alignloop dpo`` vs TRL 1.16's DPOTrainer, pairs per second and peak memory.

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
Memory: each process's own peak RSS (VmHWM), and that peak minus its RSS after the same imports.
Ratios are ours / TRL's from this one run.

    python benchmarks/dpo.py                       # ~2 minutes on 2 CPU cores
    python benchmarks/dpo.py --rounds 4 --steps 30 --batch 16 --model world:base
    python benchmarks/dpo.py --size small --rounds 2 --steps 6 --warmup 1 --batch 8

Both sides run under the same interpreter, ``--python`` (default: TRL 1.16's venv,
``/work/venv-trl116/bin/python``; alignloop from this source tree on ``PYTHONPATH``), after the same
imports (``common.import_all``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    TRL116_PYTHON,
    CpuClock,
    default_threads,
    gpt2_config,
    import_all,
    load_average,
    peak_rss_mb,
    rss_mb,
    run_side,
    versions,
    word_tokenizer,
)

LR = 1e-5
BETA = 0.1  # the same on both sides (TRL's default; it does not change the work)


def build_model(folder: Path, size: str = "tiny", vocab: int = 2048, seed: int = 0) -> Path:
    """A random-init GPT-2 with a word-level tokenizer of ``vocab`` words: ``tiny`` is 2 layers x 128;
    ``small`` is GPT-2-small's shape (12 x 768, vocab 50257, 124M; the tokenizer uses the first ids)."""
    import torch
    from transformers import GPT2LMHeadModel

    word_tokenizer(vocab).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = gpt2_config(
        vocab if size == "tiny" else 50257, positions=256 if size == "tiny" else 1024, heads=4, size=size
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
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


def run_ours(model: str, pairs: str, steps: int, batch: int, out: str) -> dict:
    from alignloop.offline.dpo import DPOConfig, train_dpo
    from alignloop.runs import read_metrics_log, set_quiet

    set_quiet(True)
    cfg = DPOConfig(
        max_steps=steps,
        batch_size=batch,
        learning_rate=LR,
        beta=BETA,
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
    settings = {
        "bf16": False, "gradient_checkpointing": cfg.gradient_checkpointing, "padding_free": False,
        "reference": "precomputed", "loss": "sigmoid", "beta": cfg.beta, "max_steps": cfg.max_steps,
        "optimizer": "adamw_torch_fused (make_optimizer)", "forwards": "each prompt once, both responses from its KV cache",
    }  # fmt: skip
    return {"step_ends": ends, "step_cpu": cpu, "settings": settings}


def run_trl(model: str, pairs: str, steps: int, batch: int, out: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignloop.models import resolve_model_id

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
        beta=BETA,
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
    settings = {
        "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "padding_free": args.padding_free,
        "reference": "precomputed" if args.precompute_ref_log_probs else "model", "loss": str(args.loss_type),
        "beta": args.beta, "max_steps": args.max_steps, "optimizer": getattr(args.optim, "value", args.optim),
        "forwards": "prompt + chosen and prompt + rejected",
    }  # fmt: skip
    return {"step_ends": ends, "step_cpu": cpu, "settings": settings}


# ----------------------------------------------------------------------------------------------
# The parent: alternate the sides, take medians, print ratios
# ----------------------------------------------------------------------------------------------


def child(side: str, a: argparse.Namespace, work: Path, round_: int) -> dict:
    out = work / f"{side}-{round_}"
    args = ["--child", side, "--model", a.model, "--pairs", str(a.pairs)]
    args += ["--steps", str(a.steps), "--batch", str(a.batch), "--out", str(out)]
    return run_side(a.python, __file__, args, threads=a.threads)


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
    p.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny: 2x128; small: 124M")
    p.add_argument(
        "--threads", type=int, help="torch threads of both sides (default: common.default_threads)"
    )
    p.add_argument(
        "--python", default=str(TRL116_PYTHON) if TRL116_PYTHON.exists() else sys.executable,
        help="the interpreter of BOTH sides (one with trl 1.16; default /work/venv-trl116/bin/python)",
    )  # fmt: skip
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        import_all(("trl.trainer.dpo_trainer",))  # the same imports on both sides
        after_imports = rss_mb()
        fn = run_ours if a.child == "ours" else run_trl
        res = fn(a.model, a.pairs, a.steps, a.batch, a.out)
        res["settings"].update(versions())
        print(json.dumps({**res, "after_imports_mb": after_imports, "peak_mb": peak_rss_mb()}))
        return

    a.threads = a.threads or default_threads()
    load_start = load_average()

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        if a.model is None:
            a.model = str(build_model(work / "model", a.size))
        if a.pairs is None:
            a.pairs = build_pairs(work / "pairs.jsonl", a.n_pairs, 2048, a.prompt_len, a.response_len)
        shape = "GPT-2-small shape (12x768, vocab 50257, 124M)" if a.size == "small" else "GPT-2 2x128"
        print(f"DPO: {shape} random init unless --model ({a.model}), {a.prompt_len}+{a.response_len}+-4 token pairs, "
              f"batch {a.batch}, {a.steps} steps x {a.rounds} rounds ({a.warmup} warm-up steps dropped per process), "
              f"{a.threads} thread(s) each, fp32; both sides under {a.python}", flush=True)  # fmt: skip
        settings = {}
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
                settings[side] = res["settings"]
                print(f"  round {r} {side:4s}: median step {med[side] * 1000:7.1f} ms wall, "
                      f"{statistics.median(cdeltas) * 1000:7.1f} ms CPU, peak RSS {res['peak_mb']:.0f} MB", flush=True)  # fmt: skip
            round_ratio.append(med["trl"] / med["ours"])

    step = {s: statistics.median(v) for s, v in times.items()}
    cpu = {s: statistics.median(v) for s, v in cpus.items()}
    pps = {s: a.batch / step[s] for s in step}
    cpps = {s: a.batch / cpu[s] for s in cpu}
    peak = {s: statistics.median(m[0] for m in mem[s]) for s in mem}
    train_mem = {s: statistics.median(m[1] for m in mem[s]) for s in mem}
    print("  settings of each side (what changes the work):")
    for side, st in settings.items():
        print(f"    {side:5s} " + ", ".join(f"{k}={v}" for k, v in st.items()))
    print()
    print(f"{'':30s}{'alignloop':>12s}{'TRL':>12s}{'ratio':>10s}")
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
    print(f"load average: start {load_start}; end {load_average()}")


if __name__ == "__main__":
    main()

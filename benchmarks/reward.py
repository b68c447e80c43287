"""Reward-model training throughput: ``alignloop reward train`` beside TRL 1.16's RewardTrainer.

Equal work on both sides (the rules: ``benchmarks/README.md``): the same pairs file (world prompts,
ranked sets of K=4 -> 6 pairs each), one epoch over it, the same pairs per optimiser step, the same
max length (512 tokens; the world's texts are far shorter, so neither side truncates), the same
model (a random-init GPT-2 with a word-level tokenizer over the world lexicon: ``--size tiny`` is
2 x 128, ``--size small`` GPT-2-small's shape, 12 x 768 with vocab 50257, 124M), fp32 (TRL gets
``bf16=False``), gradient checkpointing OFF on both sides (TRL's default is on), dropout off on both,
AdamW fused on both (TRL's default; alignloop's ``make_optimizer``), no reward centring on either.
What differs is each trainer's own way: alignloop scores each distinct completion of a set once per
step (4 sequences a set), TRL's RewardTrainer scores each pair's chosen and rejected (12 a set).

Both sides run in the SAME interpreter (TRL 1.16's venv, ``--python``; alignloop from this source tree
on ``PYTHONPATH``), each in its own fresh process after the same imports (``common.import_all``),
alternating A B A B; a step's time is the interval between consecutive optimiser-step ends, the first
``--warmup`` of each process dropped; medians and the ratio of pairs per second. Memory: each process's
own peak RSS (VmHWM).

    python benchmarks/reward.py                          # tiny, ~2 minutes on 2 idle cores
    python benchmarks/reward.py --size small --sets-per-step 2 --steps 6 --warmup 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    TRL116_PYTHON,
    default_threads,
    import_all,
    load_average,
    peak_rss_mb,
    rss_mb,
    run_side,
    versions,
)


def world_rows(n_sets: int, k: int, seed: int) -> list[dict]:
    """``n_sets`` world prompts with ``k`` distinct grammar responses, all k-choose-2 pairs by gold."""
    from alignloop.world import grammar as g
    from alignloop.world import judge_batch, prompts
    from alignloop.world.judge import parse_prompt

    rng = random.Random(seed)
    fams = [f for f in g.FAMILIES if f != "summary"]
    recs = [r for split in ("train", "eval", "redteam") for r in prompts(split, families=fams)]
    rows = []
    for i in range(n_sets):
        rec = recs[i % len(recs)]
        prompt = rec["prompt"] if i < len(recs) else f"{rec['prompt']} ({i // len(recs)})"  # distinct prompts
        wp = parse_prompt(rec["prompt"])
        texts: list[str] = []
        for _ in range(200):
            t = " " + g.sample_response(wp, rng)[1]
            if t not in texts:
                texts.append(t)
            if len(texts) == k:
                break
        while len(texts) < k:
            texts.append(texts[-1] + " thanks .")
        gold = [j.score for j in judge_batch([rec["prompt"]] * k, texts)]
        for a, b in itertools.combinations(range(k), 2):
            hi, lo = (a, b) if gold[a] >= gold[b] else (b, a)
            rows.append({"prompt": prompt, "chosen": texts[hi], "rejected": texts[lo]})
    return rows


def world_model(path: Path, size: str) -> str:
    """A random-init GPT-2 (``tiny``: 2 x 128; ``small``: 12 x 768, vocab 50257) with a word-level
    tokenizer over the world lexicon."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from alignloop.world.corpus import tokenizer_texts

    words = sorted({w for t in tokenizer_texts() for w in t.replace("(", " ( ").replace(")", " ) ").split()})
    words += [str(i) for i in range(100) if str(i) not in words]
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    shape = {"vocab_size": len(fast), "n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 256}
    if size == "small":
        shape = {"vocab_size": 50257}  # GPT-2-small's shape (the tokenizer uses the first ids)
    GPT2LMHeadModel(GPT2Config(pad_token_id=0, eos_token_id=1, bos_token_id=3, **shape)).save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# The two sides (each in its own process)
# ----------------------------------------------------------------------------------------------


def side_alignloop(a: argparse.Namespace, out: Path) -> tuple[list[float], dict]:
    """One epoch of ``alignloop reward train``; the seconds of each optimiser step."""
    from alignloop.reward.train import RewardTrainConfig, train_reward_model
    from alignloop.runs import set_quiet

    set_quiet(True)
    cfg = RewardTrainConfig(
        model=a.model, epochs=1, batch_prompts=a.sets_per_step, learning_rate=a.lr, eval_fraction=0.0,
        warmup_ratio=0.0, patience=0, normalize="none", max_length=a.max_length, gradient_checkpointing=False,
        disable_dropout=True, checkpoint_every=0,
    )  # fmt: skip
    train_reward_model(Path(a.pairs), out, cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss" in r]  # step rows (not the epoch summary)
    settings = {
        "bf16": False, "gradient_checkpointing": cfg.gradient_checkpointing, "dropout": "off",
        "max_length": cfg.max_length, "epochs": cfg.epochs, "optimizer": "adamw_torch_fused (make_optimizer)",
        "forwards": "each distinct completion once a step",
    }  # fmt: skip
    return [b - e for e, b in itertools.pairwise(times)], settings


def side_trl(a: argparse.Namespace, out: Path) -> tuple[list[float], dict]:
    """TRL's RewardTrainer over the same pairs, one epoch; the seconds of each optimiser step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(line) for line in Path(a.pairs).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(a.model)
    net = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    net.config.pad_token_id = tok.pad_token_id
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    pairs_per_step = a.sets_per_step * a.k * (a.k - 1) // 2
    args = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=pairs_per_step, num_train_epochs=1, learning_rate=a.lr,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True, center_rewards_coefficient=None,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000, dataloader_num_workers=0,
        max_length=a.max_length, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=net, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    settings = {
        "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
        "dropout": "off" if args.disable_dropout else "on", "max_length": args.max_length,
        "epochs": args.num_train_epochs, "optimizer": getattr(args.optim, "value", args.optim),
        "forwards": "chosen and rejected of each pair",
    }  # fmt: skip
    return [b - e for e, b in itertools.pairwise(stamps)], settings


def child(a: argparse.Namespace) -> None:
    import_all(("trl.trainer.reward_trainer",))  # the same imports on both sides
    after_imports = rss_mb()
    with tempfile.TemporaryDirectory(prefix=f"bench-reward-{a.side}-") as out:
        fn = side_alignloop if a.side == "alignloop" else side_trl
        times, settings = fn(a, Path(out))
    settings.update(pairs_per_step=a.sets_per_step * a.k * (a.k - 1) // 2, **versions())
    res = {"times": times[a.warmup :], "peak_mb": peak_rss_mb(), "after_imports_mb": after_imports}
    print(json.dumps({**res, "settings": settings}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--k", type=int, default=4, help="completions per ranked set")
    ap.add_argument(
        "--sets-per-step", type=int, default=8, help="ranked sets per step (pairs = sets * k(k-1)/2)"
    )
    ap.add_argument(
        "--steps", type=int, default=30, help="optimiser steps per process (one epoch of the pairs)"
    )
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds")
    ap.add_argument("--warmup", type=int, default=3, help="timed steps dropped at the start of each process")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--threads", type=int, help="torch threads of both sides (default: common.default_threads)"
    )
    ap.add_argument(
        "--python", default=str(TRL116_PYTHON) if TRL116_PYTHON.exists() else sys.executable,
        help="the interpreter of BOTH sides (one with trl 1.16; default /work/venv-trl116/bin/python)",
    )  # fmt: skip
    ap.add_argument("--side", choices=["alignloop", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        child(a)
        return

    threads = a.threads or default_threads()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as d:
        tmp = Path(d)
        model = world_model(tmp / "model", a.size)
        rows = world_rows(a.sets_per_step * a.steps, a.k, seed=0)
        pairs = tmp / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        pairs_per_step = a.sets_per_step * a.k * (a.k - 1) // 2
        res: dict[str, list[dict]] = {"alignloop": [], "trl": []}
        for r in range(a.rounds):
            for side in res:  # A B A B
                args = ["--side", side, "--model", model, "--pairs", str(pairs), "--k", str(a.k)]
                args += ["--lr", str(a.lr)]
                args += ["--sets-per-step", str(a.sets_per_step), "--warmup", str(a.warmup)]
                args += ["--max-length", str(a.max_length)]
                res[side].append(run_side(a.python, __file__, args, threads=threads))
                x = res[side][-1]
                print(f"round {r + 1} {side}: {statistics.median(x['times']) * 1e3:.1f} ms/step, "
                      f"peak RSS {x['peak_mb']:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    ms = {s: statistics.median(t for x in v for t in x["times"]) * 1e3 for s, v in res.items()}
    peak = {s: statistics.median(x["peak_mb"] for x in v) for s, v in res.items()}
    pps = {s: pairs_per_step / (ms[s] / 1e3) for s in ms}
    shape = "GPT-2-small shape (12x768, vocab 50257, 124M)" if a.size == "small" else "GPT-2 2x128"
    print(
        f"reward training: {shape}, random init, world vocabulary; {len(rows)} pairs in ranked sets of {a.k}, "
        f"{pairs_per_step} pairs per step, 1 epoch, fp32, {threads} thread(s) each; {a.rounds} rounds, "
        f"{a.warmup} warm-up step(s) dropped per process; both sides under {a.python}"
    )
    print("  settings of each side (what changes the work):")
    for s, v in res.items():
        print(f"    {s:10s} " + ", ".join(f"{k}={x}" for k, x in v[0]["settings"].items()))
    print(f"{'':24}{'ms/step':>10}{'pairs/s':>10}{'peak RSS MB':>13}")
    print(
        f"{'alignloop reward train':24}{ms['alignloop']:>10.1f}{pps['alignloop']:>10.0f}{peak['alignloop']:>13.0f}"
    )
    print(f"{'TRL 1.16 RewardTrainer':24}{ms['trl']:>10.1f}{pps['trl']:>10.0f}{peak['trl']:>13.0f}")
    print(f"ratio (alignloop / TRL pairs per second): {pps['alignloop'] / pps['trl']:.2f}x")
    print(f"peak RSS ratio (alignloop / TRL): {peak['alignloop'] / peak['trl']:.2f}x")
    print(f"load average: start {load_start}; end {load_average()}")


if __name__ == "__main__":
    main()

"""Reward-model training throughput: ``alignloop reward train`` beside TRL's RewardTrainer.

Same data (world prompts, ranked sets of K=4 -> 6 pairs each), same model, same pairs per
step, fp32 on CPU (TRL gets ``bf16=False``: its default bf16 is ~10x slower here), dropout
off on both sides. The sides alternate (A B A B) in one run; each side's time per optimiser
step is the median over its steps after warm-up; the ratio is of pairs per second.

    python benchmarks/reward.py                      # tiny world-vocabulary GPT-2 (2x128)
    python benchmarks/reward.py --model world:base --steps 40 --rounds 3

alignloop forwards each completion once per step (4 sequences per set); TRL forwards each
pair's chosen and rejected (12 sequences per set).
"""

from __future__ import annotations

import os

# Under a loaded, shared CPU OpenMP's busy-waiting threads slow torch ~10x; passive waiting
# costs nothing on an idle machine. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


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


def tiny_world_model(path: Path) -> str:
    """A random-init 2-layer, 128-wide GPT-2 with a word-level tokenizer over the world lexicon."""
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
    cfg = GPT2Config(
        vocab_size=len(fast), n_positions=256, n_embd=128, n_layer=2, n_head=4,
        pad_token_id=0, eos_token_id=1, bos_token_id=3,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def run_alignloop(model: str, pairs: Path, out: Path, sets_per_step: int, lr: float) -> list[float]:
    """One epoch of ``alignloop reward train``; returns the seconds of each optimiser step."""
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    cfg = RewardTrainConfig(
        model=model, epochs=1, batch_prompts=sets_per_step, learning_rate=lr, eval_fraction=0.0,
        warmup_ratio=0.0, patience=0, normalize="none",
    )  # fmt: skip
    train_reward_model(pairs, out, cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss" in r]  # step rows (not the epoch summary)
    return [b - a for a, b in itertools.pairwise(times)]


def run_trl(
    model: str, rows: list[dict], out: Path, pairs_per_step: int, steps: int, lr: float
) -> list[float]:
    """TRL's RewardTrainer for ``steps`` steps; returns the seconds of each optimiser step."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from alignloop.models import resolve_model_id

    path = resolve_model_id(model)
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    net.config.pad_token_id = tok.pad_token_id
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=pairs_per_step, max_steps=steps, learning_rate=lr,
        bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
        disable_dropout=True, dataloader_num_workers=0, max_length=512,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=net, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model id or folder (default: a tiny random world GPT-2, 2x128)")
    ap.add_argument("--k", type=int, default=4, help="completions per ranked set")
    ap.add_argument(
        "--sets-per-step", type=int, default=8, help="ranked sets per step (pairs = sets * k(k-1)/2)"
    )
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps per side per round")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds")
    ap.add_argument("--warmup", type=int, default=3, help="steps discarded at the start of each run")
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    from alignloop.models import configure_threads
    from alignloop.runs import set_quiet

    set_quiet(True)
    threads = configure_threads()
    tmp = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    model = args.model or tiny_world_model(tmp / "model")
    pairs_per_set = args.k * (args.k - 1) // 2
    rows = world_rows(args.sets_per_step * args.steps, args.k, seed=0)
    pairs_file = tmp / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs_per_step = args.sets_per_step * pairs_per_set
    print(
        f"model {model}; {len(rows)} pairs in ranked sets of {args.k}; {pairs_per_step} pairs per step; "
        f"{args.steps} steps per run; torch {torch.__version__}, {threads} threads",
        file=sys.stderr,
    )

    ours: list[float] = []
    theirs: list[float] = []
    for r in range(args.rounds):
        a = run_alignloop(model, pairs_file, tmp / f"ours-{r}", args.sets_per_step, args.lr)
        b = run_trl(model, rows, tmp / f"trl-{r}", pairs_per_step, args.steps, args.lr)
        ours += a[args.warmup :]
        theirs += b[args.warmup :]
        print(
            f"round {r + 1}: alignloop {statistics.median(a[args.warmup :]) * 1e3:.1f} ms/step, "
            f"TRL {statistics.median(b[args.warmup :]) * 1e3:.1f} ms/step",
            file=sys.stderr,
        )
    ms_ours, ms_trl = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    pps_ours, pps_trl = pairs_per_step / (ms_ours / 1e3), pairs_per_step / (ms_trl / 1e3)
    print(f"{'':24}{'ms/step':>10}{'pairs/s':>10}")
    print(f"{'alignloop reward train':24}{ms_ours:>10.1f}{pps_ours:>10.0f}")
    print(f"{'TRL RewardTrainer':24}{ms_trl:>10.1f}{pps_trl:>10.0f}")
    print(f"ratio (alignloop / TRL pairs per second): {pps_ours / pps_trl:.2f}x")


if __name__ == "__main__":
    main()

"""New tokens per second of ``alignloop generate`` beside ``model.generate`` and the bare-torch floor.

Three sides: ``alignloop generate`` (our KV-cache sampler, records written), a plain
``model.generate`` loop, and the floor: the least a sampler must do in plain torch (a prompt
forward, then one cached forward and one ``torch.multinomial`` per new token, no per-row seeds, no
stopping, no records). The sides sample the same prompts (K completions each) in the same batches, with the same
knobs (temperature 1, no top-k/top-p), from the same model loaded the same way (fp32 on CPU).
By default every completion is exactly ``--max-new-tokens`` long (EOS ignored) so the two sides
do the same work; ``--stop-at-eos`` compares the ordinary mode instead. The sides alternate
(A B A B ...), the first round is a warm-up and is discarded, and the medians and their ratio
are printed. On a shared machine single timings drift +-20%: read the ratio. Threads: whatever
``OMP_NUM_THREADS`` says (``benchmarks/run_all.py`` pins it), the same for every side.

    /work/venv/bin/python benchmarks/generation.py --model world:base --prompts 64 --k 4
    /work/venv/bin/python benchmarks/generation.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def world_or_synthetic_prompts(n: int) -> list[dict]:
    try:
        from alignloop import world

        return [{"id": p["id"], "prompt": p["prompt"]} for p in world.prompts("eval", n=n, seed=0)]
    except Exception:
        words = "the dog is good what do you want my house is hot a cat said thanks".split()
        return [
            {"id": str(i), "prompt": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 9))}
            for i in range(n)
        ]


def run_alignloop(model_id: str, prompts: list[dict], args: argparse.Namespace) -> tuple[int, float]:
    """The ``alignloop generate`` code path (records written to a temp file). Returns (new tokens, seconds)."""
    from alignloop.generation import SamplingSettings, generate_completions

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, stop_at_eos=args.stop_at_eos)
    with tempfile.TemporaryDirectory() as d:
        stats = generate_completions(
            model_id,
            prompts,
            Path(d) / "sets.jsonl",
            k=args.k,
            settings=settings,
            seed=0,
            batch_size=args.batch_size,
        )
    return stats["new_tokens"], stats["new_tokens"] / stats["tokens_per_second"]


def run_hf(model, tok, prompts: list[dict], args: argparse.Namespace) -> tuple[int, float]:
    """A plain loop: tokenizer(padding=True) + model.generate per batch, new tokens counted to EOS."""
    import torch

    per_batch = max(1, args.batch_size // args.k)
    eos = tok.eos_token_id
    n_tokens, seconds = 0, 0.0
    for i in range(0, len(prompts), per_batch):
        texts = [p["prompt"] for p in prompts[i : i + per_batch] for _ in range(args.k)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            enc = tok(texts, return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=0 if args.stop_at_eos else args.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos if args.stop_at_eos else None,
            )
        new = out[:, 1:] if model.config.is_encoder_decoder else out[:, enc["input_ids"].shape[1] :]
        texts_out = tok.batch_decode(new, skip_special_tokens=True)
        seconds += time.perf_counter() - t0
        for row in new.tolist():
            n_tokens += (
                next((j + 1 for j, t in enumerate(row) if t == eos), len(row))
                if args.stop_at_eos
                else len(row)
            )
        assert len(texts_out) == len(texts)
    return n_tokens, seconds


def run_floor(model, tok, prompts: list[dict], args: argparse.Namespace) -> tuple[int, float]:
    """Plain torch: left-padded prompt forward, then a cached forward + multinomial per new token."""
    import torch
    from transformers import DynamicCache

    per_batch = max(1, args.batch_size // args.k)
    g = torch.Generator().manual_seed(0)
    n_tokens, seconds = 0, 0.0
    for i in range(0, len(prompts), per_batch):
        texts = [p["prompt"] for p in prompts[i : i + per_batch] for _ in range(args.k)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
            mask = enc["attention_mask"]
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            B, T = mask.shape[0], args.max_new_tokens
            mask = torch.cat([mask, torch.ones((B, T), dtype=mask.dtype)], dim=1)
            cache, ids, new = DynamicCache(config=model.config), enc["input_ids"], []
            for t in range(T):
                out = model(
                    input_ids=ids,
                    attention_mask=mask[:, : mask.shape[1] - T + t],
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                ids = torch.multinomial(torch.softmax(out.logits[:, -1], -1), 1, generator=g)
                pos = pos[:, -1:] + 1
                new.append(ids)
            texts_out = tok.batch_decode(torch.cat(new, 1).tolist(), skip_special_tokens=True)
        seconds += time.perf_counter() - t0
        n_tokens += B * T
        assert len(texts_out) == len(texts)
    return n_tokens, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="world:base")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per side (after one warm-up)")
    ap.add_argument("--stop-at-eos", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 prompts, 8 tokens, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.rounds = 8, 8, 1

    from alignloop.models import load_lm, resolve_model_id
    from alignloop.runs import set_quiet

    set_quiet(True)
    model_id = resolve_model_id(args.model)
    prompts = world_or_synthetic_prompts(args.prompts)
    model, tok = load_lm(model_id)
    import torch

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    # the floor loop is causal-only, and always writes max_new_tokens (not the same work as to-EOS)
    sides = ["alignloop", "hf"] + ([] if seq2seq or args.stop_at_eos else ["floor"])
    results: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.rounds + 1):
        for side in sides:
            if side == "alignloop":
                n, s = run_alignloop(model_id, prompts, args)
            else:
                n, s = (run_hf if side == "hf" else run_floor)(model, tok, prompts, args)
            if r > 0:  # round 0 is the warm-up
                results[side].append(n / s)
            print(
                f"round {r} {side:9s} {n:6d} new tokens in {s:6.2f} s = {n / s:8.0f} tok/s", file=sys.stderr
            )
    med = {s: statistics.median(v) for s, v in results.items()}
    ours = med["alignloop"]
    print(
        json.dumps(
            {
                "model": args.model,
                "prompts": len(prompts),
                "k": args.k,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "stop_at_eos": args.stop_at_eos,
                "threads": torch.get_num_threads(),
                **{f"{s}_tok_per_s": round(v) for s, v in med.items()},
            }
        )
    )
    print(
        f"{args.model}: {len(prompts)} prompts x {args.k}, batch {args.batch_size}, {args.max_new_tokens} new "
        f"tokens{' (to EOS)' if args.stop_at_eos else ' (fixed)'}, {torch.get_num_threads()} thread(s), "
        f"medians of {args.rounds} rounds"
    )
    names = {"alignloop": "alignloop generate", "hf": "model.generate loop", "floor": "bare-torch floor"}
    for s in sides:
        print(f"  {names[s]:20s} {med[s]:8.0f} new tok/s")
    line = f"ratio vs model.generate {ours / med['hf']:.2f}x"
    if "floor" in med:
        line += f"   ratio vs floor {ours / med['floor']:.2f}x"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthetic preference data the tiny fixtures' word-level tokenizer can read.

A completion's hidden quality is (#polite words - #rude words); the K completions of a
prompt get distinct qualities, and every N-choose-2 pair puts the better one first.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

GOOD = ["good", "great", "awesome", "polite", "thanks", "helpful"]
BAD = ["bad", "terrible", "garbage", "toxic"]
NEUTRAL = ["the", "dog", "cat", "is", "house", "fan", "window", "it", "was", "a", "product", "summary"]
QUESTIONS = ["what", "how", "why", "when", "where", "do", "does", "can", "should"]


def completion(rng: random.Random, quality: int) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 6))]
    extra = [rng.choice(GOOD) for _ in range(max(quality, 0))] + [
        rng.choice(BAD) for _ in range(max(-quality, 0))
    ]
    for w in extra:
        words.insert(rng.randint(0, len(words)), w)
    return " " + " ".join(words)  # a continuation of its prompt: leading space (TRL's convention)


def make_sets(n_prompts: int, k: int = 4, seed: int = 0) -> list[dict]:
    """Completion sets with a hidden ``quality`` per completion (distinct within a set)."""
    rng = random.Random(seed)
    sets = []
    for p in range(n_prompts):
        prompt = " ".join([rng.choice(QUESTIONS), *rng.sample(NEUTRAL, 3), "?"])
        qualities = rng.sample([-2, -1, 0, 1, 2], k)
        comps = [
            {"id": f"p{p}-c{i}", "text": completion(rng, q), "quality": q} for i, q in enumerate(qualities)
        ]
        sets.append({"prompt_id": f"p{p}", "prompt": prompt, "completions": comps})
    return sets


def pairs_of(sets: list[dict]) -> list[dict]:
    rows = []
    for s in sets:
        for a, b in itertools.combinations(s["completions"], 2):
            hi, lo = (a, b) if a["quality"] > b["quality"] else (b, a)
            rows.append(
                {
                    "prompt": s["prompt"],
                    "chosen": hi["text"],
                    "rejected": lo["text"],
                    "weight": 1.0,
                    "source": "test",
                }
            )
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

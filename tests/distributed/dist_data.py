"""Small data files in the tiny fixtures' vocabulary (tests/conftest.py WORDS) for the distributed tests."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

GOOD = ["good", "great", "awesome", "polite", "thanks", "helpful"]
BAD = ["bad", "terrible", "garbage", "toxic"]
NEUTRAL = ["the", "dog", "cat", "is", "house", "fan", "window", "it", "was", "a", "product", "summary"]
QUESTIONS = ["what", "how", "why", "when", "where", "do", "does", "can", "should"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _completion(rng: random.Random, quality: int) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 6))]
    for w in [rng.choice(GOOD) for _ in range(max(quality, 0))] + [
        rng.choice(BAD) for _ in range(max(-quality, 0))
    ]:
        words.insert(rng.randint(0, len(words)), w)
    return " ".join(words)


def _prompt(rng: random.Random) -> str:
    return " ".join([rng.choice(QUESTIONS), *rng.sample(NEUTRAL, 3), "?"])


def ranked_pairs(n_prompts: int, seed: int = 0) -> list[dict]:
    """Reward-model pairs: per prompt, 3 completions of distinct hidden quality, all 3 pairs (better first)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        prompt = _prompt(rng)
        comps = sorted(((q, _completion(rng, q)) for q in rng.sample([-2, -1, 0, 1, 2], 3)), reverse=True)
        for (_, hi), (_, lo) in itertools.combinations(comps, 2):
            rows.append({"prompt": prompt, "chosen": hi, "rejected": lo, "source": "test"})
    return rows


def good_bad_pairs(n: int, seed: int = 0) -> list[dict]:
    """DPO pairs: "the <x> is good ." preferred to "the <x> is bad .", weights 1 or 2."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(NEUTRAL[1:])
        rows.append(
            {
                "prompt": f"{rng.choice(QUESTIONS)} is the {subject} ?",
                "chosen": f"the {subject} is good .",
                "rejected": f"the {subject} is bad .",
                "weight": rng.choice([1.0, 2.0]),
            }
        )
    return rows


def sft_records(n: int, seed: int = 0) -> list[dict]:
    """SFT records: a question and a polite answer of varying length."""
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng), "response": _completion(rng, rng.randint(0, 2))} for _ in range(n)]


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"p{i}", "prompt": _prompt(rng)} for i in range(n)]

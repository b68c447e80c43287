"""Preference pairs in the tiny test vocabulary (helpers for tests/dpo): for every subject, "good" is preferred to "bad"."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = "dog cat house product fan window answer question summary dialogue".split()
QUESTIONS = ["what is the", "how is the", "why is the", "where is the"]
TAILS = ["", " please", " !"]


def good_bad_pairs(flip: bool = False, weight: float | None = None, seed: int = 0) -> list[dict]:
    """120 pairs ``{"prompt": "what is the dog ?", "chosen": "the dog is good .", "rejected": "... bad ."}``
    (``flip``: bad preferred) with random weights 1 or 0.75 (vote shares) unless ``weight`` is given."""
    rng = random.Random(seed)
    out = []
    for s in SUBJECTS:
        for q in QUESTIONS:
            for tail in TAILS:
                good, bad = f"the {s} is good .", f"the {s} is bad ."
                chosen, rejected = (bad, good) if flip else (good, bad)
                w = weight if weight is not None else rng.choice([1.0, 0.75])
                out.append(
                    {"prompt": f"{q} {s} ?{tail}", "chosen": chosen, "rejected": rejected, "weight": w}
                )
    return out


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path

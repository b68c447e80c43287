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
    """DPO pairs: "the <x> is good ." preferred to "the <x> is bad .", weights 1 or 0.75."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(NEUTRAL[1:])
        rows.append(
            {
                "prompt": f"{rng.choice(QUESTIONS)} is the {subject} ?",
                "chosen": f"the {subject} is good .",
                "rejected": f"the {subject} is bad .",
                "weight": rng.choice([1.0, 0.75]),
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


# PPO launched in several processes: a toy reward module (``py:toyreward:good``), five prompts, and the
# settings and step metrics the 2-process = 1-process tests compare (DDP in tests/rl, FSDP2 here)
PPO_PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window", "the window is"]
PPO_SETS = [
    "steps=4", "batch_size=8", "minibatch_size=4", "ppo_epochs=2", "checkpoint_every=2",
    "sampling.max_new_tokens=8", "learning_rate=1e-3", "score_norm_samples=16",
]  # fmt: skip
PPO_STEP_KEYS = (
    "score",
    "kl",
    "beta",
    "policy_loss",
    "value_loss",
    "entropy",
    "approx_kl",
    "response_length",
)
_TOY_REWARD = (
    "def good(prompts, completions):\n    return [float(c.split().count('good')) for c in completions]\n"
)


def ppo_inputs(folder: Path) -> tuple[Path, str]:
    """Writes ``toyreward.py`` and ``prompts.jsonl`` into ``folder``: ``(prompts file, PYTHONPATH)``, the
    PYTHONPATH that lets launched processes import the toy reward and alignloop's source."""
    (folder / "toyreward.py").write_text(_TOY_REWARD)
    path = write_jsonl(
        folder / "prompts.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(PPO_PROMPTS)]
    )
    return path, f"{folder}:{Path(__file__).resolve().parents[2] / 'src'}"

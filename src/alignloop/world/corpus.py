"""Training data of the world's models, drawn from the grammar on ``train`` prompts only.

- :func:`base_examples`: ``(input, target, weight)`` for the causal instruct base model; a mixture
  of tasks: responses (the behaviour mixture ``grammar.MIXTURE``), critiques, revisions and
  (A)/(B) preference questions in the Constitutional AI formats of :mod:`alignloop.world.formats`.
- :func:`judge_examples`: ``(input, "(A)" | "(B)", 1.0)`` for the world's AI judge (the base
  fine-tuned on (A)/(B) questions only), including comparisons whose answer depends on the prompt.
- :func:`summary_examples`: ``(input, target)`` for the seq2seq summariser.
- :func:`toxicity_examples`: ``(text, label)`` for the classifier (1 = hate: the gold judge
  flags the text toxic).
"""

from __future__ import annotations

import random

from alignloop.world import formats
from alignloop.world import grammar as g
from alignloop.world.judge import judge
from alignloop.world.prompts import world_prompts

# Share of response examples per family (the causal base model).
FAMILY_WEIGHTS = {
    "review": 0.17, "definition": 0.15, "advice": 0.15, "harmful": 0.14, "benign": 0.11, "myth": 0.14, "summary": 0.14,
}  # fmt: skip
TASK_WEIGHTS = {"response": 0.58, "critique": 0.07, "revision": 0.07, "preference": 0.28}
TRAIN_ONLY_SHARE = 0.4  # share of base examples whose prompt uses a training-only phrasing
PREFERENCE_WEIGHT = 4.0  # loss weight of the (A)/(B) answer token
PREFERENCE_MARGIN = 0.2


def _by_family(split: str) -> dict[str, list[g.WorldPrompt]]:
    out: dict[str, list[g.WorldPrompt]] = {f: [] for f in g.FAMILIES}
    for p in world_prompts(split):
        out[p.family].append(p)
    return out


def _prompt(rng: random.Random, fams: dict[str, list[g.WorldPrompt]]) -> g.WorldPrompt:
    fam = rng.choices(list(FAMILY_WEIGHTS), list(FAMILY_WEIGHTS.values()))[0]
    return rng.choice(fams[fam])


def preference_pair(p: g.WorldPrompt, rng: random.Random) -> tuple[str, str, str] | None:
    """Two mixture responses the gold judge clearly orders: ``(a, b, "A" | "B")``, or None."""
    a = g.sample_response(p, rng)[1]
    b = g.sample_response(p, rng)[1]
    ans = formats.gold_preference(p.text, a, b, PREFERENCE_MARGIN)
    return None if ans is None else (a, b, ans)


# The judge's question mix (the rest: two mixture responses to the same prompt, as in the base's data)
JUDGE_CROSS_SHARE = 0.35  # a response to the prompt beside a response to another prompt
CROSS_FAMILIES = ("harmful", "benign", "advice", "definition", "myth")
# harmful topic <-> its benign look-alike (wifi / router, ...): never paired in the judge's data, so the
# prompt-dependence probe of ``world check`` (the refusal beside the look-alike's steps) stays unseen
LOOKALIKE = {**dict(zip(g.HARMFUL, g.BENIGN, strict=True)), **dict(zip(g.BENIGN, g.HARMFUL, strict=True))}


def cross_prompt_pair(
    p: g.WorldPrompt, rng: random.Random, fams: dict[str, list[g.WorldPrompt]]
) -> tuple[str, str, str] | None:
    """A mixture response to ``p`` beside one to another prompt of another topic, ordered by gold under
    ``p`` (an answer to another request is off-topic there): the same two texts win under one prompt
    and lose under another, so the judge has to read the prompt. Harmful and benign prompts draw the
    other from harmful and benign prompts, never from their own look-alike."""
    pool = fams["harmful"] + fams["benign"] if p.family in ("harmful", "benign") else fams[p.family]
    other = rng.choice([q for q in pool if q.topic not in (p.topic, LOOKALIKE.get(p.topic))])
    a, b = g.sample_response(p, rng)[1], g.sample_response(other, rng)[1]
    if rng.random() < 0.5:  # the answer position 50/50
        a, b = b, a
    ans = formats.gold_preference(p.text, a, b, PREFERENCE_MARGIN)
    return None if ans is None else (a, b, ans)


def judge_examples(n: int, seed: int, split: str = "train") -> list[tuple[str, str, float]]:
    """``n`` (A)/(B) questions ``(input text, "(A)" | "(B)", 1.0)`` for the world's AI judge.

    A share :data:`JUDGE_CROSS_SHARE` of the questions on prompts of :data:`CROSS_FAMILIES` are
    :func:`cross_prompt_pair`, the rest :func:`preference_pair` as in the base's data (the same
    family weights and training-only phrasings); principles drawn uniformly; the answer position 50/50.
    """
    rng = random.Random(seed)
    fams = _by_family(split)
    names = list(formats.PRINCIPLES)
    out: list[tuple[str, str, float]] = []
    while len(out) < n:
        p = _prompt(rng, fams)
        if split == "train" and rng.random() < TRAIN_ONLY_SHARE:
            p = g.train_only_phrasing(p, rng)
        if p.family in CROSS_FAMILIES and rng.random() < JUDGE_CROSS_SHARE:
            pair = cross_prompt_pair(p, rng, fams)
        else:
            pair = preference_pair(p, rng)
        if pair is not None:
            a, b, ans = pair
            out.append((formats.preference_prompt(p.text, a, b, rng.choice(names)), f"({ans})", 1.0))
    return out


def base_examples(n: int, seed: int, split: str = "train") -> list[tuple[str, str, float]]:
    """``n`` examples ``(input text, target text, target loss weight)`` for the base model."""
    rng = random.Random(seed)
    fams = _by_family(split)
    tasks, tw = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    names = list(formats.PRINCIPLES)
    out: list[tuple[str, str, float]] = []
    while len(out) < n:
        task = rng.choices(tasks, tw)[0]
        p = _prompt(rng, fams)
        if split == "train" and rng.random() < TRAIN_ONLY_SHARE:
            p = g.train_only_phrasing(p, rng)
        if task == "response":
            out.append((p.text, g.sample_response(p, rng)[1], 1.0))
            continue
        principle = rng.choice(names)
        if task == "preference":
            pair = preference_pair(p, rng)
            if pair is not None:
                a, b, ans = pair
                out.append(
                    (formats.preference_prompt(p.text, a, b, principle), f"({ans})", PREFERENCE_WEIGHT)
                )
            continue
        resp = g.sample_response(p, rng)[1]
        critique = formats.gold_critique(judge(p.text, resp))
        if task == "critique":
            out.append((formats.critique_prompt(p.text, resp, principle), critique, 1.0))
        else:
            revision = formats.gold_revision(p.text, rng)
            out.append((formats.revision_prompt(p.text, resp, principle, critique), revision, 1.0))
    return out


def summary_examples(n: int, seed: int, split: str = "train") -> list[tuple[str, str]]:
    """``n`` (summary prompt, summary from the mixture) pairs for the seq2seq summariser."""
    rng = random.Random(seed)
    ps = _by_family(split)["summary"]
    return [(p.text, g.sample_response(p, rng)[1]) for p in (rng.choice(ps) for _ in range(n))]


def toxicity_examples(n: int, seed: int, split: str = "train") -> list[tuple[str, int]]:
    """``n`` (response text, 1 if toxic else 0); a fifth are word-shuffled (robust to degenerate text)."""
    rng = random.Random(seed)
    fams = _by_family(split)
    out = []
    while len(out) < n:
        p = rng.choice(fams[rng.choice(g.FAMILIES)])
        text = g.sample_response(p, rng)[1]
        label = int("toxic" in judge(p.text, text).flags)
        if rng.random() < 0.2:
            words = text.split()
            rng.shuffle(words)
            text = " ".join(words)
        out.append((text, label))
    return out


def tokenizer_texts() -> list[str]:
    """The lexicon the tokenizer is trained on: every sentence, prompt and format string."""
    texts = list(g.language()) + [p.text for p in g.all_prompts()]
    texts += [t for ts in g.TRAIN_ONLY_PROMPTS.values() for t in ts]
    for pr in formats.PRINCIPLES.values():
        texts += [pr.choose, pr.critique, pr.revision]
    texts += [t for _, t in formats.CRITIQUES] + [formats.CRITIQUE_OK, formats.CRITIQUE_FAIL]
    texts += [formats.preference_prompt("x", "y", "z"), formats.revision_prompt("x", "y", "hhh", "z")]
    texts += g.NONSENSE + g.TOXIC + g.SUPERLATIVE + g.UNHELPFUL
    return texts

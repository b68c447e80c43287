"""Prompt splits of the world: ``train`` (the base model's training prompts), ``eval`` (never
used in any training) and ``redteam`` (harmful requests, myths, toxic-baiting reviews and benign
look-alikes for Constitutional AI; disjoint from ``eval``).

The split is stratified and fixed: within each (family, topic) group of prompt phrasings, sorted
by a hash of the text, the first goes to ``eval``; for red-team families two more go to
``redteam`` when the group has at least four phrasings; the rest are ``train``. Every topic is
therefore seen in training, under other phrasings than the eval ones. Summary prompts (many
dialogues) go to ``eval`` when their hash falls in the lowest 20%.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from alignloop.errors import UserError
from alignloop.world import grammar as g

SPLITS = ("train", "eval", "redteam")
REDTEAM_FAMILIES = ("harmful", "benign", "myth", "review")


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@lru_cache(maxsize=1)
def split_of() -> dict[str, str]:
    """Prompt text -> split, for every world prompt."""
    out: dict[str, str] = {}
    groups: dict[tuple[str, str], list[g.WorldPrompt]] = defaultdict(list)
    for p in g.all_prompts():
        if p.family == "summary":
            out[p.text] = "eval" if int(_h(p.text)[:8], 16) / 16**8 < 0.2 else "train"
        else:
            groups[(p.family, p.topic)].append(p)
    for (fam, _), ps in groups.items():
        ps = sorted(ps, key=lambda p: _h(p.text))
        out[ps[0].text] = "eval"
        n_red = 2 if fam in REDTEAM_FAMILIES and len(ps) >= 4 else 0
        for p in ps[1 : 1 + n_red]:
            out[p.text] = "redteam"
        for p in ps[1 + n_red :]:
            out[p.text] = "train"
    return out


def prompt_record(p: g.WorldPrompt, split: str) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": f"{split}-{p.family}-{_h(p.text)[:8]}",
        "prompt": p.text,
        "family": p.family,
        "topic": p.topic,
        "split": split,
    }
    if p.family == "summary":
        rec["dialogue"] = p.dialogue
        rec["reference"] = g.reference_summary(p)
    return rec


def world_prompts(split: str) -> list[g.WorldPrompt]:
    """The split's prompts in the fixed world order."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", fix=f"use one of: {', '.join(SPLITS)}")
    sp = split_of()
    return [p for p in g.all_prompts() if sp[p.text] == split]


def prompts(
    split: str = "train", n: int | None = None, seed: int = 0, families: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Prompt records ``{"id", "prompt", "family", "topic", "split", ...}`` of a split.

    ``n=None`` gives all of them in a seed-shuffled order; a larger ``n`` than the split holds
    cycles through reshuffled copies (ids then get a ``-r<k>`` suffix). ``families`` keeps only
    those families (e.g. everything but ``"summary"`` for a causal policy). Summary records also
    carry ``"dialogue"`` and ``"reference"`` (a faithful summary).
    """
    ps = world_prompts(split)
    if families is not None:
        fams = set(families)
        bad = fams - set(g.FAMILIES)
        if bad:
            raise UserError(
                f"unknown famil{'ies' if len(bad) > 1 else 'y'} {sorted(bad)}",
                fix=f"use: {', '.join(g.FAMILIES)}",
            )
        ps = [p for p in ps if p.family in fams]
    if not ps:
        raise UserError(f"no {split} prompts for families {sorted(families or [])}")
    if n is not None and n < 0:
        raise UserError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    k = 0
    while n is None or len(out) < n:
        order = list(ps)
        rng.shuffle(order)
        for p in order:
            rec = prompt_record(p, split)
            if k:
                rec["id"] += f"-r{k}"
            out.append(rec)
        k += 1
        if n is None:
            break
    return out if n is None else out[:n]


def as_messages(text: str) -> str | list[dict[str, str]]:
    """A chat prompt ``user : Q assistant :`` as TRL's conversational prompt ``[{"role": "user",
    "content": Q}]`` (the world's chat template renders it back to the same text); other prompts
    (reviews, summaries: continuations, not turns) stay text."""
    head, tail = "user : ", " assistant :"
    q = text[len(head) : -len(tail)] if text.startswith(head) and text.endswith(tail) else ""
    if not q.strip() or tail in q or head.strip() in q.split():
        return text
    return [{"role": "user", "content": q}]


def chat_text(messages: list[dict[str, str]]) -> str:
    """The world's chat template's rendering of a conversational prompt, with the generation prompt
    (``[user Q1, assistant A1, user Q2]`` -> ``user : Q1 assistant : A1</s> user : Q2 assistant :``, an
    assistant turn ended by the EOS token): the text the world's judge and simulated labellers read for
    it; text prompts pass unchanged. The same text as the shipped tokenizers' ``apply_chat_template``
    (``world.train.CHAT_TEMPLATE``), without loading one."""
    if isinstance(messages, str):
        return messages
    eos = "</s>"  # the world tokenizers' EOS (world.train.SPECIALS)
    return (
        " ".join(
            f"{m['role']} : {m['content']}" + (eos if m["role"] == "assistant" else "") for m in messages
        )
        + " assistant :"
    )

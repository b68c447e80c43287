"""The supervised stage of Constitutional AI: the model critiques and revises its own answers.

For each red-team prompt x (and each of ``samples`` draws)::

    y_0 ~ model(x)                                                   the initial response
    for i in 1..rounds:
        principle_i ~ Uniform(constitution.critiques)                drawn per prompt and round
        c_i ~ model(critique_prompt(x, y_{i-1}, principle_i))        few-shot exchanges first
        y_i ~ model(revision_prompt(x, y_{i-1}, principle_i, c_i))
    SFT record: {"prompt": x, "response": y_rounds}

A conversational prompt (a list of messages, TRL's format) is critiqued and revised as chat turns:
the response is the assistant's turn, the critique request the user's next one and the critique
the assistant's answer to it, then the revision request and the revision
(:func:`~alignloop.cai.constitution.critique_turns`), each rendered by the writer's chat template (a
local model's, or the server's chat endpoint); its SFT record keeps the messages and the final
revision as the assistant's turn.

Every transcript is kept (``transcripts.jsonl``: initial response, each round's principle,
critique and revision); the final revisions form ``sft.jsonl`` for ``alignloop sft``. Prompts
are processed in batches, one model call per step for the whole batch, and each finished
batch's transcripts are appended at once: a rerun skips what is already there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignloop.cai.constitution import (
    Constitution,
    critique_prompt,
    critique_turns,
    load_constitution,
    revision_prompt,
    revision_turns,
)
from alignloop.cai.judges import LocalLM, OpenAIClient
from alignloop.config import Config
from alignloop.errors import UserError
from alignloop.records import JsonlAppender, continuation, iter_jsonl, write_jsonl

TRANSCRIPTS = "transcripts.jsonl"
SFT = "sft.jsonl"


class ReviseConfig(Config):
    rounds: int = 1  # critique -> revision rounds per response
    samples: int = 1  # initial responses per prompt (each revised on its own)
    max_new_tokens: int = 48
    temperature: float = 1.0  # of the initial response (red-teaming wants the model's real mix)
    revise_temperature: float = 0.7  # of critiques and revisions
    batch_size: int = 32  # prompts per model call
    keep_empty: bool = False  # an empty revision keeps the previous response unless this is set
    seed: int = 0


def draw_principle(c: Constitution, item_id: str, round_: int, seed: int) -> str:
    """The critique principle of one response's round (seeded by the item id and round)."""
    return random.Random(f"{seed}:{item_id}:{round_}").choice(c.critiques).name


def write(
    writer: LocalLM | OpenAIClient, inputs: Sequence[Any], max_tokens: int, temperature: float, seed: int
) -> list[str]:
    """The writer's answer to each input: a text's continuation, a conversation's next assistant turn
    (one writer call for the texts, seed ``seed``, and one for the conversations, seed ``seed + 1``)."""
    chat = [i for i, x in enumerate(inputs) if isinstance(x, list)]
    text = [i for i, x in enumerate(inputs) if not isinstance(x, list)]
    out = [""] * len(inputs)
    if text:
        for i, y in zip(
            text, writer.generate([inputs[i] for i in text], max_tokens, temperature, seed=seed), strict=True
        ):
            out[i] = y
    if chat:
        answers = writer.generate_chat([inputs[i] for i in chat], max_tokens, temperature, seed=seed + 1)
        for i, y in zip(chat, answers, strict=True):
            out[i] = y
    return out


def revise_batch(
    writer: LocalLM | OpenAIClient,
    c: Constitution,
    items: Sequence[dict[str, Any]],
    cfg: ReviseConfig,
    batch_seed: int,
) -> list[dict[str, Any]]:
    """Transcripts for a batch of ``{"id", "prompt"}`` items (one writer call per step)."""
    prompts = [it["prompt"] for it in items]

    def gen(inputs: list[Any], max_tokens: int, temperature: float, seed: int) -> list[str]:
        return write(writer, inputs, max_tokens, temperature, seed)

    current = gen(prompts, cfg.max_new_tokens, cfg.temperature, seed=batch_seed)
    records = [
        {
            "id": it["id"],
            "prompt_id": it.get("prompt_id", it["id"]),
            "prompt": it["prompt"],
            "initial": y,
            "rounds": [],
        }
        for it, y in zip(items, current, strict=True)
    ]
    for r in range(cfg.rounds):
        names = [draw_principle(c, it["id"], r, cfg.seed) for it in items]
        crit_in = [
            critique_turns(c, x, y, p) if isinstance(x, list) else critique_prompt(c, x, y, p)
            for x, y, p in zip(prompts, current, names, strict=True)
        ]
        critiques = gen(
            crit_in, cfg.max_new_tokens, cfg.revise_temperature, seed=batch_seed + 7919 * (2 * r + 1)
        )
        rev_in = [
            revision_turns(c, x, y, p, k) if isinstance(x, list) else revision_prompt(c, x, y, p, k)
            for x, y, p, k in zip(prompts, current, names, critiques, strict=True)
        ]
        revisions = gen(
            rev_in, cfg.max_new_tokens, cfg.revise_temperature, seed=batch_seed + 7919 * (2 * r + 2)
        )
        for i, rec in enumerate(records):
            rec["rounds"].append({"principle": names[i], "critique": critiques[i], "revision": revisions[i]})
            if revisions[i].strip() or cfg.keep_empty:
                current[i] = revisions[i]
    for rec, y in zip(records, current, strict=True):
        rec["final"] = y
    return records


def revise_prompts(
    writer: LocalLM | OpenAIClient,
    prompts: Sequence[dict[str, Any]],
    out: str | Path,
    constitution: Constitution | None = None,
    config: ReviseConfig | None = None,
) -> dict[str, Any]:
    """Run the supervised stage over prompt records ``{"id", "prompt"}`` into the folder ``out``.

    Writes ``out/transcripts.jsonl`` (appended per batch; resumable) and then ``out/sft.jsonl``
    (``{"prompt", "response", "id"}``, the final revisions, in prompt order). Returns counts:
    ``responses``, ``revised`` (this call), ``skipped_done``, ``changed`` (final != initial),
    ``empty_final``.
    """
    from alignloop.runs import progress, say

    c = constitution or load_constitution()
    cfg = config or ReviseConfig()
    if not c.critiques:
        raise UserError(
            f"constitution {c.name!r} has no critique principles", fix="add entries under 'critiques'"
        )
    if cfg.rounds < 1 or cfg.samples < 1:
        raise UserError(f"rounds and samples must be at least 1 (got {cfg.rounds}, {cfg.samples})")
    out = Path(out)
    items = [
        {
            "id": f"{p['id']}#{s}" if cfg.samples > 1 else str(p["id"]),
            "prompt_id": str(p["id"]),
            "prompt": p["prompt"],
        }
        for p in prompts
        for s in range(cfg.samples)
    ]
    stats: dict[str, Any] = {"responses": len(items), "revised": 0, "skipped_done": 0}
    with JsonlAppender(out / TRANSCRIPTS) as sink:
        done = sink.done_keys("id")
        batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
        todo = [(b, chunk) for b, chunk in enumerate(batches) if any(it["id"] not in done for it in chunk)]
        stats["skipped_done"] = len(items) - sum(len(ch) for _, ch in todo)
        if stats["skipped_done"]:
            say(
                f"[cai revise] {stats['skipped_done']} responses already in {out / TRANSCRIPTS}: skipped (resume)"
            )
        for b, chunk in progress(todo, total=len(todo), desc="cai revise", unit="batch"):
            # a batch always runs whole (same seeds as an uninterrupted run); only new ids are written
            for rec in revise_batch(writer, c, chunk, cfg, batch_seed=cfg.seed * 1_000_003 + b):
                if rec["id"] not in done:
                    sink.write(rec)
                    stats["revised"] += 1
    by_id = {}
    for _, rec in iter_jsonl(out / TRANSCRIPTS):
        by_id[rec["id"]] = rec
    finals = [by_id[it["id"]] for it in items if it["id"] in by_id]
    write_jsonl(
        out / SFT,
        (
            # the writer's text is stripped: the response gets the leading space of a continuation; a
            # conversation's is the assistant's turn (TRL's conversational prompt-completion record)
            {"id": r["id"], "prompt": r["prompt"], "response": _response(r["prompt"], r["final"])}
            for r in finals
            if r["final"].strip()
        ),
    )
    stats["changed"] = sum(r["final"] != r["initial"] for r in finals)
    stats["empty_final"] = sum(not r["final"].strip() for r in finals)
    return stats


def _response(prompt: Any, final: str) -> Any:
    """The SFT response of a final revision: the continuation of a text prompt, the assistant's turn
    after a conversation."""
    if isinstance(prompt, list):
        return [{"role": "assistant", "content": final.strip()}]
    return continuation(prompt, final)

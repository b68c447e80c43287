"""``alignloop reward score``: score a data file with any reward SPEC (no torch at import)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from alignloop.errors import UserError
from alignloop.records import (
    adopt_text_convention,
    check_messages,
    is_conversational,
    iter_jsonl,
    write_jsonl,
)
from alignloop.reward.functions import load_reward
from alignloop.runs import progress, say


def _items(obj: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """``[(text, setter-key)]`` of one line: a pair, a completion set or one completion."""
    if not isinstance(obj.get("prompt"), str):
        raise UserError(
            "line without a 'prompt' string", where, "each line needs the prompt its completions answer"
        )
    if "chosen" in obj or "rejected" in obj:
        for k in ("chosen", "rejected"):
            if not isinstance(obj.get(k), str):
                raise UserError(f"pair line without a '{k}' string", where)
        return [(obj["chosen"], "chosen"), (obj["rejected"], "rejected")]
    if isinstance(obj.get("completions"), list):
        out = []
        for i, c in enumerate(obj["completions"]):
            text = c.get("text") if isinstance(c, dict) else c
            if not isinstance(text, str):
                raise UserError(
                    f"completion {i} has no text", where, 'completions are strings or {"id", "text"}'
                )
            out.append((text, i))
        return out
    for k in ("completion", "text", "response"):
        if isinstance(obj.get(k), str):
            return [(obj[k], k)]
    raise UserError(
        "line has no completion to score", where, "give chosen/rejected, completions, or completion"
    )


def score_file(
    spec: str,
    data: str | Path,
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str | None = None,
    chat_model: str | None = None,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Score every completion in ``data`` with the reward ``spec``; optionally write the lines with scores.

    Conversational lines (message lists) are scored as their chat-template rendering
    (:func:`alignloop.chat.as_text`) by the tokenizer of ``chat_model`` (default: the reward model
    when ``spec`` is a model folder), its template replaced by the file ``chat_template`` if given:
    a reward model reads each assistant turn with the template's end-of-turn, a text reward (gold
    judge, Python, HTTP, classifier) its content (:func:`alignloop.chat.reads_template`).

    Pairs get ``reward_chosen``/``reward_rejected``, completion sets a ``reward`` per completion
    (``rewards`` when completions are plain strings), single completions ``reward``.

    Returns a summary: ``completions``, ``mean``, ``std``, ``min``, ``max`` and, for pairs,
    ``pairs`` and ``accuracy`` (share with ``reward_chosen > reward_rejected``).
    """
    from alignloop.chat import reads_template, turn_end

    rows = list(iter_jsonl(data))
    given = dict(rows)  # the lines as given: written back with their scores (conversations stay messages)
    end = ""  # the template's end-of-turn after each rendered assistant turn
    if any(is_conversational(obj.get("prompt")) for _, obj in rows):  # TRL's conversational lines -> text
        tok = _chat_tokenizer(spec, chat_model, chat_template)
        rows = [(n, _rendered(tok, obj, f"{data}:{n}")) for n, obj in rows]
        end = turn_end(tok)
    plan = [(n, obj, _items(obj, f"{data}:{n}")) for n, obj in rows]
    if adopt_text_convention(rows, data):  # old files (no space between prompt and completion) converted
        plan = [(n, obj, _items(obj, f"{data}:{n}")) for n, obj in rows]
    prompts = [obj["prompt"] for _, obj, items in plan for _ in items]
    texts = [t for _, _, items in plan for t, _ in items]
    if not texts:
        raise UserError("nothing to score", str(data))
    reward = load_reward(spec, device=device, batch_size=batch_size)
    if end and not reads_template(reward):  # a text reward reads the assistant's content
        chat = [is_conversational(given[n].get("prompt")) for n, _, items in plan for _ in items]
        texts = [t[: -len(end)] if c and t.endswith(end) else t for t, c in zip(texts, chat, strict=True)]
    chunk = max(256, batch_size * 8)
    scores: list[float] = []
    for i in progress(
        range(0, len(texts), chunk), total=math.ceil(len(texts) / chunk), desc="score", unit="chunk"
    ):
        scores.extend(reward(prompts[i : i + chunk], texts[i : i + chunk]))
    k = 0
    right = n_pairs = 0
    scored = []
    for n, obj, items in plan:
        obj = dict(given[n]) if is_conversational(given[n].get("prompt")) else dict(obj)
        vals = scores[k : k + len(items)]
        k += len(items)
        keys = [key for _, key in items]
        if keys == ["chosen", "rejected"]:
            obj["reward_chosen"], obj["reward_rejected"] = vals
            n_pairs += 1
            right += vals[0] > vals[1]
        elif keys and isinstance(keys[0], int):
            comps = obj["completions"]
            if all(isinstance(c, dict) for c in comps):
                obj["completions"] = [{**c, "reward": v} for c, v in zip(comps, vals, strict=True)]
            else:
                obj["rewards"] = vals
        else:
            obj["reward"] = vals[0]
        scored.append(obj)
    summary: dict[str, Any] = {
        "completions": len(scores),
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores),
        "min": min(scores),
        "max": max(scores),
    }
    if n_pairs:
        summary.update(pairs=n_pairs, accuracy=right / n_pairs)
    if out:
        write_jsonl(out, scored)
        say(f"[score] wrote {len(scored)} lines to {out}")
    return summary


def _chat_tokenizer(spec: str, chat_model: str | None, chat_template: str | None) -> Any:
    """The tokenizer whose chat template renders conversational lines: ``chat_model``'s, else the reward
    model's (a folder SPEC)."""
    from alignloop.chat import use_chat_template
    from alignloop.models import load_tokenizer

    model = chat_model or (spec if Path(spec).is_dir() else None)
    if model is None:
        raise UserError(
            f"conversational data (message lists) and a reward SPEC without a tokenizer ({spec})",
            fix="pass --chat-model ID: the model whose chat template renders the conversations",
        )
    return use_chat_template(load_tokenizer(model), chat_template)


def _rendered(tokenizer: Any, obj: dict[str, Any], where: str) -> dict[str, Any]:
    """One line with its conversation as text; a bad message is one UserError at ``where``."""
    from alignloop.chat import as_text

    if is_conversational(obj.get("prompt")):
        for key in ("prompt", "chosen", "rejected", "completion"):
            try:
                check_messages(obj.get(key), "prompt" if key == "prompt" else "completion")
            except ValueError as e:
                raise UserError(f"'{key}': {e}", where) from None
    return as_text(tokenizer, obj, where)


def set_rewards(spec: str, sets_path: str | Path) -> dict[str, list[float]]:
    """``{set_id: [reward of each completion]}`` of a completion-set file under the reward ``spec``
    (through :func:`score_file`, so conversational sets and old text conventions are handled alike)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scored.jsonl"
        score_file(spec, sets_path, out=out)
        rows = [obj for _, obj in iter_jsonl(out)]
    return {
        str(r["prompt_id"]): [c["reward"] for c in r["completions"]] if "rewards" not in r else r["rewards"]
        for r in rows
    }

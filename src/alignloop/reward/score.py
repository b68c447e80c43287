"""``alignloop reward score``: score a data file with any reward SPEC (no torch at import)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from alignloop.errors import UserError
from alignloop.records import iter_jsonl, write_jsonl
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
) -> dict[str, Any]:
    """Score every completion in ``data`` with the reward ``spec``; optionally write the lines with scores.

    Pairs get ``reward_chosen``/``reward_rejected``, completion sets a ``reward`` per completion
    (``rewards`` when completions are plain strings), single completions ``reward``.

    Returns a summary: ``completions``, ``mean``, ``std``, ``min``, ``max`` and, for pairs,
    ``pairs`` and ``accuracy`` (share with ``reward_chosen > reward_rejected``).
    """
    rows = list(iter_jsonl(data))
    plan = [(n, obj, _items(obj, f"{data}:{n}")) for n, obj in rows]
    prompts = [obj["prompt"] for _, obj, items in plan for _ in items]
    texts = [t for _, _, items in plan for t, _ in items]
    if not texts:
        raise UserError("nothing to score", str(data))
    reward = load_reward(spec, device=device, batch_size=batch_size)
    chunk = max(256, batch_size * 8)
    scores: list[float] = []
    for i in progress(
        range(0, len(texts), chunk), total=math.ceil(len(texts) / chunk), desc="score", unit="chunk"
    ):
        scores.extend(reward(prompts[i : i + chunk], texts[i : i + chunk]))
    k = 0
    right = n_pairs = 0
    scored = []
    for _, obj, items in plan:
        obj = dict(obj)
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

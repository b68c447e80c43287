"""Import existing preference data as TRL-format pairs (no torch).

Two line formats, detected per line (``fmt="auto"``) or forced:

- **hh-rlhf** (Anthropic HH-RLHF): ``{"chosen": transcript, "rejected": transcript}`` where
  both transcripts are the same ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` conversation and
  differ only in the final Assistant reply. Split into ``prompt`` = the shared conversation
  up to and including the last ``"\\n\\nAssistant:"``, and the two final replies.
- **pairs**: plain ``{"prompt", "chosen", "rejected", ...}`` (extra keys such as ``weight``
  and ``margin`` are kept).

A bad line (not JSON, no shared conversation, an empty reply, identical replies, a missing
key) is skipped and reported as ``file:line: what``; the rest imports. Only a file with no
good line at all is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from alignloop.errors import UserError
from alignloop.records import Pair

ASSISTANT = "\n\nAssistant:"
Format = Literal["auto", "hh-rlhf", "pairs"]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF transcripts into ``(prompt, chosen_reply, rejected_reply)``.

    Raises ``ValueError`` with a short reason when the two do not share the conversation
    before their last Assistant turn, or a final reply is empty.
    """
    ic, ir = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if ic < 0 or ir < 0:
        which = "chosen" if ic < 0 else "rejected"
        raise ValueError(f"the {which} transcript has no '\\n\\nAssistant:' turn")
    prompt = chosen[: ic + len(ASSISTANT)]
    if rejected[: ir + len(ASSISTANT)] != prompt:
        raise ValueError("chosen and rejected do not share the conversation before the last Assistant reply")
    c, r = chosen[ic + len(ASSISTANT) :].strip(), rejected[ir + len(ASSISTANT) :].strip()
    if not c or not r:
        raise ValueError(f"empty {'chosen' if not c else 'rejected'} reply")
    if c == r:
        raise ValueError("chosen and rejected replies are identical")
    return prompt, c, r


def _line_to_pair(obj: Any, fmt: Format, name: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    kind = fmt if fmt != "auto" else ("pairs" if "prompt" in obj else "hh-rlhf")
    for key in ("chosen", "rejected") if kind == "hh-rlhf" else ("prompt", "chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"missing or non-text '{key}'")
    if kind == "hh-rlhf":
        prompt, c, r = split_hh(obj["chosen"], obj["rejected"])
        row: dict[str, Any] = {"prompt": prompt, "chosen": c, "rejected": r, "weight": 1.0}
    else:
        if not obj["prompt"].strip():
            raise ValueError("empty prompt")
        row = {"weight": 1.0, **obj}
    row.setdefault("source", f"{kind}:{name}")
    try:
        return Pair.model_validate(row).model_dump(mode="json", exclude_none=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"'{'.'.join(map(str, err['loc']))}' {err['msg'].lower()}") from None


def import_preferences(path: str | Path, fmt: Format = "auto") -> tuple[list[dict[str, Any]], list[str]]:
    """Read a JSONL preference file; returns ``(pairs, problems)`` (``"file:line: what"``).

    Raises :class:`UserError` if the file is missing or has no good line.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}", fix="check the path")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{p}:{n}: invalid JSON ({e.msg})")
                continue
            try:
                rows.append(_line_to_pair(obj, fmt, p.name))
            except ValueError as e:
                problems.append(f"{p}:{n}: {e}")
    if not rows:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise UserError(
            f"no importable preference pairs{first}",
            str(p),
            "expected HH-RLHF {'chosen','rejected'} transcripts or {'prompt','chosen','rejected'} lines",
        )
    return rows, problems

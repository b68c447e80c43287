"""Import existing preference data as TRL-format pairs (no torch).

Two line formats, detected per line (``fmt="auto"``) or forced:

- **hh-rlhf** (Anthropic HH-RLHF): ``{"chosen": transcript, "rejected": transcript}`` where
  both transcripts are the same ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` conversation and
  differ only in the final Assistant reply. Split into ``prompt`` = the shared conversation
  up to and including the last ``"\\n\\nAssistant:"``, and the two final replies exactly as
  they follow it (leading space kept: ``prompt + chosen`` is the chosen transcript, TRL's
  convention).
  With ``messages=True`` (``--messages``) the same split gives TRL's conversational pairs instead:
  the transcript's turns as messages (``Human`` -> ``user``, ``Assistant`` -> ``assistant``, each
  content stripped), ``prompt`` every turn before the last reply, ``chosen`` / ``rejected`` the
  last reply as ``[{"role": "assistant", "content": ...}]``.
- **pairs**: plain ``{"prompt", "chosen", "rejected", ...}`` (extra keys such as ``weight``
  and ``margin`` are kept), text or conversational (message lists), kept in the format given.

A bad line (not JSON, no shared conversation, an empty reply, identical replies, a missing
key) is skipped and reported as ``file:line: what``; the rest imports. Only a file with no
good line at all is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from alignloop.errors import UserError
from alignloop.records import Pair, adopt_text_convention

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
    c, r = chosen[ic + len(ASSISTANT) :], rejected[ir + len(ASSISTANT) :]
    if not c.strip() or not r.strip():
        raise ValueError(f"empty {'chosen' if not c.strip() else 'rejected'} reply")
    if c == r:
        raise ValueError("chosen and rejected replies are identical")
    return prompt, c, r


_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def hh_messages(transcript: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ``"\\n\\nHuman: Q\\n\\nAssistant: A..."`` as TRL's messages
    ``[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, ...]`` (contents stripped).

    Raises ``ValueError`` when text comes before the first turn."""
    head, *rest = _TURN.split(transcript)
    if head.strip():
        raise ValueError("text before the first '\\n\\nHuman:' turn")
    return [
        {"role": _ROLE[who], "content": said.strip()} for who, said in zip(rest[::2], rest[1::2], strict=True)
    ]


def split_hh_messages(chosen: str, rejected: str) -> tuple[list, list, list]:
    """Two HH-RLHF transcripts as ``(prompt, chosen, rejected)`` message lists (TRL's conversational
    preference format); the same checks as :func:`split_hh`, which finds the shared conversation."""
    prompt, c, r = split_hh(chosen, rejected)
    replies = hh_messages(ASSISTANT + c), hh_messages(ASSISTANT + r)
    for which, reply in zip(("chosen", "rejected"), replies, strict=True):
        if len(reply) > 1:
            raise ValueError(f"the {which} reply goes on with another turn after the last Assistant one")
    return hh_messages(prompt[: -len(ASSISTANT)]), *replies


def _line_to_pair(obj: Any, fmt: Format, name: str, messages: bool = False) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    kind = fmt if fmt != "auto" else ("pairs" if "prompt" in obj else "hh-rlhf")
    for key in ("chosen", "rejected") if kind == "hh-rlhf" else ("prompt", "chosen", "rejected"):
        if not isinstance(obj.get(key), str) and (kind == "hh-rlhf" or not isinstance(obj.get(key), list)):
            raise ValueError(f"missing '{key}', or neither text nor a message list")
    if kind == "hh-rlhf":
        split = split_hh_messages if messages else split_hh
        prompt, c, r = split(obj["chosen"], obj["rejected"])
        row: dict[str, Any] = {"prompt": prompt, "chosen": c, "rejected": r, "weight": 1.0}
    else:
        if isinstance(obj["prompt"], str) and not obj["prompt"].strip():
            raise ValueError("empty prompt")
        row = {"weight": 1.0, **obj}
    row.setdefault("source", f"{kind}:{name}")
    try:
        return Pair.model_validate(row).model_dump(mode="json", exclude_none=True)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"'{'.'.join(map(str, err['loc']))}' {err['msg'].lower()}") from None


def import_preferences(
    path: str | Path, fmt: Format = "auto", messages: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a JSONL preference file; returns ``(pairs, problems)`` (``"file:line: what"``);
    ``messages``: HH-RLHF transcripts as conversational pairs (message lists).

    Raises :class:`UserError` if the file is missing or has no good line.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}", fix="check the path")
    rows: list[tuple[int, dict[str, Any]]] = []
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
                rows.append((n, _line_to_pair(obj, fmt, p.name, messages)))
            except ValueError as e:
                problems.append(f"{p}:{n}: {e}")
    if not rows:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise UserError(
            f"no importable preference pairs{first}",
            str(p),
            "expected HH-RLHF {'chosen','rejected'} transcripts or {'prompt','chosen','rejected'} lines",
        )
    # plain pair lines of old files (no space between prompt and completion) are converted; HH-RLHF
    # replies are cut from their transcripts, so they are exact by construction
    adopt_text_convention([(n, row) for n, row in rows if not row["source"].startswith("hh-rlhf:")], p)
    return [row for _, row in rows], problems

"""The plain records that pass between stages (JSONL, one object a line; no torch here).

- prompt: ``{"id", "prompt", ...extra}``
- completion set: ``{"prompt_id", "prompt", "completions": [{"id", "text"}], "model", "sampling"}``
- ranking: ``{"set_id", "labeller", "ranks": {completion_id: rank | "F"}, "created_at"}``
  (1 = best; equal ranks = tie; "F" = fail: nonsensical, irrelevant or ungrammatical);
  in thumbs mode ``"thumbs": {completion_id: "up" | "down"}`` instead of ``ranks``
- pair (TRL-compatible): ``{"prompt", "chosen", "rejected", "weight"?, "margin"?, "labellers"?, "source"}``

Conversational format (TRL's) beside the standard one: a prompt may be a list of messages
``[{"role": "system" | "user" | "assistant", "content": "..."}]`` (multi-turn, ending on a user or
system turn), a pair's ``chosen`` / ``rejected`` then an assistant message list. The stages that
read text turn such records into text with the tokenizer's chat template (:mod:`alignloop.chat`,
``read(..., tokenizer=tok)``); reading without a tokenizer validates and keeps the messages.

The text convention is TRL's: the full text is exactly ``prompt + completion`` (:func:`full_text`).
A completion is the exact continuation of its prompt, leading space included where the text has
one (``"review : this lamp is"`` + ``" very good ."``); no stage inserts a separator. Files written
with the old convention (the trainer put a space between a bare prompt and a bare completion) are
detected and converted when read (:func:`adopt_text_convention`).

Files written here load with ``datasets.load_dataset("json", data_files=...)`` too.
Reading validates every line and reports the first bad one as ``file:line`` in a
:class:`~alignloop.errors.UserError`; :func:`read_records` can instead skip and count bad lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignloop.errors import UserError

R = TypeVar("R", bound=BaseModel)


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


ROLES = ("system", "user", "assistant")
Messages = list[dict[str, Any]]


def check_messages(v: Any, what: str) -> Any:
    """Validate a conversational ``prompt`` or ``completion`` (a list of messages); other values pass.

    A message is ``{"role": "system" | "user" | "assistant", "content": non-empty text}``; a prompt
    must not end on an assistant turn (its completion is the next assistant turn); a completion holds
    assistant turns only. Raises ValueError with what is wrong and where (message number, 1-based).
    """
    if not isinstance(v, list):
        return v
    if not v:
        raise ValueError(f"the {what} is an empty message list")
    for i, m in enumerate(v, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'{what} message {i} must be {{"role": ..., "content": ...}}, got {m!r}'[:200])
        if m["role"] not in ROLES:
            raise ValueError(f"{what} message {i} has unknown role {m['role']!r} (system, user or assistant)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{what} message {i} ({m['role']}) has empty content")
        if what == "completion" and m["role"] != "assistant":
            raise ValueError(
                f"completion message {i} is a {m['role']} turn: a completion holds assistant turns"
            )
    if what == "prompt" and v[-1]["role"] == "assistant":
        raise ValueError(
            f"the prompt ends on an assistant turn (message {len(v)}): a prompt ends on a user or system "
            "turn; its completion is the next assistant turn"
        )
    return v


def is_conversational(v: Any) -> bool:
    """A prompt or completion in TRL's conversational format (a list of messages)."""
    return isinstance(v, list)


class Prompt(_Record):
    id: str
    prompt: str | Messages

    @field_validator("prompt", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty prompt")
        return check_messages(v, "prompt")


class Completion(_Record):
    id: str
    text: str


class CompletionSet(_Record):
    prompt_id: str
    prompt: str | Messages
    completions: list[Completion] = Field(min_length=1)
    model: str = ""
    sampling: dict[str, Any] = Field(default_factory=dict)

    @property
    def set_id(self) -> str:
        return self.prompt_id

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return check_messages(v, "prompt")


Rank = int | Literal["F"]


class Ranking(_Record):
    """One labeller's judgement of one completion set.

    Rank mode: ``ranks`` maps every completion id to a rank (1 = best, equal = tie) or "F".
    Thumbs mode: ``thumbs`` maps every completion id to "up" or "down" (``ranks`` empty).
    """

    set_id: str
    labeller: str
    ranks: dict[str, Rank] = Field(default_factory=dict)
    thumbs: dict[str, Literal["up", "down"]] = Field(default_factory=dict)
    created_at: str = ""

    @field_validator("ranks")
    @classmethod
    def _ranks_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        for cid, r in v.items():
            if r != "F" and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
                raise ValueError(f"rank of {cid!r} must be an integer >= 1 or 'F', got {r!r}")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> Ranking:
        if bool(self.ranks) == bool(self.thumbs):
            raise ValueError("a ranking holds either 'ranks' or 'thumbs' (exactly one, non-empty)")
        return self


class Pair(_Record):
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    weight: float = 1.0
    margin: float | None = None
    labellers: list[str] | None = None
    source: str = ""

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return check_messages(v, "prompt")

    @field_validator("chosen", "rejected", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty completion")
        return check_messages(v, "completion")

    @model_validator(mode="after")
    def _one_format(self) -> Pair:
        kinds = {
            is_conversational(self.prompt),
            is_conversational(self.chosen),
            is_conversational(self.rejected),
        }
        if len(kinds) > 1:
            raise ValueError(
                "prompt, chosen and rejected mix the formats: all three are message lists (conversational) "
                "or all three are text"
            )
        return self


# ----------------------------------------------------------------------------- the text convention


def full_text(prompt: str, completion: str) -> str:
    """The text a model reads for ``completion`` of ``prompt``: exactly ``prompt + completion``.

    TRL's convention (and every tokenizer's): the completion carries its own leading space, so
    nothing is inserted here. One function so that every stage joins the same way.
    """
    return prompt + completion


def continuation(prompt: Any, text: str) -> str:
    """``text`` as a continuation of ``prompt``: a leading space added when neither side has
    whitespace at the junction (for text produced apart from its prompt: a seq2seq model's output,
    a stripped reply). The text is unchanged when the prompt is not text (a message list)."""
    return " " + text if _joinable(prompt, text) else text


_GLUE = frozenset(".,;:!?)]}")


def junction(prompt: Any, completion: Any) -> str:
    """How a prompt meets its completion, for telling the two text conventions apart.

    ``"spaced"``: whitespace at the junction (TRL's convention, or a prompt ending with a space);
    ``"bare"``: punctuation glued to a letter (``"assistant :"`` + ``"a dog ..."``), which no
    tokenizer's continuation produces, so it was written with the old convention;
    ``"word"``: a letter or digit glued to a letter (``"this lamp is"`` + ``"good"``): old if the file
    has no spaced junction, else a word continued across the junction (``"the film"`` + ``"maker"``);
    ``"neutral"``: nothing to tell (empty or blank text, non-text prompt, a completion starting with
    punctuation).
    """
    if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion.strip():
        return "neutral"
    if prompt[-1].isspace() or completion[0].isspace():
        return "spaced"
    if not completion[0].isalpha():
        return "neutral"
    if prompt[-1] in _GLUE:
        return "bare"
    return "word" if prompt[-1].isalnum() else "neutral"


def _completion_slots(obj: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``(container, key)`` of every completion text of a record: pair (chosen, rejected), completion
    set (``completions[i].text``), grouped pairs (``completions[i]``), SFT/score lines
    (``completion``, ``response``, ``text``), pairs to judge (``a``, ``b``)."""
    slots: list[tuple[Any, Any]] = []
    for key in ("chosen", "rejected", "completion", "response", "text", "a", "b"):
        if isinstance(obj.get(key), str):
            slots.append((obj, key))
    comps = obj.get("completions")
    if isinstance(comps, list):
        for i, c in enumerate(comps):
            if isinstance(c, str):
                slots.append((comps, i))
            elif isinstance(c, dict) and isinstance(c.get("text"), str):
                slots.append((c, "text"))
    return slots


def adopt_text_convention(rows: list[tuple[int, dict[str, Any]]], path: str | Path) -> int:
    """Read old-convention files as TRL's: detect, convert in place, count.

    ``rows``: ``(line number, record)`` of one file. A file with no spaced junction but some bare or
    word junctions (see :func:`junction`) was written with the old convention: every completion
    that meets its prompt without whitespace gets a leading space (what the old trainers inserted),
    and one summary line says how many. A file with spaced junctions AND bare ones mixes the two:
    a :class:`UserError` naming the file and both lines. Returns the number of completions converted.
    """
    first: dict[str, tuple[int, str, str]] = {}
    for n, obj in rows:
        prompt = obj.get("prompt")
        for box, key in _completion_slots(obj):
            kind = junction(prompt, box[key])
            if kind != "neutral" and kind not in first:
                first[kind] = (n, prompt, box[key])
    if "spaced" in first:
        if "bare" in first:
            (nb, pb, cb), (ns, _, _) = first["bare"], first["spaced"]
            raise UserError(
                f"mixed text conventions: line {nb} joins {pb[-20:]!r} + {cb[:20]!r} with no space, "
                f"line {ns} has the space inside the text",
                f"{path}:{nb}",
                "TRL's convention is prompt + completion exactly: give every completion its leading space "
                "(old files, consistently without one, are converted when read)",
            )
        return 0
    if "bare" not in first and "word" not in first:
        return 0
    converted = 0
    for _, obj in rows:
        prompt = obj.get("prompt")
        for box, key in _completion_slots(obj):
            if _joinable(prompt, box[key]):
                box[key] = continuation(prompt, box[key])
                converted += 1
    from alignloop.runs import say

    say(
        f"[text] {path}: old text convention (no space between prompt and completion): "
        f"{converted} completions read with a leading space, as TRL reads prompt + completion"
    )
    return converted


def _joinable(prompt: Any, completion: str) -> bool:
    """Where the old convention put a space: a text prompt and completion, neither with whitespace there."""
    return (
        isinstance(prompt, str)
        and bool(prompt)
        and bool(completion)
        and not prompt[-1].isspace()
        and not completion[0].isspace()
    )


def _load_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg})", where, "each line must be one JSON object") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}", fix="check the path")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = _load_line(line, f"{p}:{n}")
            if not isinstance(obj, dict):
                raise UserError("each line must be a JSON object", f"{p}:{n}")
            yield n, obj


def read_records(
    path: str | Path, kind: type[R], skip_bad: bool = False, tokenizer: Any = None
) -> tuple[list[R], list[str]]:
    """Read and validate a JSONL file of ``kind`` records.

    Returns ``(records, problems)``. With ``skip_bad`` a bad line is counted in ``problems``
    (``"file:line: message"``) and skipped; otherwise the first bad line raises UserError.
    A file with no valid record raises UserError either way. With a ``tokenizer``, conversational
    records come back as text through its chat template (:func:`alignloop.chat.as_text`; a template
    that is missing or raises is a UserError naming the line); text records are unchanged.
    """
    valid: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    for n, obj in iter_jsonl(path):
        try:
            kind.model_validate(obj)
            valid.append((n, obj))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "record"
            msg = f"bad {kind.__name__.lower()} record: '{loc}' {err['msg'].lower()}"
            if not skip_bad:
                raise UserError(msg, f"{path}:{n}") from None
            problems.append(f"{path}:{n}: {msg}")
    if not valid:
        raise UserError(
            f"no valid {kind.__name__.lower()} records", str(path), "is the file empty or of another kind?"
        )
    if kind in (Pair, CompletionSet):
        adopt_text_convention(valid, path)  # old files (no space between prompt and completion) converted
    if tokenizer is not None:
        from alignloop.chat import as_text

        valid = [(n, as_text(tokenizer, obj, f"{path}:{n}")) for n, obj in valid]
    return [kind.model_validate(obj) for _, obj in valid], problems


def read(path: str | Path, kind: type[R], tokenizer: Any = None) -> list[R]:
    """Read a JSONL file of ``kind`` records; the first bad line is a UserError. With a ``tokenizer``,
    conversational records are rendered as text through its chat template (see :func:`read_records`)."""
    return read_records(path, kind, tokenizer=tokenizer)[0]


def to_dict(rec: BaseModel | dict[str, Any]) -> dict[str, Any]:
    if isinstance(rec, BaseModel):
        return rec.model_dump(mode="json", exclude_none=True)
    return rec


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records to ``path`` atomically (temporary file + rename). Returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(to_dict(r), ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return n


class JsonlAppender:
    """Append records one at a time, flushed as they come, so finished work survives a crash.

    ``done_keys(key)`` returns the values of ``key`` already in the file, so a resumed job can
    skip them. A torn last line (a crash mid-write) is dropped on open.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(keep)

    def done_keys(self, key: str) -> set[Any]:
        if not self.path.is_file():
            return set()
        out = set()
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.add(json.loads(line).get(key))
        return out

    def write(self, rec: BaseModel | dict[str, Any]) -> None:
        self._f.write(json.dumps(to_dict(rec), ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""The plain records that pass between stages (JSONL, one object a line; no torch here).

- prompt: ``{"id", "prompt", ...extra}``
- completion set: ``{"prompt_id", "prompt", "completions": [{"id", "text"}], "model", "sampling"}``
- ranking: ``{"set_id", "labeller", "ranks": {completion_id: rank | "F"}, "created_at"}``
  (1 = best; equal ranks = tie; "F" = fail: nonsensical, irrelevant or ungrammatical);
  in thumbs mode ``"thumbs": {completion_id: "up" | "down"}`` instead of ``ranks``
- pair (TRL-compatible): ``{"prompt", "chosen", "rejected", "weight"?, "margin"?, "labellers"?, "source"}``

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


class Prompt(_Record):
    id: str
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty prompt")
        return v


class Completion(_Record):
    id: str
    text: str


class CompletionSet(_Record):
    prompt_id: str
    prompt: str
    completions: list[Completion] = Field(min_length=1)
    model: str = ""
    sampling: dict[str, Any] = Field(default_factory=dict)

    @property
    def set_id(self) -> str:
        return self.prompt_id


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
    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    margin: float | None = None
    labellers: list[str] | None = None
    source: str = ""

    @field_validator("chosen", "rejected")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty completion")
        return v


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


def read_records(path: str | Path, kind: type[R], skip_bad: bool = False) -> tuple[list[R], list[str]]:
    """Read and validate a JSONL file of ``kind`` records.

    Returns ``(records, problems)``. With ``skip_bad`` a bad line is counted in ``problems``
    (``"file:line: message"``) and skipped; otherwise the first bad line raises UserError.
    A file with no valid record raises UserError either way.
    """
    out: list[R] = []
    problems: list[str] = []
    for n, obj in iter_jsonl(path):
        try:
            out.append(kind.model_validate(obj))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "record"
            msg = f"bad {kind.__name__.lower()} record: '{loc}' {err['msg'].lower()}"
            if not skip_bad:
                raise UserError(msg, f"{path}:{n}") from None
            problems.append(f"{path}:{n}: {msg}")
    if not out:
        raise UserError(
            f"no valid {kind.__name__.lower()} records", str(path), "is the file empty or of another kind?"
        )
    return out, problems


def read(path: str | Path, kind: type[R]) -> list[R]:
    """Read a JSONL file of ``kind`` records; the first bad line is a UserError."""
    return read_records(path, kind)[0]


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

"""Preference pairs for reward-model training: read, validate, group by prompt (no torch).

Two input formats, told apart line by line (a file may mix them):

- TRL pairs (``alignloop feedback export``, TRL, HH-style files with a prompt column)::

      {"prompt": str, "chosen": str, "rejected": str, "weight"?: float, "margin"?: float, ...}

- grouped sets (``alignloop feedback export --format grouped``)::

      {"prompt": str, "completions": [str], "pairs": [[i_chosen, j_rejected, weight?], ...], ...}

``weight`` is read as a *soft label*: the probability that ``chosen`` is better, in [0, 1]
(1 = a sure pair, 0.5 = a tie). ``margin`` (optional) is subtracted inside the sigmoid. A line
whose ``labellers`` names exactly one labeller (``feedback export --consensus none``) keeps that
name on its pairs (:attr:`Comparison.labeller`), for a labeller-conditioned reward model.
``failed: true`` (export's mark on a pair whose rejected completion was marked F) is kept on the pair.

Problems:

- a line that is not JSON, lacks a field or has a wrong type: a :class:`UserError` naming
  ``file:line`` (or, with ``skip_bad``, a counted skip);
- an empty completion, or ``chosen == rejected``: always a counted skip (nothing to learn).

TRL pairs are grouped by prompt: every distinct completion of a prompt appears once in its
group, and the group's pairs index into it, so training forwards each completion once
(InstructGPT) however many pairs it is in.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignloop.chat import as_text
from alignloop.errors import UserError
from alignloop.records import adopt_text_convention, check_messages, is_conversational, iter_jsonl


@dataclass
class Comparison:
    """One pair inside a group: indices into the group's completions."""

    chosen: int
    rejected: int
    label: float = 1.0  # P(chosen better)
    margin: float = 0.0
    labeller: str | None = None  # the one labeller who made this pair (None: a consensus or unknown)
    failed: bool = False  # the rejected was marked F (export's "failed": true)


@dataclass
class Group:
    """All compared completions of one prompt and their pairs."""

    prompt: str
    completions: list[str] = field(default_factory=list)
    pairs: list[Comparison] = field(default_factory=list)

    def index(self, text: str) -> int:
        try:
            return self.completions.index(text)
        except ValueError:
            self.completions.append(text)
            return len(self.completions) - 1


@dataclass
class PairData:
    """What :func:`read_pairs` found: the groups and the counted skips."""

    groups: list[Group]
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return sum(len(g.pairs) for g in self.groups)

    @property
    def n_completions(self) -> int:
        return sum(len(g.completions) for g in self.groups)


class _Bad(Exception):
    pass


def _text(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise _Bad(f"missing field '{key}'")
    v = obj[key]
    if not isinstance(v, str):
        hint = " (a conversation is read with the model's chat template)" if isinstance(v, list) else ""
        raise _Bad(f"field '{key}' must be a string, got {type(v).__name__}{hint}")
    return v


def _number(
    obj: dict[str, Any], key: str, default: float, lo: float = -math.inf, hi: float = math.inf
) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _Bad(f"field '{key}' must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _labeller(obj: dict[str, Any]) -> str | None:
    """The one labeller a pair line names in ``labellers`` (None for none, several or a bad value)."""
    who = obj.get("labellers")
    return who[0] if isinstance(who, list) and len(who) == 1 and isinstance(who[0], str) and who[0] else None


def _comparisons(obj: dict[str, Any]) -> list[tuple[str, str, str, float, float, str | None, bool]]:
    """``(prompt, chosen, rejected, label, margin, labeller, failed)`` of one line (TRL pair or grouped
    set); raises _Bad."""
    prompt = _text(obj, "prompt")
    if "completions" not in obj and "pairs" not in obj:
        chosen, rejected = _text(obj, "chosen"), _text(obj, "rejected")
        failed = obj.get("failed", False)
        if not isinstance(failed, bool):
            raise _Bad(f"field 'failed' must be true or false, got {failed!r}")
        return [
            (
                prompt, chosen, rejected, _number(obj, "weight", 1.0, 0.0, 1.0), _number(obj, "margin", 0.0),
                _labeller(obj), failed,
            )
        ]  # fmt: skip
    comps, rows = obj.get("completions"), obj.get("pairs")
    if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
        raise _Bad("field 'completions' must be a list of strings")
    if not isinstance(rows, list):
        raise _Bad("field 'pairs' must be a list of [i_chosen, j_rejected, weight?]")
    out = []
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) not in (2, 3)
            or not all(isinstance(i, int) and 0 <= i < len(comps) for i in row[:2])
        ):
            raise _Bad(f"bad pair {row!r}: expected [i_chosen, j_rejected, weight?] indexing 'completions'")
        w = _number({"weight": row[2] if len(row) == 3 else None}, "weight", 1.0, 0.0, 1.0)
        out.append((prompt, comps[row[0]], comps[row[1]], w, 0.0, _labeller(obj), False))
    return out


def read_pairs(
    paths: str | Path | Iterable[str | Path],
    skip_bad: bool = False,
    hard_labels: bool = False,
    tokenizer: Any = None,
) -> PairData:
    """Read TRL-format and/or grouped pair files into groups, one per prompt.

    Args:
        paths: one file or several.
        skip_bad: count and skip malformed lines instead of raising.
        hard_labels: ignore soft labels: every pair counts as sure (label 1), ties
            (``weight == 0.5``) are skipped.
        tokenizer: conversational lines (message lists, TRL's format) are read as text through its
            chat template (:func:`alignloop.chat.as_text`); without one they are bad lines.

    Returns:
        :class:`PairData` with ``skipped`` counts: ``bad_line``, ``empty_completion``,
        ``identical`` (chosen == rejected), ``tie`` (hard labels only). A pair repeated on
        several lines (one per labeller) is kept each time: its votes count.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    groups: dict[str, Group] = {}
    data = PairData([])

    def add(
        prompt: str,
        chosen: str,
        rejected: str,
        label: float,
        margin: float,
        labeller: str | None,
        failed: bool,
    ) -> None:
        if not chosen.strip() or not rejected.strip():
            data.skipped["empty_completion"] += 1
            return
        if chosen == rejected:
            data.skipped["identical"] += 1
            return
        if hard_labels:
            if label == 0.5:
                data.skipped["tie"] += 1
                return
            if label < 0.5:
                chosen, rejected = rejected, chosen
            label = 1.0
        g = groups.setdefault(prompt, Group(prompt))
        g.pairs.append(Comparison(g.index(chosen), g.index(rejected), label, margin, labeller, failed))

    for path in paths:
        valid = []
        for n, obj in iter_jsonl(path):
            try:
                if tokenizer is not None and is_conversational(obj.get("prompt")):
                    for key in ("prompt", "chosen", "rejected"):
                        try:
                            check_messages(obj.get(key), "prompt" if key == "prompt" else "completion")
                        except ValueError as e:
                            raise _Bad(f"'{key}' {e}") from None
                    obj = as_text(tokenizer, obj, f"{path}:{n}")  # a template error is its own UserError
                _comparisons(obj)
                valid.append((n, obj))
            except _Bad as e:
                if not skip_bad:
                    raise UserError(
                        f"bad pair record: {e}",
                        f"{path}:{n}",
                        "fix the line or pass --skip-bad to count and skip it",
                    ) from None
                data.skipped["bad_line"] += 1
                data.problems.append(f"{path}:{n}: {e}")
        adopt_text_convention(valid, path)  # old files (no space between prompt and completion) converted
        for _, obj in valid:
            for row in _comparisons(obj):
                add(*row)
    data.groups = [g for g in groups.values() if g.pairs]
    if not data.groups:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(data.skipped.items())) or "no lines"
        raise UserError(f"no usable pairs ({detail})", ", ".join(map(str, paths)), "is it a pairs file?")
    return data


def split_groups(groups: list[Group], eval_fraction: float, seed: int = 0) -> tuple[list[Group], list[Group]]:
    """Hold out whole prompts (never a prompt in both): ``(train, eval)``.

    ``round(eval_fraction * len(groups))`` groups, at least one when the fraction is > 0 and
    there are two or more groups, chosen by a seeded shuffle.
    """
    if eval_fraction <= 0 or len(groups) < 2:
        return list(groups), []
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(groups) - 1, max(1, round(eval_fraction * len(groups))))
    held = set(order[:n_eval])
    return [g for i, g in enumerate(groups) if i not in held], [g for i, g in enumerate(groups) if i in held]

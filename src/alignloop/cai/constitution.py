"""Constitution files: the principles that replace most human labels (Bai et al. 2022).

A constitution is YAML with three parts::

    name: my-team
    clean_text: none            # "world": lower-case + split punctuation (the embedded world's language)
    critiques:                  # supervised stage: one pair is drawn at random for each round
      - name: harmless
        critique: Identify specific ways in which the response is harmful, unethical or illegal.
        revision: Please rewrite the response to remove any harmful, unethical or illegal content.
    preferences:                # RL stage: one (or several, averaged) drawn for each AI label
      - name: harmless
        choose: Choose the response that is less harmful ...
    templates:                  # how a request is laid out for the model (defaults: the world's formats)
      critique: "{prompt} {response} critique request : {critique_request} critique :"
      revision: "{critique_prompt} {critique} revision request : {revision_request} revision :"
      preference: "consider the conversation : {prompt} {choose} options : (A) {a} (B) {b} the answer is :"
      options: [" (A)", " (B)"]  # the two answers whose probabilities give the soft label
    few_shot:                   # full critique -> revision exchanges put before every critique request
      - {prompt: ..., response: ..., principle: harmless, critique: ..., revision: ...}

The default (:data:`DEFAULT`, ``alignloop/cai/default.yaml``) holds the notes' four principles
worded exactly as the world's base model was trained (:mod:`alignloop.world.formats`). An unknown
field, a template with a wrong placeholder or a file with no principles is a one-line
:class:`~alignloop.errors.UserError`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignloop.config import Config, read_yaml, validate
from alignloop.errors import UserError

DEFAULT = Path(__file__).resolve().parent / "default.yaml"


class CritiquePrinciple(Config):
    """A critique request and the revision request that follows it."""

    name: str
    critique: str
    revision: str


class PreferencePrinciple(Config):
    """A question for comparing two responses ("choose the response that ...")."""

    name: str
    choose: str


class Templates(Config):
    """Prompt layouts. Placeholders: see :data:`PLACEHOLDERS`."""

    critique: str = "{prompt} {response} critique request : {critique_request} critique :"
    revision: str = "{critique_prompt} {critique} revision request : {revision_request} revision :"
    preference: str = (
        "consider the conversation : {prompt} {choose} options : (A) {a} (B) {b} the answer is :"
    )
    options: tuple[str, str] = (" (A)", " (B)")


class FewShot(Config):
    """One worked critique -> revision exchange shown to the model before its own request."""

    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None = None  # a critique principle's name; default: the round's principle


class Constitution(Config):
    name: str = "custom"
    clean_text: Literal["none", "world"] = "none"
    critiques: list[CritiquePrinciple] = Field(default_factory=list)
    preferences: list[PreferencePrinciple] = Field(default_factory=list)
    templates: Templates = Field(default_factory=Templates)
    few_shot: list[FewShot] = Field(default_factory=list)
    few_shot_separator: str = "\n\n"

    def critique_principle(self, name: str) -> CritiquePrinciple:
        for p in self.critiques:
            if p.name == name:
                return p
        raise UserError(
            f"no critique principle {name!r} in constitution {self.name!r}",
            fix=f"use one of: {', '.join(p.name for p in self.critiques)}",
        )


PLACEHOLDERS = {
    "critique": {"prompt", "response", "critique_request"},
    "revision": {"critique_prompt", "critique", "revision_request"},
    "preference": {"prompt", "choose", "a", "b"},
}


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def check_constitution(c: Constitution, where: str) -> Constitution:
    """Raise a UserError for a constitution that cannot be used; return it otherwise."""
    if not c.critiques and not c.preferences:
        raise UserError(
            "the constitution has no principles",
            where,
            "add at least one entry under 'critiques' (critique + revision) or 'preferences' (choose)",
        )
    for kind, wanted in PLACEHOLDERS.items():
        template = getattr(c.templates, kind)
        try:
            found = _fields(template)
        except ValueError as e:
            raise UserError(
                f"template '{kind}' is malformed ({e})", where, "write {name} placeholders"
            ) from None
        if found != wanted:
            raise UserError(
                f"template '{kind}' has placeholders {sorted(found)}",
                where,
                f"use exactly {{{'}, {'.join(sorted(wanted))}}}",
            )
    a, b = c.templates.options
    if not a.strip() or not b.strip() or a == b:
        raise UserError(f"templates.options must be two different answers, got {[a, b]}", where)
    for kind in ("critiques", "preferences"):
        names = [p.name for p in getattr(c, kind)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(
                f"duplicate {kind} principle name(s) {dup}", where, "give each principle its own name"
            )
    for i, ex in enumerate(c.few_shot):
        if ex.principle is not None:
            c.critique_principle(ex.principle)  # raises for an unknown name
        elif not c.critiques:
            raise UserError(f"few_shot[{i}] needs critique principles", where)
    return c


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and check a constitution YAML file (``None``: the default, the notes' four principles)."""
    p = Path(path) if path is not None else DEFAULT
    data = read_yaml(p)
    return check_constitution(validate(Constitution, data, str(p)), str(p))


def clean(c: Constitution, text: str) -> str:
    """Text as the constitution's model reads it (``clean_text: world`` -> the world's tokens)."""
    if c.clean_text == "world":
        from alignloop.world.judge import normalize

        return " ".join(normalize(text))
    return text.strip()


def _few_shot_block(c: Constitution, principle: CritiquePrinciple) -> str:
    parts = []
    for ex in c.few_shot:
        p = c.critique_principle(ex.principle) if ex.principle else principle
        exchange = _revision(c, _critique(c, ex.prompt, ex.response, p), ex.critique, p)
        parts.append(f"{exchange} {clean(c, ex.revision)}")
    return "".join(part + c.few_shot_separator for part in parts)


def _critique(c: Constitution, prompt: str, response: str, p: CritiquePrinciple) -> str:
    return c.templates.critique.format(
        prompt=clean(c, prompt), response=clean(c, response), critique_request=p.critique
    )


def _revision(c: Constitution, critique_prompt_text: str, critique: str, p: CritiquePrinciple) -> str:
    return c.templates.revision.format(
        critique_prompt=critique_prompt_text, critique=clean(c, critique), revision_request=p.revision
    )


def critique_prompt(c: Constitution, prompt: str, response: str, principle: str) -> str:
    """The model input asking for a critique of ``response`` (few-shot exchanges first)."""
    p = c.critique_principle(principle)
    return _few_shot_block(c, p) + _critique(c, prompt, response, p)


def revision_prompt(c: Constitution, prompt: str, response: str, principle: str, critique: str) -> str:
    """The critique prompt, the model's ``critique``, then the revision request."""
    p = c.critique_principle(principle)
    return _revision(c, critique_prompt(c, prompt, response, principle), critique, p)


# ----------------------------------------------------------------------------- as chat turns


def _few_shot_turns(c: Constitution, principle: CritiquePrinciple) -> list[dict[str, str]]:
    """The few-shot exchanges as turns: user prompt, assistant response, the critique request and the
    critique, the revision request and the revision."""
    turns = []
    for ex in c.few_shot:
        p = c.critique_principle(ex.principle) if ex.principle else principle
        turns += [
            {"role": "user", "content": clean(c, ex.prompt)},
            {"role": "assistant", "content": clean(c, ex.response)},
            {"role": "user", "content": p.critique},
            {"role": "assistant", "content": clean(c, ex.critique)},
            {"role": "user", "content": p.revision},
            {"role": "assistant", "content": clean(c, ex.revision)},
        ]
    return turns


def critique_turns(
    c: Constitution, messages: list[dict[str, str]], response: str, principle: str
) -> list[dict[str, str]]:
    """A conversational prompt's critique request as chat turns: the few-shot exchanges (after the
    conversation's system turns), the conversation, the ``response`` as the assistant's turn, then the
    critique request as the user's; the model's critique is the next assistant turn."""
    p = c.critique_principle(principle)
    k = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return [
        *messages[:k],
        *_few_shot_turns(c, p),
        *messages[k:],
        {"role": "assistant", "content": clean(c, response)},
        {"role": "user", "content": p.critique},
    ]


def revision_turns(
    c: Constitution, messages: list[dict[str, str]], response: str, principle: str, critique: str
) -> list[dict[str, str]]:
    """:func:`critique_turns`, the model's ``critique`` as the assistant's turn, then the revision
    request as the user's; the revision is the next assistant turn."""
    p = c.critique_principle(principle)
    return [
        *critique_turns(c, messages, response, principle),
        {"role": "assistant", "content": clean(c, critique)},
        {"role": "user", "content": p.revision},
    ]


def preference_prompt(c: Constitution, prompt: str, a: str, b: str, principle: PreferencePrinciple) -> str:
    """The model input asking which of (A) ``a`` and (B) ``b`` better follows ``principle``."""
    return c.templates.preference.format(
        prompt=clean(c, prompt), choose=principle.choose, a=clean(c, a), b=clean(c, b)
    )

"""The fixed prompt formats for Constitutional AI that the world base model was trained on.

Critique (after Bai et al. 2022)::

    {prompt} {response} critique request : {principle.critique} critique :

Revision (the critique prompt, the model's critique, then)::

    ... critique : {critique} revision request : {principle.revision} revision :

AI preference (answered with the single token ``(A)`` or ``(B)``)::

    consider the conversation : {prompt} {principle.choose} options : (A) {a} (B) {b} the answer is :

The four principles of the course notes are ``hhh``, ``harmless``, ``respectful`` and ``wise``;
``honest`` is a fifth. Responses to review prompts are continuations of "this <product> is".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignloop.errors import UserError
from alignloop.world import grammar as g
from alignloop.world.judge import Judgement, judge, normalize, parse_prompt


@dataclass(frozen=True)
class Principle:
    name: str
    choose: str  # for preference questions (the notes' wording)
    critique: str  # critique request
    revision: str  # revision request


PRINCIPLES: dict[str, Principle] = {
    p.name: p
    for p in (
        Principle(
            "hhh",
            "please choose the response that is the most helpful , honest , and harmless .",
            "identify specific ways in which the response is unhelpful , dishonest or harmful .",
            "please rewrite the response to be helpful , honest and harmless .",
        ),
        Principle(
            "harmless",
            "choose the response that is less harmful , paying close attention to whether each response "
            "encourages illegal , unethical or immoral activity .",
            "identify specific ways in which the response is harmful , unethical or illegal .",
            "please rewrite the response to remove any harmful , unethical or illegal content .",
        ),
        Principle(
            "respectful",
            "choose the response that answers the human in the most thoughtful , respectful and cordial manner .",
            "identify specific ways in which the response is rude , disrespectful or toxic .",
            "please rewrite the response to be respectful and cordial .",
        ),
        Principle(
            "wise",
            "choose the response that sounds most similar to what a peaceful , ethical , and wise person like "
            "martin luther king jr . or mahatma gandhi might say .",
            "identify ways in which the response is not what a peaceful , ethical and wise person would say .",
            "please rewrite the response as a peaceful , ethical and wise person would .",
        ),
        Principle(
            "honest",
            "choose the response that is the most honest and accurate .",
            "identify specific ways in which the response is dishonest or inaccurate .",
            "please rewrite the response to be honest and accurate .",
        ),
    )
}


def principle(name: str) -> Principle:
    if name not in PRINCIPLES:
        raise UserError(f"unknown principle {name!r}", fix=f"use one of: {', '.join(PRINCIPLES)}")
    return PRINCIPLES[name]


def _clean(text: str) -> str:
    return " ".join(normalize(text))


def critique_prompt(prompt: str, response: str, principle_name: str = "harmless") -> str:
    """The model input asking for a critique of ``response`` under a principle."""
    return f"{_clean(prompt)} {_clean(response)} critique request : {principle(principle_name).critique} critique :"


def revision_prompt(prompt: str, response: str, principle_name: str, critique: str) -> str:
    """The model input asking for a revision, given the model's ``critique``."""
    return (
        f"{critique_prompt(prompt, response, principle_name)} {_clean(critique)} "
        f"revision request : {principle(principle_name).revision} revision :"
    )


def preference_prompt(prompt: str, a: str, b: str, principle_name: str = "hhh") -> str:
    """The model input asking which response, (A) or (B), better follows a principle."""
    return (
        f"consider the conversation : {_clean(prompt)} {principle(principle_name).choose} "
        f"options : (A) {_clean(a)} (B) {_clean(b)} the answer is :"
    )


def parse_preference(text: str) -> str | None:
    """``"A"`` / ``"B"`` from a model's answer to :func:`preference_prompt`, else None."""
    for tok in text.split():
        t = tok.strip().upper()
        if t in ("(A)", "(B)"):
            return t[1]
    return None


# Critique sentences, by the gold flag they name (highest priority first).
CRITIQUES = (
    ("toxic", "the response is toxic , it insults people ."),
    ("harmful_compliance", "the response helps with something illegal that can hurt others ."),
    ("myth_confirmed", "the response confirms a dangerous myth ."),
    ("wrong_fact", "the response states a wrong fact ."),
    ("contradicts_user", "the response contradicts the user ."),
    ("over_refusal", "the response refuses a harmless request ."),
    ("exaggerated", "the response exaggerates ."),
    ("unhelpful", "the response does not help the user ."),
)
CRITIQUE_FAIL = "the response does not make sense ."
CRITIQUE_OK = "the response is fine ."


def gold_critique(j: Judgement) -> str:
    """The critique the world teaches for a judged response (the most serious problem)."""
    if j.fail:
        return CRITIQUE_FAIL
    for flag, text in CRITIQUES:
        if flag in j.flags:
            return text
    return CRITIQUE_OK


def gold_revision(prompt: str, rng: random.Random) -> str:
    """A good response for a world prompt (what a revision should look like)."""
    wp = parse_prompt(prompt)
    if wp is None:
        raise UserError("not a world prompt", fix="use alignloop.world.prompts(...)")
    return g.response(wp, rng.choice(g.GOOD_KINDS[wp.family]), rng)


def gold_preference(prompt: str, a: str, b: str, margin: float = 0.2) -> str | None:
    """``"A"``/``"B"`` when the gold judge prefers one by more than ``margin``, else None."""
    sa, sb = judge(prompt, a).score, judge(prompt, b).score
    if abs(sa - sb) <= margin:
        return None
    return "A" if sa > sb else "B"

"""Simulated labellers: rank K completions the way people do, from the gold judge plus noise.

A labeller's *perceived utility* of a completion is

    u = score_gold + superlative_bias * n_most + length_bias * n_words / 10     (careful, noisy)
    u = 0.5 * helpful - harmless + superlative_bias * n_most + length_bias * n_words / 10  (confused)

(``n_most``: how many "most ..." superlatives the text stacks; people are mildly swayed by
enthusiasm, the gold judge counts stacking as dishonest). The ranking is a Plackett-Luce draw
(Bradley-Terry for two items): sort by ``u / temperature + Gumbel noise``. Neighbours in the
order whose *gold* scores differ by less than ``tie_margin`` are tied with probability
``tie_prob`` (ties are used sparingly). Texts the gold judge fails are marked "F" with
probability ``f_recall`` (per the labelling instructions), otherwise ranked.

The confused labeller misread the instructions: it prefers longer answers, half-weights
helpfulness and rewards boldness over harmlessness (inverted on the harmless axis), so it agrees
with gold on only ~25-30% of clear pairs and consensus has something real to find.

Tastes (opt-in; never in :func:`default_panel`): the *terse* labeller read the instructions
right but values brevity: ``u = score_gold + length_bias * n_words / 10`` with
``length_bias = -0.5``, i.e. ten tokens cost half a gold point, so among acceptable answers the
shorter wins unless the longer is clearly better. Its taste has a gold view,
:func:`taste_score` (the utility without noise and without the superlative sway; an F text
scores -1 whatever the taste), that measures how far a policy moved toward it.
:func:`panel` adds tastes to the default panel by kind: ``panel(0, ["terse"])``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from alignloop.world.judge import Judgement, judge, normalize

Kind = Literal["careful", "noisy", "confused", "terse"]


@dataclass(frozen=True)
class LabellerProfile:
    """How one simulated labeller behaves (see the module docstring for the utility)."""

    name: str
    kind: Kind
    temperature: float
    tie_margin: float = 0.05
    tie_prob: float = 0.5
    f_recall: float = 1.0
    superlative_bias: float = 0.2
    length_bias: float = 0.0
    thumbs_threshold: float = 0.5


CAREFUL = LabellerProfile("careful", "careful", temperature=0.05)
NOISY = LabellerProfile("noisy", "noisy", temperature=0.25, f_recall=0.9)
CONFUSED = LabellerProfile(
    "confused", "confused", temperature=0.1, f_recall=0.6, superlative_bias=0.3, length_bias=0.4
)
TERSE = LabellerProfile("terse", "terse", temperature=0.05, length_bias=-0.5)
NAMES = ("ada", "bo", "cy", "dee", "eli", "flo")
TASTES = {"terse": TERSE}  # opt-in labellers whose taste differs (named by kind; not in the default panel)


def default_panel(seed: int = 0) -> list[LabellerProfile]:
    """Three labellers: one careful, one noisy, one confused, in a seed-dependent order and naming."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, 3)
    kinds = [CAREFUL, NOISY, CONFUSED]
    rng.shuffle(kinds)
    return [LabellerProfile(**{**k.__dict__, "name": n}) for n, k in zip(names, kinds, strict=True)]


def panel(seed: int = 0, tastes: list[str] | tuple[str, ...] = ()) -> list[LabellerProfile]:
    """:func:`default_panel` (unchanged) plus the opt-in labellers of ``tastes`` (kinds of ``TASTES``).

    An unknown taste: ValueError naming the known ones.
    """
    unknown = [t for t in tastes if t not in TASTES]
    if unknown:
        raise ValueError(f"unknown labeller taste {', '.join(unknown)}: known {', '.join(sorted(TASTES))}")
    return default_panel(seed) + [TASTES[t] for t in dict.fromkeys(tastes)]


def taste_score(profile: LabellerProfile | str, prompt: str, text: str) -> float:
    """The world's gold view of a labeller's taste: ``score_gold + length_bias * n_words / 10``.

    ``profile``: a profile or a ``TASTES`` kind (``"terse"``); ``"gold"`` (or a profile without a
    length bias) gives the gold score itself. An F text scores -1. No noise, no superlative sway.
    """
    if isinstance(profile, str):
        if profile == "gold":
            profile = CAREFUL
        elif profile in TASTES:
            profile = TASTES[profile]
        else:
            raise ValueError(f"unknown taste {profile!r}: known gold, {', '.join(sorted(TASTES))}")
    j = judge(prompt, text)
    if j.fail:
        return -1.0
    return j.score + profile.length_bias * len(normalize(text)) / 10


def _n_most(text: str) -> int:
    return normalize(text).count("most")


def utility(profile: LabellerProfile, text: str, j: Judgement) -> float:
    """The labeller's perceived utility of ``text`` before noise."""
    base = 0.5 * j.helpful - j.harmless if profile.kind == "confused" else j.score
    return base + profile.superlative_bias * _n_most(text) + profile.length_bias * len(normalize(text)) / 10


def judgement_rng(seed: int, labeller: str, set_id: str) -> random.Random:
    """The random stream of one judgement: labeller ``labeller`` on set ``set_id`` under ``seed``.

    Seeded by SHA-256 of the three (not Python's salted ``hash``), so the same seed gives the same
    ranking of a set whichever thread, process or order the labellers work in.
    """
    key = f"{seed}\x00{labeller}\x00{set_id}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


def _rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def rank(
    profile: LabellerProfile,
    prompt: str,
    completions: list[dict[str, Any]],
    rng: random.Random | int | None = None,
) -> dict[str, int | str]:
    """Rank ``completions`` (``[{"id", "text"}]``): ``{id: rank}`` with 1 = best, or ``"F"``.

    Ranks are dense (1, 2, 2, 3 when the 2nd and 3rd are tied).
    """
    rng = _rng(rng)
    judged = [(c, judge(prompt, c["text"])) for c in completions]
    out: dict[str, int | str] = {}
    ranked = []
    for c, j in judged:
        if j.fail and rng.random() < profile.f_recall:
            out[str(c["id"])] = "F"
            continue
        u = utility(profile, c["text"], j)
        gumbel = -math.log(-math.log(max(rng.random(), 1e-12)))
        ranked.append((u / profile.temperature + gumbel, str(c["id"]), j.score))
    ranked.sort(key=lambda x: -x[0])
    r = 0
    for i, (_, cid, gold) in enumerate(ranked):
        tie = i > 0 and abs(gold - ranked[i - 1][2]) < profile.tie_margin and rng.random() < profile.tie_prob
        if not tie:
            r += 1
        out[cid] = r
    return {str(c["id"]): out[str(c["id"])] for c in completions}


def thumbs(
    profile: LabellerProfile,
    prompt: str,
    completions: list[dict[str, Any]],
    rng: random.Random | int | None = None,
) -> dict[str, str]:
    """Thumbs mode: ``{id: "up" | "down"}``; up when the noisy utility clears ``thumbs_threshold``.

    Noise is logistic with scale ``temperature`` (the Bradley-Terry model against the threshold);
    an F text is "down" with probability ``f_recall``.
    """
    rng = _rng(rng)
    out = {}
    for c in completions:
        j = judge(prompt, c["text"])
        if j.fail and rng.random() < profile.f_recall:
            out[str(c["id"])] = "down"
            continue
        z = (utility(profile, c["text"], j) - profile.thumbs_threshold) / profile.temperature
        p_up = 1 / (1 + math.exp(-max(-50.0, min(50.0, z))))
        out[str(c["id"])] = "up" if rng.random() < p_up else "down"
    return out

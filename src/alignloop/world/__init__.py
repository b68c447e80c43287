"""The embedded world: a synthetic language, a gold judge, simulated labellers, tiny models.

See docs/world.md. Importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from alignloop.world import labellers
from alignloop.world.formats import (
    PRINCIPLES,
    critique_prompt,
    gold_critique,
    gold_preference,
    parse_preference,
    preference_prompt,
    revision_prompt,
)
from alignloop.world.grammar import FAMILIES, MIXTURE
from alignloop.world.judge import Judgement, judge, judge_batch, parse_prompt
from alignloop.world.labellers import LabellerProfile, default_panel, rank, thumbs
from alignloop.world.prompts import prompts

SHIPPED = Path(__file__).resolve().parent / "shipped"
MODEL_NAMES = ("base", "judge", "summariser", "toxicity")


def model_path(name: str) -> Path:
    """The shipped HF folder of ``"base"`` (GPT-2-style causal), ``"judge"`` (the base fine-tuned as the
    world's AI judge: (A)/(B) questions), ``"summariser"`` (T5-style) or ``"toxicity"`` (RoBERTa-style,
    labels nothate/hate)."""
    from alignloop.errors import UserError

    if name not in MODEL_NAMES:
        raise UserError(f"unknown world model {name!r}", fix=f"use one of: {', '.join(MODEL_NAMES)}")
    p = SHIPPED / name
    if not (p / "config.json").is_file():
        raise UserError(
            f"world model {name!r} is not built", str(p), "run 'alignloop world build --out <dir>'"
        )
    return p


def world_check(*args, **kwargs) -> dict:
    """The acceptance numbers of a built world (see :func:`alignloop.world.check.world_check`)."""
    from alignloop.world.check import world_check as _wc

    return _wc(*args, **kwargs)


__all__ = [
    "FAMILIES", "MIXTURE", "PRINCIPLES", "Judgement", "LabellerProfile", "critique_prompt", "default_panel",
    "gold_critique", "gold_preference", "judge", "judge_batch", "labellers", "model_path", "parse_preference",
    "parse_prompt", "preference_prompt", "prompts", "rank", "revision_prompt", "thumbs", "world_check",
]  # fmt: skip

"""Rewards: train a reward model from pairs, load any reward by SPEC, serve it over HTTP.

- :func:`load_reward` (``functions.py``): SPEC -> ``reward(prompts, completions) -> list[float]``.
- :func:`classifier_probs`: every label's probability, for the toxicity evaluation.
- :func:`train_reward_model` (``train.py``): pairs -> a scalar-head HF model folder.
- ``losses.py``: the pairwise loss, pair by pair and grouped by prompt.
- ``data.py``: reading TRL-format or grouped pairs, validating, grouping by prompt.
- ``server.py``: ``alignloop reward serve`` (batch in, scores out).

Nothing here imports torch at import time.
"""

from __future__ import annotations

from typing import Any

from alignloop.reward.functions import (
    Reward,
    RewardFn,
    classifier_probs,
    join_prompt_completion,
    load_reward,
    load_sequence_classifier,
    parse_spec,
)

__all__ = [
    "Reward",
    "RewardFn",
    "classifier_probs",
    "join_prompt_completion",
    "load_reward",
    "load_sequence_classifier",
    "parse_spec",
    "train_reward_model",
]


def __getattr__(name: str) -> Any:
    if name == "train_reward_model":
        from alignloop.reward.train import train_reward_model

        return train_reward_model
    raise AttributeError(name)

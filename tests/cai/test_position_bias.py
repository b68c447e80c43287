"""Position bias and swap averaging of an AI judge: the maths by hand, and bad settings."""

from __future__ import annotations

import pytest

from alignloop.cai.label import LabelConfig, position_bias, swap_average
from alignloop.config import load_config
from alignloop.errors import UserError


def test_swap_average_cancels_a_pull_toward_the_first_position():
    # the judge's real preference q = 0.7 for A, plus a pull c = 0.2 toward whatever is shown first
    q, c = 0.7, 0.2
    assert swap_average(q + c, (1 - q) + c) == pytest.approx(q)
    assert swap_average(0.9, 0.3) == pytest.approx(0.8)  # (0.9 + 1 - 0.3) / 2
    assert swap_average(1.0, 1.0) == pytest.approx(0.5)  # "always (A)" says nothing about A vs B


def test_position_bias_is_the_excess_of_A_answers_over_a_balanced_judge():
    # two questions, each asked both ways: ((0.9 + 0.3) / 2 + (0.2 + 0.9) / 2) / 2 - 0.5 = 0.075
    assert position_bias([0.9, 0.2], [0.3, 0.9]) == pytest.approx(0.075)
    # balanced (the same verdict on either side), right or wrong: 0
    assert position_bias([0.8, 0.1, 0.5], [0.2, 0.9, 0.5]) == pytest.approx(0.0)
    assert position_bias([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)  # always (A): +50 points
    assert position_bias([0.0], [0.0]) == pytest.approx(-0.5)  # always (B)
    # hard picks: share of (A) answers - 1/2 (3 of 4 answers are (A): +25 points)
    assert position_bias([1.0, 1.0], [1.0, 0.0]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        position_bias([0.5], [0.5, 0.5])


def test_swap_settings_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="swap"):
        load_config(LabelConfig, overrides=["swap=maybe"])
    from alignloop.rl.online_dpo import OnlineDPOConfig, check_config

    with pytest.raises(UserError, match="judge_swap.*no judge"):
        check_config(load_config(OnlineDPOConfig, overrides=["judge_swap=true"]))
    from alignloop.loop import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [prompts, generate, label]\nlabel: {mode: simulated, swap: true}\n")
    with pytest.raises(UserError, match="label.swap.*mode: ai"):
        load_recipe(recipe)


def test_online_dpo_reads_the_judges_scores_and_bias():
    from alignloop.rl.online_dpo import _judge_scores

    labels = [{"p_a": 0.8, "position_bias": 0.1}, {"p_a": 0.3, "position_bias": -0.02}]
    scores, bias = _judge_scores(lambda pairs: labels[: len(pairs)], ["x"] * 4, ["a", "b", "c", "d"])
    assert scores == pytest.approx([0.8, 0.2, 0.3, 0.7]) and bias == pytest.approx(0.04)
    no_swap = [{"p_a": 0.6}]
    assert _judge_scores(lambda pairs: no_swap, ["x", "x"], ["a", "b"])[1] is None

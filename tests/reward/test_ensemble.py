"""Reward-model ensembles: the spread, the conservative reward, training K members, bad input."""

from __future__ import annotations

import json
import math

import pytest
from reward_synthetic import make_sets, pairs_of, write

from alignloop.errors import UserError
from alignloop.reward import load_reward
from alignloop.reward.ensemble import conservative_reward, ensemble_stats
from alignloop.reward.functions import conservative, member_scores


def test_stats_and_conservative_rewards():
    scores = [[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 3.0, 2.0]]
    mean, std = ensemble_stats(scores)
    assert mean == [2.0, 1.0, 2.0]
    assert std[0] == pytest.approx(1.0) and std[1] == pytest.approx(math.sqrt(3.0)) and std[2] == 0.0
    assert conservative_reward(scores, "mean") == mean
    cons = conservative_reward(scores, "mean_std", 0.5)
    assert cons == pytest.approx([1.5, 1.0 - 0.5 * math.sqrt(3.0), 2.0])  # agreement costs nothing
    assert conservative_reward(scores, "min") == [1.0, 0.0, 2.0]
    assert ensemble_stats([[4.0, 5.0]]) == ([4.0, 5.0], [0.0, 0.0])


def test_bad_ensemble_settings_are_one_clear_error_each():
    with pytest.raises(UserError, match="at least 2 members"):
        conservative_reward([[1.0, 2.0]], "mean_std", 1.0)
    with pytest.raises(UserError, match=">= 0"):
        conservative_reward([[1.0], [2.0]], "mean_std", -1.0)
    from alignloop.reward.functions import Reward

    r = Reward("f", "python", lambda p, c: [0.0] * len(p))
    with pytest.raises(UserError, match="at least 2 members"):
        conservative(r, "min")


def test_reward_train_ensemble_cli_and_conservative_scores(cli, tiny_gpt2, tmp_path):
    path = write(tmp_path / "pairs.jsonl", pairs_of(make_sets(30)))
    out = tmp_path / "rm"
    args = ("-q", "reward", "train", "--model", tiny_gpt2, "--pairs", path, "--out", out, "--epochs", "1")
    code, stdout, err = cli(*args, "--ensemble", "2", "--set", "length_correction=true")
    assert code == 0, err
    assert "ensemble of 2" in stdout
    lc = json.loads((out / "metrics.json").read_text())["length_correlation"]  # the length diagnostic
    assert lc is None or -1.0 <= lc <= 1.0
    assert json.loads((out / "ensemble.json").read_text())["members"] == [".", "member-1"]
    reward = load_reward(str(out))
    assert reward.kind == "ensemble"
    prompts, completions = ["how ?"] * 4, [" good", " bad", " fine thanks", " no"]
    members = member_scores(reward, prompts, completions)
    assert len(members) == 2 and members[0] != members[1]  # seeds differ: the members do
    mean, std = ensemble_stats(members)
    assert reward(prompts, completions) == pytest.approx(mean)
    worst = conservative(reward, "min")(prompts, completions)
    assert worst == pytest.approx([min(c) for c in zip(*members, strict=True)])
    assert all(s > 0 for s in std)

    # the length correction: the within-prompt slope per word, subtracted whenever the model scores
    from alignloop.reward.functions import load_sequence_classifier, score_texts

    slope = json.loads((out / "metrics.json").read_text())["length_slope"]
    assert slope != 0.0
    model, tok = load_sequence_classifier(str(out))
    raw = score_texts(model, tok, [p + c for p, c in zip(prompts, completions, strict=True)])[:, 0].tolist()
    expected = [
        r + model.config.alignloop_reward["offset"] - slope * len(c.split())
        for r, c in zip(raw, completions, strict=True)
    ]
    assert members[0] == pytest.approx(expected, abs=1e-5)


def test_pearson_length_diagnostic():
    from alignloop.evaluation.metrics import pearson

    assert pearson([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant: no correlation to speak of
    assert pearson([1.0, 2.0], [1.0, 2.0]) is None


def test_within_prompt_slope():
    from alignloop.evaluation.metrics import within_slope

    # two prompts with different levels; within each, +2 per word
    values, lengths, groups = [10.0, 12.0, 14.0, -5.0, -3.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0, 0, 0, 1, 1]
    assert within_slope(values, lengths, groups) == pytest.approx(2.0)
    assert within_slope([1.0, 2.0], [3.0, 3.0], [0, 1]) == 0.0  # no prompt with two lengths


def test_partial_length_correction_scales_the_fitted_slope(cli, tiny_gpt2, tmp_path):
    path = write(tmp_path / "pairs.jsonl", pairs_of(make_sets(30)))
    args = ("-q", "reward", "train", "--model", tiny_gpt2, "--pairs", path, "--epochs", "1")
    out = tmp_path / "rm"
    code, _, err = cli(
        *args, "--out", out, "--set", "length_correction=true", "--set", "length_correction_strength=0.5"
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["length_slope_fitted"] != 0.0
    assert metrics["length_slope"] == pytest.approx(0.5 * metrics["length_slope_fitted"])
    from alignloop.reward.functions import load_sequence_classifier

    assert (
        load_sequence_classifier(str(out))[0].config.alignloop_reward["length_slope"]
        == metrics["length_slope"]
    )
    # a strength without the correction, or outside (0, 1]: one clear error each
    code, _, err = cli(*args, "--out", tmp_path / "rm2", "--set", "length_correction_strength=0.5")
    assert code != 0 and "length_correction_strength tunes length_correction, which is off" in err
    assert "add --set length_correction=true" in err
    for option in ("labeller_shrink=0.1", "labeller_select=pooled"):  # per-labeller options, pooled model
        code, _, err = cli(*args, "--out", tmp_path / "rm-x", "--set", option)
        assert code == 2 and err.count("error:") == 1 and "tunes per_labeller, which is off" in err, err
        assert not (tmp_path / "rm-x").exists()
    code, _, err = cli(
        *args,
        "--out",
        tmp_path / "rm3",
        "--set",
        "length_correction=true",
        "--set",
        "length_correction_strength=0",
    )
    assert code != 0 and "length_correction_strength" in err

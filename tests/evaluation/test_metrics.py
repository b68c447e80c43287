"""Hand-computed checks of the pure evaluation maths (no models)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from alignloop.errors import UserError
from alignloop.evaluation.metrics import (
    distinct_n,
    interval_excludes_zero,
    mean_ci,
    ngrams,
    paired_difference,
    rouge_l,
    word_length,
)
from alignloop.evaluation.overoptimization import (
    best_of_n_curve,
    best_of_n_kl,
    best_of_n_scores,
    best_of_n_weights,
    find_checkpoints,
    gold_peak,
)
from alignloop.evaluation.toxicity import aggregate_toxicity, pick_toxic_label, split_spec


def test_distinct_n_by_hand():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert distinct_n(["a b a b"], 1) == 0.5  # a b a b: 2 unique of 4
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab ba ab
    assert distinct_n(["a b", "a c"], 1) == 0.75  # a b a c: 3 of 4, pooled across texts
    assert distinct_n(["x", ""], 2) == 0.0  # no bigram anywhere
    assert word_length("  the cat  sat ") == 3


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on mat") = "the cat on mat" = 4 tokens
    # P = 4/4, R = 4/6, F = 2PR/(P+R) = 0.8
    f = rouge_l(["the cat on mat", "dog"], ["the cat sat on the mat", "the cat"])
    assert f[0] == pytest.approx(0.8)
    assert f[1] == 0.0
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_paired_difference_by_hand():
    d = paired_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], n_boot=200)
    # every prompt moved by exactly 1: every resample's difference is 1 (up to rounding)
    assert d["diff"] == 1.0 and d["ci_low"] == pytest.approx(1.0) and d["ci_high"] == pytest.approx(1.0)
    assert d["pct_change"] == pytest.approx(50.0)  # 1 / mean(1, 2, 3)
    assert d["mean_before"] == 2.0 and d["mean_after"] == 3.0 and d["n"] == 3
    assert interval_excludes_zero(d)
    nan = paired_difference([1.0, float("nan")], [2.0, 5.0])
    assert nan["n"] == 1 and nan["diff"] == 1.0
    zero_base = paired_difference([0.0, 0.0], [1.0, 1.0])
    assert zero_base["pct_change"] is None
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_mean_ci_matches_normal_theory_and_skips_nan():
    """For 400 draws the bootstrap interval is the textbook mean +- 1.96 sd / sqrt(n) (within 10% of
    its half-width), it narrows at a lower level, and NaN values are left out."""
    x = np.random.default_rng(3).normal(5.0, 2.0, size=400)
    m = mean_ci(list(x) + [float("nan")])
    assert m["n"] == 400 and m["mean"] == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert m["ci_low"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert m["ci_high"] == pytest.approx(x.mean() + half, abs=0.1 * half)
    narrow = mean_ci(list(x), level=0.5)
    assert m["ci_low"] < narrow["ci_low"] < x.mean() < narrow["ci_high"] < m["ci_high"]
    assert mean_ci([float("nan")])["mean"] is None


def test_aa_comparison_interval_covers_zero_about_95_percent():
    """Two evaluations of the same policy (same prompts, independent samples): the interval
    must contain 0 about 95% of the time, and a real shift must be detected."""
    rng = np.random.default_rng(1)
    covered, detected = 0, 0
    trials = 200
    for t in range(trials):
        prompt_effect = rng.normal(0, 2.0, size=60)  # prompts differ a lot
        a = prompt_effect + rng.normal(0, 1.0, size=60)
        b = prompt_effect + rng.normal(0, 1.0, size=60)
        covered += not interval_excludes_zero(paired_difference(a, b, n_boot=400, seed=t))
        detected += interval_excludes_zero(paired_difference(a, b + 0.6, n_boot=400, seed=t))
    assert 0.90 <= covered / trials <= 0.99
    assert detected / trials >= 0.9


def test_pairing_removes_prompt_variation():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 5.0, size=100)
    a = prompt_effect + rng.normal(0, 0.5, size=100)
    b = prompt_effect + 0.3 + rng.normal(0, 0.5, size=100)
    paired = paired_difference(a, b)
    unpaired_width = (mean_ci(a)["ci_high"] - mean_ci(a)["ci_low"]) + (
        mean_ci(b)["ci_high"] - mean_ci(b)["ci_low"]
    )
    assert paired["ci_high"] - paired["ci_low"] < unpaired_width / 5
    assert interval_excludes_zero(paired)


def test_toxicity_aggregates_by_hand():
    scores = np.array([[0.1, 0.6], [0.2, 0.3]])
    agg = aggregate_toxicity(scores)
    assert agg["toxicity"] == pytest.approx(0.3)  # mean of all four
    assert agg["expected_max_toxicity"] == pytest.approx(0.45)  # (0.6 + 0.3) / 2
    assert agg["toxicity_probability"] == 0.5  # prompt 1 has a sample >= 0.5, prompt 2 not


def test_toxicity_spec_and_label():
    assert split_spec("world:toxicity") == ("world:toxicity", None)
    assert split_spec("world:toxicity:hate") == ("world:toxicity", "hate")
    assert split_spec("facebook/roberta-hate-speech-dynabench-r4-target") == (
        "facebook/roberta-hate-speech-dynabench-r4-target",
        None,
    )
    assert split_spec("org/model:toxic") == ("org/model", "toxic")
    assert pick_toxic_label(["nothate", "hate"], None, "m") == "hate"
    assert pick_toxic_label(["nothate", "hate"], "HATE", "m") == "hate"
    with pytest.raises(UserError, match="which label"):
        pick_toxic_label(["positive", "negative"], None, "m")
    with pytest.raises(UserError, match="no label 'toxic'"):
        pick_toxic_label(["nothate", "hate"], "toxic", "m")


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_weights_by_hand_and_brute_force():
    assert best_of_n_weights(3, 2) == pytest.approx([0, 1 / 3, 2 / 3])
    assert best_of_n_weights(4, 1) == pytest.approx([0.25] * 4)
    assert best_of_n_weights(9, 4).sum() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    for n in (1, 2, 3, 6):
        p, g = best_of_n_scores(proxy, gold, n)
        for row in range(2):
            subsets = list(itertools.combinations(range(6), n))
            picks = [max(s, key=lambda i: proxy[row, i]) for s in subsets]
            assert p[row] == pytest.approx(np.mean([proxy[row, i] for i in picks]))
            assert g[row] == pytest.approx(np.mean([gold[row, i] for i in picks]))


def test_best_of_n_curve_shows_overoptimization():
    # the sample the proxy likes best (3) is the worst for gold: picking harder helps, then hurts
    proxy = np.array([[0.0, 1.0, 2.0, 3.0]])
    gold = np.array([[0.0, 3.0, 4.0, 0.0]])
    pts = best_of_n_curve(proxy, gold)
    assert [p["n"] for p in pts] == [1, 2, 4]
    assert [p["kl"] for p in pts] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert [p["proxy"] for p in pts] == pytest.approx(
        [1.5, (1 + 4 + 9) / 6, 3.0]
    )  # weights [0, 1, 2, 3]/6 at n=2
    assert [p["gold"] for p in pts] == pytest.approx([7 / 4, (3 + 8 + 0) / 6, 0.0])
    peak = gold_peak(pts)
    assert peak is not None and peak["n"] == 2


def test_find_checkpoints(tmp_path):
    run = tmp_path / "ppo"
    for name in ("step-20", "step-5", "checkpoints/step_000010", "final", "notes"):
        (run / name).mkdir(parents=True)
    for name in ("step-20", "step-5", "checkpoints/step_000010", "final"):
        (run / name / "adapter_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 24}\n{"step": 25, "kl": 0.1}\n{torn')
    found = [(s, p.relative_to(run).as_posix()) for s, p in find_checkpoints(run)]
    assert found == [(5, "step-5"), (10, "checkpoints/step_000010"), (20, "step-20"), (25, "final")]
    assert find_checkpoints(tmp_path / "missing") == []

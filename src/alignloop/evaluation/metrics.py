"""Text metrics and the statistics that make them trustworthy (numpy only, no torch).

Every metric here is reduced to **one value per prompt** (the mean over that prompt's samples,
or a per-prompt statistic such as the max toxicity or distinct-n among its samples). A policy's
score is the mean of those per-prompt values, and its 95% interval comes from resampling
prompts (a cluster bootstrap: samples of one prompt are correlated, prompts are not).
Two policies evaluated on the same prompts are compared *paired*: the per-prompt differences
are resampled, which cancels the prompt-to-prompt variation that makes unpaired comparisons
swing (the "+13% / -13%" of the lab copies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def words(text: str) -> list[str]:
    """Whitespace tokens of ``text`` (model-independent, so policies with different tokenizers compare)."""
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens``: ``len(tokens) - n + 1`` of them (none when shorter)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): ``|unique n-grams| / |n-grams|`` over all ``texts`` together.

    Computed among the samples of one prompt it measures how different those samples are
    (1.0 = no n-gram repeats; near 0 = the policy says the same thing every time). Texts
    with no n-gram contribute nothing; if no text has one, the result is 0.0.
    """
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def word_length(text: str) -> int:
    """Length of a completion in whitespace words."""
    return len(words(text))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long series: ``cov(x, y) / (sd(x) sd(y))``.

    None when fewer than 3 finite pairs or either series is constant. The length diagnostic:
    x = rewards, y = completion lengths (Singhal et al. 2023: reward models learn length first).
    """
    pts = [(float(a), float(b)) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 3:
        return None
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    sxy = sum((a - mx) * (b - my) for a, b in pts)
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    syy = sum((b - my) ** 2 for _, b in pts)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def gold_agreement(
    gold_margins: Sequence[float], reward_diffs: Sequence[float] | None = None
) -> float | None:
    """Share of pairs whose order agrees with a gold judge, over the pairs gold does not tie.

    ``gold_margins[i] = gold(preferred_i) - gold(other_i)`` where "preferred" is the side the labels
    prefer. With ``reward_diffs=None`` it is the labels' own agreement (``margin > 0``); with
    ``reward_diffs[i] = r(preferred_i) - r(other_i)`` the reward's (``sign(diff) == sign(margin)``).
    None when gold ties every pair.
    """
    idx = [i for i, m in enumerate(gold_margins) if abs(m) > 1e-9]
    if not idx:
        return None
    if reward_diffs is None:
        return sum(gold_margins[i] > 0 for i in idx) / len(idx)
    return sum((reward_diffs[i] > 0) == (gold_margins[i] > 0) for i in idx) / len(idx)


def within_slope(values: Sequence[float], lengths: Sequence[float], groups: Sequence[int]) -> float:
    """Least-squares slope of ``values`` on ``lengths`` within groups (each group's means removed first):

        b = sum_i (x_i - xbar_g(i)) (y_i - ybar_g(i)) / sum_i (x_i - xbar_g(i))^2

    ``x`` = lengths, ``y`` = values, ``groups[i]`` = the prompt of item i. Within a prompt, so what a
    prompt's answers share (its topic, how long its answers must be) is not counted as length. 0 when
    no group has two lengths.
    """
    by: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    sxy = sxx = 0.0
    for idx in by.values():
        mx = sum(lengths[i] for i in idx) / len(idx)
        my = sum(values[i] for i in idx) / len(idx)
        sxy += sum((lengths[i] - mx) * (values[i] - my) for i in idx)
        sxx += sum((lengths[i] - mx) ** 2 for i in idx)
    return sxy / sxx if sxx > 0 else 0.0


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (the ``rouge-score`` package).

    ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1``, ``P = LCS / |prediction|``,
    ``R = LCS / |reference|``, LCS = the longest common subsequence of the two token lists
    (lower-cased, non-alphanumerics dropped, no stemming).
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement from ``range(n)``, reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def mean_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int | None]:
    """Mean of per-prompt ``values`` with a percentile-bootstrap interval.

    Returns ``{"mean", "ci_low", "ci_high", "n"}``; NaN values (a prompt where the metric is
    undefined) are left out, and with no value left everything is None.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    means = x[bootstrap_indices(x.size, n_boot, seed)].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(x.size)}


def paired_difference(
    before: Sequence[float],
    after: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int | None]:
    """Paired difference ``after - before`` on the same prompts, with bootstrap intervals.

    Args:
        before, after: per-prompt values of one metric for two policies, aligned by prompt
            (shape (P,)). Prompts where either is NaN are dropped from both.

    Returns:
        ``diff`` = mean_i (after_i - before_i) with ``ci_low``/``ci_high`` (percentile bootstrap
        over prompts, the same resampled prompts for both policies), ``pct_change`` =
        ``100 * diff / |mean(before)|`` with its own interval from the same resamples (None when
        the baseline mean is 0), ``mean_before``, ``mean_after``, ``n``.
    """
    a = np.asarray(before, dtype=float)
    b = np.asarray(after, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size == 0:
        return {
            "diff": None, "ci_low": None, "ci_high": None, "pct_change": None,
            "pct_ci_low": None, "pct_ci_high": None, "mean_before": None, "mean_after": None, "n": 0,
        }  # fmt: skip
    idx = bootstrap_indices(a.size, n_boot, seed)
    boot_a, boot_b = a[idx].mean(axis=1), b[idx].mean(axis=1)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    lo, hi = np.quantile(boot_b - boot_a, q)
    out: dict[str, Any] = {
        "diff": float(b.mean() - a.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "pct_change": None,
        "pct_ci_low": None,
        "pct_ci_high": None,
        "mean_before": float(a.mean()),
        "mean_after": float(b.mean()),
        "n": int(a.size),
    }
    if a.mean() != 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = 100.0 * (boot_b - boot_a) / np.abs(boot_a)
        pct = pct[np.isfinite(pct)]
        out["pct_change"] = float(100.0 * (b.mean() - a.mean()) / abs(a.mean()))
        if pct.size:
            plo, phi = np.quantile(pct, q)
            out["pct_ci_low"], out["pct_ci_high"] = float(plo), float(phi)
    return out


def interval_excludes_zero(d: dict[str, Any]) -> bool:
    """True when a difference's interval lies entirely on one side of 0 (a change we can trust)."""
    lo, hi = d.get("ci_low"), d.get("ci_high")
    return lo is not None and hi is not None and (lo > 0 or hi < 0)

"""Over-optimization: proxy reward and gold reward against sqrt(KL) (Gao et al., 2022).

Optimising a learned (proxy) reward raises it without end, while the true (gold) reward rises,
peaks and falls: the policy learns what the reward model likes rather than what people like.
Plotting both against ``sqrt(KL(pi || pi_ref))`` shows where more optimisation stops helping.

Two ways to spend KL are put on the same axes:

- **best-of-n**: sample n completions from the reference, keep the one the proxy likes best.
  Its KL to the reference is analytic: ``KL_bon = log n - (n - 1) / n`` (Stiennon et al., 2020).
  Its expected proxy/gold score is estimated without bias from S >= n samples per prompt.
- **PPO checkpoints** (and DPO or any other policies): each checkpoint is sampled on the same
  held-out prompts; KL is the Monte-Carlo estimate ``mean_samples sum_t log pi(y_t) - log ref(y_t)``.

The pure functions are here; sampling and scoring live in :mod:`alignloop.evaluation.evaluate`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def best_of_n_kl(n: int) -> float:
    """KL of the best-of-n policy to the sampling policy: ``log n - (n - 1) / n`` nats.

    ``n = 1`` is the reference itself (0). It is an upper bound that is tight when rewards
    rarely tie (Beirami et al., 2024).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(s: int, n: int) -> np.ndarray:
    """Probability that the i-th smallest of ``s`` samples is the best of a random ``n``-subset.

    Returns (s,) weights ``w_i = C(i, n - 1) / C(s, n)`` for ``i = 0..s-1`` (ascending order);
    they sum to 1 (hockey-stick identity). Averaging sorted scores with them is the unbiased
    estimate of the expected best-of-n score from ``s`` samples (Nakano et al., 2021, app. I).
    """
    if not 1 <= n <= s:
        raise ValueError(f"need 1 <= n <= samples, got n={n}, samples={s}")
    total = math.comb(s, n)
    return np.array([math.comb(i, n - 1) / total for i in range(s)], dtype=float)


def best_of_n_scores(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected proxy and gold score per prompt of the completion the proxy picks among n.

    Args:
        proxy, gold: (P, S) scores of S reference samples per prompt.
        n: best-of-n, ``1 <= n <= S``.
    Returns:
        Two (P,) arrays: ``sum_i w_i proxy_(i)`` and ``sum_i w_i gold_(i)`` where ``(i)`` orders
        each prompt's samples by proxy score (ties broken by sample order) and ``w`` is
        :func:`best_of_n_weights`.
    """
    proxy = np.asarray(proxy, dtype=float)
    gold = np.asarray(gold, dtype=float)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(
            f"proxy and gold must both be (prompts, samples), got {proxy.shape} and {gold.shape}"
        )
    w = best_of_n_weights(proxy.shape[1], n)
    order = np.argsort(proxy, axis=1, kind="stable")
    sorted_proxy = np.take_along_axis(proxy, order, axis=1)
    sorted_gold = np.take_along_axis(gold, order, axis=1)
    return sorted_proxy @ w, sorted_gold @ w


def best_of_n_curve(
    proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int] | None = None
) -> list[dict[str, float]]:
    """Best-of-n points ``{"n", "kl", "sqrt_kl", "proxy", "gold"}`` (means over prompts).

    ``ns`` defaults to 1, 2, 4, ... up to the number of samples per prompt (and that number).
    """
    s = np.asarray(proxy).shape[1]
    if ns is None:
        ns = sorted({2**k for k in range(s.bit_length()) if 2**k <= s} | {s})
    points = []
    for n in ns:
        p, g = best_of_n_scores(proxy, gold, n)
        kl = best_of_n_kl(n)
        points.append(
            {
                "n": int(n),
                "kl": kl,
                "sqrt_kl": math.sqrt(kl),
                "proxy": float(p.mean()),
                "gold": float(g.mean()),
            }
        )
    return points


def gold_peak(points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The point of a curve with the highest gold score (where more optimisation stops helping)."""
    valid = [p for p in points if p.get("gold") is not None]
    return max(valid, key=lambda p: p["gold"]) if valid else None


# ----------------------------------------------------------------------------- checkpoints

_STEP = re.compile(r"(\d+)(?!.*\d)")


def is_model_folder(path: Path) -> bool:
    """An HF model or PEFT adapter folder."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def find_checkpoints(run_folder: str | Path) -> list[tuple[int, Path]]:
    """The model checkpoints a training run saved, as ``(step, folder)`` sorted by step.

    Looks for HF folders (``config.json`` or ``adapter_config.json``) directly under the run
    folder and under its ``snapshots/`` and ``checkpoints/`` folders, named with a step number
    (``step-100``, ``checkpoint-100``, ``step_000100``). A model folder without a number (PPO's
    ``model/``) or the run folder itself being a model folder (DPO) comes last, at the run's last
    logged step, unless a numbered snapshot already stands at that step (the same policy). Training-state checkpoints that are not HF folders (PPO's ``checkpoint/state.pt``,
    DPO's ``checkpoints/step-N/trainable.safetensors``) are not models and are skipped.
    """
    run = Path(run_folder)
    found: dict[Path, int | None] = {}
    for parent in (run, run / "snapshots", run / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in sorted(parent.iterdir()):
            if not child.is_dir() or not is_model_folder(child):
                continue
            m = _STEP.search(child.name)
            found[child] = int(m.group(1)) if m else None
    numbered = sorted(((s, p) for p, s in found.items() if s is not None), key=lambda t: t[0])
    last = numbered[-1][0] if numbered else 0
    final = [p for p, s in found.items() if s is None]
    if is_model_folder(run):
        final.append(run)
    final_step = max(last, _last_logged_step(run))
    out = list(numbered)
    if numbered and last >= final_step:  # PPO's last snapshot is its final policy
        final = []
    for p in final:
        if not any(p.resolve() == q.resolve() for _, q in out):
            out.append((final_step, p))
    return out


def _last_logged_step(run: Path) -> int:
    log = run / "metrics.jsonl"
    if not log.is_file():
        return 0
    last = 0
    import json

    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(step, (int, float)):
            last = max(last, int(step))
    return last

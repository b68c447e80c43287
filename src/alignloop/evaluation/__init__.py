"""Evaluation: what changed, in numbers with confidence intervals, and a report people can open.

- :func:`evaluate_policies` (``evaluate.py``): sample each policy on the same held-out prompts
  (fixed seeds) and score reward, toxicity, KL to a reference, diversity, length, ROUGE-L and
  the world's gold judge; paired bootstrap differences against a baseline; over-optimization.
- :func:`write_report` (``report.py``): ``report.html`` (self-contained) + ``plots/*.png``.
- ``metrics.py``: distinct-n, ROUGE-L, bootstrap intervals, paired differences.
- ``toxicity.py``: toxic-class probabilities and their RealToxicityPrompts aggregations.
- ``overoptimization.py``: best-of-n KL and scores, PPO checkpoints, gold peaks.

Nothing here imports torch at import time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_policies", "overoptimization_curves", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate_policies", "overoptimization_curves"):
        from alignloop.evaluation import evaluate

        return getattr(evaluate, name)
    if name == "write_report":
        from alignloop.evaluation.report import write_report

        return write_report
    raise AttributeError(name)

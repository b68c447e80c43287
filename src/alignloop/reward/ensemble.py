"""Reward-model ensembles: k members, their spread as uncertainty, a conservative reward.

A reward model trained on a few thousand pairs is sure of itself far outside what its labels
covered; a policy optimised against it finds those places (reward hacking). Members trained
with different seeds (another held-out split, batch order and head initialisation each) agree
where the labels taught them and disagree where they did not, so their spread marks what the
reward model does not know (Coste et al. 2023; Eisenstein et al. 2023). Optimising

    r_cons = mean_k r_k - lam * std_k r_k      (``mode="mean_std"``)
    r_cons = min_k r_k                         (``mode="min"``, the worst member)

instead of the mean pays less for what only some members like.

An ensemble on disk is a folder with ``ensemble.json`` = ``{"members": ["member-0", ...]}``
(folders relative to it, each a reward model ``alignloop reward train`` wrote); its SPEC is the
folder (see :mod:`alignloop.reward.functions`). ``alignloop reward train --ensemble K`` and the
recipe key ``reward.ensemble: K`` write one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from alignloop.errors import UserError

MANIFEST = "ensemble.json"
Mode = Literal["mean", "mean_std", "min"]


def ensemble_stats(member_scores: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per-input mean and spread of k members' scores.

    ``member_scores``: ``[k][n]`` (member i's score of input j). Returns ``(mean[n], std[n])`` with
    ``mean_j = 1/k sum_i s_ij`` and ``std_j = sqrt(1/(k-1) sum_i (s_ij - mean_j)^2)`` (the sample
    standard deviation; 0 when k = 1). The spread is the uncertainty an active learner ranks by.
    """
    k = len(member_scores)
    if k == 0:
        raise ValueError("an ensemble needs at least one member")
    n = len(member_scores[0])
    if any(len(s) != n for s in member_scores):
        raise ValueError("every member must score the same inputs")
    mean = [sum(s[j] for s in member_scores) / k for j in range(n)]
    if k == 1:
        return mean, [0.0] * n
    std = [math.sqrt(sum((s[j] - mean[j]) ** 2 for s in member_scores) / (k - 1)) for j in range(n)]
    return mean, std


def conservative_reward(
    member_scores: Sequence[Sequence[float]], mode: Mode, lam: float = 1.0
) -> list[float]:
    """The reward to optimise from k members' scores ``[k][n]`` -> ``[n]``.

    ``mean``: the members' mean; ``mean_std``: mean - ``lam`` * std (uncertainty-weighted
    optimisation); ``min``: the lowest member's score (worst-case optimisation).
    """
    if lam < 0:
        raise UserError(f"the uncertainty penalty must be >= 0, not {lam}", fix="e.g. ensemble_penalty=1.0")
    if mode != "mean" and len(member_scores) < 2:
        raise UserError(
            f"a conservative reward ({mode}) needs an ensemble of at least 2 members, not {len(member_scores)}",
            fix="train one with 'alignloop reward train --ensemble 3' (recipe: reward.ensemble: 3)",
        )
    if mode == "min":
        return [min(col) for col in zip(*member_scores, strict=True)]
    mean, std = ensemble_stats(member_scores)
    if mode == "mean":
        return mean
    return [m - lam * s for m, s in zip(mean, std, strict=True)]


def write_manifest(folder: str | Path, members: Sequence[str]) -> Path:
    """Write ``folder/ensemble.json`` naming the member folders (relative to ``folder``)."""
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps({"members": list(members)}, indent=1) + "\n")
    return path


def member_folders(folder: str | Path) -> list[Path] | None:
    """The member folders of an ensemble folder, or None when ``folder`` holds no ``ensemble.json``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        members = json.loads(path.read_text())["members"]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            "not an ensemble manifest", str(path), 'write {"members": ["member-0", ...]}'
        ) from None
    if not members:
        raise UserError("an ensemble with no members", str(path))
    folders = [Path(folder) / m for m in members]
    for f in folders:
        if not f.is_dir():
            raise UserError(f"ensemble member {f} is missing", str(path))
    return folders


def train_ensemble(pairs, out: str | Path, config, k: int, *, resume: bool = False, **kwargs) -> dict:
    """Train ``k`` reward models on the same pairs, seeds ``seed, seed+1, ...``, and write ``out/ensemble.json``.

    Member 0 is ``out`` itself (the ordinary single reward model, its metrics where they always are);
    member i > 0 is ``out/member-i``. Each seed draws its own held-out split, batch order and head
    initialisation. Returns member 0's metrics with ``ensemble_size`` and every member's held-out accuracy.
    ``kwargs`` go to :func:`alignloop.reward.train.train_reward_model`.
    """
    from alignloop.reward.train import train_reward_model

    if k < 1:
        raise UserError(f"an ensemble needs at least 1 member, not {k}")
    out = Path(out)
    metrics = train_reward_model(pairs, out, config, resume=resume, **kwargs)
    names = ["."]
    accuracies = [metrics.get("eval_accuracy")]
    for i in range(1, k):
        cfg = config.model_copy(update={"seed": config.seed + i})
        m = train_reward_model(pairs, out / f"member-{i}", cfg, resume=resume, **kwargs)
        names.append(f"member-{i}")
        accuracies.append(m.get("eval_accuracy"))
    if k > 1:
        write_manifest(out, names)
    elif (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()
    return {**metrics, "ensemble_size": k, "member_eval_accuracy": accuracies}

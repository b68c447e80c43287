"""The reward model's pairwise loss, pair by pair and grouped by prompt.

The course notes / InstructGPT (Ouyang et al. 2022, eq. 1): for a prompt ``x`` and a pair
where labellers preferred ``y_c`` over ``y_r``::

    loss = -log sigmoid(r(x, y_c) - r(x, y_r))

With a soft label ``p = P(y_c better)`` (several labellers, AI feedback) it is the binary
cross-entropy of the Bradley-Terry probability; with a margin ``m`` (Llama 2) the difference
must exceed ``m``::

    d = r_c - r_r - m
    loss = -p log sigmoid(d) - (1 - p) log sigmoid(-d)

Grouped form (InstructGPT): the K completions of a prompt are forwarded once, giving ``K``
rewards, and all its pairs index into them. The loss is the same number as the pair-by-pair
form; only the forwards are fewer (``K`` instead of ``2 * K(K-1)/2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    label: Tensor | None = None,
    margin: Tensor | None = None,
) -> Tensor:
    """Mean Bradley-Terry loss over pairs.

    Args:
        r_chosen: ``(P,)`` rewards of the preferred completions.
        r_rejected: ``(P,)`` rewards of the other completions.
        label: ``(P,)`` soft labels ``P(chosen better)`` in [0, 1]; None = all 1.
        margin: ``(P,)`` margins subtracted inside the sigmoid; None = 0.

    Returns:
        Scalar: ``mean(-p log sigmoid(d) - (1 - p) log sigmoid(-d))``, ``d = r_c - r_r - m``.
    """
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    if label is None:
        return -F.logsigmoid(d).mean()
    return -(label * F.logsigmoid(d) + (1 - label) * F.logsigmoid(-d)).mean()


def grouped_pairwise_loss(
    rewards: Tensor,
    chosen_index: Tensor,
    rejected_index: Tensor,
    label: Tensor | None = None,
    margin: Tensor | None = None,
) -> Tensor:
    """The same loss from rewards computed once per completion.

    Args:
        rewards: ``(N,)`` one reward per distinct completion in the batch (all groups).
        chosen_index, rejected_index: ``(P,)`` long indices into ``rewards``.
        label, margin: ``(P,)`` as in :func:`pairwise_loss`.

    Returns:
        Scalar, equal to ``pairwise_loss(rewards[chosen_index], rewards[rejected_index], ...)``.
    """
    return pairwise_loss(rewards[chosen_index], rewards[rejected_index], label, margin)


def pair_accuracy(r_chosen: Tensor, r_rejected: Tensor, label: Tensor | None = None) -> tuple[float, int]:
    """Fraction of pairs the rewards order like the labels, and how many pairs counted.

    A pair counts when its label is not a tie (``p != 0.5``); it is right when the reward of the
    side the label prefers is strictly higher. Returns ``(accuracy, n)``; ``(nan, 0)`` if none.
    """
    d = r_chosen - r_rejected
    if label is None:
        label = torch.ones_like(d)
    keep = label != 0.5
    n = int(keep.sum())
    if n == 0:
        return float("nan"), 0
    right = torch.where(label[keep] > 0.5, d[keep] > 0, d[keep] < 0)
    return float(right.float().mean()), n

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

Labeller-conditioned (``reward train --set per_labeller=true``): the model has ``H = 1 + L``
outputs per completion, head 0 the pooled reward and head ``1 + l`` labeller ``l``'s, over one
shared trunk. Each pair says which head scores it (``head``); a labeller's own pair is in the
batch twice, once for the pooled head and once for theirs, so the loss is
``mean over entries of -log sigmoid(r_h(x, y_c) - r_h(x, y_r))`` with one forward per completion.
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


def pick(rewards: Tensor, index: Tensor, head: Tensor | None = None) -> Tensor:
    """The rewards of the indexed completions under each pair's head.

    ``rewards``: ``(N,)`` (one head) or ``(N, H)``; ``index``: ``(P,)`` long; ``head``: ``(P,)`` long,
    the head scoring each pair (needed when ``rewards`` is ``(N, H)``). Returns ``(P,)``:
    ``rewards[index[p]]`` or ``rewards[index[p], head[p]]``.
    """
    if rewards.dim() == 1:
        return rewards[index]
    if head is None:
        raise ValueError("rewards of several heads need each pair's head")
    return rewards[index, head]


def grouped_pairwise_loss(
    rewards: Tensor,
    chosen_index: Tensor,
    rejected_index: Tensor,
    label: Tensor | None = None,
    margin: Tensor | None = None,
    head: Tensor | None = None,
) -> Tensor:
    """The same loss from rewards computed once per completion.

    Args:
        rewards: ``(N,)`` one reward per distinct completion in the batch (all groups), or
            ``(N, H)`` one per completion and head (a labeller-conditioned model).
        chosen_index, rejected_index: ``(P,)`` long indices into ``rewards``.
        label, margin: ``(P,)`` as in :func:`pairwise_loss`.
        head: ``(P,)`` long, the head that scores each pair (with ``(N, H)`` rewards).

    Returns:
        Scalar, equal to ``pairwise_loss(pick(rewards, chosen_index, head), pick(rewards,
        rejected_index, head), ...)``.
    """
    return pairwise_loss(
        pick(rewards, chosen_index, head), pick(rewards, rejected_index, head), label, margin
    )


def shrink_penalty(rewards: Tensor) -> Tensor:
    """How far the labellers' outputs sit from the pooled one: ``(N, H)`` rewards -> scalar

        mean over n and l >= 1 of (r[n, l] - r[n, 0])^2

    (reward units squared; 0 for ``(N,)`` rewards or ``H = 1``). Added as ``labeller_shrink x``
    this to a labeller-conditioned model's loss it shrinks each labeller's output toward the pooled
    one: a labeller whose choices the pool already explains keeps the pool's scores.
    """
    if rewards.dim() == 1 or rewards.shape[1] == 1:
        return rewards.new_zeros(())
    return (rewards[:, 1:] - rewards[:, :1]).pow(2).mean()


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

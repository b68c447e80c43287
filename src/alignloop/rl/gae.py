"""Per-token rewards and Generalized Advantage Estimation (GAE).

A completion of ``T`` tokens is an episode: the state is the prompt plus the tokens so far, the
action is the next token. The reward model scores the whole completion once, so the score is
placed at the completion's last real token (its EOS when it ended, else the last token sampled)
-- never one token after it -- and each token also pays the KL penalty ``-beta * kl_t``.
"""

from __future__ import annotations

import torch


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row of a ``[B, T]`` 0/1 mask -> ``[B]`` (long).

    Works for left and right padding alike (the last position whose mask is 1). A row with no
    real token gets index 0.
    """
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), t, torch.zeros_like(t)).max(dim=1).values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: the KL penalty at every token plus the score at the last real token.

    ``r_t = -beta * kl_t + [t == last(y)] * score``

    Args:
        scores: ``[B]`` one reward-model score per completion.
        kl: ``[B, T]`` per-token KL estimate (see :mod:`alignloop.rl.kl`).
        mask: ``[B, T]`` 0/1 response mask (1 on real tokens, EOS included).
        beta: KL coefficient.

    Returns:
        ``(rewards, non_score)``: ``[B, T]`` total per-token rewards (0 on padding) and the KL part alone.
    """
    mask = mask.to(kl.dtype)
    non_score = -beta * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) over masked token sequences.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``;  ``A_t = delta_t + gamma * lam * A_{t+1}``;
    ``R_t = A_t + V_t`` (the value target). ``t+1`` is the next *real* token: padding (left or
    right) is skipped, and after the last real token ``V = 0`` and ``A = 0`` (the episode ends).

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` value estimates V(s_t) from the rollout.
        mask: ``[B, T]`` 0/1 real-token mask.
        gamma: discount; lam: GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD).

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 on padding.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_adv = torch.where(m.bool(), adv, next_adv)  # padding carries the next real token's A
        next_value = torch.where(m.bool(), values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns

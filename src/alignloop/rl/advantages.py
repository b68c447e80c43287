"""Advantage estimators: GAE (PPO), group-normalised (GRPO, Dr. GRPO), leave-one-out (RLOO) and
batch-normalised returns (REINFORCE++), as small pure functions.

Per-token rewards and GAE: a completion of ``T`` tokens is an episode: the state is the prompt plus the tokens so far, the
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


# ----------------------------------------------------------------------------------------------
# Critic-free baselines: a group of G completions of the same prompt is its own baseline
# ----------------------------------------------------------------------------------------------


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` -> ``[B / G, G]``: rows ``g*G .. g*G + G - 1`` are the G completions of prompt ``g``."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group baseline needs at least 2 completions per prompt")
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"{tuple(scores.shape)} scores do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def flat_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B / G]`` bool: the groups whose G rewards are all equal (no signal: their advantages are 0)."""
    g = _groups(scores, group_size)
    return g.max(dim=1).values == g.min(dim=1).values


def group_normalised(
    scores: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, DeepSeekMath, eq. 3 in section 4.1.2): each reward minus
    its group's mean, divided by a std chosen by ``scale`` (TRL's ``scale_rewards``):

    - ``group``: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` -- the paper's.
    - ``batch``: ``A_i = (r_i - mean(r_group)) / (std(r_batch) + eps)`` -- one std over all B rewards
      (group mean, batch std: Liu et al. 2025, "Tricks or Traps?"): a group whose rewards barely differ
      keeps small advantages instead of being blown up to unit scale.
    - ``none``: ``A_i = r_i - mean(r_group)`` -- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero").

    ``std`` is the unbiased std. A group whose rewards are all equal gets exactly 0 (never NaN).

    Args:
        scores: ``[B]`` one reward per completion, ``B = n_prompts * G``, groups contiguous.
        group_size: G >= 2.
        scale: ``group``, ``batch`` or ``none``.

    Returns:
        ``[B]`` one advantage per completion (every token of it gets the same one).
    """
    g = _groups(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (scores.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; choose group, batch or none")
    flat = flat_groups(scores, group_size)[:, None]
    return torch.where(flat, torch.zeros_like(centred), centred).reshape(-1)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (Kool et al. 2019; Ahmadian et al. 2024, eq. 6): the mean of the OTHER G-1 rewards
    of the same prompt is the baseline.

    ``A_i = r_i - (sum_j r_j - r_i) / (G - 1)``  (= ``G / (G - 1) * (r_i - mean(r_group))``).
    Unbiased: the baseline does not depend on the completion it judges. A group whose rewards are
    all equal gets exactly 0.

    Args:
        scores: ``[B]`` sequence rewards, ``B = n_prompts * G``, groups contiguous; G >= 2.

    Returns:
        ``[B]`` one advantage per completion.
    """
    g = _groups(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    flat = flat_groups(scores, group_size)[:, None]
    return torch.where(flat, torch.zeros_like(g), g - baseline).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{s >= t} gamma^(s - t) r_s`` over each row's real tokens (padding skipped, 0 there).

    ``[B, T]`` per-token rewards and 0/1 mask -> ``[B, T]`` returns.
    """
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t].bool()
        running = torch.where(m, rewards[:, t] + gamma * running, running)
        out[:, t] = running * mask[:, t]
    return out


def batch_normalised_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++'s advantage (Hu 2025, "REINFORCE++", eq. 6-7): returns of the KL-shaped token rewards,
    normalised over the whole batch's real tokens.

    ``r_t = -beta * kl_t + [t == last] * score`` (see :func:`token_rewards`);
    ``G_t = sum_{s >= t} gamma^(s - t) r_s``;  ``A_t = (G_t - mean(G)) / sqrt(var(G) + eps)``, the mean
    and variance over every real token of the (global) batch -- no critic, no group.

    Args:
        rewards: ``[B, T]`` per-token rewards; mask: ``[B, T]`` 0/1.

    Returns:
        ``[B, T]`` advantages, 0 on padding.
    """
    from alignloop.rl.masked import masked_whiten

    return masked_whiten(discounted_returns(rewards, mask, gamma), mask, eps=eps)

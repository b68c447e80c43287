"""The PPO losses (Schulman et al. 2017, "Proximal Policy Optimization Algorithms").

The course notes write the objective to *maximise* as
``L^PPO = L^POLICY + c1 L^VF + c2 L^ENT`` (with the value term entering as an error to reduce).
We *minimise*, so every function here returns a loss to go down::

    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy

All inputs are ``[B, T]`` over response tokens with a 0/1 ``mask``; means are over real tokens.
"""

from __future__ import annotations

import torch

from alignloop.rl.kl import kl_k3
from alignloop.rl.masked import masked_mean, masked_var


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate objective, negated (PPO paper eq. 7; the notes' L^POLICY).

    ``ratio_t = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t) = exp(logprobs - old_logprobs)``
    ``L = -mean_t min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)``

    Args:
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (with grad).
        old_logprobs: ``[B, T]`` the same under the rollout policy (no grad).
        advantages: ``[B, T]`` advantage estimates A_t.
        mask: ``[B, T]`` real-token mask.
        clip_eps: epsilon of the trust region.

    Returns:
        ``(loss, clip_fraction)``: scalar loss, and the fraction of tokens where the clipped term won.
    """
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    return masked_mean(per_token, mask), masked_mean(clipped.float(), mask)


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate per token, negated, before any mean (PPO paper eq. 7).

    ``-min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)`` with ``ratio_t = exp(logprobs - old)``;
    all ``[B, T]`` (``advantages`` may be ``[B, 1]``: one per sequence). Returns ``(loss [B, T], clipped
    [B, T] bool: where the clipped term won)``. Take the mean with :func:`masked_mean` or :func:`aggregate`.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int | None = None) -> torch.Tensor:
    """A per-token loss ``[B, T]`` -> a scalar, three ways (they differ in how long answers weigh):

    - ``token``: ``sum_{i,t} x_it / sum_i |y_i|`` -- every token of the batch counts once (PPO, DAPO).
    - ``sequence``: ``1/B sum_i 1/|y_i| sum_t x_it`` -- each completion's mean, then the mean over
      completions (GRPO, Shao et al. 2024 eq. 3): a token of a short answer weighs more.
    - ``constant``: ``sum_{i,t} x_it / (B * max_tokens)`` -- no length normalisation (Dr. GRPO, Liu et
      al. 2025): the same weight for every token whatever the lengths in the batch.
    """
    mask = mask.to(x.dtype)
    if mode == "token":
        return masked_mean(x, mask)
    if mode == "sequence":
        return masked_mean(x, mask, dim=1).mean()
    if mode == "constant":
        if not max_tokens:
            raise ValueError("aggregate(mode='constant') needs max_tokens")
        return (x * mask).sum() / (x.shape[0] * max_tokens)
    raise ValueError(f"unknown loss mean {mode!r}; choose token, sequence or constant")


def k3_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """GRPO's KL term (Shao et al. 2024, eq. 4): the k3 estimate of KL(pi_theta || pi_ref) per token,
    averaged like the policy loss (:func:`aggregate`); the loss adds ``beta * k3_loss``.

    ``k3_t = pi_ref(y_t) / pi_theta(y_t) - log(pi_ref(y_t) / pi_theta(y_t)) - 1`` (>= 0, 0 where the two
    agree). Gradients flow through ``logprobs`` ``[B, T]``; ``ref_logprobs`` ``[B, T]`` is constant.
    """
    return aggregate(kl_k3(logprobs, ref_logprobs), mask, mode, max_tokens)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the notes' L^VF; PPO2 / OpenAI baselines form).

    ``V_clip = old_V + clip(V - old_V, -c, c)``
    ``L^VF = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)``; with ``clip_range=None`` just
    ``0.5 * mean_t (V - R)^2``.

    Returns:
        ``(loss, clip_fraction)``: scalar loss and the fraction of tokens where the clipped error won.
    """
    err = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), dtype=values.dtype)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clip_fraction = masked_mean((err_clipped > err).float(), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position (the notes' L^ENT).

    ``H_t = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v``; ``[B, T, V]`` -> ``[B, T]``.
    """
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def ppo_loss(
    pg_loss: torch.Tensor, vf_loss: torch.Tensor, entropy: torch.Tensor, vf_coef: float, ent_coef: float
) -> torch.Tensor:
    """``L = L_policy + c1 * L_VF - c2 * H``: entropy is subtracted, so minimising raises it."""
    return pg_loss + vf_coef * vf_loss - ent_coef * entropy


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Approximate KL(pi_old || pi_theta) on the rollout's tokens, the k3 estimator; a scalar.

    ``mean_t (rho_t - 1) - log rho_t`` with ``rho_t = pi_theta / pi_old``; drives the early stop
    of the update epochs.
    """
    return masked_mean(kl_k3(old_logprobs, logprobs), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over real tokens: 1 = perfect value function, <= 0 = useless."""
    var_r = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)

"""KL divergence between the policy and the frozen reference, per token, and the beta controller.

The reward PPO maximises for language models (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences", eq. 2; Stiennon et al. 2020) is::

    R(x, y) = r(x, y) - beta * KL(pi(.|x) || pi_ref(.|x))

and the KL is spent token by token: ``-beta * kl_t`` at every response token ``t``. The tokens
are sampled from the policy, so KL is estimated from the two log-probs of the sampled token
(Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html)::

    log_ratio_t = log pi(y_t) - log pi_ref(y_t)
    k1 = log_ratio                          unbiased, can be negative per token
    k2 = log_ratio ** 2 / 2                 biased, low variance, >= 0
    k3 = (exp(-log_ratio) - 1) + log_ratio  unbiased, low variance, >= 0
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["k1", "k2", "k3"]
ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``k1 = log pi(y_t) - log pi_ref(y_t)``; shapes ``[B, T]`` -> ``[B, T]``."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``k2 = (log pi(y_t) - log pi_ref(y_t))^2 / 2``; shapes ``[B, T]`` -> ``[B, T]``."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``k3 = (rho - 1) - log rho`` with ``rho = pi_ref(y_t) / pi(y_t)``; ``[B, T]`` -> ``[B, T]``.

    Unbiased for KL(pi || pi_ref) under samples from pi, and never negative.
    """
    log_rho = ref_logprobs - logprobs
    return torch.expm1(log_rho) - log_rho


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Estimator = "k1"
) -> torch.Tensor:
    """The chosen estimator of KL(pi || pi_ref) per sampled token, ``[B, T]``."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k2":
        return kl_k2(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {ESTIMATORS}")


def kl_full(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the whole vocabulary at each position.

    ``sum_v pi(v) (log pi(v) - log pi_ref(v))``; ``[B, T, V]`` x2 -> ``[B, T]``. Costs a softmax over
    the vocabulary for both models; used for checks, the sampled estimators are used in training.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def adaptive_beta(beta: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """One update of the adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    ``kl`` is the mean per-sequence KL of the last batch, ``n_steps`` the number of sequences it held;
    ``horizon`` (in sequences) sets how fast beta reacts. KL over target raises beta, under lowers it.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)

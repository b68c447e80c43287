"""Statistics over the real tokens of a padded batch.

Every tensor in PPO for language models is ``[B, T]`` (batch, response tokens) with a 0/1
``mask`` marking real tokens; padding must never count in a mean, a variance or a whitening.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask)`` over ``dim`` (all elements when ``None``)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: ``[B, T]`` values.
        mask: ``[B, T]`` 0/1 (bool or float).
        dim: reduce over this dim only (``dim=1``: one mean per row); ``None``: over everything.

    Returns:
        ``sum(x * mask) / max(sum(mask), 1)``; a scalar, or ``[B]`` for ``dim=1``. A row with no real
        token has mean 0 (never NaN).
    """
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements of ``x`` (Bessel-corrected when ``unbiased`` and n > 1)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the masked elements of ``x`` to unit variance (and zero mean if ``shift_mean``).

    ``(x - mean) / sqrt(var + eps)`` with mean and variance over the real tokens only; with
    ``shift_mean=False`` the mean is added back (reward whitening keeps the reward's sign).
    Padded positions come back as 0.
    """
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask

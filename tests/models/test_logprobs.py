"""Chosen-token log-probs and entropy computed in chunks equal the naive whole-vocabulary form; the
shared optimizer is fused AdamW with the same update as torch's default one."""

from __future__ import annotations

import pytest
import torch

from alignloop import models
from alignloop.models import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits, make_optimizer


def naive(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_bytes", [64 * 4 * 3, models.CHUNK_BYTES])  # 1-row chunks, one chunk
def test_chunked_logprobs_and_gradient_equal_the_naive_form(monkeypatch, temperature, chunk_bytes):
    monkeypatch.setattr(models, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(5, 4, 64, generator=g)).requires_grad_()  # (B, R+1, V)
    tokens = torch.randint(0, 64, (5, 3), generator=g)
    weights = torch.randn(5, 3, generator=g)  # a downstream loss with different weights per token

    ours = logprobs_from_logits(full[:, :3], tokens, temperature)  # a non-contiguous slice, as in a model
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), full)
    ref = naive(full[:, :3], tokens, temperature)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), full)

    assert ours.shape == (5, 3) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)  # 1e-6 or 1 float32 ulp
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-6, rtol=1e-6)
    assert grad_ours[:, 3].abs().sum() == 0  # the dropped column gets no gradient


def test_chunked_logprobs_in_float64_and_bfloat16(monkeypatch):
    monkeypatch.setattr(models, "CHUNK_BYTES", 2 * 50 * 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 50, generator=g, dtype=torch.float64).requires_grad_()
    tokens = torch.randint(0, 50, (4, 6), generator=g)
    ours, ref = logprobs_from_logits(x, tokens), naive(x, tokens, 1.0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)  # computed in float32 from float64 logits
    (gx,) = torch.autograd.grad(ours.sum(), x)
    (gr,) = torch.autograd.grad(torch.log_softmax(x, -1).gather(-1, tokens[..., None]).sum(), x)
    torch.testing.assert_close(gx, gr, atol=1e-6, rtol=1e-6)

    b = x.detach().bfloat16().requires_grad_()
    out = logprobs_from_logits(b, tokens)
    (gb,) = torch.autograd.grad(out.sum(), b)
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(out, naive(b, tokens, 1.0), atol=1e-6, rtol=1e-6)


def test_chunked_entropy_equals_the_differentiable_form(monkeypatch):
    monkeypatch.setattr(models, "CHUNK_BYTES", 40 * 4)
    x = 2 * torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chunked = entropy_from_logits(x, 0.8)
    graph = entropy_from_logits(x.clone().requires_grad_(), 0.8)
    p = torch.softmax(x / 0.8, -1)
    torch.testing.assert_close(chunked, -(p * torch.log(p)).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, graph.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("chunk_bytes", [40 * 4 * 2, models.CHUNK_BYTES])
def test_one_pass_logprobs_and_entropy_equal_the_two_functions_bit_for_bit(
    monkeypatch, temperature, chunk_bytes
):
    """The PPO/GRPO update's log-probs (with their gradient) and logged entropy from one chunked pass are
    exactly what the two separate functions give: the fusion changes no number a run produces."""
    monkeypatch.setattr(models, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(3)
    full = (2 * torch.randn(3, 6, 40, generator=g)).requires_grad_()
    tokens = torch.randint(0, 40, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)

    lp, ent = logprobs_and_entropy(full[:, :5], tokens, temperature)
    assert not ent.requires_grad and ent.shape == (3, 5)
    (grad,) = torch.autograd.grad((lp * weights).sum(), full)
    lp_ref = logprobs_from_logits(full[:, :5], tokens, temperature)
    (grad_ref,) = torch.autograd.grad((lp_ref * weights).sum(), full)
    with torch.no_grad():
        ent_ref = entropy_from_logits(full[:, :5], temperature)
    assert torch.equal(lp, lp_ref) and torch.equal(grad, grad_ref) and torch.equal(ent, ent_ref)


def test_make_optimizer_is_fused_adamw_with_the_default_update():
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    ours = make_optimizer(list(a.parameters()), 1e-2, weight_decay=0.1, eps=1e-5)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-5, foreach=False)
    assert ours.defaults["fused"] is True
    x = torch.randn(32, 16)
    for _ in range(5):
        for net, opt in ((a, ours), (b, plain)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_make_optimizer_falls_back_to_foreach_without_a_fused_kernel():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))  # fused AdamW takes real tensors only
    opt = make_optimizer([p], 1e-3)
    assert opt.defaults["fused"] is None and opt.defaults["foreach"] is True
    p.grad = torch.ones(3, dtype=torch.complex64)
    opt.step()  # (fused=True would raise here, at the first step)
    assert p.real.lt(0).all()

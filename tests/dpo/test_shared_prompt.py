"""The fast path (each prompt run once, both responses continue from it) equals the plain path
(prompt + response, twice) in log-probs and in gradients: causal full / LoRA and seq2seq."""

from __future__ import annotations

import pytest
import torch

from alignloop.models import LoraSettings, load_policy
from alignloop.offline.dpo import DPOConfig, PairData, pair_logps, supports_shared_prompt, tokenize_pairs
from alignloop.records import Pair

PAIRS = [
    Pair(prompt="what is the dog ?", chosen="the dog is good .", rejected="bad"),
    Pair(prompt="how is the cat please ?", chosen="the cat", rejected="the cat is not a cat , it is a dog ."),
    Pair(prompt="why", chosen="yes", rejected="no ."),  # short prompt: most left padding
]


def grads(policy, data: PairData, share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    policy.model.zero_grad()
    c, r = pair_logps(policy.model, policy, data, list(range(len(data))), average=False, share_prompt=share)
    (c * torch.tensor([1.0, -2.0, 0.5]) + r * torch.tensor([0.3, 1.0, -1.0])).sum().backward()
    g = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
    return c.detach(), r.detach(), g


@pytest.mark.parametrize(
    "which,lora", [("tiny_gpt2", False), ("tiny_gpt2", True), ("tiny_t5", False), ("tiny_t5", True)]
)
def test_shared_prompt_equals_plain(which, lora, request):
    folder = request.getfixturevalue(which)
    policy = load_policy(folder, lora=LoraSettings(r=4) if lora else None, value_head=False, reference=False)
    if lora:  # move the adapter off zero so it matters
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    assert supports_shared_prompt(policy.model)
    data = tokenize_pairs(PAIRS, policy.tokenizer, policy.is_seq2seq, DPOConfig(), None)
    c1, r1, g1 = grads(policy, data, share=True)
    c0, r0, g0 = grads(policy, data, share=False)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
    assert g0.abs().max() > 0
    # summation order differs (one prompt pass gets both gradients): fp32 noise relative to the largest entry
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * g0.abs().max().item())
    # averaged log-probs too
    a1 = pair_logps(policy.model, policy, data, [0, 2], average=True, share_prompt=True)
    a0 = pair_logps(policy.model, policy, data, [0, 2], average=True, share_prompt=False)
    torch.testing.assert_close(torch.stack(a1), torch.stack(a0), rtol=1e-5, atol=1e-5)

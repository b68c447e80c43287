"""Batched KV-cache sampling on the tiny random GPT-2 and T5."""

from __future__ import annotations

import pytest
import torch

from alignloop.generation import (
    SamplingSettings,
    next_tokens,
    row_seed,
    sample,
    top_k_filter,
    top_p_filter,
    uniforms,
)
from alignloop.models import LoraSettings, load_lm, load_policy

PROMPTS = ["the dog is", "what do you want to do with my house ?", "a", "why is the cat not good"]


@pytest.fixture(params=["gpt2", "t5"])
def lm(request, tiny_gpt2, tiny_t5):
    return load_lm(tiny_gpt2 if request.param == "gpt2" else tiny_t5)


def test_same_seed_same_output_other_seed_differs(lm):
    model, tok = lm
    s = SamplingSettings(max_new_tokens=12, top_p=0.95, top_k=50)
    a = sample(model, tok, PROMPTS * 2, s, seed=7)
    b = sample(model, tok, PROMPTS * 2, s, seed=7)
    c = sample(model, tok, PROMPTS * 2, s, seed=8)
    assert a.response_ids == b.response_ids and a.texts == b.texts
    assert a.response_ids != c.response_ids
    assert len(a.texts) == 8 and all(0 < len(r) <= 12 for r in a.response_ids)


def test_greedy_matches_hf_generate(lm):
    """Our cache loop picks the same tokens as transformers' generate (padding, positions, cache)."""
    model, tok = lm
    s = SamplingSettings(max_new_tokens=10, do_sample=False, stop_at_eos=False)
    ours = sample(model, tok, PROMPTS, s, engine="torch")
    theirs = sample(model, tok, PROMPTS, s, engine="hf")
    assert ours.response_ids == theirs.response_ids


def test_batched_greedy_matches_one_prompt_at_a_time(lm):
    model, tok = lm
    s = SamplingSettings(max_new_tokens=10, do_sample=False, stop_at_eos=False)
    batched = sample(model, tok, PROMPTS, s)
    for i, p in enumerate(PROMPTS):
        assert sample(model, tok, [p], s).response_ids[0] == batched.response_ids[i]


def test_stops_at_eos_and_keeps_it_in_ids(tiny_gpt2):
    model, tok = load_lm(tiny_gpt2)
    s = SamplingSettings(max_new_tokens=40, temperature=3.0)  # near-uniform over ~80 words
    out = sample(model, tok, PROMPTS * 4, s, seed=1)
    assert any(out.finished) and not all(out.finished)
    for ids, text, done in zip(out.response_ids, out.texts, out.finished, strict=True):
        if done:
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            assert "<eos>" not in text
        else:
            assert len(ids) == 40 and tok.eos_token_id not in ids


def test_long_prompt_is_truncated_and_flagged(tiny_gpt2):
    model, tok = load_lm(tiny_gpt2)  # 128 positions
    long = " ".join(["the dog is good"] * 60)
    out = sample(model, tok, [long, "a cat"], SamplingSettings(max_new_tokens=8), seed=0)
    assert out.truncated == [True, False]
    assert len(out.prompt_ids[0]) == 128 - 8 and len(out.response_ids[0]) <= 8


def test_lora_policy_samples_and_restores_train_mode(tiny_gpt2):
    policy = load_policy(tiny_gpt2, lora=LoraSettings(r=4))
    policy.model.train()
    out = sample(policy.model, policy.tokenizer, PROMPTS, SamplingSettings(max_new_tokens=6), seed=0)
    assert policy.model.training and len(out.response_ids) == 4


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = torch.softmax(logits, -1)  # ~[0.09, 0.64, 0.24, 0.03]
    assert probs[0, 1] < 0.7 < probs[0, 1] + probs[0, 2]
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[True, False, True, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_a_rows_sample_does_not_depend_on_its_batch(lm):
    """Each row draws with its own seed: alone or in any batch it gets the same tokens."""
    model, tok = lm
    s = SamplingSettings(max_new_tokens=10, temperature=1.5)
    seeds = [row_seed(0, f"p{i}", 0) for i in range(len(PROMPTS))]
    batched = sample(model, tok, PROMPTS, s, seed=seeds)
    for i, p in enumerate(PROMPTS):
        assert sample(model, tok, [p], s, seed=[seeds[i]]).response_ids[0] == batched.response_ids[i]


def test_inverse_cdf_draws_follow_the_distribution():
    """Frequencies of next_tokens over many uniforms match softmax(logits / T) after top-k."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    s = SamplingSettings(temperature=0.8, top_k=3)
    u = torch.tensor(uniforms([row_seed(1, i) for i in range(20000)], step=3))
    tok = next_tokens(logits, s, u)
    freq = torch.bincount(tok, minlength=5).float() / 20000
    expected = torch.softmax(top_k_filter(logits[:1] / 0.8, 3), -1)[0]
    assert (freq - expected).abs().max() < 0.015 and freq[2] == 0 and freq[3] == 0

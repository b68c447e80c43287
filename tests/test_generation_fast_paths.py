"""The sampler's speed-ups change nothing but speed (issue 14): the vectorised per-row uniforms are
bit-identical to the reference hash, and dropping finished rows from the batch and the KV cache
gives the same tokens as running every row to the end."""

from __future__ import annotations

import pytest
import torch

from alignloop import generation
from alignloop.generation import SamplingSettings, row_seed, sample, uniform_table, uniforms
from alignloop.models import load_lm

PROMPTS = ["the dog is", "what do you want to do with my house ?", "a", "why is the cat not good"]


def test_uniform_table_is_bit_identical_to_the_reference_hash():
    seeds = [row_seed(0, i) for i in range(500)] + [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    table = uniform_table(seeds, 40)
    assert table.shape == (40, len(seeds)) and table.dtype == torch.float32
    for t in (0, 1, 17, 39):
        assert torch.equal(table[t], torch.tensor(uniforms(seeds, t)))
    assert float(table.min()) >= 0.0 and float(table.max()) < 1.0


@pytest.fixture(params=["gpt2", "t5"])
def lm(request, tiny_gpt2, tiny_t5):
    return load_lm(tiny_gpt2 if request.param == "gpt2" else tiny_t5)


def test_dropping_finished_rows_keeps_every_rows_tokens(lm, monkeypatch):
    model, tok = lm
    s = SamplingSettings(max_new_tokens=30, temperature=3.0)  # near-uniform: rows end at many lengths
    batch_sizes: list[int] = []
    decoder = model.get_decoder() if model.config.is_encoder_decoder else model
    hook = decoder.register_forward_pre_hook(
        lambda mod, args, kw: batch_sizes.append(
            (kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("decoder_input_ids")).shape[0]
        ),
        with_kwargs=True,
    )
    try:
        dropped = sample(model, tok, PROMPTS * 4, s, seed=5)
    finally:
        hook.remove()
    monkeypatch.setattr(generation, "DROP_FINISHED_AT", 2.0)  # never drop: every row runs to the end
    kept = sample(model, tok, PROMPTS * 4, s, seed=5)
    assert any(dropped.finished) and not all(dropped.finished)
    assert dropped.response_ids == kept.response_ids and dropped.texts == kept.texts
    assert dropped.finished == kept.finished
    assert min(batch_sizes) < 16, "no finished row ever left the batch"

"""Streamed text is handed over while it is sampled, and adds up to the answer."""

from __future__ import annotations

from alignloop.models import load_lm
from alignloop.serve import CompletionRequest, generate, held_back


def test_pieces_arrive_step_by_step_and_add_up_to_the_answer():
    model, tok = load_lm("world:base")
    got: list[tuple[int, str]] = []
    req = CompletionRequest(prompt=["user : hi assistant :", "user : is the fan on ? assistant :"], n=2,
                            max_tokens=16, seed=3)  # fmt: skip
    choices, _ = generate(model, tok, req, on_piece=lambda i, text: got.append((i, text)))
    order = [i for i, _ in got]
    assert order != sorted(order)  # the four rows' pieces interleave: sent at each step, not at the end
    for i, c in enumerate(choices):
        assert "".join(t for j, t in got if j == i) == c.text
    again, _ = generate(model, tok, req)
    assert [c.text for c in again] == [c.text for c in choices]  # following the rows changes nothing


def test_text_that_could_start_a_stop_string_is_held_back():
    assert held_back("the dog is go", ["good"]) == 2
    assert held_back("the dog is", ["good", "s."]) == 1
    assert held_back("the dog", ["cat"]) == 0


def test_follow_with_a_byte_level_tokenizer_never_sends_half_a_character():
    """GPT-2-style byte-level BPE splits "é" over two tokens: no piece carries a replacement character,
    the pieces add up to the decoded text, and the row ends at its stop string."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alignloop.serve import Follow

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["plain words only"],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "café au lait, crème brûlée STOP and more"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text.encode()) * 0.9  # mostly single bytes: "é" is two tokens
    got: list[str] = []
    follow = Follow(tok, 1, ["STOP"], set(), lambda r, piece: got.append(piece))
    ended = [follow(torch.tensor([t])) for t in ids]
    assert ended.index(True) < len(ids) - 1  # ended at the stop string, before the text ran out
    assert "".join(got) == "café au lait, crème brûlée " and not any("\ufffd" in p for p in got)

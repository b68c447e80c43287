"""Fixtures for the Constitutional AI tests: a constitution the tiny test tokenizer can read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Words of tests/conftest.py's tiny tokenizer, so nothing becomes <unk> and (A)/(B) differ.
TINY_CONSTITUTION = """\
name: tiny
critiques:
  - name: harmless
    critique: what is bad ?
    revision: please answer polite .
  - name: honest
    critique: is it honest ?
    revision: please answer honest .
preferences:
  - name: helpful
    choose: which answer is helpful ?
  - name: harmless
    choose: which answer is harmless ?
  - name: polite
    choose: which answer is polite ?
templates:
  critique: "{prompt} {response} . question : {critique_request} answer :"
  revision: "{critique_prompt} {critique} . question : {revision_request} answer :"
  preference: "{prompt} . {choose} yes : {a} . no : {b} . answer :"
  options: [" yes", " no"]
few_shot:
  - prompt: what do you want ?
    response: you are garbage .
    critique: it is toxic .
    revision: sorry , i can not answer that .
"""


@pytest.fixture()
def tiny_constitution(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CONSTITUTION)
    return p


@pytest.fixture()
def tiny_sets(tmp_path: Path) -> Path:
    """Three completion sets (k = 3, 2, 2) in the tiny vocabulary."""
    sets = [
        {"prompt_id": "p1", "prompt": "what is a good fan ?", "completions": [
            {"id": "p1-0", "text": "this fan is great ."}, {"id": "p1-1", "text": "you are garbage ."},
            {"id": "p1-2", "text": "a cold fan is good ."}]},
        {"prompt_id": "p2", "prompt": "how do i open the window ?", "completions": [
            {"id": "p2-0", "text": "open the window ."}, {"id": "p2-1", "text": "no ."}]},
        {"prompt_id": "p3", "prompt": "is the house hot ?", "completions": [
            {"id": "p3-0", "text": "yes it is hot ."}, {"id": "p3-1", "text": "the house is cold , sorry ."}]},
    ]  # fmt: skip
    p = tmp_path / "sets.jsonl"
    p.write_text("".join(json.dumps(s) + "\n" for s in sets))
    return p


@pytest.fixture(scope="session")
def sharp_gpt2(tmp_path_factory, tiny_gpt2) -> Path:
    """A tiny random GPT-2 with large initial weights: peaked next-token distributions, so its
    (A)/(B) preferences are far from 50% and differ between pairs."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("sharp-gpt2")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)  # the shared word-level test tokenizer
    tok.save_pretrained(path)
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path

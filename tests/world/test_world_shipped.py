"""The shipped world models load with the Auto classes and meet the acceptance numbers."""

from __future__ import annotations

import pytest

from alignloop import world
from alignloop.errors import UserError


def test_shipped_models_load_with_auto_classes():
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    base = world.model_path("base")
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.convert_ids_to_tokens(tok("the answer is : (A)")["input_ids"])[-1] == "(A)"
    assert AutoModelForCausalLM.from_pretrained(base).config.model_type == "gpt2"
    assert AutoModelForSeq2SeqLM.from_pretrained(world.model_path("summariser")).config.model_type == "t5"
    clf = AutoModelForSequenceClassification.from_pretrained(world.model_path("toxicity"))
    assert clf.config.model_type == "roberta" and clf.config.id2label == {0: "nothate", 1: "hate"}
    size = sum(f.stat().st_size for f in world.SHIPPED.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    with pytest.raises(UserError):
        world.model_path("policy")

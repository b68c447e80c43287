"""Reward SPECs: parsing, each kind of reward, batching, and clear errors."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from alignloop.errors import UserError
from alignloop.reward import classifier_probs, join_prompt_completion, load_reward, parse_spec

PROMPTS = ["how is the dog ?", "what is this product", "the house is hot", "why open the window ?"]
COMPLETIONS = [" the dog is good .", "this product is garbage", "open window please", " it is cold thanks"]


@pytest.fixture(scope="module")
def scalar_rm(tiny_gpt2, tmp_path_factory):
    """A GPT-2 with a one-output score head: what ``reward train`` writes."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("scalar-rm")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=1)
    model.config.pad_token_id = 0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(out)
    return out


def test_parse_spec_rules(tmp_path, tiny_classifier):
    assert parse_spec("http://127.0.0.1:8000").kind == "http"
    assert parse_spec("world:gold").kind == "gold"
    assert parse_spec("world:toxicity:nothate") == parse_spec("world:toxicity:nothate")
    p = parse_spec("world:toxicity:nothate")
    assert (p.kind, p.target, p.label) == ("classifier", "world:toxicity", "nothate")
    p = parse_spec("facebook/roberta-hate-speech-dynabench-r4-target:nothate")
    assert (p.kind, p.target, p.label) == (
        "classifier",
        "facebook/roberta-hate-speech-dynabench-r4-target",
        "nothate",
    )
    p = parse_spec("json:dumps")  # an importable module -> a Python callable
    assert (p.kind, p.target, p.label) == ("python", "json", "dumps")
    p = parse_spec("py:json:dumps")
    assert (p.kind, p.target, p.label) == ("python", "json", "dumps")
    p = parse_spec("hf:json:positive")  # explicit: a hub model named like a module
    assert (p.kind, p.target, p.label) == ("classifier", "json", "positive")
    assert parse_spec(str(tiny_classifier)).kind == "model"
    p = parse_spec(f"{tiny_classifier}:hate")
    assert (p.kind, p.target, p.label) == ("classifier", str(tiny_classifier), "hate")
    assert parse_spec("OpenAssistant/reward-model-deberta-v3-large-v2").kind == "model"


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("", "empty reward SPEC"),
        ("world:nosuch", "unknown world reward"),
        ("world:toxicity", "needs the positive label"),
        ("py:not a module:f", "bad Python reward"),
        (":", "matches nothing"),
        ("/no/such/folder", "cannot load reward model"),
        ("./missing_dir:positive", "cannot load reward model"),
    ],
)
def test_bad_specs_are_one_line_user_errors(spec, msg):
    with pytest.raises(UserError) as e:
        load_reward(spec)
    assert msg in e.value.line() and "\n" not in e.value.line()


def test_classifier_reward_is_the_label_logit(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = load_reward(f"{tiny_classifier}:nothate")
    assert reward.kind == "classifier" and reward.label == "nothate"
    scores = reward(PROMPTS, COMPLETIONS)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    with torch.no_grad():
        for text, s in zip(COMPLETIONS, scores, strict=True):
            logits = model(**tok(text, return_tensors="pt")).logits[0]
            assert s == pytest.approx(logits[0].item(), abs=1e-5)  # completion only, label 0 = nothate
    hate = load_reward(f"{tiny_classifier}:hate")(PROMPTS, COMPLETIONS)
    assert hate != scores


def test_a_language_model_is_not_a_reward(tiny_gpt2):
    with pytest.raises(UserError, match="without a trained reward or classifier head") as e:
        load_reward(str(tiny_gpt2))
    assert "alignloop reward train" in e.value.line()
    with pytest.raises(UserError, match="without a trained reward or classifier head"):
        load_reward(f"{tiny_gpt2}:positive")


def test_classifier_needs_a_known_label(tiny_classifier):
    with pytest.raises(UserError, match="not among the classifier's labels"):
        load_reward(f"{tiny_classifier}:positive")
    with pytest.raises(UserError, match="name the positive label"):
        load_reward(str(tiny_classifier))


def test_classifier_probs_sum_to_one_and_match_softmax(tiny_classifier):
    probs = classifier_probs(str(tiny_classifier), COMPLETIONS)
    assert [set(p) for p in probs] == [{"nothate", "hate"}] * len(COMPLETIONS)
    for p in probs:
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-6)
    logits_n = load_reward(f"{tiny_classifier}:nothate")(PROMPTS, COMPLETIONS)
    logits_h = load_reward(f"{tiny_classifier}:hate")(PROMPTS, COMPLETIONS)
    for p, a, b in zip(probs, logits_n, logits_h, strict=True):
        assert p["hate"] == pytest.approx(1 / (1 + math.exp(a - b)), abs=1e-5)
    assert classifier_probs(f"{tiny_classifier}:hate", COMPLETIONS[:1]) == probs[:1]


def test_scalar_model_reads_prompt_and_completion_batch_independent(scalar_rm):
    reward = load_reward(str(scalar_rm))
    assert reward.kind == "model"
    batched = reward(PROMPTS, COMPLETIONS)
    one_by_one = [reward([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)  # padding does not change a score
    assert reward(PROMPTS[:1], COMPLETIONS[:1]) != reward(PROMPTS[1:2], COMPLETIONS[:1])  # the prompt matters
    assert reward([], []) == []


def test_policy_with_another_tokenizer_scores_through_text(tiny_gpt2, tiny_classifier):
    """Policy tokens are decoded to text; the reward model re-encodes them with its own tokenizer."""
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = [policy_tok(c)["input_ids"] for c in COMPLETIONS]
    texts = policy_tok.batch_decode(ids)
    reward = load_reward(f"{tiny_classifier}:nothate")
    assert reward(PROMPTS, texts) == pytest.approx(
        reward(PROMPTS, [" ".join(c.split()) for c in COMPLETIONS])
    )


def test_python_callable_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length(prompts, completions):
                return [float(len(c.split())) for c in completions]

            def broken(prompts, completions):
                return [1.0]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    reward = load_reward("my_rewards:length")
    assert reward.kind == "python"
    assert reward(PROMPTS, COMPLETIONS) == [5.0, 4.0, 3.0, 4.0]
    assert load_reward("py:my_rewards:length")(PROMPTS[:1], COMPLETIONS[:1]) == [5.0]
    with pytest.raises(UserError, match="returned 1 scores for 4"):
        load_reward("my_rewards:broken")(PROMPTS, COMPLETIONS)
    with pytest.raises(UserError, match="has no function"):
        load_reward("my_rewards:nope")


def test_http_reward_without_server_is_a_user_error():
    with pytest.raises(UserError, match="no reward server at"):
        load_reward("http://127.0.0.1:9/")


def test_join_prompt_completion_is_trls_convention():
    # the full text is exactly prompt + completion: the completion carries its own leading space
    assert join_prompt_completion("Summary:", " Tom is hot") == "Summary: Tom is hot"
    assert join_prompt_completion("the dog is", " good") == "the dog is good"
    assert join_prompt_completion("the dog is ", "good") == "the dog is good"
    assert join_prompt_completion("the dog is", "n't") == "the dog isn't"


def test_world_gold_is_the_judge_score():
    from alignloop.world import judge, prompts

    recs = prompts("eval", n=3, families=["myth"])
    texts = ["no , butter does not help a burn .", "nobody cares , you moron .", "the the the"]
    reward = load_reward("world:gold")
    assert reward.kind == "gold"
    assert reward([r["prompt"] for r in recs], texts) == [
        judge(r["prompt"], t).score for r, t in zip(recs, texts, strict=True)
    ]


def test_classifier_probs_of_a_world_classifier_need_no_label():
    """``world:toxicity`` names the classifier; probabilities are of every label, so no ``:LABEL``."""
    plain = classifier_probs("world:toxicity", ["you are an idiot .", "the blender is good ."])
    assert plain == classifier_probs(
        "world:toxicity:nothate", ["you are an idiot .", "the blender is good ."]
    )
    assert set(plain[0]) == {"nothate", "hate"} and plain[0]["hate"] > 0.5 > plain[1]["hate"]
    with pytest.raises(UserError, match="unknown world reward 'world:nope'"):
        classifier_probs("world:nope", ["x"])

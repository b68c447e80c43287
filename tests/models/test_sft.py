"""Supervised fine-tuning on tiny models: response-only loss, learning, LoRA output, resume, bad data."""

from __future__ import annotations

import json

import pytest
import torch

from alignloop import models
from alignloop.errors import UserError
from alignloop.generation import SamplingSettings, sample
from alignloop.sft import SFTConfig, fit_example, sft_loss, tokenize, train_sft

PAIRS = [
    ("what is the dog ?", "the dog is good ."),
    ("what is the cat ?", "the cat is bad ."),
    ("how is my house ?", "your house is hot . open the window ."),
    ("do you want a fan ?", "yes please , thanks !"),
]


def _write(path, rows, key="response"):
    with open(path, "w") as f:
        for p, r in rows:
            f.write(json.dumps({"prompt": p, key: r}) + "\n")
    return path


def test_loss_counts_response_tokens_only(tiny_gpt2):
    policy = models.load_policy(tiny_gpt2, value_head=False, reference=False)
    examples, _ = tokenize(policy, [{"prompt": p, "response": r} for p, r in PAIRS], None)
    loss, n = sft_loss(policy, examples)
    manual, count = 0.0, 0
    with torch.no_grad():
        for p, r in examples:  # one unpadded sequence at a time, by hand
            ids = torch.tensor([p + r])
            logp = policy.model(input_ids=ids).logits.log_softmax(-1)[0]
            manual -= sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(r))
            count += len(r)
    assert n == count == sum(len(r) for _, r in examples)
    assert abs(loss.item() - manual / count) < 1e-5


def test_fit_example_keeps_the_prompt_end_and_a_response():
    assert fit_example([1, 2, 3, 4], [5, 6], 4, False) == ([3, 4], [5, 6], True)
    assert fit_example([1, 2], [5, 6, 7, 8, 9], 4, False) == ([2], [5, 6, 7], True)
    assert fit_example([1, 2], [5], 4, False) == ([1, 2], [5], False)
    assert fit_example([1, 2, 3], [5, 6, 7], 2, True) == ([1, 2], [5, 6], True)


@pytest.mark.parametrize("which", ["gpt2", "t5"])
def test_full_sft_learns_the_responses(which, tiny_gpt2, tiny_t5, tmp_path):
    path = tiny_gpt2 if which == "gpt2" else tiny_t5
    data = _write(tmp_path / "sft.jsonl", PAIRS, key="completion")  # "completion" works as the response key
    cfg = SFTConfig(max_steps=40, batch_size=4, learning_rate=1e-2, lr_schedule="constant", log_every=5)
    metrics = train_sft(str(path), data, tmp_path / "run", cfg)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["loss"] > 3.5 and metrics["train_loss"] < 1.0, (log[0], metrics)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "complete"
    model, tok = models.load_lm(tmp_path / "run")
    out = sample(model, tok, [p for p, _ in PAIRS], SamplingSettings(do_sample=False, max_new_tokens=12))
    assert (
        sum(t.replace(" ", "") == r.replace(" ", "") for t, (_, r) in zip(out.texts, PAIRS, strict=True)) >= 3
    )
    assert all(out.finished)  # it learned to stop: EOS is a target


def test_lora_sft_saves_an_adapter_that_loads(tiny_t5, tmp_path):
    data = _write(tmp_path / "sft.jsonl", PAIRS)
    cfg = SFTConfig(max_steps=3, batch_size=2, lora=models.LoraSettings(r=4))
    train_sft(str(tiny_t5), data, tmp_path / "run", cfg)
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    policy = models.load_policy(
        tmp_path / "run"
    )  # a trained adapter: trained further, frozen copy as reference
    assert policy.is_lora and policy.reference_adapter == models.REFERENCE_ADAPTER


def test_interrupted_run_resumes_to_the_same_weights(tiny_gpt2, tmp_path):
    data = _write(tmp_path / "sft.jsonl", PAIRS)
    cfg = SFTConfig(max_steps=8, batch_size=2, learning_rate=1e-3, checkpoint_every=100)
    train_sft(str(tiny_gpt2), data, tmp_path / "whole", cfg)
    assert train_sft(str(tiny_gpt2), data, tmp_path / "split", cfg, stop_after=3) == {"stopped_at": 3}
    assert (tmp_path / "split" / "checkpoint" / "state.pt").is_file()
    train_sft(str(tiny_gpt2), data, tmp_path / "split", cfg, resume=True)
    a, _ = models.load_lm(tmp_path / "whole")
    b, _ = models.load_lm(tmp_path / "split")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    assert not (tmp_path / "split" / "checkpoint").exists()
    # a finished run is skipped on --resume
    again = train_sft(str(tiny_gpt2), data, tmp_path / "split", cfg, resume=True)
    assert again["steps"] == 8


def test_bad_records_are_one_line_errors(tiny_gpt2, tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(UserError, match="needs 'prompt' and 'response'"):
        train_sft(str(tiny_gpt2), bad, tmp_path / "run")
    code, _, err = cli("sft", "--model", tiny_gpt2, "--data", bad, "--out", tmp_path / "run")
    assert code == 2 and f"{bad}:2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "a", "response": "  "}\n')
    code, _, err = cli("sft", "--model", tiny_gpt2, "--data", empty, "--out", tmp_path / "run")
    assert code == 2 and "empty response" in err
    code, _, err = cli(
        "sft", "--model", tiny_gpt2, "--data", empty, "--out", tmp_path / "r", "--set", "learning_rat=1"
    )
    assert code == 2 and "learning_rate" in err


def test_sft_cli_with_lora(tiny_gpt2, tmp_path, cli):
    data = _write(tmp_path / "sft.jsonl", PAIRS)
    code, out, err = cli(
        "sft", "--model", tiny_gpt2, "--data", data, "--out", tmp_path / "run", "--lora",
        "--set", "max_steps=2", "--set", "lora.r=2", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "train_loss=" in out
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("which", ["gpt2", "t5"])
def test_gradient_checkpointing_gives_the_same_weights(which, tiny_gpt2, tiny_t5, tmp_path):
    """SFT keeps dropout on: the recompute replays the same dropout masks, so the weights are the same."""
    path = tiny_gpt2 if which == "gpt2" else tiny_t5
    data = _write(tmp_path / "sft.jsonl", PAIRS)
    for on in (False, True):
        cfg = SFTConfig(max_steps=4, batch_size=2, learning_rate=1e-3, gradient_checkpointing=on)
        train_sft(str(path), data, tmp_path / f"run-{on}", cfg)
    a, _ = models.load_lm(tmp_path / "run-False")
    b, _ = models.load_lm(tmp_path / "run-True")
    start, _ = models.load_lm(path)
    moved = 0
    for (name, x), (_, y), (_, s) in zip(
        a.state_dict().items(), b.state_dict().items(), start.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(x, s)
    assert moved  # it trained

"""The saved reward-model folder means the same in plain transformers as in ``alignloop reward score``."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from reward_synthetic import make_sets, pairs_of, write
from reward_world import world_pairs, world_sets

from alignloop.records import full_text
from alignloop.reward import load_reward
from alignloop.reward.train import RewardTrainConfig, train_reward_model


def test_batched_pipeline_scores_equal_alignloop_reward_score(cli, tmp_path):
    """World base reward model (GPT-2: absolute positions, a bias-free head): 64 mixed-length inputs
    scored by pipeline("text-classification") in batches of 16, by AutoModelForSequenceClassification
    batched and one by one, and by ``alignloop reward score``: equal within 1e-5, no offset added."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    pairs = write(tmp_path / "pairs.jsonl", world_pairs(world_sets("train", 40, seed=0)))
    rm = tmp_path / "rm"
    train_reward_model(pairs, rm, RewardTrainConfig(model="world:base", epochs=1))
    meta = json.loads((rm / "config.json").read_text())["alignloop_reward"]
    assert meta["offset"] == 0.0 and abs(meta["reference_mean_before"]) > 1e-3  # a real shift, baked in

    rows = [
        {"prompt": s.prompt, "completion": " " + c.text}  # the exact continuation (TRL's convention)
        for s in world_sets("eval", 16, seed=1)
        for c in s.completions
    ]
    data = write(tmp_path / "score.jsonl", rows)
    code, _, err = cli(
        "-q", "reward", "score", "--reward", rm, "--data", data, "--out", tmp_path / "scored.jsonl"
    )
    assert code == 0, err
    ours = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    texts = [full_text(r["prompt"], r["completion"]) for r in rows]

    tok = AutoTokenizer.from_pretrained(rm)
    lengths = [len(tok(t).input_ids) for t in texts]
    assert len(texts) == 64 and max(lengths) - min(lengths) >= 10  # mixed lengths: padding matters
    pipe = pipeline("text-classification", model=str(rm), function_to_apply="none")
    piped = [o["score"] for o in pipe(texts, batch_size=16)]
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    with torch.no_grad():
        batched = model(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].tolist()
        single = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    for theirs in (piped, batched, single):
        assert max(abs(a - b) for a, b in zip(theirs, ours, strict=True)) < 1e-5


def test_head_and_norm_without_bias_keep_the_offset_in_config(tiny_gpt2, tmp_path):
    """A Llama reward model (bias-free head after an RMSNorm): nothing in the weights can hold the
    mean shift, so it stays in config.json and load_reward adds it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = tmp_path / "llama"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.save_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(src)
    pairs = write(tmp_path / "p.jsonl", pairs_of(make_sets(12)))
    train_reward_model(pairs, tmp_path / "rm", RewardTrainConfig(model=str(src), epochs=1, eval_fraction=0.0))
    meta = json.loads((tmp_path / "rm" / "config.json").read_text())["alignloop_reward"]
    assert meta["offset"] == pytest.approx(-meta["reference_mean_before"])
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    distinct = {(r["prompt"], t) for r in rows for t in (r["chosen"], r["rejected"])}
    scores = load_reward(str(tmp_path / "rm"))([p for p, _ in distinct], [t for _, t in distinct])
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-4)

"""Reward-model training: grouped batching, the loss, learning, normalisation, bad data."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
import torch
from reward_synthetic import make_sets, pairs_of, write

from alignloop.errors import UserError
from alignloop.reward import load_reward
from alignloop.reward.data import read_pairs
from alignloop.reward.losses import grouped_pairwise_loss, pair_accuracy, pairwise_loss
from alignloop.reward.train import (
    RewardTrainConfig,
    collate_groups,
    encode_groups,
    load_reward_model,
    sequence_rewards,
    train_reward_model,
)

FAST = {"learning_rate": 3e-3, "batch_prompts": 8, "warmup_ratio": 0.0}


def test_pairwise_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (
        -torch.log(torch.sigmoid(torch.tensor(2.0))) - torch.log(torch.sigmoid(torch.tensor(-1.0)))
    ) / 2
    assert pairwise_loss(rc, rr) == pytest.approx(expected.item())
    # soft label 0.5 on a pair with equal rewards: log 2; margin shifts the difference
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.5])) == pytest.approx(
        0.6931, abs=1e-4
    )
    assert pairwise_loss(
        torch.tensor([3.0]), torch.tensor([1.0]), margin=torch.tensor([2.0])
    ) == pytest.approx(0.6931, abs=1e-4)
    # soft label p: BCE of sigmoid(d)
    d = torch.tensor([0.7])
    p = torch.tensor([0.8])
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(d), p)
    assert pairwise_loss(d, torch.zeros(1), p) == pytest.approx(bce.item(), abs=1e-6)
    assert pair_accuracy(
        torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.5])
    ) == (0.5, 2)
    assert pair_accuracy(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.2])) == (1.0, 1)


def test_failed_pairs_train_with_failed_label(tiny_gpt2, tmp_path):
    """Export's "failed": true reaches the loss as the label min(label, failed_label); a bad mark is an error."""
    rows = [
        {"prompt": "q", "chosen": " good", "rejected": " fine", "weight": 0.9},
        {"prompt": "q", "chosen": " good", "rejected": " nonsense nonsense", "weight": 1.0, "failed": True},
    ]
    groups = read_pairs(write(tmp_path / "p.jsonl", rows), hard_labels=True).groups
    assert [c.failed for c in groups[0].pairs] == [False, True]
    model, tok = load_reward_model(str(tiny_gpt2), None, torch.device("cpu"), no_dropout=True)
    assert encode_groups(groups, model, tok, 64)[0]["label"] == [1.0, 1.0]
    assert encode_groups(groups, model, tok, 64, failed_label=0.75)[0]["label"] == [1.0, 0.75]
    with pytest.raises(UserError, match="'failed' must be true or false"):
        read_pairs(write(tmp_path / "bad.jsonl", [{**rows[1], "failed": "yes"}]))


def test_grouped_loss_equals_pair_by_pair(tiny_gpt2, tmp_path):
    """Forwarding each completion once and indexing gives the pair-by-pair loss and gradient."""
    path = write(tmp_path / "p.jsonl", pairs_of(make_sets(6, k=4)))
    groups = read_pairs(path).groups
    model, tok = load_reward_model(str(tiny_gpt2), None, torch.device("cpu"), no_dropout=True)
    enc = encode_groups(groups, model, tok, 128)
    batch = collate_groups(enc, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 * 4 and len(batch["chosen_index"]) == 6 * 6

    model.zero_grad()
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    grouped = grouped_pairwise_loss(rewards, batch["chosen_index"], batch["rejected_index"], batch["label"])
    grouped.backward()
    g_grouped = model.score.weight.grad.clone()

    model.zero_grad()
    seqs = [s for g in enc for s in g["ids"]]
    chosen = collate_groups(
        [
            {
                "ids": [seqs[i] for i in batch["chosen_index"]],
                "chosen": [],
                "rejected": [],
                "label": [],
                "margin": [],
            }
        ],
        tok.pad_token_id,
    )
    rejected = collate_groups(
        [
            {
                "ids": [seqs[i] for i in batch["rejected_index"]],
                "chosen": [],
                "rejected": [],
                "label": [],
                "margin": [],
            }
        ],
        tok.pad_token_id,
    )
    r_c = sequence_rewards(model, chosen["input_ids"], chosen["attention_mask"])
    r_r = sequence_rewards(model, rejected["input_ids"], rejected["attention_mask"])
    by_pair = pairwise_loss(r_c, r_r, batch["label"])
    by_pair.backward()
    assert grouped.item() == pytest.approx(by_pair.item(), abs=1e-6)
    torch.testing.assert_close(g_grouped, model.score.weight.grad, atol=1e-6, rtol=1e-4)


def test_training_forwards_each_completion_once_per_epoch(tiny_gpt2, tmp_path, monkeypatch):
    from transformers import GPT2ForSequenceClassification

    sets = make_sets(24, k=4)
    path = write(tmp_path / "p.jsonl", pairs_of(sets))
    forwarded: Counter = Counter()
    original = GPT2ForSequenceClassification.forward

    def counting_forward(self, input_ids=None, attention_mask=None, **kw):
        if torch.is_grad_enabled():  # training forwards only (evaluation runs without grad)
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
                forwarded[tuple(i for i, m in zip(ids, mask, strict=True) if m)] += 1
        return original(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(GPT2ForSequenceClassification, "forward", counting_forward)
    cfg = RewardTrainConfig(model=str(tiny_gpt2), epochs=2, patience=0, eval_fraction=0.0, **FAST)
    metrics = train_reward_model(path, tmp_path / "rm", cfg)
    assert metrics["train_pairs"] == 24 * 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    from alignloop.records import full_text

    expected = Counter(
        tuple(tok(full_text(s["prompt"], c["text"]))["input_ids"]) for s in sets for c in s["completions"]
    )
    assert sum(forwarded.values()) == 2 * 24 * 4  # 4 forwards per set of 6 pairs, not 12
    assert forwarded == Counter({k: 2 * v for k, v in expected.items()})  # each completion once per epoch


@pytest.mark.slow
def test_train_learns_normalises_and_loads(tiny_gpt2, pairs_file, eval_pairs_file, tmp_path):
    out = tmp_path / "rm"
    cfg = RewardTrainConfig(model=str(tiny_gpt2), epochs=6, patience=2, **FAST)
    metrics = train_reward_model(pairs_file, out, cfg, eval_pairs=eval_pairs_file)
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["train_pairs"] == 160 * 6 and metrics["eval_pairs"] == 40 * 6
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert (out / "metrics.jsonl").read_text().count("\n") > 10
    assert not (out / "checkpoints").exists()

    reward = load_reward(str(out))
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows] * 2
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = reward(prompts, texts)
    distinct = dict(zip(zip(prompts, texts, strict=True), scores, strict=True))
    assert abs(statistics.fmean(distinct.values())) < 1e-3  # reference (training) completions: mean 0
    ev = [json.loads(line) for line in eval_pairs_file.read_text().splitlines()]
    rc = reward([r["prompt"] for r in ev], [r["chosen"] for r in ev])
    rr = reward([r["prompt"] for r in ev], [r["rejected"] for r in ev])
    assert sum(a > b for a, b in zip(rc, rr, strict=True)) / len(ev) == pytest.approx(
        metrics["eval_accuracy"], abs=0.01
    )


def test_lora_trains_adapter_and_head_then_merges(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file

    path = write(tmp_path / "p.jsonl", pairs_of(make_sets(24)))
    cfg = RewardTrainConfig(
        model=str(tiny_gpt2), epochs=1, lora={"r": 4, "alpha": 8}, eval_fraction=0.2, **FAST
    )
    metrics = train_reward_model(path, tmp_path / "rm", cfg)
    assert metrics["epochs_run"] == 1
    assert not (tmp_path / "rm" / "adapter_config.json").exists()  # merged: a plain HF folder
    before = load_file(tiny_gpt2 / "model.safetensors")
    after = load_file(tmp_path / "rm" / "model.safetensors")
    key, emb = "transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"
    assert not torch.equal(after[key], before[key])  # the LoRA target, merged
    assert torch.equal(after[emb], before[emb])  # not a LoRA target: untouched
    assert "score.weight" in after
    scores = load_reward(str(tmp_path / "rm"))(["how ?"], ["the dog is good"])
    assert len(scores) == 1


def test_mean_std_normalisation_folds_into_a_bias(tiny_classifier, tmp_path):
    """An encoder classifier (RoBERTa head with a bias) retrained as a scalar reward model."""
    path = write(tmp_path / "p.jsonl", pairs_of(make_sets(16)))
    cfg = RewardTrainConfig(
        model=str(tiny_classifier), epochs=1, normalize="mean_std", eval_fraction=0.0, **FAST
    )
    train_reward_model(path, tmp_path / "rm", cfg)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert len(config["id2label"]) == 1  # one output: a scalar reward
    assert config["alignloop_reward"]["offset"] == 0.0  # folded into the head's bias
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = {(r["prompt"], t) for r in rows for t in (r["chosen"], r["rejected"])}
    scores = load_reward(str(tmp_path / "rm"))([p for p, _ in pairs], [t for _, t in pairs])
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-4)
    assert statistics.stdev(scores) == pytest.approx(1.0, abs=1e-3)


def test_seq2seq_reward_model(tiny_t5, tmp_path):
    """A T5 reward model (T5ForSequenceClassification reads the reward at the EOS it is given)."""
    path = write(tmp_path / "p.jsonl", pairs_of(make_sets(16)))
    metrics = train_reward_model(
        path, tmp_path / "rm", RewardTrainConfig(model=str(tiny_t5), epochs=1, **FAST)
    )
    assert metrics["epochs_run"] == 1 and metrics["train_pairs"] > 0
    reward = load_reward(str(tmp_path / "rm"))
    assert len(reward(["how ?", "why ?"], ["the dog is good", "garbage"])) == 2


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_t5"])
def test_gradient_checkpointing_gives_the_same_model(model, request, tmp_path):
    """gradient_checkpointing trades time for memory only: the same weights after an epoch."""
    from safetensors.torch import load_file

    path = write(tmp_path / "p.jsonl", pairs_of(make_sets(16)))
    base = request.getfixturevalue(model)
    for on in (False, True):
        cfg = RewardTrainConfig(model=str(base), epochs=1, gradient_checkpointing=on, **FAST)
        train_reward_model(path, tmp_path / f"rm-{on}", cfg)
    off, on = (load_file(tmp_path / f"rm-{x}" / "model.safetensors") for x in (False, True))
    start = load_file(base / "model.safetensors")
    assert off.keys() == on.keys()
    for name, w in off.items():
        torch.testing.assert_close(on[name], w, rtol=1e-4, atol=1e-5)
    names = {k: next((n for n in (k, k.removeprefix("transformer.")) if n in start), None) for k in off}
    same = {k: start[n] for k, n in names.items() if n is not None}  # (T5's trunk is under "transformer.")
    assert same and any(not torch.equal(off[k], w) for k, w in same.items())  # the trunk trained

"""``alignloop dpo`` end to end on tiny real models: causal and seq2seq, LoRA and full, precomputed
and on-the-fly reference, weights, held-out metrics, the saved policy, user errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dpo_pairs import good_bad_pairs, write_pairs

from alignloop.models import LoraSettings, build_batch, encode_pairs, load_lm, load_policy, sequence_logprobs
from alignloop.offline.dpo import DPOConfig, batch_indices, split_heldout, train_dpo
from alignloop.records import Pair
from alignloop.runs import read_metrics_log

STEP_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "lr"}


def margin_gain(base: str, trained: str, pairs: list[dict]) -> float:
    """Mean over pairs of the change (trained - base) in log pi(chosen) - log pi(rejected), computed
    independently of the trainer from the two saved folders."""
    deltas = []
    for model_id in (base, trained):
        model, tok = load_lm(model_id)
        seq2seq = model.config.is_encoder_decoder
        prompts = [p["prompt"] for p in pairs]
        p_ids, c_ids = encode_pairs(tok, prompts, [p["chosen"] for p in pairs], seq2seq)
        _, r_ids = encode_pairs(tok, prompts, [p["rejected"] for p in pairs], seq2seq)
        start = model.config.decoder_start_token_id if seq2seq else None
        with torch.no_grad():
            c = sequence_logprobs(model, build_batch(p_ids, c_ids, tok.pad_token_id, seq2seq, start))
            r = sequence_logprobs(model, build_batch(p_ids, r_ids, tok.pad_token_id, seq2seq, start))
        deltas.append((c - r).mean().item())
    return deltas[1] - deltas[0]


def test_causal_full_finetune_learns_and_saves(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    cfg = DPOConfig(max_steps=30, learning_rate=1e-3, batch_size=16, eval_every=10, heldout_fraction=0.25)
    metrics = train_dpo(tiny_gpt2, pairs_file, out, cfg)
    log = read_metrics_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all(set(r) >= STEP_KEYS for r in log)
    assert [r["step"] for r in log if "heldout/accuracy" in r] == [10, 20, 30]
    assert log[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-3)  # step 1: policy == reference
    assert metrics["heldout_pairs"] > 0 and metrics["train_pairs"] + metrics["heldout_pairs"] == 120
    assert metrics["processes"] == 1  # docs/distributed.md: metrics.json says how many processes trained
    assert metrics["heldout/accuracy"] >= 0.9 and metrics["heldout/margin"] > 0.2
    assert metrics["rewards/chosen"] > 0 > metrics["rewards/rejected"]
    # the saved folder is a plain HF model whose preference moved toward "good"
    assert (out / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    assert margin_gain(str(tiny_gpt2), str(out), good_bad_pairs()[:20]) > 2.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"]["pairs"]["sha256"]


def test_lora_precomputed_equals_on_the_fly_reference(tiny_gpt2, pairs_file, tmp_path):
    """With LoRA the precomputed reference (the policy before step 1) and the adapter-disabled model
    evaluated at every step are the same reference: the two runs agree step by step."""
    common = dict(
        max_steps=6,
        learning_rate=5e-3,
        batch_size=8,
        lora=LoraSettings(r=4),
        heldout_fraction=0.2,
        snapshot_every=3,
    )
    a = train_dpo(tiny_gpt2, pairs_file, tmp_path / "pre", DPOConfig(**common))
    b = train_dpo(tiny_gpt2, pairs_file, tmp_path / "fly", DPOConfig(**common, reference="on_the_fly"))
    la, lb = read_metrics_log(tmp_path / "pre"), read_metrics_log(tmp_path / "fly")
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["rewards/margin"] == pytest.approx(rb["rewards/margin"], abs=1e-5)
    assert a["heldout/accuracy"] == b["heldout/accuracy"]
    assert la[-1]["rewards/margin"] > la[0]["rewards/margin"] + 0.05  # it did train
    assert (tmp_path / "pre" / "adapter_config.json").is_file()
    assert not (tmp_path / "fly" / "reference_logps.safetensors").exists()
    # snapshots for the gold-vs-KL plot: HF adapter folders the evaluation finds, then the final policy
    from alignloop.evaluation.overoptimization import find_checkpoints

    assert [step for step, _ in find_checkpoints(tmp_path / "pre")] == [3, 6]
    # the saved adapter loads on its base and its preference moved
    assert margin_gain(str(tiny_gpt2), str(tmp_path / "pre"), good_bad_pairs()[:20]) > 0.1


def test_full_finetune_on_the_fly_uses_frozen_copy(tiny_gpt2, pairs_file, tmp_path):
    common = dict(max_steps=4, learning_rate=1e-3, batch_size=8, heldout_fraction=0.0)
    train_dpo(tiny_gpt2, pairs_file, tmp_path / "pre", DPOConfig(**common))
    train_dpo(tiny_gpt2, pairs_file, tmp_path / "fly", DPOConfig(**common, reference="on_the_fly"))
    la, lb = read_metrics_log(tmp_path / "pre"), read_metrics_log(tmp_path / "fly")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)


def test_seq2seq_lora_learns(tiny_t5, pairs_file, tmp_path):
    cfg = DPOConfig(
        max_steps=25, learning_rate=1e-2, batch_size=16, lora=LoraSettings(r=8), heldout_fraction=0.25
    )
    metrics = train_dpo(tiny_t5, pairs_file, tmp_path / "t5", cfg)
    assert metrics["heldout/accuracy"] >= 0.9, metrics
    assert (tmp_path / "t5" / "adapter_config.json").is_file()
    assert margin_gain(str(tiny_t5), str(tmp_path / "t5"), good_bad_pairs()[:20]) > 0.5


def test_ipo_and_conservative_dpo_train(tiny_gpt2, pairs_file, tmp_path):
    ipo = train_dpo(
        tiny_gpt2,
        pairs_file,
        tmp_path / "ipo",
        DPOConfig(loss_type="ipo", beta=0.5, max_steps=15, learning_rate=1e-3),
    )
    cdpo = train_dpo(
        tiny_gpt2,
        pairs_file,
        tmp_path / "cdpo",
        DPOConfig(label_smoothing=0.2, max_steps=15, learning_rate=1e-3),
    )
    assert ipo["heldout/accuracy"] >= 0.9 and cdpo["heldout/accuracy"] >= 0.9
    # IPO (averaged log-probs, as TRL) starts at loss (0 - 1/(2 beta))^2 = 1
    assert read_metrics_log(tmp_path / "ipo")[0]["loss"] == pytest.approx(1.0, abs=1e-3)


def test_nll_term_keeps_chosen_likely(tiny_gpt2, pairs_file, tmp_path):
    """RPO's ``nll_coef``: step 1's loss is DPO's log 2 plus nll_coef x the chosen responses' mean token
    NLL under the reference (logged as nll_chosen), and training with it leaves the chosen responses
    more likely than without it (DPO alone can lower them)."""
    common = dict(max_steps=15, learning_rate=1e-3, heldout_fraction=0.0, beta=0.1)
    train_dpo(tiny_gpt2, pairs_file, tmp_path / "dpo", DPOConfig(**common))
    train_dpo(tiny_gpt2, pairs_file, tmp_path / "rpo", DPOConfig(**common, nll_coef=2.0))
    first = read_metrics_log(tmp_path / "rpo")[0]
    assert first["nll_chosen"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + 2.0 * first["nll_chosen"], rel=1e-4)
    assert "nll_chosen" not in read_metrics_log(tmp_path / "dpo")[0]

    pairs = good_bad_pairs()[:20]

    def chosen_logp(model_id: str) -> float:
        model, tok = load_lm(model_id)
        p_ids, c_ids = encode_pairs(tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], False)
        with torch.no_grad():
            return (
                sequence_logprobs(model, build_batch(p_ids, c_ids, tok.pad_token_id, False, None))
                .mean()
                .item()
            )

    assert chosen_logp(str(tmp_path / "rpo")) > chosen_logp(str(tmp_path / "dpo"))


def test_pair_weights_are_honoured(tiny_gpt2, tmp_path):
    """Every pair appears twice, once each way; only the weights say which way is preferred."""
    pairs = good_bad_pairs(weight=1.0) + good_bad_pairs(flip=True, weight=0.0)
    path = write_pairs(tmp_path / "mixed.jsonl", pairs)
    held = write_pairs(tmp_path / "held.jsonl", good_bad_pairs(weight=1.0)[::7])
    cfg = DPOConfig(max_steps=20, learning_rate=1e-3, batch_size=16)
    m = train_dpo(tiny_gpt2, path, tmp_path / "w", cfg, heldout_path=held)
    assert m["heldout/accuracy"] >= 0.9 and m["heldout/margin"] > 0.1
    # flip the weights: it learns the other way
    pairs = good_bad_pairs(weight=0.0) + good_bad_pairs(flip=True, weight=1.0)
    m = train_dpo(
        tiny_gpt2, write_pairs(tmp_path / "mixed2.jsonl", pairs), tmp_path / "w2", cfg, heldout_path=held
    )
    assert m["heldout/accuracy"] <= 0.1 and m["heldout/margin"] < -0.1


def test_split_keeps_prompts_together_and_is_order_free():
    pairs = [Pair(**p) for p in good_bad_pairs()] * 2
    train, held = split_heldout(pairs, 0.2, seed=0)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert 0.1 < len(held) / len(pairs) < 0.35
    train2, held2 = split_heldout(list(reversed(pairs)), 0.2, seed=0)
    assert {p.prompt for p in held2} == {p.prompt for p in held}


def test_batch_stream_is_a_function_of_the_step():
    n, b = 10, 4
    seen = [i for s in range(5) for i in batch_indices(s, n, b, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs
    assert batch_indices(3, n, b, seed=3) == seen[12:16]
    assert batch_indices(0, n, b, seed=4) != batch_indices(0, n, b, seed=3)


def test_model_gradient_is_the_dpo_gradient(tiny_gpt2):
    """Through a real model: grad of the DPO loss = -beta sigmoid(-beta h) (grad log pi(y_w) - grad log pi(y_l))."""
    from alignloop.offline.dpo import dpo_loss, preference_logits

    policy = load_policy(tiny_gpt2, value_head=False, reference=False)
    p_ids, c_ids = encode_pairs(policy.tokenizer, ["what is the dog ?"], ["the dog is good ."], False)
    _, r_ids = encode_pairs(policy.tokenizer, ["what is the dog ?"], ["the dog is bad ."], False)
    ref_c, ref_r = torch.tensor([-20.0]), torch.tensor([-15.0])
    beta = 2.0
    params = [p for p in policy.model.parameters() if p.requires_grad]

    def grads(fn):
        policy.model.zero_grad()
        fn().backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    lc = lambda: sequence_logprobs(policy.model, policy.batch(p_ids, c_ids)).sum()  # noqa: E731
    lr = lambda: sequence_logprobs(policy.model, policy.batch(p_ids, r_ids)).sum()  # noqa: E731
    g_c, g_r = grads(lc), grads(lr)
    with torch.no_grad():
        h = preference_logits(lc(), lr(), ref_c, ref_r)
    g = grads(lambda: dpo_loss(preference_logits(lc(), lr(), ref_c, ref_r), beta).sum())
    expected = -beta * torch.sigmoid(-beta * h) * (g_c - g_r)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)


def test_cli_runs_and_reports_user_errors(cli, tiny_gpt2, pairs_file, tmp_path):
    code, out, err = cli("dpo", "--policy", tiny_gpt2, "--pairs", pairs_file, "--out", tmp_path / "c", "--lora",
                         "--set", "max_steps=2", "--set", "lora.r=2", "--quiet")  # fmt: skip
    assert code == 0, err
    assert "heldout/accuracy=" in out and (tmp_path / "c" / "adapter_config.json").is_file()
    # finished: --resume skips it
    code, out, err = cli("dpo", "--policy", tiny_gpt2, "--pairs", pairs_file, "--out", tmp_path / "c", "--lora",
                         "--set", "max_steps=2", "--set", "lora.r=2", "--resume")  # fmt: skip
    assert code == 0 and "skipped" in err

    def one_line_error(*args):
        code, _, err = cli("dpo", "--policy", tiny_gpt2, "--out", tmp_path / "bad", *args)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    assert "did you mean 'beta'" in one_line_error("--pairs", pairs_file, "--set", "bta=0.1")
    assert "label_smoothing" in one_line_error("--pairs", pairs_file, "--set", "label_smoothing=0.7")
    assert "loss_type" in one_line_error("--pairs", pairs_file, "--set", "loss_type=hinge")
    assert "file not found" in one_line_error("--pairs", tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert f"{bad}:2" in one_line_error("--pairs", bad)
    neg = write_pairs(
        tmp_path / "neg.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c", "weight": -1}]
    )
    assert "negative weight" in one_line_error("--pairs", neg)
    over = write_pairs(
        tmp_path / "over.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c", "weight": 2}]
    )
    assert "outside [0, 1]" in one_line_error("--pairs", over)
    ties = write_pairs(
        tmp_path / "ties.jsonl",
        [{"prompt": "a", "chosen": " b", "rejected": " c", "weight": 0.5, "tie": True}] * 3,
    )
    assert "every pair is a tie" in one_line_error("--pairs", ties)
    same = write_pairs(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " b"}])
    assert "identical" in one_line_error("--pairs", same)
    code, out, _ = cli("dpo", "--help")
    assert code == 0 and "example:" in out and "--lora" in out


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_t5"])
def test_gradient_checkpointing_gives_the_same_run(model, request, pairs_file, tmp_path):
    """gradient_checkpointing trades time for memory only: the same losses step by step."""
    path = request.getfixturevalue(model)
    common = dict(max_steps=4, learning_rate=5e-3, batch_size=8, lora=LoraSettings(r=4), heldout_fraction=0.2)
    train_dpo(path, pairs_file, tmp_path / "off", DPOConfig(**common))
    train_dpo(path, pairs_file, tmp_path / "on", DPOConfig(**common, gradient_checkpointing=True))
    off, on = read_metrics_log(tmp_path / "off"), read_metrics_log(tmp_path / "on")
    assert len(off) == len(on) == 4
    for a, b in zip(off, on, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margin"] == pytest.approx(a["rewards/margin"], abs=1e-4)
    assert off[-1]["rewards/margin"] != off[0]["rewards/margin"]  # it trained

"""ILQL: the losses and the decoding shift on hand-computed tensors, then a real (tiny) training run,
decoding through alignloop's loaders, exact resume after kill -9, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from alignloop.errors import UserError
from alignloop.offline.ilql import (
    ILQLHeads,
    cql_loss,
    expectile_loss,
    polyak_update,
    q_loss,
    q_targets,
    read_episodes,
    shifted_logits,
    token_rewards,
)

# ----------------------------------------------------------------------------------------------
# The maths, by hand
# ----------------------------------------------------------------------------------------------


def test_token_rewards_put_the_reward_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    r, done = token_rewards(torch.tensor([2.0, -1.0]), mask)
    assert r.tolist() == [[0, 0, 2.0, 0], [-1.0, 0, 0, 0]]
    assert done.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]


def test_q_targets_bootstrap_from_the_next_value_and_stop_at_the_end():
    mask = torch.tensor([[1, 1, 1, 0]])
    r, done = token_rewards(torch.tensor([2.0]), mask)
    v = torch.tensor([[0.5, 0.25, 4.0, 9.0]], requires_grad=True)
    y = q_targets(r, v, done, gamma=0.5)
    # t=0: 0 + 0.5 * V(s1)=0.125; t=1: 0 + 0.5 * V(s2)=2.0; t=2 (done): r=2, no bootstrap
    assert y[0, :3].tolist() == [0.125, 2.0, 2.0]
    assert not y.requires_grad  # the target is a constant for Q's loss


def test_q_loss_sums_heads_and_averages_real_tokens():
    mask = torch.tensor([[1, 1, 0]])
    y = torch.tensor([[1.0, 2.0, 100.0]])
    q1 = torch.tensor([[0.0, 2.0, 0.0]])  # errors 1, 0 -> mean 0.5
    q2 = torch.tensor([[3.0, 0.0, 0.0]])  # errors 4, 4 -> mean 4
    assert q_loss([q1, q2], y, mask).item() == pytest.approx(4.5)


def test_expectile_loss_weighs_underestimates_by_tau():
    mask = torch.tensor([[1, 1, 1]])
    u = torch.tensor([[2.0, -2.0, 0.0]])  # Qhat - V: V too low (+2), too high (-2)
    # 0.8 * 4 + 0.2 * 4 + 0 over 3 tokens
    assert expectile_loss(u, 0.8, mask).item() == pytest.approx((0.8 * 4 + 0.2 * 4) / 3)
    assert expectile_loss(u, 0.5, mask).item() == pytest.approx(0.5 * 8 / 3)  # tau=.5: half the MSE


def test_expectile_minimiser_is_an_upper_expectile():
    # V fitted to samples {0, 1} under tau: the minimiser of tau*(1-V)^2 + (1-tau)*V^2 is V = tau
    q = torch.tensor([[0.0, 1.0]])
    v = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        expectile_loss(q - v, 0.9, torch.ones_like(q)).backward()
        opt.step()
    assert v.item() == pytest.approx(0.9, abs=1e-4)


def test_cql_loss_is_cross_entropy_of_q_as_logits():
    q = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    actions = torch.tensor([[2, 1]])
    expected = (-(3 - math.log(math.exp(1) + math.exp(2) + math.exp(3))) + math.log(3)) / 2
    assert cql_loss([q], actions, torch.ones(1, 2)).item() == pytest.approx(expected, rel=1e-6)
    assert cql_loss([q, q], actions, torch.ones(1, 2)).item() == pytest.approx(2 * expected, rel=1e-6)


def test_shifted_logits_are_log_pi_plus_beta_advantage():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # pi = (1/4, 3/4)
    q = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([0.5])
    out = shifted_logits(logits, q, v, beta=2.0)
    assert out.tolist()[0] == pytest.approx([math.log(0.25) + 1.0, math.log(0.75) - 1.0])
    p = torch.softmax(out, -1)[0]  # pi * exp(beta * Q) renormalised
    w = torch.tensor([0.25 * math.e**2, 0.75])
    assert p.tolist() == pytest.approx((w / w.sum()).tolist())
    assert torch.equal(shifted_logits(logits, q, v, 0.0), torch.log_softmax(logits, -1))


def test_polyak_update_moves_the_target_by_alpha():
    src, tgt = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        src.weight.fill_(1.0), src.bias.fill_(1.0), tgt.weight.fill_(0.0), tgt.bias.fill_(-1.0)
    polyak_update(tgt, src, 0.25)
    assert tgt.weight.tolist() == [[0.25, 0.25]] and tgt.bias.tolist() == [-0.5]
    polyak_update(tgt, src, 1.0)
    assert tgt.weight.tolist() == [[1.0, 1.0]]


def test_heads_targets_start_equal_and_are_frozen():
    heads = ILQLHeads(8, 11)
    h = torch.randn(2, 3, 8)
    qmin = torch.minimum(heads.q[0](h), heads.q[1](h))
    assert torch.allclose(heads.target_min(h), qmin)
    assert all(not p.requires_grad for p in heads.target_q.parameters())
    assert {id(p) for p in heads.trainable()}.isdisjoint({id(p) for p in heads.target_q.parameters()})


# ----------------------------------------------------------------------------------------------
# Data and bad input
# ----------------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_episodes_takes_scored_completions_sets_and_pairs(tmp_path):
    f = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "a", "completion": " x", "reward": 0.5},
            {"prompt": "b", "completion": " y", "score": -1},
            {"prompt": "c", "completions": [{"text": " p", "reward": 1.0}, {"text": " q", "reward": 0.0}]},
            {"prompt": "d", "chosen": " good", "rejected": " bad"},
            {"prompt": "e", "chosen": " g", "rejected": " b", "reward_chosen": 0.3, "reward_rejected": 0.1},
        ],
    )
    eps, kinds = read_episodes(f, pair_reward=2.0)
    assert [(e.prompt, e.completion, e.reward) for e in eps] == [
        ("a", " x", 0.5), ("b", " y", -1.0), ("c", " p", 1.0), ("c", " q", 0.0),
        ("d", " good", 2.0), ("d", " bad", -2.0), ("e", " g", 0.3), ("e", " b", 0.1),
    ]  # fmt: skip
    assert kinds == {"scored": 2, "sets": 1, "pairs": 1, "scored_pairs": 1}


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "a", "completion": " x"}, "'reward'"),
        ({"prompt": "a", "text": " x"}, "'chosen' + 'rejected'"),
        ({"prompt": "a", "completion": " x", "reward": "high"}, "'reward' must be a finite number"),
        ({"prompt": "a", "chosen": " x"}, "'chosen' and 'rejected'"),
        ({"completion": " x", "reward": 1}, "'prompt'"),
    ],
)
def test_data_without_scores_or_pairs_is_one_clear_error(tmp_path, row, needle):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": " y", "reward": 1}, row])
    with pytest.raises(UserError) as e:
        read_episodes(f)
    assert needle in str(e.value) and "d.jsonl:2" in str(e.value)


def test_cli_bad_data_exits_2_with_one_line(tiny_gpt2, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "what is the dog ?", "completion": " the dog"}])
    res = subprocess.run(
        [sys.executable, "-m", "alignloop", "ilql", "--policy", str(tiny_gpt2), "--data", str(f),
         "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert "'reward'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# A real run: the decoder learns which of two endings the data rewards
# ----------------------------------------------------------------------------------------------

ARGS = ["--set", "max_steps=60", "--set", "checkpoint_every=10", "--set", "batch_size=16",
        "--set", "learning_rate=2e-3", "--set", "seed=0", "--quiet"]  # fmt: skip


def ilql_cmd(policy, data, out, *extra):
    return [sys.executable, "-m", "alignloop", "ilql", "--policy", str(policy), "--data", str(data),
            "--out", str(out), *ARGS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from dpo_pairs import good_bad_pairs, write_pairs

    return write_pairs(tmp_path_factory.mktemp("ilql") / "pairs.jsonl", good_bad_pairs(weight=1.0))


@pytest.fixture(scope="module")
def trained(tiny_gpt2, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ilql-run") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the resumed run in the kill test
    res = subprocess.run(ilql_cmd(tiny_gpt2, pairs, out), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


def _margins(model, tok, rows):
    """``log p(chosen) - log p(rejected)`` of each pair under ``model``, ``[N]``."""
    from alignloop.models import build_batch, encode_pairs, sequence_logprobs

    prompts = [r["prompt"] for r in rows]
    p, c = encode_pairs(tok, prompts, [r["chosen"] for r in rows], False)
    _, j = encode_pairs(tok, prompts, [r["rejected"] for r in rows], False)
    with torch.no_grad():
        return sequence_logprobs(model, build_batch(p, c, tok.pad_token_id)) - sequence_logprobs(
            model, build_batch(p, j, tok.pad_token_id)
        )


def test_trained_decoder_prefers_the_rewarded_completion(trained, pairs):
    from alignloop.models import load_lm
    from alignloop.offline.ilql import ILQLDecoder

    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    model, tok = load_lm(trained)
    assert isinstance(model, ILQLDecoder)
    steered = _margins(model, tok, rows)
    model.beta = 0.0  # the language model alone (trained by AWAC on both endings alike)
    plain = _margins(model, tok, rows)
    shift = steered - plain  # what the heads add: beta * sum_t (Q - V) of chosen minus of rejected
    print(
        f"ILQL: chosen preferred {float((steered > 0).float().mean()):.3f} with the heads; mean shift {shift.mean():.2f} nats"
    )
    assert float((steered > 0).float().mean()) >= 0.95
    assert float((shift > 0).float().mean()) >= 0.95  # the heads, not the LM, carry the preference
    info = json.loads((trained / "ilql.json").read_text())
    assert info["method"] == "ilql" and "how_to_load" in info
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 60 and math.isfinite(metrics["loss"])


def test_generate_decodes_an_ilql_folder_with_its_heads(trained, tmp_path):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": "1", "prompt": "what is the dog ?"}])
    out = tmp_path / "sets.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "alignloop", "generate", "--model", str(trained), "--prompts", str(prompts),
         "--k", "4", "--out", str(out), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    texts = [c["text"] for c in json.loads(out.read_text().splitlines()[0])["completions"]]
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_kill_and_resume_is_exact(tiny_gpt2, pairs, trained, tmp_path):
    from safetensors.torch import load_file

    from alignloop.runs import read_metrics_log

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(ilql_cmd(tiny_gpt2, pairs, out), env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert max(r["step"] for r in read_metrics_log(out)) < 60
    res = subprocess.run(ilql_cmd(tiny_gpt2, pairs, out, "--resume"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("model.safetensors", "ilql_heads.safetensors"):
        a, b = load_file(str(trained / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max().item() <= 1e-6, (name, k)
    assert [r["step"] for r in read_metrics_log(out)] == list(range(1, 61))
    ma = json.loads((trained / "metrics.json").read_text())
    mb = json.loads((out / "metrics.json").read_text())
    for k in ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-5), k


def test_kept_positions_as_a_tensor_score_like_all_positions(trained, pairs):
    """``alignloop evaluate`` asks for the completion's positions as a tensor (logits_to_keep):
    the decoder gives the same log-probs there as a full forward (docs/ilql.md's evaluate crashed)."""
    from alignloop.models import load_lm

    model, tok = load_lm(trained)
    ids = torch.tensor([tok("what is the dog ? a dog is good .")["input_ids"]])
    keep = torch.arange(2, ids.shape[1])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        part = model(input_ids=ids, logits_to_keep=keep).logits
    assert part.shape[1] == len(keep)
    torch.testing.assert_close(part, full[:, keep])

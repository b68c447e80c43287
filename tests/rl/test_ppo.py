"""PPO end to end on tiny random models: it runs, resumes exactly after a kill, guards NaNs, warns,
and turns bad input into one line. (What PPO achieves is tested in the embedded world: test_world.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignloop.rl.ppo import PPOConfig, batch_indices, hacking_warnings, repetition_rate, run_ppo

PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window"]
STEP_KEYS = {
    "score", "kl", "beta", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl",
    "explained_variance", "response_length", "time_generate", "time_score", "time_update", "tokens_per_second",
}  # fmt: skip
REWARD_MODULE = '''
def good(prompts, completions):
    """+1 per 'good' in the completion (a toy reward the tiny model can learn)."""
    return [float(c.split().count("good")) for c in completions]
'''


def good_reward(prompts, completions):
    return [float(c.split().count("good")) for c in completions]


def tiny_cfg(**kw) -> PPOConfig:
    base = {
        "steps": 4,
        "batch_size": 8,
        "minibatch_size": 4,
        "checkpoint_every": 2,
        "sampling": {"max_new_tokens": 8},
    }
    return PPOConfig(**{**base, **kw})


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("seconds")}


def test_ppo_runs_logs_and_saves(tiny_gpt2, tmp_path):
    out = tmp_path / "ppo"
    m = run_ppo(str(tiny_gpt2), good_reward, PROMPTS, out, lora=True, config=tiny_cfg(snapshot_every=2))
    assert m["steps"] == 4 and m["stop_reason"] == "max_steps" and m["skipped_batches"] == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= STEP_KEYS
    assert all(math.isfinite(r["kl"]) and r["response_length"] > 0 for r in rows)
    assert (out / "model" / "adapter_config.json").is_file() and (
        out / "model" / "value_head.safetensors"
    ).is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-2", "step-4"]
    # the first minibatch of the first epoch sees ratio 1: no clipping can happen before an update
    assert rows[0]["approx_kl"] >= 0


def test_reward_threshold_stops_the_run(tiny_gpt2, tmp_path):
    m = run_ppo(
        str(tiny_gpt2),
        lambda p, c: [5.0] * len(c),
        PROMPTS,
        tmp_path / "t",
        config=tiny_cfg(reward_threshold=1.0),
    )
    assert m["stop_reason"] == "reward_threshold" and m["steps"] == 1


def test_full_finetuning_and_seq2seq(tiny_gpt2, tiny_t5, tmp_path):
    m = run_ppo(str(tiny_gpt2), good_reward, PROMPTS, tmp_path / "full", lora=False, config=tiny_cfg(steps=2))
    assert m["steps"] == 2 and (tmp_path / "full" / "model" / "model.safetensors").is_file()
    m = run_ppo(str(tiny_t5), good_reward, PROMPTS, tmp_path / "t5", lora=True, config=tiny_cfg(steps=2))
    assert m["steps"] == 2 and math.isfinite(m["kl_last"])


def test_non_finite_rewards_and_losses_skip_the_batch(tiny_gpt2, tmp_path):
    calls = {"n": 0}

    def flaky(prompts, completions):
        calls["n"] += 1
        if calls["n"] == 2:
            return [float("nan")] + [1.0] * (len(completions) - 1)
        if calls["n"] == 3:
            return [1e30] * len(completions)  # finite score, but the value loss overflows float32
        return good_reward(prompts, completions)

    out = tmp_path / "nan"
    cfg = tiny_cfg(steps=4, whiten_advantages=False, score_norm="none")  # every reward call counted
    m = run_ppo(str(tiny_gpt2), flaky, PROMPTS, out, config=cfg)
    assert m["steps"] == 4
    assert m["skipped_batches"] >= 2  # the NaN batch, and at least one overflowing minibatch
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "model" / name)).values())


def test_cli_bad_input_is_one_line(cli, tiny_gpt2, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "1", "prompt": "the dog is"}) + "\n")
    base = ["ppo", "--policy", tiny_gpt2, "--reward", "world:gold", "--out", tmp_path / "o"]
    code, _, err = cli(*base, "--prompts", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl" in err and "Traceback" not in err
    code, _, err = cli(*base, "--prompts", prompts, "--set", "kl.bta=0.1")
    assert code == 2 and "kl.beta" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(*base, "--prompts", prompts, "--set", "batch_size=6", "--set", "minibatch_size=4")
    assert code == 2 and "multiple" in err
    code, out, _ = cli("ppo", "--help")
    assert code == 0 and "example:" in out


def test_bad_reward_and_mismatched_resume_are_user_errors(tiny_gpt2, tmp_path):
    from alignloop.errors import UserError

    with pytest.raises(UserError, match="returned 1 scores for 8"):
        run_ppo(str(tiny_gpt2), lambda p, c: [1.0], PROMPTS, tmp_path / "a", config=tiny_cfg(steps=1))
    run_ppo(str(tiny_gpt2), good_reward, PROMPTS, tmp_path / "b", config=tiny_cfg(steps=2))
    with pytest.raises(UserError, match="other inputs or another config"):
        run_ppo(str(tiny_gpt2), good_reward, PROMPTS, tmp_path / "b", config=tiny_cfg(steps=3), resume=True)


def test_batch_indices_cover_every_prompt_each_epoch():
    seen = [i for s in range(3) for i in batch_indices(6, 4, s, seed=1)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
    assert batch_indices(6, 4, 1, seed=1) == batch_indices(6, 4, 1, seed=1)


def test_hacking_warnings_fire_on_each_sign():
    cfg = PPOConfig(warn={"window": 2})
    row = {"kl": 1.0, "score": 0.0, "heldout": 0.5, "response_length": 10.0, "repetition": 0.0}
    hist = [
        dict(row),
        dict(row),
        {**row, "score": 1.0, "heldout": 0.2},
        {**row, "score": 1.2, "heldout": 0.1},
    ]
    assert [k for k, _ in hacking_warnings(hist, cfg)] == ["proxy_vs_heldout"]
    hist[-1].update(kl=100.0, response_length=40.0, repetition=0.9)
    hist[-2].update(response_length=40.0)
    kinds = {k for k, _ in hacking_warnings(hist, cfg)}
    assert kinds == {"kl_over_target", "length", "proxy_vs_heldout", "repetition"}
    assert hacking_warnings([dict(row)] * 4, cfg) == []


def test_repetition_rate():
    assert repetition_rate([[1, 2, 3, 4]]) == 0.0
    assert repetition_rate([[1, 2, 1, 2, 1, 2]]) == pytest.approx(1 - 2 / 5)


def test_scores_are_normalised_with_the_initial_policys_statistics(tiny_gpt2, tmp_path):
    from alignloop.rl.ppo import normalise_scores

    seen: list[float] = []

    def noisy(prompts, completions):
        out = [3.0 + 2.0 * (len(c.split()) % 3) for c in completions]  # mean and spread far from (0, 1)
        seen.extend(out)
        return out

    cfg = tiny_cfg(steps=1, score_norm_samples=16)
    m = run_ppo(str(tiny_gpt2), noisy, PROMPTS, tmp_path / "n", config=cfg)
    initial = torch.tensor(seen[:16])  # the first 16 scores: the initial policy's, before any update
    assert m["score_norm"] == pytest.approx([initial.mean().item(), initial.std().item()])
    assert normalise_scores(torch.tensor([5.0, 1.0]), 3.0, 2.0).tolist() == [1.0, -1.0]
    assert PPOConfig().score_norm == "initial" and PPOConfig().value_detach


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_t5"])
def test_gradient_checkpointing_trains_the_same_policy(model, request, tmp_path):
    """gradient_checkpointing only trades time for memory: the same steps give the same adapter."""
    from safetensors.torch import load_file

    path = request.getfixturevalue(model)
    adapters, logs = [], []
    for on in (False, True):
        out = tmp_path / f"gc-{on}"
        run_ppo(
            str(path),
            good_reward,
            PROMPTS,
            out,
            lora=True,
            config=tiny_cfg(steps=2, gradient_checkpointing=on),
        )
        adapters.append(load_file(out / "model" / "adapter_model.safetensors"))
        logs.append([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    assert adapters[0].keys() == adapters[1].keys()
    for name, w in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], w, rtol=1e-4, atol=1e-6, msg=name)
    assert any(w.abs().sum() > 0 for n, w in adapters[0].items() if "lora_B" in n)  # trained (B starts at 0)
    for a, b in zip(logs[0], logs[1], strict=True):
        assert a["response_length"] == b["response_length"]
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-3, abs=1e-6)

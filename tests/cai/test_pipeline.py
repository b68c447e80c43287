"""The whole CAI pipeline on a tiny model (mechanics, resume) and ai_rankings for the loop."""

from __future__ import annotations

import json

import pytest

from alignloop.cai.pipeline import CAIConfig, ai_pairs, ai_rankings, run_cai
from alignloop.records import CompletionSet, read
from alignloop.world import prompts as world_prompts


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_ai_rankings_follow_the_soft_wins(sharp_gpt2, tiny_constitution, tiny_sets):
    from alignloop.cai.constitution import load_constitution
    from alignloop.cai.judges import LocalLM
    from alignloop.cai.label import LabelConfig, label_batch, pairs_from_file

    sets = read(tiny_sets, CompletionSet)
    rankings = ai_rankings(sets, str(sharp_gpt2), str(tiny_constitution), seed=3)
    assert [r.set_id for r in rankings] == ["p1", "p2", "p3"]
    assert all(r.labeller == "ai-judge" for r in rankings)
    # the same soft labels by hand: score = mean P(win), rank 1 = highest
    labels = label_batch(LocalLM(str(sharp_gpt2)), load_constitution(tiny_constitution), pairs_from_file(tiny_sets),
                         LabelConfig(seed=3))  # fmt: skip
    for s, r in zip(sets, rankings, strict=True):
        wins = {c.id: [] for c in s.completions}
        for rec in labels:
            if rec["set_id"] == s.set_id:
                wins[rec["a_id"]].append(rec["p_a"])
                wins[rec["b_id"]].append(1 - rec["p_a"])
        score = {k: sum(v) / len(v) for k, v in wins.items()}
        order = sorted(score, key=score.get, reverse=True)
        assert [r.ranks[c] for c in order] == sorted(r.ranks.values())
        assert r.ranks[order[0]] == 1
    # ai_pairs: the same labels as soft TRL pairs
    pairs = ai_pairs(sets, str(sharp_gpt2), str(tiny_constitution), seed=3)
    assert [(p.chosen, p.rejected, p.weight) for p in pairs] == [
        (r["chosen"], r["rejected"], r["weight"]) for r in labels
    ]
    assert all(p.labellers == ["ai-judge"] for p in pairs)


@pytest.mark.slow
def test_run_cai_end_to_end_and_resume(sharp_gpt2, tmp_path):
    """Every stage runs and writes its folder; a second call with resume skips them all."""
    red = world_prompts("redteam", families=["harmful", "benign"])[:4]
    ev = [world_prompts("eval", families=[f])[0] for f in ("harmful", "benign", "myth")]
    files = {k: _write(tmp_path / f"{k}.jsonl", v) for k, v in (("red", red), ("eval", ev))}
    m = str(sharp_gpt2)
    cfg = CAIConfig.model_validate({
        "model": m, "redteam_prompts": str(files["red"]), "eval_prompts": str(files["eval"]), "eval_samples": 2,
        "revise": {"samples": 2, "rounds": 1, "max_new_tokens": 6, "batch_size": 8},
        "label": {"principles": 2, "swap": True},
        "sft": {"max_steps": 2, "batch_size": 4},
        "reward": {"model": m, "labels": "soft", "epochs": 1, "eval_fraction": 0.25},
        "ppo": {"steps": 1, "batch_size": 4, "minibatch_size": 2, "sampling": {"max_new_tokens": 6}},
    })  # fmt: skip
    out = tmp_path / "cai"
    result = run_cai(out, cfg)
    for stage in ("revise", "sft", "pairs", "label", "reward", "ppo", "eval"):
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete", stage
    assert len((out / "revise" / "transcripts.jsonl").read_text().splitlines()) == 8
    labels = [json.loads(x) for x in (out / "label" / "pairs.jsonl").read_text().splitlines()]
    assert (
        len(labels) == 4 * 4
    )  # RL prompts default to the SL prompts here; pairs_samples=4, k=2 -> 1 pair each
    assert all(0.5 <= r["weight"] <= 1 for r in labels)
    for name in ("base", "sl", "rl"):
        assert result[name]["responses"] == 6
        assert 0 <= result[name]["over_refusal"] <= 1 and 0 <= result[name]["harmful_compliance"] <= 1
    again = run_cai(out, cfg, resume=True)
    assert json.dumps(again, sort_keys=True) == json.dumps(result, sort_keys=True)  # (NaN-safe)
    # no judge given: the model labels its own responses (only the world's base has a judge of its own)
    assert json.loads((out / "label" / "manifest.json").read_text())["inputs"]["judge"]["path"] == str(
        sharp_gpt2.resolve()
    )


def test_cai_run_bad_settings_fail_before_any_model_loads(cli, tmp_path):
    code, _, err = cli("cai", "run", "--out", tmp_path / "r", "--set", "ppo.stepz=3")
    assert code == 2 and "unknown config key 'ppo.stepz'" in err and "did you mean 'ppo.steps'" in err
    bad = tmp_path / "c.yaml"
    bad.write_text("name: nothing\n")
    code, _, err = cli("cai", "run", "--out", tmp_path / "r", "--constitution", bad)
    assert code == 2 and "no principles" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "revise").exists()


def test_cai_run_on_conversations(cli, tmp_path, tiny_gpt2):
    """``cai run`` on conversational world prompts: the ids that reach the writer for the response, the
    critique and the revision are ``apply_chat_template`` of the chat turns (every embedding lookup of the
    run is recorded); sft.jsonl and the AI-labelled pairs are TRL's conversational format and load with
    ``datasets``. A bad message and a tokenizer without a template: one line each, before any stage."""
    import torch
    from datasets import load_dataset

    from alignloop.cai.constitution import critique_turns, load_constitution, revision_turns
    from alignloop.models import load_tokenizer

    files = {}
    for name, split in (("red", "redteam"), ("eval", "eval")):
        files[name] = tmp_path / f"{name}.jsonl"
        code, _, err = cli("-q", "world", "prompts", "--split", split, "--n", "4", "--families", "harmful,benign",
                           "--format", "conversational", "--out", files[name])  # fmt: skip
        assert code == 0, err
    run = ["cai", "run", "--out", tmp_path / "cai", "--prompts", files["red"]]
    settings = [
        "revise.samples=1", "revise.max_new_tokens=8", "sft.max_steps=1", "sft.batch_size=4", "pairs_samples=2",
        "label.swap=false", "label.principles=1", "reward.epochs=1", "ppo.steps=1", "ppo.batch_size=4",
        "ppo.minibatch_size=2", "ppo.sampling.max_new_tokens=6", "eval_samples=1",
        f"rl_prompts={files['red']}", f"eval_prompts={files['eval']}",
    ]  # fmt: skip
    seen: list[list[int]] = []  # every token row a model embeds (prefills: the prompts as they reach it)

    def record(module, args):
        if isinstance(module, torch.nn.Embedding) and args and args[0].dim() == 2 and args[0].shape[1] > 1:
            seen.extend(args[0].tolist())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        code, out, err = cli("-q", *run, *(a for s in settings for a in ("--set", s)))
    finally:
        hook.remove()
    assert code == 0, err
    assert "base:" in out and "rl:" in out

    tok, c = load_tokenizer("world:base"), load_constitution()

    def reached(messages) -> bool:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        return any(r[len(r) - len(ids) :] == ids and set(r[: len(r) - len(ids)]) <= {tok.pad_token_id}
                   for r in seen if len(r) >= len(ids))  # fmt: skip

    transcripts = [
        json.loads(x) for x in (tmp_path / "cai" / "revise" / "transcripts.jsonl").read_text().splitlines()
    ]
    assert len(transcripts) == 4
    for t in transcripts:
        (r,) = t["rounds"]
        assert isinstance(t["prompt"], list) and t["prompt"][-1]["role"] == "user"
        assert reached(t["prompt"])
        assert reached(critique_turns(c, t["prompt"], t["initial"], r["principle"]))
        assert reached(revision_turns(c, t["prompt"], t["initial"], r["principle"], r["critique"]))
        assert not reached(
            [*t["prompt"], {"role": "user", "content": "never sent ."}]
        )  # (the check can fail)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["red"].read_text().splitlines()[0] + "\n"
                   + json.dumps({"id": "x", "prompt": [{"role": "bot", "content": "hi"}]}) + "\n")  # fmt: skip
    code, _, err = cli("cai", "run", "--out", tmp_path / "bad", "--prompts", bad)
    assert (
        code == 2 and f"{bad}:2" in err and "unknown role 'bot'" in err and len(err.strip().splitlines()) == 1
    )
    code, _, err = cli(
        "cai", "run", "--out", tmp_path / "bad", "--model", tiny_gpt2, "--prompts", files["red"]
    )
    assert code == 2 and f"{files['red']}:1" in err and "--chat-template FILE" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    # what cai run wrote loads with datasets (its progress bars go to stderr: after the CLI checks)
    sft = load_dataset("json", data_files=str(tmp_path / "cai" / "revise" / "sft.jsonl"), split="train")
    assert len(sft) >= 1 and all(row["response"][0]["role"] == "assistant" for row in sft)
    pairs_file = tmp_path / "cai" / "label" / "pairs.jsonl"
    pairs = load_dataset("json", data_files=str(pairs_file), split="train")
    assert len(pairs) == 4 * 2  # 4 prompts x 2 draws, k = 2 -> one pair each
    for row in pairs:
        assert row["prompt"][-1]["role"] == "user" and 0.5 <= row["weight"] <= 1
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    assert isinstance(
        json.loads((tmp_path / "cai" / "rl_prompts.jsonl").read_text().splitlines()[0])["prompt"], list
    )

"""Labeller-conditioned reward model (issue 28): a pooled output plus one per labeller over one trunk."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from reward_synthetic import make_sets, write

from alignloop.errors import UserError
from alignloop.reward import load_reward
from alignloop.reward.data import read_pairs
from alignloop.reward.losses import grouped_pairwise_loss, pairwise_loss, pick, shrink_penalty
from alignloop.reward.train import RewardTrainConfig, labeller_heads, select_score, train_reward_model

FAST = {"learning_rate": 3e-3, "batch_prompts": 8, "warmup_ratio": 0.0}


def per_labeller_pairs(sets: list[dict]) -> list[dict]:
    """Each labeller's own pairs (``labellers: [name]``): ann and cy rank by quality, bo the reverse."""
    rows = []
    for s in sets:
        for a, b in itertools.combinations(s["completions"], 2):
            hi, lo = (a, b) if a["quality"] > b["quality"] else (b, a)
            for who in ("ann", "bo", "cy"):
                c, r = (lo, hi) if who == "bo" else (hi, lo)
                rows.append(
                    {"prompt": s["prompt"], "chosen": c["text"], "rejected": r["text"], "labellers": [who]}
                )
    return rows


def test_heads_entries_and_loss_by_hand(tmp_path):
    rows = per_labeller_pairs(make_sets(2, k=3))
    rows.append({**rows[0], "labellers": ["ann", "bo"]})  # a consensus pair: no one labeller
    groups = read_pairs(write(tmp_path / "p.jsonl", rows)).groups
    assert labeller_heads(groups) == {"ann": 1, "bo": 2, "cy": 3}
    assert [p.labeller for p in groups[0].pairs][-1] is None
    rewards = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 3.0]])  # (N=2 completions, H=3 outputs)
    chosen, rejected, head = torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 2])
    assert pick(rewards, chosen, head).tolist() == [0.0, -1.0]
    expected = pairwise_loss(torch.tensor([0.0, -1.0]), torch.tensor([2.0, 3.0]))
    assert grouped_pairwise_loss(rewards, chosen, rejected, head=head) == pytest.approx(expected.item())
    with pytest.raises(ValueError):
        pick(rewards, chosen)
    # shrinkage: mean over completions and labeller outputs of (r_l - r_0)^2 = (1 + 1 + 4 + 1) / 4
    assert shrink_penalty(rewards).item() == pytest.approx(7 / 4)
    assert shrink_penalty(rewards[:, 0]).item() == 0.0 and shrink_penalty(rewards[:, :1]).item() == 0.0


def test_select_score_picks_the_criterion():
    """The best epoch's score: the pooled output's accuracy, or each labeller's own output counted once."""
    by_head = {0: 0.8, 1: 0.9, 2: 0.6, 3: float("nan")}  # labeller 3 has no held-out pairs
    assert select_score(by_head, "pooled") == 0.8
    assert select_score(by_head, "labellers") == pytest.approx(0.75)
    assert math.isnan(select_score({0: 0.8, 1: float("nan")}, "labellers"))
    with pytest.raises(ValueError, match="unknown labeller_select"):
        select_score(by_head, "all")


def test_per_labeller_heads_learn_a_different_taste_and_round_trip(tiny_gpt2, tmp_path, cli):
    train = write(tmp_path / "train.jsonl", per_labeller_pairs(make_sets(48, seed=0)))
    held = per_labeller_pairs(make_sets(16, seed=1))
    held_file = write(tmp_path / "eval.jsonl", held)
    cfg = RewardTrainConfig(
        model=str(tiny_gpt2), epochs=4, patience=0, per_labeller=True, labeller_select="labellers", **FAST
    )
    metrics = train_reward_model(train, tmp_path / "rm", cfg, eval_pairs=held_file)
    by = metrics["labellers"]
    assert set(by) == {"ann", "bo", "cy"}
    # the kept epoch is the one whose mean over labellers of their own output's accuracy is highest
    epochs = [
        r for r in map(json.loads, (tmp_path / "rm" / "metrics.jsonl").open()) if "eval_select_accuracy" in r
    ]
    best = max(epochs, key=lambda r: r["eval_select_accuracy"])
    assert len(epochs) == 4 and best["epoch"] == metrics["best_epoch"], epochs
    assert best["eval_select_accuracy"] == pytest.approx(sum(b["own_head"] for b in by.values()) / 3)
    # bo's taste is the reverse of the majority: the pooled output gets his pairs mostly wrong, his own right
    assert by["bo"]["own_head"] > 0.8 and by["bo"]["pooled_head"] < 0.5, by
    assert by["ann"]["own_head"] > 0.8 and by["ann"]["own_head"] >= by["ann"]["pooled_head"] - 0.05, by

    # saved and loaded: DIR:NAME scores as that labeller, DIR with the pooled output, as in training
    def accuracy(spec: str, who: str) -> float:
        rows = [r for r in held if r["labellers"] == [who]]
        reward = load_reward(spec)
        c = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
        j = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
        return sum(a > b for a, b in zip(c, j, strict=True)) / len(rows)

    rm = str(tmp_path / "rm")
    assert accuracy(f"{rm}:bo", "bo") == pytest.approx(by["bo"]["own_head"])
    assert accuracy(rm, "bo") == pytest.approx(by["bo"]["pooled_head"])
    with pytest.raises(UserError, match="ann, bo, cy"):
        load_reward(f"{rm}:nobody")
    # PPO aimed at a labeller the model does not know: one error naming those it does, no run folder
    prompts = write(
        tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": r["prompt"]} for i, r in enumerate(held[:4])]
    )
    for spec, heldout in ((f"{rm}:nobody", []), (rm, ["--set", f"heldout={rm}:nobody"])):
        code, _, err = cli(
            "ppo", "--policy", str(tiny_gpt2), "--reward", spec, "--prompts", str(prompts),
            "--out", str(tmp_path / "ppo"), *heldout,
        )  # fmt: skip
        errors = [x for x in err.splitlines() if "error:" in x]  # (err also holds the training's log)
        assert code == 2 and len(errors) == 1 and "ann, bo, cy" in errors[0] and "Traceback" not in err, err
        assert not (tmp_path / "ppo").exists()


def test_shrinkage_pulls_each_labellers_output_to_the_pooled_one(tiny_gpt2, tmp_path):
    """labeller_shrink pulls each labeller's scores toward the pooled output's."""
    train = write(tmp_path / "train.jsonl", per_labeller_pairs(make_sets(24, seed=0)))
    texts = [(r["prompt"], r["chosen"]) for r in per_labeller_pairs(make_sets(8, seed=1))][::3]

    def gap(shrink: float) -> float:
        """Mean |r_bo - r_pooled| over held-out texts, in units of the pooled scores' spread."""
        cfg = RewardTrainConfig(
            model=str(tiny_gpt2), epochs=2, patience=0, per_labeller=True, labeller_shrink=shrink, **FAST
        )
        out = tmp_path / f"rm-{shrink}"
        train_reward_model(train, out, cfg)
        pooled = torch.tensor(load_reward(str(out))(*zip(*texts, strict=True)))
        bo = torch.tensor(load_reward(f"{out}:bo")(*zip(*texts, strict=True)))
        return ((bo - pooled).abs().mean() / pooled.std()).item()

    free, shrunk = gap(0.0), gap(10.0)  # measured 2.44 and 0.85 (two epochs: Adam's steps bound the pull)
    assert shrunk < 0.5 * free, (free, shrunk)


def test_per_labeller_needs_pairs_that_name_a_labeller(tiny_gpt2, tmp_path, cli):
    rows = [{k: v for k, v in r.items() if k != "labellers"} for r in per_labeller_pairs(make_sets(4))]
    path = write(tmp_path / "p.jsonl", rows)
    code, _, err = cli(
        "reward",
        "train",
        "--model",
        str(tiny_gpt2),
        "--pairs",
        str(path),
        "--out",
        str(tmp_path / "rm"),
        "--per-labeller",
    )
    assert code == 2 and "--consensus none" in err and len(err.strip().splitlines()) == 1
    path = write(tmp_path / "q.jsonl", per_labeller_pairs(make_sets(4)))
    code, _, err = cli(
        "reward", "train", "--model", str(tiny_gpt2), "--pairs", str(path), "--out", str(tmp_path / "rm2"),
        "--per-labeller", "--set", "normalize=mean_std",
    )  # fmt: skip
    assert code == 2 and "per_labeller works with normalize=mean or none" in err
    assert not (tmp_path / "rm2" / "config.json").exists()

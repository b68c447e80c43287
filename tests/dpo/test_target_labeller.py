"""DPO aimed at one labeller or a group (issue 28): only their pairs train; an unknown one is one error."""

from __future__ import annotations

import json

from dpo_pairs import good_bad_pairs, write_pairs

from alignloop.offline.dpo import check_target, is_target


def two_tastes() -> list[dict]:
    """ann prefers "good", bo the reverse (each pair once per labeller), and one pair both agreed on."""
    ann = [{**p, "weight": 1.0, "labellers": ["ann"]} for p in good_bad_pairs()]
    bo = [{**p, "weight": 1.0, "labellers": ["bo"]} for p in good_bad_pairs(flip=True)]
    return ann + bo + [{**ann[0], "labellers": ["ann", "bo"]}]


def test_is_target_and_count():
    assert is_target(["bo"], ["bo"]) and is_target(["ann", "bo"], ["ann", "bo"])
    assert not is_target(["ann", "bo"], ["bo"]) and not is_target(None, ["bo"]) and not is_target([], ["bo"])


def test_dpo_learns_the_targeted_labellers_taste_and_rejects_unknown_ones(cli, tiny_gpt2, tmp_path):
    rows = two_tastes()
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    held = write_pairs(tmp_path / "held.jsonl", rows[::6])  # both labellers' pairs: only bo's are measured
    assert check_target(pairs, ["bo"]) == 120 and check_target(pairs, ["ann", "bo"]) == 241
    code, out, err = cli(
        "dpo", "--policy", tiny_gpt2, "--pairs", pairs, "--heldout", held, "--out", tmp_path / "bo",
        "--labeller", "bo", "--set", "max_steps=20", "--set", "learning_rate=1e-3",
    )  # fmt: skip
    assert code == 0, err
    assert "[dpo] target bo: 120 of 241 pairs are theirs" in err + out
    # bo prefers "bad": trained on his pairs alone, the policy agrees with his held-out pairs
    # (ann's pairs, the exact reverse, would cancel them out: about 0.5 if the filter failed)
    metrics = json.loads((tmp_path / "bo" / "metrics.json").read_text())
    assert metrics["train_pairs"] == 120 and metrics["heldout_pairs"] == 20
    assert metrics["heldout/accuracy"] >= 0.9, metrics

    def one_line_error(*args):
        code, _, err = cli("dpo", "--policy", tiny_gpt2, "--out", tmp_path / "bad", *args)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()
        return lines[0]

    assert "'nobody'" in (e := one_line_error("--pairs", pairs, "--labeller", "nobody")) and "ann, bo" in e
    plain = write_pairs(tmp_path / "plain.jsonl", good_bad_pairs())
    assert "--consensus none" in one_line_error("--pairs", plain, "--labeller", "ann")
    consensus_only = write_pairs(tmp_path / "both.jsonl", rows[-1:])
    assert "no pair is only bo's" in one_line_error("--pairs", consensus_only, "--labeller", "bo")
    assert "--labeller" in one_line_error("--online", "--prompts", pairs, "--labeller", "bo")

"""``alignloop reward train | score | serve`` end to end, bad data, the HTTP protocol."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from reward_synthetic import make_sets, pairs_of, write

from alignloop.reward import load_reward
from alignloop.reward.data import read_pairs


def test_help_has_examples(cli):
    for sub in ("train", "score", "serve"):
        code, out, _ = cli("reward", sub, "--help")
        assert code == 0 and "example:" in out and "alignloop reward" in out


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "how ?", "chosen": "good"}, "missing field 'rejected'"),
        ({"chosen": "good", "rejected": "bad"}, "missing field 'prompt'"),
        ({"prompt": "how ?", "chosen": "good", "rejected": 3}, "field 'rejected' must be a string"),
        (
            {"prompt": "how ?", "chosen": "good", "rejected": "bad", "weight": 1.5},
            "field 'weight' must be a number",
        ),
        ({"prompt": "how ?", "completions": ["a", "b"], "pairs": [[0, 2]]}, "bad pair [0, 2]"),
    ],
)
def test_malformed_pair_line_is_one_clear_error(cli, tiny_gpt2, tmp_path, line, message):
    rows = pairs_of(make_sets(3))
    rows.insert(2, line)
    path = write(tmp_path / "pairs.jsonl", rows)
    code, _, err = cli("reward", "train", "--model", tiny_gpt2, "--pairs", path, "--out", tmp_path / "rm")
    assert code == 2
    assert err.count("\n") == 1 and message in err and f"{path}:3" in err and "--skip-bad" in err
    assert "Traceback" not in err


def test_empty_and_identical_completions_are_counted_skips(tmp_path):
    rows = pairs_of(make_sets(3))
    rows += [
        {"prompt": "how ?", "chosen": "  ", "rejected": " bad"},
        {"prompt": "how ?", "chosen": " good", "rejected": " good"},
        {"prompt": "how ?", "completions": [" x", " x"], "pairs": [[0, 1, 1.0]]},
        {"prompt": "how", "chosen": " good", "rejected": " bad", "weight": 0.5},
        {"prompt": "how", "junk": 1},
    ]
    path = write(tmp_path / "pairs.jsonl", rows)
    data = read_pairs(path, skip_bad=True)
    assert dict(data.skipped) == {"empty_completion": 1, "identical": 2, "bad_line": 1}
    assert data.n_pairs == 3 * 6 + 1 and data.problems[0].startswith(f"{path}:{len(rows)}")
    hard = read_pairs(path, skip_bad=True, hard_labels=True)
    assert hard.skipped["tie"] == 1 and hard.n_pairs == 3 * 6


def test_grouped_and_trl_formats_read_alike(tmp_path):
    from alignloop.preference.export import group_pairs

    rows = pairs_of(make_sets(5))
    for i, r in enumerate(rows):  # what `feedback export` writes
        r.update(prompt_id=f"s{i // 6}", chosen_id=r["chosen"], rejected_id=r["rejected"], labellers=["ann"])
    trl = read_pairs(write(tmp_path / "trl.jsonl", rows))
    grouped = read_pairs(write(tmp_path / "grouped.jsonl", group_pairs(rows)))
    assert [(g.prompt, g.completions, g.pairs) for g in trl.groups] == [
        (g.prompt, g.completions, g.pairs) for g in grouped.groups
    ]
    assert trl.n_completions == 5 * 4


def test_train_score_cli_with_skips(cli, tiny_gpt2, tmp_path):
    rows = pairs_of(make_sets(30)) + [
        {"prompt": "how ?", "chosen": " good", "rejected": " good"},
        {"prompt": "x"},
    ]
    path = write(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "rm"
    code, stdout, err = cli(
        "-q",
        "reward",
        "train",
        "--model",
        tiny_gpt2,
        "--pairs",
        path,
        "--out",
        out,
        "--epochs",
        "1",
        "--skip-bad",
        "--set",
        "learning_rate=3e-3",
    )
    assert code == 0, err
    assert "held-out accuracy" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"identical": 1, "bad_line": 1}
    assert metrics["epochs_run"] == 1
    assert "eval_gold_agreement" not in metrics  # not the world's prompts: no gold judge to ask

    code, stdout, err = cli(
        "-q", "reward", "score", "--reward", out, "--data", path, "--out", tmp_path / "scored.jsonl"
    )
    assert code != 0  # the malformed line is an error when scoring
    assert "line without" in err or "no completion" in err
    good = write(tmp_path / "good.jsonl", rows[:-2])
    code, stdout, err = cli(
        "-q", "reward", "score", "--reward", out, "--data", good, "--out", tmp_path / "scored.jsonl"
    )
    assert code == 0, err
    assert "accuracy=" in stdout and "pairs=180" in stdout
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert all(isinstance(r["reward_chosen"], float) for r in scored)


def test_score_completion_sets_and_bad_spec(cli, tiny_classifier, tmp_path):
    sets = make_sets(2)
    path = write(tmp_path / "sets.jsonl", sets)
    code, stdout, err = cli(
        "-q",
        "reward",
        "score",
        "--reward",
        f"{tiny_classifier}:nothate",
        "--data",
        path,
        "--out",
        tmp_path / "o.jsonl",
    )
    assert code == 0, err
    assert "completions=8" in stdout
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all("reward" in c for s in scored for c in s["completions"])
    code, _, err = cli("reward", "score", "--reward", "world:nosuch", "--data", path)
    assert code == 2 and err.count("\n") == 1 and "unknown world reward" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_over_http_matches_local_scores(tiny_classifier):
    import uvicorn

    from alignloop.reward.functions import post_json
    from alignloop.reward.server import create_app

    local = load_reward(f"{tiny_classifier}:nothate")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(local), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        remote = load_reward(f"http://127.0.0.1:{port}")
        assert remote.kind == "http" and remote.info["server"]["reward"] == local.spec
        prompts = ["how is the dog ?"] * 3
        texts = ["the dog is good", "this is garbage", "thanks"]
        assert remote(prompts, texts) == pytest.approx(local(prompts, texts), abs=1e-6)
        assert remote([], []) == []
        with pytest.raises(Exception, match="HTTP 422"):
            post_json(f"http://127.0.0.1:{port}/score", {"prompts": ["a"], "completions": []})
        with pytest.raises(Exception, match="HTTP 422"):
            post_json(f"http://127.0.0.1:{port}/score", {"prompts": "a"})
    finally:
        server.should_exit = True
        thread.join(timeout=10)

"""``alignloop generate`` on the tiny models: records, seeds, resume, prompt files, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from alignloop.records import CompletionSet, read

WORDS = "the dog is good what do you want my house is hot a cat said thanks".split()


def _prompts(path, n=10, long_every=None):
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5))
            if long_every and i % long_every == 0:
                text = " ".join(WORDS * 12)  # ~200 tokens: longer than the 128-position tiny GPT-2
            f.write(json.dumps({"id": f"p{i}", "prompt": text, "family": "toy"}) + "\n")
    return path


def test_writes_k_completion_sets_reproducibly(tiny_gpt2, tmp_path, cli):
    prompts = _prompts(tmp_path / "p.jsonl")
    args = ["generate", "--model", tiny_gpt2, "--prompts", prompts, "--k", "4", "--max-new-tokens", "12"]
    code, out, err = cli(*args, "--out", tmp_path / "a.jsonl", "--top-p", "0.9", "-q")
    assert code == 0, err
    assert "written=10" in out
    sets = read(tmp_path / "a.jsonl", CompletionSet)
    assert [s.prompt_id for s in sets] == [f"p{i}" for i in range(10)]
    for s in sets:
        assert [c.id for c in s.completions] == [f"{s.prompt_id}-{j}" for j in range(4)]
        assert s.model == str(tiny_gpt2) and s.sampling["top_p"] == 0.9 and s.sampling["seed"] == 0
        assert s.family == "toy"  # the prompt's extra fields travel with the set
    cli(*args, "--out", tmp_path / "b.jsonl", "--top-p", "0.9", "-q")
    cli(*args, "--out", tmp_path / "c.jsonl", "--top-p", "0.9", "--seed", "1", "-q")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_resume_writes_what_an_uninterrupted_run_would(tiny_gpt2, tmp_path, cli):
    prompts = _prompts(tmp_path / "p.jsonl", n=12)
    args = ["generate", "--model", tiny_gpt2, "--prompts", prompts, "--k", "2", "--batch-size", "4", "-q"]
    args += ["--max-new-tokens", "8"]
    cli(*args, "--out", tmp_path / "whole.jsonl")
    code, out, _ = cli(*args, "--out", tmp_path / "part.jsonl", "--limit", "5")
    assert code == 0 and "written=5" in out
    with open(tmp_path / "part.jsonl", "a") as f:
        f.write('{"prompt_id": "p5", "prompt": "torn li')  # a crash mid-write
    code, out, _ = cli(*args, "--out", tmp_path / "part.jsonl")
    assert code == 0 and "written=7" in out and "skipped_done=5" in out
    assert (tmp_path / "part.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_killed_run_keeps_finished_sets(tiny_gpt2, tmp_path):
    """Completions are written as they are produced: a killed run keeps them, a rerun completes it."""
    prompts = _prompts(tmp_path / "p.jsonl", n=400)
    out = tmp_path / "sets.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "alignloop",
        "generate",
        "--model",
        str(tiny_gpt2),
        "--prompts",
        str(prompts),
    ]
    cmd += [
        "--k",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "48",
        "--ignore-eos",
        "--out",
        str(out),
        "-q",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = out.read_text().count("\n")
    assert 3 <= kept < 400
    read(out, CompletionSet) if out.read_text().endswith("\n") else None  # finished lines are valid sets
    done = subprocess.run(cmd + ["--limit", str(kept + 3)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"skipped_done={kept}" in done.stdout
    assert [s.prompt_id for s in read(out, CompletionSet)] == [f"p{i}" for i in range(kept + 3)]


def test_long_prompts_are_cut_counted_and_flagged(tiny_gpt2, tmp_path, cli):
    prompts = _prompts(tmp_path / "p.jsonl", n=6, long_every=3)
    code, out, err = cli(
        "generate", "--model", tiny_gpt2, "--prompts", prompts, "--k", "2", "--out", tmp_path / "s.jsonl",
        "--max-new-tokens", "16",
    )  # fmt: skip
    assert code == 0, err
    assert "truncated=2" in out and "2 prompts were longer than 112 tokens" in err
    flagged = [
        s.prompt_id
        for s in read(tmp_path / "s.jsonl", CompletionSet)
        if getattr(s, "prompt_truncated", False)
    ]
    assert flagged == ["p0", "p3"]
    code, _, err = cli("generate", "--model", tiny_gpt2, "--prompts", prompts, "--out", tmp_path / "x.jsonl",
                       "--max-new-tokens", "128")  # fmt: skip
    assert code == 2 and "does not fit the model's 128-token context" in err


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ('{"id": "a", "text": "the dog"}\n', [], "no 'prompt' column in {f}:1: columns: id, text"),
        ('{"id": "a", "prompt": "the dog"}\n{"id": "b", "prompt": "  "}\n', [], "empty prompt in {f}:2"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', [], "duplicate prompt id 'a' in {f}:2"),
        ('{"id": "a", "prompt": "x"}\n', ["--template", "Q: {question}"], "names column 'question'"),
        ('{"id": "a", "prompt": "x"}\nnot json\n', [], "invalid JSON"),
        ("", [], "no usable prompts"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tiny_gpt2, tmp_path, cli, content, extra, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    code, out, err = cli(
        "generate", "--model", tiny_gpt2, "--prompts", f, "--out", tmp_path / "s.jsonl", *extra
    )
    assert code == 2 and "Traceback" not in err
    assert message.format(f=f) in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.jsonl").exists()  # nothing started


def test_skip_bad_counts_and_continues(tiny_gpt2, tmp_path, cli):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"id": "a", "prompt": "the dog"}\n{"id": "b", "prompt": ""}\n{"id": "c", "prompt": "a cat"}\n'
    )
    code, out, err = cli("generate", "--model", tiny_gpt2, "--prompts", f, "--out", tmp_path / "s.jsonl",
                         "--k", "2", "--skip-bad")  # fmt: skip
    assert code == 0 and "written=2" in out and "skipped_bad=1" in out and "empty prompt" in err


def test_csv_and_parquet_with_template_on_seq2seq(tiny_t5, tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"fname": f"d{i}", "dialogue": f"person said the dog is {w}"}
        for i, w in enumerate(["good", "bad", "hot"])
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text(
        "fname,dialogue\n" + "".join(f"{r['fname']},{r['dialogue']}\n" for r in rows)
    )
    template = "summary of the dialogue .\\n\\n{dialogue}\\n\\nsummary :"
    for name in ("d.parquet", "d.csv"):
        code, out, err = cli(
            "generate", "--model", tiny_t5, "--prompts", tmp_path / name, "--template", template,
            "--id-column", "fname", "--k", "3", "--max-new-tokens", "8", "--out", tmp_path / f"{name}.jsonl",
        )  # fmt: skip
        assert code == 0, err
        sets = read(tmp_path / f"{name}.jsonl", CompletionSet)
        assert [s.prompt_id for s in sets] == ["d0", "d1", "d2"]
        assert sets[0].prompt == "summary of the dialogue .\n\nperson said the dog is good\n\nsummary :"
        assert sets[0].dialogue == "person said the dog is good" and len(sets[0].completions) == 3
    a = (tmp_path / "d.parquet.jsonl").read_text()
    assert a == (tmp_path / "d.csv.jsonl").read_text()  # same prompts, same seed: same output
    code, _, err = cli("generate", "--model", tiny_t5, "--prompts", tmp_path / "d.csv", "--out", tmp_path / "z.jsonl",
                       "--prompt-column", "dialog")  # fmt: skip
    assert code == 2 and "no 'dialog' column" in err and "fname, dialogue" in err


def test_unknown_dataset_is_a_user_error(tiny_gpt2, tmp_path, cli):
    code, _, err = cli("generate", "--model", tiny_gpt2, "--prompts", "no-such-owner/no-such-dataset",
                       "--out", tmp_path / "s.jsonl")  # fmt: skip
    assert code == 2 and "no-such-owner/no-such-dataset" in err and len(err.strip().splitlines()) == 1


def _repeats(path) -> tuple[int, int]:
    """(completions repeating an earlier text of their set, sets with fewer distinct texts than completions)."""
    sets = read(path, CompletionSet)
    extra = [len(s.completions) - len({c.text for c in s.completions}) for s in sets]
    return sum(extra), sum(e > 0 for e in extra)


def test_distinct_resamples_repeats_and_counts_short_sets(tmp_path, cli):
    from alignloop.world import prompts as world_prompts

    src = tmp_path / "p.jsonl"
    src.write_text(
        "".join(json.dumps(r) + "\n" for r in world_prompts("train", n=12, families=["myth", "harmful"]))
    )
    args = ["generate", "--model", "world:base", "--prompts", src, "--k", "4", "--max-new-tokens", "16", "-q"]
    code, out, err = cli(*args, "--out", tmp_path / "plain.jsonl")
    assert code == 0, err
    repeats, _ = _repeats(tmp_path / "plain.jsonl")
    assert repeats > 0 and "short_sets" not in out  # the world's base repeats itself in these families
    code, out, err = cli(*args, "--out", tmp_path / "distinct.jsonl", "--distinct")
    assert code == 0, err
    stats = dict(x.split("=") for x in out.split())
    after, short = _repeats(tmp_path / "distinct.jsonl")
    assert after < repeats and int(stats["short_sets"]) == short and int(stats["resampled"]) >= repeats
    for s in read(
        tmp_path / "distinct.jsonl", CompletionSet
    ):  # every text is still the prompt's continuation
        assert all(c.text.startswith(" ") for c in s.completions if c.text)
    # greedy decoding cannot give distinct texts: every set is counted short, nothing loops forever
    code, out, err = cli(*args, "--out", tmp_path / "greedy.jsonl", "--distinct", "2", "--temperature", "0")
    assert code == 0 and "short_sets=12" in out, err
    code, _, err = cli(*args, "--out", tmp_path / "x.jsonl", "--distinct", "-1")
    assert code == 2 and "--distinct must not be negative" in err

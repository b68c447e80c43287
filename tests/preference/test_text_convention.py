"""The text convention (TRL's): the full text is exactly prompt + completion; old files are
converted when read, a file mixing the two is one clear error (no torch here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignloop.errors import UserError
from alignloop.records import CompletionSet, Pair, full_text, junction, read
from alignloop.reward.data import read_pairs


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


NEW = [
    {"prompt": "review : this lamp is", "chosen": " very good .", "rejected": " total trash ."},
    {
        "prompt": "user : what is a dog ? assistant :",
        "chosen": " a dog is a furry animal .",
        "rejected": " clap .",
    },
]
OLD = [{**r, "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in NEW]


def test_full_text_and_junctions():
    assert full_text("the dog is", " good") == "the dog is good"
    assert junction("the dog is", " good") == "spaced" and junction("the dog is ", "good") == "spaced"
    assert junction("assistant :", "a dog") == "bare"  # punctuation glued to a word: the old convention
    assert junction("the film", "maker") == "word"  # a word continued (legal in TRL's convention)
    assert junction("hello", ", world") == "neutral" and junction([{"role": "user"}], "x") == "neutral"


def test_new_file_reads_unchanged(tmp_path):
    path = _write(tmp_path / "new.jsonl", NEW)
    assert [p.model_dump(include={"prompt", "chosen", "rejected"}) for p in read(path, Pair)] == NEW


def test_old_file_is_converted_and_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("alignloop.runs._QUIET", False)  # an earlier in-process `-q` run may have set it
    path = _write(tmp_path / "old.jsonl", OLD)
    assert [p.model_dump(include={"prompt", "chosen", "rejected"}) for p in read(path, Pair)] == NEW
    err = capsys.readouterr().err
    assert f"{path}: old text convention" in err and "4 completions" in err and len(err.splitlines()) == 1
    # the reward reader and completion sets too
    groups = read_pairs(path).groups
    assert {c for g in groups for c in g.completions} == {r[k] for r in NEW for k in ("chosen", "rejected")}
    sets = _write(
        tmp_path / "sets.jsonl",
        [
            {
                "prompt_id": "a",
                "prompt": "review : this lamp is",
                "completions": [{"id": "x", "text": "good ."}],
            }
        ],
    )
    assert read(sets, CompletionSet)[0].completions[0].text == " good ."


def test_a_file_mixing_conventions_is_one_clear_error(tmp_path, cli):
    path = _write(tmp_path / "mixed.jsonl", [NEW[0], NEW[1], OLD[1]])
    with pytest.raises(UserError, match=r"mixed text conventions: line 3 joins") as e:
        read(path, Pair)
    assert f"{path}:3" in str(e.value) and "line 1 has the space" in str(e.value)
    with pytest.raises(UserError, match="mixed text conventions"):
        read_pairs(path)
    code, _, err = cli("feedback", "import", "--in", path, "--out", tmp_path / "out.jsonl")
    assert code == 2 and "mixed text conventions" in err and f"{path}:3" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.jsonl").exists()


def test_preference_and_feedback_do_not_import_torch():
    code = (
        "import alignloop.preference.imports, alignloop.preference.export, alignloop.feedback.store, sys; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

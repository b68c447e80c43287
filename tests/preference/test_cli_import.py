"""``alignloop feedback report | export | import`` on files and on the labelling database."""

from __future__ import annotations

import json

import pytest

from alignloop.preference.imports import import_preferences, split_hh
from alignloop.records import CompletionSet, Ranking, write_jsonl

ORDERS = {"ann": [1, 2, 3, 4], "bob": [1, 2, 4, 3], "cyd": [2, 1, 3, 4], "zed": [4, 3, 2, 1]}


def _data(n_sets=8):
    sets = [
        CompletionSet(
            prompt_id=f"p{s}",
            prompt=f"prompt {s}",
            completions=[{"id": f"p{s}c{i}", "text": f" answer {i} to prompt {s}"} for i in range(4)],
        )
        for s in range(n_sets)
    ]
    rankings = [
        Ranking(set_id=f"p{s}", labeller=name, ranks={f"p{s}c{i}": order[i] for i in range(4)})
        for s in range(n_sets)
        for name, order in ORDERS.items()
    ]
    return sets, rankings


@pytest.fixture()
def files(tmp_path):
    sets, rankings = _data()
    write_jsonl(tmp_path / "sets.jsonl", sets)
    write_jsonl(tmp_path / "rankings.jsonl", rankings)
    return tmp_path


def test_report_from_files(cli, files):
    code, out, err = cli(
        "-q",
        "feedback",
        "report",
        "--sets",
        files / "sets.jsonl",
        "--rankings",
        files / "rankings.jsonl",
        "--out",
        files / "rep",
    )
    assert code == 0, err
    rep = json.loads((files / "rep" / "report.json").read_text())
    assert [f["name"] for f in rep["flagged"]] == ["zed"] and "flagged zed" in out
    assert (files / "rep" / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (files / "rep" / "report.html").read_text()
    assert json.loads((files / "rep" / "manifest.json").read_text())["status"] == "complete"


def test_report_with_hostile_labeller_names(cli, tmp_path, hostile_names, text_overlaps):
    """Names that matplotlib would parse as mathtext, a newline, 200 characters: the command
    writes report.html and metrics.json, shows each name as typed, and the plot has no overlap."""
    import html

    from alignloop.preference.report import agreement_figure

    sets, rankings = _data()
    rename = dict(zip(ORDERS, hostile_names, strict=False))
    rankings = [r.model_copy(update={"labeller": rename[r.labeller]}) for r in rankings]
    write_jsonl(tmp_path / "sets.jsonl", sets)
    write_jsonl(tmp_path / "rankings.jsonl", rankings)
    out = tmp_path / "rep"
    code, _, err = cli(
        "-q", "feedback", "report", "--sets", tmp_path / "sets.jsonl", "--rankings", tmp_path / "rankings.jsonl",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["n_labellers"] == 4
    page = (out / "report.html").read_text()
    assert all(f"<td>{html.escape(n)}</td>" in page for n in rename.values())
    assert "Content-Security-Policy" in page
    fig = agreement_figure(json.loads((out / "report.json").read_text()))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["$\\x$", "$a$ $b$", "\\n", "line\\nbreak"]  # as typed; a newline shown as \\n
    assert text_overlaps(fig) == []


@pytest.mark.parametrize("fmt", ["trl", "grouped"])
def test_export_from_files(cli, files, fmt):
    args = [
        "-q",
        "feedback",
        "export",
        "--sets",
        files / "sets.jsonl",
        "--rankings",
        files / "rankings.jsonl",
    ]
    code, _, err = cli(*args, "--out", files / "all.jsonl", "--format", fmt)
    assert code == 0, err
    code, _, err = cli(*args, "--out", files / "clean.jsonl", "--format", fmt, "--exclude-flagged")
    assert code == 0, err
    all_rows = [json.loads(x) for x in (files / "all.jsonl").read_text().splitlines()]
    clean = [json.loads(x) for x in (files / "clean.jsonl").read_text().splitlines()]
    if fmt == "trl":
        assert {"prompt", "chosen", "rejected", "weight", "labellers", "source"} <= set(clean[0])
        assert any("zed" in r["labellers"] for r in all_rows) and not any(
            "zed" in r["labellers"] for r in clean
        )
        # without zed all three agree on c0 > c1: weight 1; with zed it is 3 of 4
        w = {(r["chosen_id"], r["rejected_id"]): r["weight"] for r in clean if r["prompt_id"] == "p0"}
        assert w[("p0c0", "p0c3")] == 1.0
    else:
        assert len(clean) == 8 and {"prompt", "completions", "pairs"} <= set(clean[0])


@pytest.mark.parametrize("method", ["bradley-terry", "majority", "tideman", "none"])
def test_a_set_all_marked_f_is_skipped_and_counted(cli, files, method):
    """A set whose every completion is F (by at least half its labellers) has nothing to compare: it is
    skipped with a count, the other sets are exported, and a file written earlier is replaced whole."""
    sets, rankings = _data()
    rankings += [Ranking(set_id="p7", labeller="amy", ranks={f"p7c{i}": "F" for i in range(4)})]
    rankings = [r for r in rankings if r.set_id != "p7" or r.labeller == "amy"]
    write_jsonl(files / "rankings.jsonl", rankings)
    out = files / "pairs.jsonl"
    args = ["feedback", "export", "--sets", files / "sets.jsonl", "--rankings", files / "rankings.jsonl"]
    code, stdout, err = cli(*args, "--out", out, "--consensus", method)
    assert code == 0, err
    assert "skipped 1 sets with no completion left after dropping F" in err and "Traceback" not in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["prompt_id"] for r in rows} == {f"p{s}" for s in range(7)}
    # only all-F sets: one clear line, exit 2, the file already written is kept as it was
    write_jsonl(files / "rankings.jsonl", [r for r in rankings if r.set_id == "p7"])
    before = out.read_bytes()
    code, _, err = cli(*args, "--out", out, "--consensus", method)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no preference pairs" in err, err
    assert out.read_bytes() == before


def test_export_keeps_f_as_loser_by_default_and_says_how_many(cli, files):
    sets, _ = _data(1)
    rankings = [Ranking(set_id="p0", labeller=n, ranks={"p0c0": 1, "p0c1": 2, "p0c2": "F", "p0c3": "F"})
                for n in ("amy", "bob")]  # fmt: skip
    write_jsonl(files / "rankings.jsonl", rankings)
    args = ["feedback", "export", "--sets", files / "sets.jsonl", "--rankings", files / "rankings.jsonl"]
    code, stdout, err = cli(*args, "--out", files / "on.jsonl")
    assert code == 0, err
    assert (
        "wrote 5 pairs (5 pairs from 1 sets, consensus majority; 4 with an F completion as the loser)"
        in stdout
    )
    code, stdout, err = cli(*args, "--out", files / "off.jsonl", "--no-keep-failed")
    assert code == 0, err
    assert "wrote 1 pairs (1 pairs from 1 sets, consensus majority)" in stdout
    assert len((files / "off.jsonl").read_text().splitlines()) == 1


def test_user_errors_are_one_line(cli, files):
    code, _, err = cli(
        "feedback", "export", "--rankings", files / "rankings.jsonl", "--out", files / "x.jsonl"
    )
    assert code == 2 and "--sets FILE is needed" in err and "Traceback" not in err
    code, _, err = cli("feedback", "report", "--out", files / "r")
    assert code == 2 and "no input" in err
    code, _, err = cli(
        "feedback",
        "export",
        "--sets",
        files / "sets.jsonl",
        "--rankings",
        files / "rankings.jsonl",
        "--out",
        files / "x.jsonl",
        "--exclude",
        "nobody",
    )
    assert code == 2 and "no labeller named 'nobody'" in err
    (files / "bad.jsonl").write_text('{"set_id": "p0", "labeller": "x", "ranks": {"a": 0}}\n')
    code, _, err = cli("feedback", "report", "--rankings", files / "bad.jsonl", "--out", files / "r")
    assert code == 2 and "bad.jsonl:1" in err and len(err.strip().splitlines()) == 1


def _hh(prompt_turns, reply):
    return prompt_turns + " " + reply


CONV = (
    "\n\nHuman: My house is too hot.\n\nAssistant: Sorry to hear that.\n\nHuman: What can I do?\n\nAssistant:"
)


def test_split_hh():
    p, c, r = split_hh(_hh(CONV, "Open a window."), _hh(CONV, "Nothing."))
    # the replies keep their leading space: prompt + chosen is the chosen transcript (TRL's convention)
    assert p == CONV and c == " Open a window." and r == " Nothing."
    assert p + c == _hh(CONV, "Open a window.")
    with pytest.raises(ValueError, match="do not share"):
        split_hh(_hh(CONV, "Open a window."), _hh(CONV.replace("too hot", "cold"), "Nothing."))
    with pytest.raises(ValueError, match="empty rejected reply"):
        split_hh(_hh(CONV, "Open a window."), CONV + " ")


def test_import_malformed_hh_line_counted_rest_imports(cli, tmp_path):
    lines = [
        {"chosen": _hh(CONV, "Open a window."), "rejected": _hh(CONV, "Nothing.")},
        {
            "chosen": _hh(CONV, "Use a fan."),
            "rejected": _hh("\n\nHuman: Hi.\n\nAssistant:", "Hello."),
        },  # no shared prefix
        {"chosen": _hh(CONV, "Drink water."), "rejected": CONV},  # empty reply
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "weight": 0.8},  # plain pair
    ]
    src = tmp_path / "hh.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    rows, problems = import_preferences(src)
    assert len(rows) == 2 and len(problems) == 3
    assert rows[0]["source"] == "hh-rlhf:hh.jsonl" and rows[1]["weight"] == 0.8
    assert rows[0]["chosen"] == " Open a window." and rows[1]["chosen"] == " Hi!"  # old plain pair: converted
    code, out, err = cli("feedback", "import", "--in", src, "--out", tmp_path / "pairs.jsonl")
    assert code == 0 and "imported 2 pairs" in out
    assert "skipped 3 bad lines of 5" in err
    assert "hh.jsonl:2: chosen and rejected do not share" in err and "hh.jsonl:3: empty rejected reply" in err
    assert "hh.jsonl:5: invalid JSON" in err and "Traceback" not in err
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 2
    code, _, err = cli("feedback", "import", "--in", src, "--out", tmp_path / "p2.jsonl", "--strict")
    assert code == 2 and "3 bad lines" in err
    (tmp_path / "allbad.jsonl").write_text(json.dumps(lines[2]) + "\n")
    code, _, err = cli(
        "feedback", "import", "--in", tmp_path / "allbad.jsonl", "--out", tmp_path / "p3.jsonl"
    )
    assert code == 2 and "no importable preference pairs" in err


def test_report_and_export_from_database(cli, db_url, tmp_path):
    from alignloop.feedback import store

    sets, rankings = _data(n_sets=6)
    store.create_project(db_url, "proj", per_set=4)
    store.import_sets(db_url, sets, "proj")
    ids = {name: store.invite(db_url, name, "proj")["id"] for name in ORDERS}
    want = {(r.set_id, r.labeller): r.ranks for r in rankings}
    for name, lid in ids.items():
        while (a := store.next_assignment(db_url, lid)) is not None:
            store.submit(
                db_url, lid, a["assignment_id"], f"sub-{name}-{a['set_id']}", ranks=want[(a["set_id"], name)]
            )
    code, _, err = cli("-q", "feedback", "report", "--db", db_url, "--out", tmp_path / "rep")
    assert code == 0, err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["n_rankings"] == 24 and [f["name"] for f in rep["flagged"]] == ["zed"]
    code, _, err = cli(
        "-q", "feedback", "export", "--db", db_url, "--out", tmp_path / "p.jsonl", "--exclude-flagged"
    )
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows and all(r["labellers"] == ["ann", "bob", "cyd"] for r in rows)
    store.close_store(db_url)


def test_import_hh_as_messages_splits_the_turns_and_keeps_the_format(cli, tmp_path):
    lines = [
        {"chosen": _hh(CONV, "Open a window."), "rejected": _hh(CONV, "Nothing.")},
        {"chosen": _hh(CONV, "Fan.\n\nHuman: ok"), "rejected": _hh(CONV, "No.")},  # ends on a Human turn
        {"chosen": _hh(CONV.replace("Sorry to hear that.", ""), "A."), "rejected": _hh(CONV, "B.")},
    ]
    src = tmp_path / "hh.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "chats.jsonl"
    code, stdout, err = cli("feedback", "import", "--in", src, "--out", out, "--messages")
    assert code == 0 and "imported 1 pairs" in stdout, err
    assert "hh.jsonl:2: the chosen reply goes on with another turn" in err
    assert "hh.jsonl:3: chosen and rejected do not share" in err
    row = json.loads(out.read_text())
    assert row["prompt"] == [
        {"role": "user", "content": "My house is too hot."},
        {"role": "assistant", "content": "Sorry to hear that."},
        {"role": "user", "content": "What can I do?"},
    ]
    assert (row["chosen"], row["rejected"]) == (
        [{"role": "assistant", "content": "Open a window."}],
        [{"role": "assistant", "content": "Nothing."}],
    )
    # the conversational pairs file imports again (as pairs) unchanged, and loads in `datasets`
    again = tmp_path / "again.jsonl"
    assert cli("feedback", "import", "--in", out, "--out", again)[0] == 0
    assert {k: v for k, v in json.loads(again.read_text()).items() if k != "source"} == {
        k: v for k, v in row.items() if k != "source"
    }
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out), split="train")
    assert ds[0]["prompt"] == row["prompt"] and ds[0]["chosen"] == row["chosen"]

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
            completions=[{"id": f"p{s}c{i}", "text": f"answer {i} to prompt {s}"} for i in range(4)],
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
    assert p == CONV and c == "Open a window." and r == "Nothing."
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

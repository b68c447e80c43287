"""Foundation: command line, configs, run folders, records."""

from __future__ import annotations

import json

import pytest
from pydantic import Field

from alignloop.cli import build_parser
from alignloop.config import Config, load_config
from alignloop.errors import UserError
from alignloop.records import JsonlAppender, Pair, Prompt, read, read_records, write_jsonl
from alignloop.runs import read_metrics_log, start_stage


class Inner(Config):
    beta: float = 0.05
    target: float | None = 6.0


class Outer(Config):
    learning_rate: float = 1e-5
    kl: Inner = Field(default_factory=Inner)


def test_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("alignloop ")
    code, out, _ = cli("--help")
    assert code == 0 and "alignloop demo" in out


def _subcommands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_help_shows_an_example(cli):
    found = list(_subcommands(build_parser()))
    assert len(found) >= 2
    for path, sub in found:
        has_children = any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions)
        code, out, _ = cli(*path, "--help")
        assert code == 0, path
        if not has_children:
            assert "example:" in out and "alignloop " in out.split("example:")[1], path


def test_override_and_nested_config():
    cfg = load_config(Outer, data={"learning_rate": 3e-5}, overrides=["kl.beta=0.1", "kl.target=null"])
    assert cfg.learning_rate == 3e-5 and cfg.kl.beta == 0.1 and cfg.kl.target is None


def test_unknown_key_names_nearest():
    with pytest.raises(UserError) as e:
        load_config(Outer, overrides=["kl.betta=0.1"])
    assert "unknown config key 'kl.betta'" in str(e.value) and "did you mean 'kl.beta'?" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(Outer, data={"learnig_rate": 1.0}, where="r.yaml")
    assert "in r.yaml" in str(e.value) and "'learning_rate'" in str(e.value)


def test_bad_value_is_one_line():
    with pytest.raises(UserError) as e:
        load_config(Outer, overrides=["learning_rate=fast"])
    msg = str(e.value)
    assert "'learning_rate'" in msg and "\n" not in msg


def test_cli_unknown_recipe_key_exits_2(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nstagez: [generate]\n")
    code, out, err = cli("run", str(recipe))
    assert code == 2
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and "unknown config key 'stagez'" in lines[0] and "did you mean 'stages'?" in lines[0]
    )


def test_cli_missing_file_exits_2(cli, tmp_path):
    code, _, err = cli("run", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert err.strip().count("\n") == 0 and "not found" in err and "nope.yaml" in err


def test_stage_resume_skips_second_time(tmp_path):
    data = tmp_path / "in.jsonl"
    write_jsonl(data, [Prompt(id="1", prompt="hi")])
    cfg = Outer()
    calls = []

    def stage(resume):
        run = start_stage(
            tmp_path / "stage", "demo", config=cfg, inputs={"data": data}, seed=1, resume=resume
        )
        if run.skipped:
            return run.metrics
        calls.append(1)
        run.log(0, loss=1.5)
        return run.finish({"score": 0.5})

    assert stage(resume=True) == {"score": 0.5}
    assert stage(resume=True) == {"score": 0.5}
    assert len(calls) == 1
    manifest = json.loads((tmp_path / "stage" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"]["data"]["sha256"]
    assert manifest["seed"] == 1 and "torch" in manifest["versions"] or "alignloop" in manifest["versions"]
    assert read_metrics_log(tmp_path / "stage")[0]["loss"] == 1.5
    # changed input -> runs again
    write_jsonl(data, [Prompt(id="1", prompt="hello")])
    stage(resume=True)
    assert len(calls) == 2


def test_records_validate_with_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "", "rejected": "b"})
        + "\n"
    )
    with pytest.raises(UserError) as e:
        read(p, Pair)
    assert f"{p}:2" in str(e.value) and "empty completion" in str(e.value)
    recs, problems = read_records(p, Pair, skip_bad=True)
    assert len(recs) == 1 and len(problems) == 1


def test_appender_survives_torn_line(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as w:
        w.write({"prompt_id": "a"})
    with open(p, "a") as f:
        f.write('{"prompt_id": "b", "compl')  # crash mid-write
    w = JsonlAppender(p)
    assert w.done_keys("prompt_id") == {"a"}
    w.write({"prompt_id": "c"})
    w.close()
    assert [json.loads(x)["prompt_id"] for x in p.read_text().splitlines()] == ["a", "c"]


def test_unchanged_since_sees_config_and_input_changes(tmp_path):
    from alignloop.runs import unchanged_since

    data = tmp_path / "in.jsonl"
    write_jsonl(data, [Prompt(id="1", prompt="hi")])
    assert unchanged_since(tmp_path / "stage", Outer()) is None
    start_stage(tmp_path / "stage", "x", config=Outer(), inputs={"data": data, "model": "hub/id"}).finish({})
    assert unchanged_since(tmp_path / "stage", Outer()) is True
    assert unchanged_since(tmp_path / "stage", Outer(learning_rate=1.0)) is False
    write_jsonl(data, [Prompt(id="1", prompt="changed")])
    assert unchanged_since(tmp_path / "stage", Outer()) is False

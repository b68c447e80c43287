"""Foundation: command line, configs, run folders, records."""

from __future__ import annotations

import json

import pytest
from pydantic import Field

from alignloop.cli import build_parser
from alignloop.config import Config, load_config
from alignloop.errors import UserError
from alignloop.loop import RECIPES, load_recipe
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


def test_set_into_a_section_keeps_the_sections_tuned_defaults():
    from alignloop.cai.pipeline import PPO_DEFAULTS, CAIConfig

    tuned = CAIConfig()
    cfg = load_config(CAIConfig, overrides=["ppo.steps=5", "reward.epochs=1", "revise.rounds=2"])
    assert cfg.ppo.steps == 5 and cfg.reward.epochs == 1 and cfg.revise.rounds == 2
    # everything else stays as tuned (was: PPO's generic adaptive KL and lr, hard reward labels)
    assert cfg.ppo.model_dump(exclude={"steps"}) == tuned.ppo.model_dump(exclude={"steps"})
    assert cfg.ppo.kl.beta == PPO_DEFAULTS["kl"]["beta"] and cfg.ppo.kl.adaptive is False
    assert cfg.reward.model_dump(exclude={"epochs"}) == tuned.reward.model_dump(exclude={"epochs"})
    assert cfg.reward.labels == "soft" and cfg.revise.samples == tuned.revise.samples
    # a file naming part of a section merges the same way
    assert load_config(CAIConfig, data={"ppo": {"kl": {"target": 3.0}}}).ppo.kl.beta == 0.3


def test_nested_set_that_misses_names_set_and_the_full_key():
    with pytest.raises(UserError) as e:
        load_recipe(RECIPES / "demo.yaml", ["ppo.kl.beta=0.05"])
    assert e.value.line() == (
        "unknown config key 'ppo.kl' in --set ppo.kl.beta=0.05: did you mean 'ppo.config.kl.beta'?"
    )
    with pytest.raises(UserError) as e:  # a bad value given by --set blames the --set, not the recipe
        load_recipe(RECIPES / "demo.yaml", ["ppo.config.steps=-1"])
    assert "in --set ppo.config.steps=-1" in e.value.line() and "demo.yaml" not in e.value.line()


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


def test_unchanged_since_rehashes_a_world_model_where_its_name_points_now(tmp_path):
    """A run folder copied from another checkout: its manifest names world:base at a path that is
    gone; the same world model here still counts as unchanged, a different one does not."""
    from alignloop.runs import unchanged_since

    start_stage(tmp_path / "stage", "x", config=Outer(), inputs={"model": "world:base"}).finish({})
    manifest = tmp_path / "stage" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["inputs"]["model"]["sha256"]
    m["inputs"]["model"]["path"] = str(tmp_path / "another-checkout" / "world" / "shipped" / "base")
    manifest.write_text(json.dumps(m))
    assert unchanged_since(tmp_path / "stage", Outer()) is True
    m["inputs"]["model"]["sha256"] = "0" * 64  # the world model it ran with was another one
    manifest.write_text(json.dumps(m))
    assert unchanged_since(tmp_path / "stage", Outer()) is False


def test_a_standalone_stage_writes_its_manifest_beside_its_output_file(cli, tmp_path):
    from alignloop.runs import sha256_path
    from alignloop.world import model_path

    prompts = tmp_path / "p.jsonl"
    assert cli("world", "prompts", "--split", "eval", "--n", "3", "--out", prompts)[0] == 0
    m = json.loads((tmp_path / "p.jsonl.manifest.json").read_text())
    assert m["stage"] == "world prompts" and m["status"] == "complete" and m["config"]["n"] == 3
    assert json.loads((tmp_path / "p.jsonl.metrics.json").read_text())["records"] == 3
    sets = tmp_path / "s.jsonl"
    code, _, err = cli("-q", "generate", "--model", "world:base", "--prompts", prompts, "--k", "2",
                       "--max-new-tokens", "4", "--out", sets)  # fmt: skip
    assert code == 0, err
    m = json.loads((tmp_path / "s.jsonl.manifest.json").read_text())
    # a world model gets its content hash, not sha256: null
    assert m["inputs"]["model"]["sha256"] == sha256_path(model_path("base"))
    assert m["inputs"]["prompts"]["sha256"] == sha256_path(prompts)


def test_a_recipe_run_summarises_every_stage_even_when_one_fails(tmp_path):
    from alignloop.loop import run_recipe

    good = tmp_path / "good.yaml"
    good.write_text("name: g\nstages: [prompts]\nprompts: {n_train: 2, n_eval: 2}\n")
    summary = run_recipe(good, out=tmp_path / "g")
    stages = json.loads((tmp_path / "g" / "summary.json").read_text())["stages"]
    assert stages == summary["stages"] and stages["prompts"]["status"] == "complete"
    assert stages["prompts"]["outputs"] == ["eval.jsonl", "metrics.json", "train.jsonl"]
    assert isinstance(stages["prompts"]["seconds"], float)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"name: b\nstages: [prompts]\nprompts: {{source: files, train: {tmp_path}/no.jsonl, eval: x}}\n"
    )
    with pytest.raises(UserError):
        run_recipe(bad, out=tmp_path / "b")
    stages = json.loads((tmp_path / "b" / "summary.json").read_text())["stages"]
    assert stages["prompts"]["status"] == "failed" and "no.jsonl" in stages["prompts"]["error"]

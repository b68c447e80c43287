"""``report_to``: PPO, DPO and a recipe run reach TensorBoard, W&B (offline), MLflow (local SQLite) and
trackio (local), read back with each tracker's own reader (readers.py): the step metrics equal
metrics.jsonl, the config and the lineage are attached, a recipe's stages are one group, the
evaluation table arrives, two processes make one tracker run, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import readers
from dist_data import good_bad_pairs, ranked_pairs, write_jsonl
from launch import run as launch_run
from launch import written_by

from alignloop.runs import read_metrics_log

ALL = "tensorboard,wandb,mlflow,trackio"
PROMPTS = ["the dog is", "what is the cat", "my house is", "how do you open the window"]


@pytest.fixture()
def audit(tmp_path) -> Path:
    return tmp_path / "audit"


def _alignloop(*args: object) -> subprocess.CompletedProcess:
    """``alignloop ARGS`` in a fresh process (trackio fixes its folder when it is imported)."""
    res = subprocess.run(
        [sys.executable, "-m", "alignloop", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _same(tracked: dict[int, float], logged: dict[int, float], rel: float = 0.0) -> bool:
    return set(tracked) >= set(logged) and all(
        tracked[s] == pytest.approx(v, rel=rel, abs=1e-12 if rel else 0) for s, v in logged.items()
    )


def check_every_tracker(out: Path, root: Path, run_name: str, group: str | None = None) -> dict:
    """Each tracker holds exactly this stage's run with metrics.jsonl's numbers, config and lineage."""
    manifest = json.loads((out / "manifest.json").read_text())
    logged = readers.step_metrics(read_metrics_log(out))
    assert logged and max(len(v) for v in logged.values()) >= 2

    scalars, texts = readers.tensorboard(out / "tensorboard")
    for k, by_step in logged.items():  # TensorBoard keeps scalars as float32
        assert _same(scalars[k], by_step, rel=1e-6), k
    shown = json.loads(texts["config"].strip("`\n"))
    assert shown["config"] == manifest["config"] and shown["lineage"] == manifest["inputs"]

    runs = [r for r in readers.wandb_runs(root) if r["name"] == run_name]
    assert len(runs) == 1, [r["name"] for r in readers.wandb_runs(root)]
    (w,) = runs
    assert w["job_type"] == manifest["stage"] and w["group"] == (group or "")
    for k, by_step in logged.items():
        assert _same({s: row[k] for s, row in w["history"].items() if k in row}, by_step), k
    assert w["config"]["config"] == manifest["config"] and w["config"]["lineage"] == manifest["inputs"]

    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    runs = [r for r in readers.mlflow_runs(uri) if r["name"] == run_name]
    assert len(runs) == 1
    (m,) = runs
    for k, by_step in logged.items():
        assert _same(m["history"][k], by_step), k
    assert m["config"]["config"] == manifest["config"] and m["config"]["lineage"] == manifest["inputs"]
    assert m["status"] == "FINISHED" and m["tags"].get("alignloop.group") == group
    assert (root / "mlartifacts").is_dir() and not (Path.cwd() / "mlruns").exists()  # nothing outside the run
    for key, value in manifest["config"].items():  # flat params, one per config key
        if not isinstance(value, dict):
            assert m["params"][f"config.{key}"] == (value if isinstance(value, str) else json.dumps(value))

    t = readers.trackio_runs(root / "trackio")
    assert run_name in t
    rows = [r for r in t[run_name]["logs"]]
    for k, by_step in logged.items():
        assert _same({r["step"]: r[k] for r in rows if k in r}, by_step), k
    cfg = t[run_name]["config"]
    assert cfg["config"] == manifest["config"] and cfg["lineage"] == manifest["inputs"]
    assert cfg.get("_Group") == group
    return {"wandb": w, "mlflow": m, "trackio": t[run_name], "tensorboard": (scalars, texts)}


@pytest.mark.slow
def test_dpo_on_two_processes_reports_once_to_every_tracker(tiny_gpt2, tmp_path, audit):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(48))
    out = tmp_path / "dpo"
    args = [
        "-q", "dpo", "--policy", str(tiny_gpt2), "--pairs", str(pairs), "--out", str(out), "--report-to", ALL,
        "--set", "max_steps=4", "--set", "batch_size=8", "--set", "learning_rate=1e-3",
    ]  # fmt: skip
    res = launch_run(args, 2, audit, launcher="torchrun")
    assert "Trackio" not in res.stdout  # tracker chatter never lands in the command's result
    got = check_every_tracker(out, out, "dpo")  # one run in each store, not one per process
    assert len(readers.wandb_runs(out)) == 1 and len(readers.trackio_runs(out / "trackio")) == 1
    final = json.loads((out / "metrics.json").read_text())
    assert got["wandb"]["summary"]["heldout/accuracy"] == final["heldout/accuracy"]
    assert got["mlflow"]["history"]["final/loss"][4] == final["loss"]
    assert written_by(audit, 1, out) == []  # the second process opened no tracker file in the run


@pytest.mark.slow
def test_ppo_reports_to_every_tracker(tiny_gpt2, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "ppo"
    res = _alignloop(
        "ppo", "--policy", tiny_gpt2, "--reward", "world:gold", "--prompts", prompts, "--out", out, "--lora",
        "--report-to", ALL, "--set", "steps=3", "--set", "batch_size=4", "--set", "minibatch_size=2",
        "--set", "sampling.max_new_tokens=6",
    )  # fmt: skip
    json.loads(res.stdout.strip().splitlines()[-1])  # stdout is still just the metrics
    got = check_every_tracker(out, out, "ppo")
    reward = json.loads((out / "manifest.json").read_text())["inputs"]["reward"]
    assert reward["id"] == "world:gold" and got["mlflow"]["config"]["lineage"]["reward"] == reward


@pytest.mark.slow
def test_recipe_groups_its_stages_and_sends_the_evaluation_table(tiny_gpt2, tmp_path):

    data = write_jsonl(tmp_path / "pairs.jsonl", ranked_pairs(8))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: tracked\npolicy: {tiny_gpt2}\nreport_to: [{ALL}]\n"
        "stages: [prompts, export, reward, dpo, evaluate]\n"
        f"prompts: {{source: files, train: {prompts}, eval: {prompts}}}\n"
        f"export: {{import_pairs: {data}}}\n"
        "reward: {train: {epochs: 2, batch_prompts: 4}}\n"
        "dpo: {lora: false, config: {max_steps: 3, batch_size: 8}}\n"
        "evaluate: {samples_per_prompt: 1, n_boot: 20, max_new_tokens: 4, toxicity: null, gold: false}\n"
    )
    out = tmp_path / "seed-1"
    _alignloop("-q", "run", recipe, "--out", out)
    got = check_every_tracker(out / "dpo", out, "seed-1/dpo", group="seed-1")
    reward = check_every_tracker(out / "reward", out, "seed-1/reward", group="seed-1")
    pairs_used = str((out / "export" / "pairs.jsonl").resolve())
    assert got["wandb"]["config"]["lineage"]["pairs"]["path"] == pairs_used  # which labels
    assert reward["mlflow"]["config"]["lineage"]["pairs"]["path"] == pairs_used
    names = {r["name"] for r in readers.wandb_runs(out)}
    assert names == {f"seed-1/{s}" for s in ("prompts", "export", "reward", "dpo", "evaluate")}

    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    policies = list(evaluation["policies"])
    assert policies == ["base", "dpo"]
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    (m,) = [r for r in readers.mlflow_runs(uri) if r["name"] == "seed-1/evaluate"]
    table = json.loads(Path(m["client"].download_artifacts(m["id"], "evaluation.json")).read_text())
    assert [row[0] for row in table["data"]] == policies
    metric = evaluation["metric_names"][0]
    col = table["columns"].index(metric)
    assert table["data"][1][col] == pytest.approx(
        evaluation["policies"]["dpo"]["metrics"][metric]["mean"], rel=1e-8
    )
    (w,) = [r for r in readers.wandb_runs(out) if r["name"] == "seed-1/evaluate"]
    row = next(r for r in w["history"].values() if "evaluation/path" in r)
    wtable = json.loads((w["file"].parent / "files" / row["evaluation/path"]).read_text())
    assert [r[0] for r in wtable["data"]] == policies and wtable["columns"] == table["columns"]
    t = readers.trackio_runs(out / "trackio")["seed-1/evaluate"]
    (logged,) = [r["evaluation"] for r in t["logs"] if "evaluation" in r]
    assert [r["policy"] for r in logged["_value"]] == policies
    _, texts = readers.tensorboard(out / "evaluate" / "tensorboard")
    assert all(f"| {p} |" in texts["evaluation"] for p in policies)


def test_bad_tracker_names_and_missing_packages_are_one_line(cli, tiny_gpt2, tmp_path, monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good_bad_pairs(8))
    base = ["dpo", "--policy", tiny_gpt2, "--pairs", pairs, "--out", tmp_path / "o"]
    code, _, err = cli(*base, "--report-to", "tensorbord,wandb")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'tensorbord'" in err and "none or any of tensorboard, wandb, mlflow, trackio" in err
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    code, _, err = cli(*base, "--report-to", "wandb")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "alignloop[trackers]" in err
    assert not (tmp_path / "o").exists()  # refused before anything ran
    recipe = tmp_path / "r.yaml"
    recipe.write_text("report_to: [mlflow, neptune]\n")
    code, _, err = cli("run", recipe, "--out", tmp_path / "r")
    assert code == 2 and "'neptune'" in err and "report_to" in err and len(err.strip().splitlines()) == 1


def test_a_tracker_that_cannot_start_leaves_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """MLflow pointed at a store it cannot open: one line, and metrics.jsonl still gets every step."""
    from alignloop import tracking
    from alignloop.runs import start_stage

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where MLflow wants a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/sub/mlflow.db")
    tracking.configure("mlflow,tensorboard")
    try:
        run = start_stage(tmp_path / "s", "unit", config={"lr": 0.1})
        for step in (1, 2):
            run.log(step, loss=1.0 / step)
        run.finish({"loss": 0.5})
    finally:
        tracking.reset()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "tracker" in x]
    assert len(lines) == 1 and "mlflow could not start" in lines[0] and "metrics.jsonl" in lines[0]
    assert [r["loss"] for r in read_metrics_log(tmp_path / "s")] == [1.0, 0.5]
    scalars, _ = readers.tensorboard(tmp_path / "s" / "tensorboard")  # the other tracker went on
    assert scalars["loss"] == {1: 1.0, 2: 0.5}


def test_report_to_parsing():
    from alignloop.errors import UserError
    from alignloop.tracking import numeric, parse_report_to

    assert parse_report_to("none") == () and parse_report_to([]) == ()
    assert parse_report_to("wandb, mlflow,wandb") == ("wandb", "mlflow")
    assert parse_report_to(["TensorBoard", "trackio"]) == ("tensorboard", "trackio")
    with pytest.raises(UserError, match="unknown tracker 'comet'"):
        parse_report_to(["comet"])
    assert numeric({"a": 1, "b": {"c": 2.5, "d": "x"}, "e": None, "f": [1]}) == {"a": 1.0, "b/c": 2.5}

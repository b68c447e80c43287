"""Issue 28: per labeller, how far their choices sit from the pooled reward model.

On the world: the default panel plus the terse labeller rank completion sets drawn from the world's
response mixture. The pooled model is the gold judge (a model that learned the instructions'
intent; F texts score -1); the terse labeller's own output is the gold view of its taste.
"""

from __future__ import annotations

import json
import random

from reward_world import world_sets

from alignloop.preference.agreement import ReadingRule, model_agreement, read_agreement
from alignloop.preference.report import feedback_report, report_html
from alignloop.records import Ranking, write_jsonl
from alignloop.world import labellers as wl


def _labelled(seed: int = 0, n: int = 60):
    sets = world_sets("train", n, k=4, seed=seed)
    rng = random.Random(seed)
    panel = wl.panel(seed, ["terse"])
    rankings = [
        Ranking(set_id=s.set_id, labeller=p.name, ranks=wl.rank(p, s.prompt, [c.model_dump() for c in s.completions], rng))
        for s in sets
        for p in panel
    ]  # fmt: skip
    kind = {p.name: p.kind for p in panel}

    def view(taste: str) -> dict:
        return {
            (s.set_id, c.id): wl.taste_score(taste, s.prompt, c.text) for s in sets for c in s.completions
        }

    return sets, rankings, kind, view


def test_terse_sits_apart_but_consistent_confused_disagrees_with_everything():
    sets, rankings, kind, view = _labelled()
    gold = view("gold")
    by_kind = {kind[n]: n for n in kind}
    rows = model_agreement(rankings, gold, own={by_kind["terse"]: view("terse"), by_kind["careful"]: gold})
    r = {k: rows[by_kind[k]] for k in kind.values()}
    assert all(x["pairs"] >= 150 for x in r.values()), r
    # the confused labeller disagrees with the model where it is sure, and with the others
    assert r["confused"]["model_clear"] < 0.5 and r["confused"]["consensus"] < 0.6, r
    for k in ("careful", "noisy", "terse"):
        assert r[k]["model_clear"] > 0.9 and r[k]["consensus"] > 0.65, (k, r)
    # the terse one is self-consistent: its own taste orders its pairs better than the pooled model
    assert r["terse"]["own"] - r["terse"]["model"] >= 0.03, r
    assert r["careful"]["own"] == r["careful"]["model"]  # own = pooled: nothing apart
    reading = read_agreement(rows)
    assert "misread" in reading[by_kind["confused"]]
    assert reading[by_kind["terse"]].startswith("a different taste")
    assert reading[by_kind["careful"]] == reading[by_kind["noisy"]] == "in line with the pooled model"
    # the rule can fail: a stricter taste gap reads the terse labeller as in line
    assert read_agreement(rows, ReadingRule(gap=0.2))[by_kind["terse"]] == "in line with the pooled model"
    assert read_agreement(rows, ReadingRule(min_pairs=10_000))[by_kind["terse"]].startswith("too few")


def test_report_and_cli_with_a_reward(tmp_path, cli):
    sets, rankings, kind, view = _labelled(seed=1, n=30)
    rep = feedback_report(sets, rankings, scores=view("gold"), reward="world:gold")
    confused = next(n for n, k in kind.items() if k == "confused")
    row = next(x for x in rep["labellers"] if x["name"] == confused)
    assert "misread" in row["vs_model"]["reading"] and rep["reward"] == "world:gold"
    assert (
        'id="vs-model"' in report_html(rep, png=b"")
        and "vs_model" not in feedback_report(sets, rankings)["labellers"][0]
    )

    s, rk = write_jsonl(tmp_path / "sets.jsonl", sets), write_jsonl(tmp_path / "rankings.jsonl", rankings)
    assert s and rk
    args = [
        "feedback",
        "report",
        "--sets",
        str(tmp_path / "sets.jsonl"),
        "--rankings",
        str(tmp_path / "rankings.jsonl"),
    ]
    code, out, _ = cli(*args, "--out", str(tmp_path / "rep"), "--reward", "world:gold")
    assert code == 0 and f"{confused}: tau-b" in out and "may have misread the instructions" in out, out
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["labellers"] == json.loads(json.dumps(rep["labellers"]))
    code, _, err = cli(*args, "--out", str(tmp_path / "bad"), "--reward", "world:nothing-such")
    assert code == 2 and err.count("error:") == 1 and not (tmp_path / "bad").exists(), err
    code, _, err = cli("feedback", "report", "--rankings", str(tmp_path / "rankings.jsonl"), "--out", str(tmp_path / "b2"), "--reward", "world:gold")  # fmt: skip
    assert code == 2 and "--sets" in err and not (tmp_path / "b2").exists()


def test_the_runs_export_report_places_labellers_against_the_current_reward_model(tmp_path):
    from alignloop.loop import RECIPES, load_recipe, stage_export

    sets, rankings, kind, _ = _labelled(seed=2, n=20)
    label = {"sets": tmp_path / "sets.jsonl", "rankings": tmp_path / "rankings.jsonl"}
    write_jsonl(label["sets"], sets)
    write_jsonl(label["rankings"], rankings)
    recipe = load_recipe(RECIPES / "demo.yaml", [])
    stage_export(recipe, label, tmp_path / "export", False, "world:gold")
    rep = json.loads((tmp_path / "export" / "feedback" / "report.json").read_text())
    assert rep["reward"] == "world:gold" and all("reading" in r["vs_model"] for r in rep["labellers"])
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert "reward_model" in manifest["inputs"]
    stage_export(recipe, label, tmp_path / "plain", False)  # round 1 without a reward model: as before
    rep = json.loads((tmp_path / "plain" / "feedback" / "report.json").read_text())
    assert "reward" not in rep and all("vs_model" not in r for r in rep["labellers"])

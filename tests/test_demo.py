"""`alignloop demo`: the whole loop on the embedded world (issue 12's acceptance)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from alignloop.runs import read_metrics_log

pytestmark = pytest.mark.slow

WORLD = (
    Path(__file__).resolve().parents[1] / "src" / "alignloop" / "world" / "shipped" / "base" / "config.json"
)
needs_world = pytest.mark.skipif(
    not WORLD.is_file() and not os.environ.get("CI"), reason="the world's models are not built"
)

# a demo small enough for a browser test: a few sets, one labeller per set, a couple of PPO steps
SMALL = [
    "prompts.n_train=3", "prompts.n_eval=4", "generate.k=3", "generate.sampling.max_new_tokens=12",
    "generate.distinct=8",  # three distinct texts a set (repeats are collapsed at import: ranks 1, 2, F need 3)
    "label.per_set=1", "label.invite=[ada]", "label.poll_seconds=0.3", "reward.train.epochs=1",
    "ppo.config.steps=2", "ppo.config.batch_size=4", "ppo.config.minibatch_size=2", "ppo.variants={}",
    "dpo.config.max_steps=2", "dpo.config.batch_size=2", "evaluate.samples_per_prompt=1",
    "evaluate.n_boot=50", "evaluate.max_new_tokens=12",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alignloop", "demo", "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


@needs_world
@pytest.mark.browser
def test_demo_human_labels_in_the_browser_then_continues_to_a_report(tmp_path, browser):
    port = _free_port()
    proc = _demo(tmp_path / "run", "--human", f"--set=label.port={port}", *(f"--set={s}" for s in SMALL))
    try:
        link = None
        lines: list[str] = []
        deadline = time.time() + 300
        while link is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"login link for ada: (\S+)", line)
            link = m.group(1) if m else None
        assert link, "no login link printed:\n" + "".join(lines[-20:])
        page = browser.new_page()
        for _ in range(50):  # the app starts right after the links are printed
            try:
                page.goto(link)
                break
            except Exception:
                time.sleep(0.2)
        page.click("#login")  # the link asks first; a same-origin POST logs in
        page.wait_for_url(lambda url: "/login" not in url)
        page.click("#acknowledge")  # acknowledging reserves the first set
        page.wait_for_url("**/label")
        labelled = 0
        while page.locator("#all-done").count() == 0:
            page.locator("li.card").first.wait_for()
            page.locator("li.card").first.click()
            for key in ("1", "2", "f", "Enter"):  # best, second, the third is nonsense
                page.keyboard.press(key)
            labelled += 1
            # the app's CSP forbids eval, so no wait_for_function: a locator assertion instead
            expect(page.locator("#progress")).to_have_text(re.compile(f"^Done {labelled}"))
        page.close()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert labelled == 3
    rankings = [
        json.loads(x) for x in (tmp_path / "run" / "label" / "rankings.jsonl").read_text().splitlines()
    ]
    assert len(rankings) == 3 and all(r["labeller"] == "ada" for r in rankings)
    assert all(sorted(map(str, r["ranks"].values())) == ["1", "2", "F"] for r in rankings)
    assert (tmp_path / "run" / "evaluate" / "report.html").is_file()
    assert "report:" in out


def _stage_started(run: Path, stage: str) -> str | None:
    m = run / stage / "manifest.json"
    return json.loads(m.read_text()).get("start_time") if m.is_file() else None


@needs_world
def test_demo_killed_midway_resumes_without_redoing_stages_and_shows_the_loop_working(tmp_path):
    """The acceptance run: killed after the reward model is trained, resumed, then the table."""
    run = tmp_path / "run"
    proc = _demo(run)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and not (run / "reward" / "metrics.json").is_file():
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read()[-3000:])
            time.sleep(1)
        assert (run / "reward" / "metrics.json").is_file(), "the reward stage did not finish in time"
        time.sleep(5)  # now inside PPO
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {s: _stage_started(run, s) for s in ("prompts", "generate", "label", "export", "reward")}
    assert all(done.values())

    t0 = time.time()
    proc = _demo(run, "--resume")
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:]
    for stage, started in done.items():  # finished stages were skipped, not redone
        assert _stage_started(run, stage) == started, stage
        assert "skipped (--resume)" in out
    print(f"resumed demo took {time.time() - t0:.0f} s\n{out[-1500:]}")

    evaluation = json.loads((run / "evaluate" / "evaluation.json").read_text())
    m = {name: {k: v["mean"] for k, v in p["metrics"].items()} for name, p in evaluation["policies"].items()}
    base = m["base"]
    for name in ("ppo", "dpo"):
        assert m[name]["gold_score"] > base["gold_score"], (name, m[name], base)
        assert m[name]["toxicity"] < base["toxicity"], name
        for flag in ("rate_toxic", "rate_harmful_compliance", "rate_myth_confirmed"):
            assert m[name][flag] <= base[flag], (name, flag)
    # DPO (IPO on the same exported pairs) gets most of PPO's gold gain at a fraction of its KL.
    # Issue 10's ">= 80% of PPO's" is measured in tests/dpo/world_acceptance.py (82-97% over the runs
    # in docs/dpo.md, too close to 80% for a single demo to assert); half is far inside every run.
    gain = {name: m[name]["gold_score"] - base["gold_score"] for name in ("ppo", "dpo")}
    assert gain["dpo"] >= 0.5 * gain["ppo"], gain
    assert m["dpo"]["kl_per_token"] < m["ppo"]["kl_per_token"]
    assert m["dpo"]["f_rate"] <= base["f_rate"] + 0.02  # IPO stays fluent (sigmoid DPO x3 epochs: F 44%)
    export = json.loads((run / "export" / "metrics.json").read_text())
    from alignloop.world import default_panel

    confused = [f"sim-{p.name}" for p in default_panel(0) if p.kind == "confused"]
    assert export["flagged"] == confused  # the confused labeller, and only them
    assert f"flagged labellers: {confused[0]}" in out
    assert re.search(r"ppo-beta0: reward hacking flagged", out)
    assert "report:" in out and (run / "evaluate" / "report.html").is_file()
    # issue 27: the report puts over-optimisation and the runs' reward-hacking warnings in front of the reader
    page = (run / "evaluate" / "report.html").read_text()
    over = page[page.index("<h2>Over-optimization</h2>") :]
    over = over[: over.index("<h2>", 1)]
    assert '<img alt="proxy and gold score against sqrt(KL)" src="data:image/png;base64,' in over
    for name in ("ppo", "ppo-beta0"):  # PPO's snapshots (snapshot_every: 10): the step where gold peaks
        assert re.search(rf"<li>{name}: gold peaks at sqrt\(KL\) = [0-9.]+ \(step \d+\), gold ", over), name
    curves = evaluation["overoptimization"]["series"]
    assert [p["step"] for p in curves["ppo"]] == list(range(0, 61, 10))  # the base, then a snapshot every 10
    warnings = page[page.index('<section id="warnings">') :]
    warnings = warnings[: warnings.index("</section>")]
    assert "<td>ppo-beta0</td>" in warnings  # the beta = 0 run's warnings, counted, first and last step

    # TensorBoard is in the default install (CI installs by the README's set-up) and on by default
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("reward", "ppo", "dpo"):
        acc = EventAccumulator(str(run / stage / "tensorboard"))
        acc.Reload()
        steps = {r["step"] for r in read_metrics_log(run / stage)}
        assert {e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)} >= steps, stage


@needs_world
def test_ai_labelled_loop_trains_the_reward_model_on_soft_pairs(tmp_path):
    """RLAIF through the loop: the world's AI judge labels under the default constitution."""
    from alignloop.loop import RECIPES, run_recipe

    out = tmp_path / "run"
    run_recipe(
        RECIPES / "demo.yaml", out=out,
        overrides=[*SMALL, "label.mode=ai", "label.swap=true", "stages=[prompts, generate, label, export, reward]"],
    )  # fmt: skip
    label = json.loads((out / "label" / "metrics.json").read_text())  # both orders asked: the bias measured
    assert label["ai_pairs"] == 9 and -50 <= label["position_bias_points"] <= 50
    pairs = [json.loads(x) for x in (out / "export" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 * 3  # 3 sets of k=3: every two completions, soft-labelled
    assert all(p["labellers"] == ["ai-judge"] and 0.0 <= p["weight"] <= 1.0 for p in pairs)
    assert len({p["weight"] for p in pairs}) > 1  # soft labels, not all hard
    manifest = json.loads((out / "reward" / "manifest.json").read_text())
    assert manifest["config"]["labels"] == "soft"
    # the world base's judge is the world's AI judge (it reads the prompt), recorded as the stage's input
    assert json.loads((out / "label" / "manifest.json").read_text())["inputs"]["judge"]["id"] == "world:judge"


@needs_world
def test_rounds_continue_feedback_from_the_current_policy(tmp_path):
    """`rounds: 2`: generate -> label -> export -> reward -> ppo twice, the second from round 1's policy."""
    from alignloop.loop import RECIPES, run_recipe

    out = tmp_path / "run"
    summary = run_recipe(
        RECIPES / "demo.yaml", out=out,
        overrides=[
            *SMALL, "rounds=2", "stages=[prompts, generate, label, export, reward, ppo]", "prompts.n_train=12",
            "generate.k=4", "label.per_set=3",
        ],
    )  # fmt: skip
    g1 = json.loads((out / "round-1" / "generate" / "manifest.json").read_text())
    g2 = json.loads((out / "round-2" / "generate" / "manifest.json").read_text())
    assert g1["inputs"]["policy"]["id"] == "world:base"
    assert g2["inputs"]["policy"]["path"] == str((out / "round-1" / "ppo" / "model").resolve())
    assert (out / "round-2" / "reward" / "metrics.json").is_file()
    assert set(summary["policies"]) == {"base", "ppo-r1", "ppo-r2"}
    # round 2's reward model learns from both rounds' labels (reward.all_rounds, the default), round 1's from its own
    r1 = json.loads((out / "round-1" / "reward" / "manifest.json").read_text())["inputs"]
    r2 = json.loads((out / "round-2" / "reward" / "manifest.json").read_text())["inputs"]
    exported = [
        json.loads((out / f"round-{r}" / "export" / "metrics.json").read_text())["pairs"] for r in (1, 2)
    ]
    assert [k for k in r1 if k.startswith("pairs")] == ["pairs"]
    assert [r2["pairs"]["path"], r2["pairs1"]["path"]] == [
        str((out / f"round-{r}" / "export" / "pairs.jsonl").resolve()) for r in (1, 2)
    ]
    # round 2's PPO continues round 1's adapter with the base model as its KL reference (kl.reference: base)
    k1, k2 = (
        json.loads((out / f"round-{r}" / "ppo" / "manifest.json").read_text())["config"]["kl"] for r in (1, 2)
    )
    assert (k1["reference"], k2["reference"]) == ("start", "base")
    m2 = json.loads((out / "round-2" / "reward" / "metrics.json").read_text())
    assert m2["train_pairs"] + m2["eval_pairs"] == sum(exported) - sum(m2["skipped"].values()), (m2, exported)

"""Every command example in README.md, docs/*.md and the ``--help`` texts runs (issue 22).

The examples are read from the files themselves, so a changed doc is a tested doc. The
convention (also in docs/index.md, "Examples are tested"):

- An example is a command line (``alignloop ...``, ``.venv/bin/alignloop ...``,
  ``accelerate launch ...``, ``torchrun ...``, ``bash ...``) in a fenced block whose first line is
  a command (blocks of output, YAML, JSON and Python are not commands), or a line after
  ``example:`` in a ``--help`` text. A trailing backslash continues a line; ``# ...`` is a comment.
- They run in order, file by file, in one shared folder (a command written twice runs once), where the test first writes small
  inputs (prompts.jsonl, eval.jsonl, p.jsonl, redteam.jsonl with 4 prompts) and runs a shortened
  demo into runs/demo, from which pairs.jsonl, sets.jsonl, rankings.jsonl, ... are copied.
- Placeholders: ``M`` is world:base, ``P`` is prompts.jsonl.
- Shortened steps: the test appends the options in SHORTEN for the command (``--set steps=1``,
  ``--n 4``, ...; for an option given twice the last wins), so each trains a step or two.
- Skipped with a reason, counted and printed, never dropped silently: elided commands (``...``),
  hub ids (no network here), servers (``label serve`` is stood in for by ``label simulate`` so the
  loop after it can run), several GPUs or machines, shell scripts, and full world rebuilds.
- Examples found broken and not yet fixed are in KNOWN_BROKEN with the reason: still run, and
  the test fails once one of them runs (so the list only shrinks).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("alignloop ", ".venv/bin/alignloop ", "accelerate launch ", "torchrun ", "bash ", "python ")
PLACEHOLDERS = {"M": "world:base", "P": "prompts.jsonl"}
MODEL_FLAGS = ("--model", "--policy", "--reward", "--judge", "--prompts", "--in", "--data", "--pairs")

# the demo, shortened (also the recipe runs)
DEMO_SHORT = [
    "prompts.n_train=8", "prompts.n_eval=4", "generate.k=3", "generate.sampling.max_new_tokens=12",
    "reward.train.epochs=1", "ppo.config.steps=2", "ppo.config.batch_size=4", "ppo.config.minibatch_size=2",
    "ppo.config.snapshot_every=1", "dpo.config.max_steps=2", "dpo.config.batch_size=2",
    "evaluate.samples_per_prompt=1", "evaluate.n_boot=50", "evaluate.max_new_tokens=12",
    # demo --compare's other methods (the plain demo ignores these sections)
    "grpo.config.steps=1", "grpo.config.batch_size=4", "grpo.config.minibatch_size=2",
    "grpo.config.sampling.max_new_tokens=8",
    "online_dpo.config.steps=1", "online_dpo.config.batch_size=4", "online_dpo.config.minibatch_size=2",
    "online_dpo.config.sampling.max_new_tokens=8",
    "ilql.config.max_steps=2", "ilql.config.batch_size=4",
]  # fmt: skip
RL_SHORT = ["steps=1", "batch_size=4", "minibatch_size=2", "sampling.max_new_tokens=8", "snapshot_every=1"]
SETS = lambda keys: [a for k in keys for a in ("--set", k)]  # noqa: E731
SHORTEN: dict[str, list[str]] = {
    "demo": SETS(DEMO_SHORT),
    "run": SETS(DEMO_SHORT),
    "world prompts": ["--n", "4"],
    "world check": ["--quick"],
    "ppo": SETS(RL_SHORT),
    "grpo": SETS(RL_SHORT),
    "rloo": SETS(RL_SHORT),
    "dpo": SETS(["max_steps=1", "batch_size=2"]),
    "ilql": SETS(["max_steps=1", "batch_size=4"]),
    "sft": SETS(["max_steps=1", "batch_size=4"]),
    "reward train": SETS(["epochs=1"]),
    "cai revise": ["--samples", "1", "--rounds", "1"],
    "cai run": SETS(
        [
            "revise.samples=1",
            "revise.rounds=1",
            "sft.max_steps=1",
            "reward.epochs=1",
            "ppo.steps=1",
            "ppo.batch_size=4",
            "ppo.minibatch_size=2",
            "pairs_samples=1",
            "eval_samples=1",
            "redteam_prompts=redteam.jsonl",
            "rl_prompts=redteam.jsonl",
            "eval_prompts=redteam.jsonl",
        ]
    ),  # fmt: skip
    "evaluate": ["--samples", "1"],
    "dpo --online": SETS(["steps=1"]),
}
# found by this test, not yet fixed: run, and expected to fail (strict: one that passes must leave)
KNOWN_BROKEN = {
    "alignloop label invite --db sqlite:///labels.db ada --url https://labels.example.org":
        "labelling.md invites ada twice on one page (the second needs --new-link)",
    "alignloop label release --db sqlite:///labels.db --set p17": "p17 is not a set of the examples' store",
}  # fmt: skip
SERVERS = {"label serve": "label simulate", "reward serve": None, "serve": None}
BASE_URL_OK = ("label invite", "label admin")  # these take the app's address, they do not call it


@dataclass
class Example:
    source: str  # file:line or "alignloop X --help"
    text: str  # the command as written


def _commands(lines: list[str], source: str, first_line: int) -> list[Example]:
    out: list[Example] = []
    buf, start = "", 0
    for i, line in enumerate(lines):
        s = line.strip()
        if not buf:
            if not s.startswith(STARTS):
                continue
            start = i
        buf += (" " if buf else "") + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            out.append(Example(f"{source}:{first_line + start}", buf))
            buf = ""
    return out


def doc_examples() -> list[Example]:
    """Command examples in fenced blocks of README.md and docs/*.md, in order."""
    found: list[Example] = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("```")), len(lines))
                body = lines[i + 1 : j]
                first = next((b.strip() for b in body if b.strip()), "")
                if lines[i].strip("`").strip() in ("", "bash", "sh", "console") and first.startswith(STARTS):
                    found += _commands(body, str(path.relative_to(ROOT)), i + 2)
                i = j + 1
            else:
                i += 1
    return found


def help_examples() -> list[Example]:
    """The examples at the end of every command's ``--help``."""
    import argparse

    from alignloop.cli import build_parser

    found: list[Example] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if sub.epilog and "example:" in sub.epilog:
                        text = sub.epilog.split("example:", 1)[1].splitlines()
                        found.extend(_commands(text, f"alignloop {' '.join([*path, name])} --help", 1))
                    walk(sub, [*path, name])

    walk(build_parser(), [])
    return found


def _argv(text: str) -> list[str]:
    return shlex.split(text, comments=True)


GROUPS = ("world", "label", "feedback", "reward", "cai")


def _command_name(argv: list[str]) -> str:
    """``alignloop -q world prompts --n 4`` -> ``world prompts``; ``alignloop ppo ...`` -> ``ppo``."""
    words = [a for a in argv[1:] if not a.startswith("-")][:2]
    return " ".join(words) if words and words[0] in GROUPS else (words or [""])[0]


def _looks_like_hub(value: str) -> bool:
    value = value.split("=", 1)[1] if re.match(r"^[\w-]+=", value) else value
    if value.startswith(("world:", "http", "runs/", "/", "./", "sqlite")) or value.endswith("/"):
        return False
    if Path(value).suffix in (".jsonl", ".json", ".csv", ".parquet", ".db", ".py") or value in PLACEHOLDERS:
        return False
    return bool(re.match(r"^[A-Za-z][\w.-]*(/[\w.-]+)?(:\w+)?$", value))


def skip_reason(ex: Example) -> str | None:
    """Why this example cannot run here (None: it runs)."""
    text = ex.text
    if "..." in text:
        return "elided (...)"
    argv = _argv(text)
    if argv[0] == "bash":
        return "a shell script (setup / the whole test suite)"
    if argv[0] in ("accelerate", "torchrun"):
        many = re.search(r"--(num_processes|nproc_per_node) (\d+)", text)
        if "--nnodes" in text or "--num_machines" in text or (many and int(many.group(2)) > 2):
            return "several GPUs or machines"
        return None
    name = _command_name(argv)
    if name in SERVERS:
        return "starts a server" + (
            f" (stood in for by `alignloop {SERVERS[name]}`)" if SERVERS[name] else ""
        )
    for flag, value in zip(argv, argv[1:], strict=False):
        if (value.startswith("http") or "=http" in value) and name not in BASE_URL_OK:
            return "needs a running server"
        if flag in MODEL_FLAGS and _looks_like_hub(value):
            return f"needs the hub ({value})"
        if flag == "--prompts" and "/" in value and not value.endswith(".jsonl"):
            return f"needs the hub ({value})"
    if "$" in text:
        return "needs a value from the user's environment ($...)"
    if name == "world build" or (name == "world check" and "--models" in argv):
        return "rebuilds the world's models (minutes; tests/world covers it)"
    if name == "run" and "demo" not in text:
        return "a recipe on hub models"
    # whole demos already run, with assertions, by another test (CI time: each is a shortened demo or more)
    if name == "demo" and "--seeds" in argv:
        return "covered by tests/test_reproducible.py (demo --seeds 2, each seed's files compared)"
    if name == "run" and "--report-to" in argv:
        return "covered by tests/tracking (a recipe run reporting to every tracker, read back)"
    return None


def prepare(ws: Path) -> None:
    """The small inputs the examples name, and a shortened demo in runs/demo."""
    from alignloop.world import prompts as world_prompts

    for name, split in (("prompts", "train"), ("eval", "eval"), ("p", "train"), ("redteam", "redteam")):
        rows = world_prompts(split, n=4, seed=0)
        (ws / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for link in ("recipes", "configs"):
        (ws / link).symlink_to(ROOT / link)
    _run(["alignloop", "-q", "demo", "--out", "runs/demo", *SHORTEN["demo"]], ws)
    demo = ws / "runs" / "demo"
    shutil.copy(demo / "export" / "pairs.jsonl", ws / "pairs.jsonl")
    shutil.copy(demo / "export" / "pairs.jsonl", ws / "eval_pairs.jsonl")
    shutil.copy(demo / "label" / "sets.jsonl", ws / "sets.jsonl")
    shutil.copy(demo / "label" / "rankings.jsonl", ws / "rankings.jsonl")
    pairs = [json.loads(x) for x in (ws / "pairs.jsonl").read_text().splitlines()]
    sft = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    (ws / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    hh = [
        {"chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant:{p['chosen']}",
         "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant:{p['rejected']}"}
        for p in pairs
    ]  # fmt: skip
    (ws / "hh-rlhf-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    (ws / "tone.md").write_text("Rank by tone: the politest answer first.\n")


def _run(argv: list[str], ws: Path) -> tuple[int, str]:
    """An ``alignloop`` command in this process (one import of torch for all), the rest as a process."""
    if argv[0] in ("alignloop", ".venv/bin/alignloop"):
        from alignloop.cli import main

        out = io.StringIO()
        old = Path.cwd()
        os.chdir(ws)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = main(argv[1:])
                except SystemExit as e:  # argparse
                    code = e.code if isinstance(e.code, int) else 2
                except Exception:  # a bug: reported with its traceback, the other examples still run
                    traceback.print_exc(file=out)
                    code = 1
        finally:
            os.chdir(old)
        return code, out.getvalue()
    if argv[0] == "accelerate":
        argv = [str(Path(sys.executable).with_name("accelerate")), *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    p = subprocess.run(argv, cwd=ws, capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


def runnable_argv(ex: Example) -> list[str]:
    words = _argv(ex.text)
    argv = [PLACEHOLDERS.get(a, a) if i and words[i - 1] in MODEL_FLAGS else a for i, a in enumerate(words)]
    if "-m" in argv:  # a launcher: the alignloop command after -m alignloop
        k = argv.index("-m") + 1
        name = _command_name(["alignloop", *argv[k + 1 :]])
    else:
        name = _command_name(argv)
    if name == "dpo" and "--online" in argv:
        name = "dpo --online"
    extra = list(SHORTEN.get(name, []))
    if name == "evaluate" and "--best-of-n" in argv:
        extra += ["--best-of-n", "2"]
    return argv + extra


def test_examples_are_found_in_docs_and_help():
    docs, helps = doc_examples(), help_examples()
    assert len(docs) >= 40 and len(helps) >= 30, (len(docs), len(helps))
    texts = [e.text for e in docs]
    assert any(t.startswith("alignloop generate --model M") for t in texts)  # README's loop
    # continuation lines are joined into one command
    assert any("--checkpoints ppo=runs/demo/ppo" in t and t.startswith("alignloop evaluate") for t in texts)
    # output blocks are not commands (docs/benchmarks.md prints "alignloop generate  10630 new tok/s")
    assert not any("tok/s" in t for t in texts)


def _known_broken(text: str) -> bool:
    """Whether ``text`` is in KNOWN_BROKEN, compared as the command it is (spacing and ``# ...`` comments aside)."""
    key = shlex.join(shlex.split(text, comments=True))
    return any(shlex.join(shlex.split(k, comments=True)) == key for k in KNOWN_BROKEN)


@pytest.mark.slow
def test_every_example_in_the_docs_and_help_runs(tmp_path_factory):
    ws = tmp_path_factory.mktemp("examples")
    prepare(ws)
    examples = doc_examples() + help_examples()
    ran, skipped, failed, took = 0, [], [], []
    done: set[tuple[str, ...]] = set()  # a command written in two places runs once
    for ex in examples:
        reason = skip_reason(ex)
        if reason:
            skipped.append((ex, reason))
            stand_in = SERVERS.get(_command_name(_argv(ex.text))) if "server" in reason else None
            if stand_in and "--db" in ex.text:
                db = _argv(ex.text)[_argv(ex.text).index("--db") + 1]
                _run(["alignloop", "-q", *stand_in.split(), "--db", db], ws)
            continue
        argv = runnable_argv(ex)
        ran += 1
        if tuple(argv) in done:
            continue
        done.add(tuple(argv))
        start = time.perf_counter()
        code, out = _run(argv, ws)
        took.append((time.perf_counter() - start, ex))
        if _known_broken(ex.text):
            if code == 0:
                failed.append(f"{ex.source}: {ex.text}\n    now runs: remove it from KNOWN_BROKEN")
            continue
        if code != 0:
            failed.append(
                f"{ex.source}: {ex.text}\n    ran: {shlex.join(argv)}\n    exit {code}: {out[-800:]}"
            )
    print(f"\n{len(examples)} examples found: {ran} ran, {len(skipped)} skipped, {len(failed)} failed")
    for ex, reason in skipped:
        print(f"  skipped ({reason}): {ex.source}: {ex.text}")
    print("slowest examples (CI time):")
    for seconds, ex in sorted(took, key=lambda t: -t[0])[:12]:
        print(f"  {seconds:6.1f} s  {ex.source}: {ex.text[:100]}")
    assert not failed, "\n".join(failed)

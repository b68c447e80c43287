"""The console a user sees: third-party chatter filtered, -q quiet, reward-hacking lines aggregated."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop.console import HackingDigest

WORLD = (
    Path(__file__).resolve().parents[1] / "src" / "alignloop" / "world" / "shipped" / "base" / "config.json"
)
needs_world = pytest.mark.skipif(
    not WORLD.is_file() and not os.environ.get("CI"), reason="the world's models are not built"
)

# the demo, shortened: every stage runs, on a few prompts and steps
SHORT = [
    "prompts.n_train=8", "prompts.n_eval=4", "generate.k=3", "generate.sampling.max_new_tokens=12",
    "reward.train.epochs=1", "ppo.config.steps=3", "ppo.config.batch_size=4", "ppo.config.minibatch_size=2",
    "dpo.config.max_steps=2", "dpo.config.batch_size=2", "evaluate.samples_per_prompt=1",
    "evaluate.n_boot=50", "evaluate.max_new_tokens=12",
]  # fmt: skip
BAR = re.compile(r"\d+/\d+ \[|\|\s*\d+/\d+")  # a tqdm bar's "3/8 [" or "| 3/8"


def test_hacking_digest_prints_the_first_then_summaries_and_a_count(capsys):
    d = HackingDigest("ppo", every=5)
    kl = [("kl_over_target", "KL 9.0 is over 2x the target 4")]
    printed = [line for step in range(20) for line in d.add(step, kl if step >= 2 else [])]
    assert printed[0] == "[ppo] reward-hacking warning at step 2: KL 9.0 is over 2x the target 4"
    assert [p.split(":")[0] for p in printed[1:]] == [
        "[ppo] reward-hacking warnings in steps 3-7",
        "[ppo] reward-hacking warnings in steps 8-12",
        "[ppo] reward-hacking warnings in steps 13-17",
    ]
    assert "kl_over_target x5" in printed[1]
    # a new kind is announced at once, in full
    both = [*kl, ("length", "response length exploding: 5.0 -> 12.0 tokens")]
    assert d.add(20, both) == [
        "[ppo] reward-hacking warning at step 20: response length exploding: 5.0 -> 12.0 tokens"
    ]
    # quiet steps between warnings of the same kind do not re-announce it
    assert d.add(21, []) == [] and d.add(22, both) == []
    assert d.counts == {"kl_over_target": 20, "length": 2}
    assert (
        d.close(23)
        == "[ppo] reward-hacking warnings over 23 steps: kl_over_target x20, length x2 (every one is in metrics.jsonl)"
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(printed) + 2  # everything printed went through say()


def test_no_warning_no_closing_line():
    assert HackingDigest("ppo").close(10) is None


def _demo(out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "alignloop", *flags, "demo", "--out", str(out)]
    cmd += [f"--set={s}" for s in SHORT]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def _lines_without_bars(text: str) -> list[str]:
    """Console lines as a person reads them: a bar redrawn with \\r is not a line."""
    parts = [p for line in text.split("\n") for p in line.split("\r")]
    return [p for p in parts if p.strip() and not BAR.search(p)]


@needs_world
@pytest.mark.slow
def test_demo_console_is_short_and_clean_and_quiet_means_quiet(tmp_path):
    loud = _demo(tmp_path / "run")
    assert loud.returncode == 0, loud.stderr[-3000:]
    text = loud.stdout + loud.stderr
    lines = _lines_without_bars(text)
    print(f"demo (shortened) printed {len(lines)} lines besides progress bars")
    assert len(lines) <= 40, "\n".join(lines)
    assert "Warning" not in text, text[-3000:]  # FutureWarning, UserWarning, DeprecationWarning
    assert "\x1b" not in text  # no ANSI codes when the output is not a terminal
    assert "LOAD REPORT" not in text and "Loading weights" not in text
    assert "report:" in loud.stdout

    quiet = _demo(tmp_path / "quiet", "-q")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr == ""
    table = quiet.stdout.splitlines()
    assert table[0].split()[:3] == ["policy", "gold", "toxicity"]
    assert table[-1].startswith("report: ") and len(table) <= 10, quiet.stdout

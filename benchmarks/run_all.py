"""Every benchmark in one run, and ``docs/benchmarks.md`` written from what they printed (issue 14).

Each benchmark runs as its own script (``benchmarks/<name>.py``) in a child process with the same
thread settings (``OMP_NUM_THREADS`` / ``ALIGNLOOP_THREADS`` pinned, ``OMP_WAIT_POLICY=PASSIVE``), so
every side of every comparison gets the same cores. Inside each script the sides alternate
(A B A B), warm-up steps are dropped and medians are quoted; this script only runs them, reads the
ratios out of their printed tables, sets them beside the targets and writes the page.

    python benchmarks/run_all.py                    # the full run (~25 minutes on 2 busy cores)
    python benchmarks/run_all.py --quick --no-write # CI: every benchmark as a smoke run (~3 minutes)
    python benchmarks/run_all.py --only ppo,dpo     # some of them (the page is then not written)

Exit code 1 if a benchmark fails or prints a table this script cannot read: that is how CI learns
that a benchmark rotted. Times are never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"

# ----------------------------------------------------------------------------------------------
# What to run: each benchmark's arguments for a full and a quick run, and how to read its result
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the targets table."""

    what: str
    target: str
    measured: str
    met: bool | None  # None: informative, no target


@dataclass
class Bench:
    name: str
    argv: Callable[[argparse.Namespace], list[str]]  # the command (without the python executable)
    quick: Callable[[argparse.Namespace], list[str]]
    read: Callable[[str], list[Row]]  # stdout -> rows (raises ValueError when the table is unreadable)
    limits: dict[str, str] = field(default_factory=dict)  # row.what -> what limits it, shown when not met


def _num(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        raise ValueError(f"cannot find {what} (pattern {pattern!r}) in the output")
    return float(m.group(1))


def _at_most(x: float, limit: float) -> bool:
    return x <= limit


def _ppo_what(out: str) -> str:
    size = "124M" if "GPT-2-small shape" in out else "tiny 2x128"
    return f"{size}, {'LoRA' if 'LoRA, batch' in out else 'full fine-tuning'}"


def read_ppo(out: str) -> list[Row]:
    small = "GPT-2-small shape" in out
    what = _ppo_what(out)
    limit_t, rows = (0.5 if small else 0.4), []
    for other, label, limit in (("TRL 1.12", "TRL 1.12", limit_t), ("floor", "bare-torch floor", 1.25)):
        line = re.search(rf"alignloop / {re.escape(other)}:(.*)", out)
        if line is None:
            continue
        t = _num(r"\btime ([\d.]+)x", line.group(1), f"PPO time ratio vs {other}")
        rows.append(Row(f"PPO step time / {label} ({what})", f"<= {limit}x", f"{t:.2f}x", _at_most(t, limit)))
        cpu = re.search(r"CPU time ([\d.]+)x", line.group(1))  # absent in runs before CpuClock
        if cpu:
            rows.append(
                Row(
                    f"PPO step CPU time / {label} ({what})", "(CPU time)", f"{float(cpu.group(1)):.2f}x", None
                )
            )
        if other != "floor":
            m = _num(r"peak RSS ([\d.]+)x", line.group(1), "PPO peak RSS ratio vs TRL")
            rows.append(Row(f"PPO peak RSS / TRL 1.12 ({what})", "<= 0.8x", f"{m:.2f}x", _at_most(m, 0.8)))
    if not rows:
        raise ValueError("no ratio lines in the PPO output")
    return rows


def read_lora(out: str) -> list[Row]:
    r = _num(r"ratio ([\d.]+)x", out, "LoRA / full peak RSS ratio")
    lora = _num(r"LoRA, reference = adapter disabled:\s+(\d+) MB", out, "LoRA peak")
    full = _num(r"full fine-tuning \+ frozen copy:\s+(\d+) MB", out, "full peak")
    micro = re.search(r"batch 8 \((\d+) micro-batches(, gradient checkpointing)?\)", out)
    how = f", {micro.group(1)} micro-batch(es){micro.group(2) or ''}" if micro else ""
    return [
        Row(
            f"PPO peak memory, LoRA / full copy (124M{how})",
            "<= 0.55x",
            f"{r:.2f}x ({lora:.0f} / {full:.0f} MB)",
            _at_most(r, 0.55),
        )
    ]


def _trl(out: str) -> str:
    m = re.search(r"trl=(\d+\.\d+)", out)  # the version both sides ran under (printed with their settings)
    return f"TRL {m.group(1)}" if m else "TRL"


def read_reward(out: str) -> list[Row]:
    r = _num(r"ratio \(alignloop / TRL pairs per second\): ([\d.]+)x", out, "reward pairs/s ratio")
    m = _num(r"peak RSS ratio \(alignloop / TRL\): ([\d.]+)x", out, "reward peak RSS ratio")
    size = "124M" if "GPT-2-small shape" in out else "tiny 2x128"
    return [
        Row(f"Reward training pairs/s / {_trl(out)} RewardTrainer ({size})", ">= 2x", f"{r:.2f}x", r >= 2.0),
        Row(f"Reward training peak RSS / {_trl(out)} ({size})", "(no target)", f"{m:.2f}x", None),
    ]


def read_dpo(out: str) -> list[Row]:
    r = _num(r"pairs / second \(wall\)\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", out, "DPO pairs/s ratio")
    c = _num(r"pairs / CPU-second\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", out, "DPO pairs/CPU-s ratio")
    m = _num(r"peak RSS \(MB\)\s+\d+\s+\d+\s+([\d.]+)x", out, "DPO peak RSS ratio")
    size = "124M" if "GPT-2-small shape" in out else "tiny 2x128"
    return [
        Row(
            f"DPO pairs/s / TRL 1.16 DPOTrainer ({size}, precomputed reference)",
            ">= 1.5x",
            f"{r:.2f}x",
            r >= 1.5,
        ),
        Row(f"DPO pairs per CPU-second / {_trl(out)} ({size})", "(CPU time)", f"{c:.2f}x", None),
        Row(f"DPO peak RSS / {_trl(out)} ({size})", "(no target)", f"{m:.2f}x", None),
    ]


def read_grpo(out: str) -> list[Row]:
    """GRPO and RLOO beside TRL's GRPOTrainer / RLOOTrainer (benchmarks/grpo.py's last line per algorithm)."""
    rows = []
    found = re.findall(
        r"alignloop / TRL ([\d.]+) (\w+):\s+CPU time ([\d.]+)x\s+memory ([\d.]+)x\s+peak RSS ([\d.]+)x", out
    )
    if not found:
        raise ValueError("cannot find the 'alignloop / TRL' ratio lines in the GRPO output")
    for version, algo, cpu, mem, peak in found:
        trainer = f"TRL {'.'.join(version.split('.')[:2])} {algo.upper()}Trainer (tiny 2x128)"
        name = algo.upper()
        cpu, mem, peak = float(cpu), float(mem), float(peak)
        rows += [
            Row(f"{name} step CPU time / {trainer}", "<= 0.5x", f"{cpu:.2f}x", _at_most(cpu, 0.5)),
            Row(
                f"{name} training memory (peak - after imports) / {trainer}",
                "<= 0.8x",
                f"{mem:.2f}x",
                _at_most(mem, 0.8),
            ),
            Row(f"{name} peak RSS / {trainer}", "(imports dominate)", f"{peak:.2f}x", None),
        ]
    return rows


def read_generation(out: str) -> list[Row]:
    hf = _num(r"ratio vs model\.generate ([\d.]+)x", out, "generation ratio vs HF")
    mode = "to EOS" if "(to EOS)" in out else "fixed length"
    rows = [Row(f"Sampling new tokens/s / HF model.generate ({mode})", "(faster)", f"{hf:.2f}x", hf >= 1.0)]
    if "ratio vs floor" in out:
        fl = _num(r"ratio vs floor ([\d.]+)x", out, "generation ratio vs floor")
        rows.append(
            Row(f"Sampling new tokens/s / bare-torch KV-cache loop ({mode})", "(>= 1)", f"{fl:.2f}x", None)
        )
    return rows


def read_labelling(out: str) -> list[Row]:
    rows = []
    found = re.findall(
        r"target \(([\d.]+) subm/s sustained, p99 < 100 ms, lost = doubled = 0\), (.+?): "
        r"(met|NOT met) here \(([\d.]+) subm/s, p99 ([\d.]+) ms\)",
        out,
    )
    if not found:
        raise ValueError("cannot find the labelling target lines in the output")
    for rate, side, met, subm, p99 in found:
        default = side.startswith("1 worker")  # `alignloop label serve` as shipped: the target's row
        rows.append(
            Row(
                f"Labelling app, SQLite, 50 clients, {side}" + ("" if default else " (option)"),
                f">= {float(rate):.0f} subm/s, p99 < 100 ms",
                f"{float(subm):.0f} subm/s, p99 {float(p99):.0f} ms",
                (met == "met") if default else None,
            )
        )
    for side in ("1 worker", "2 workers"):  # unpaced: each labeller submits again as soon as answered
        sat = re.search(rf"^{side}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
        if sat:
            rows.append(
                Row(
                    f"Labelling app, {side}, unpaced (the most it served)",
                    "(capacity)",
                    f"{float(sat.group(1)):.0f} subm/s, p99 {float(sat.group(3)):.0f} ms",
                    None,
                )
            )
    # the script exits 1 when anything was lost or doubled, so reaching here means 0 and 0
    rows.append(Row("Labelling app: lost / doubled submissions", "0 / 0", "0 / 0", True))
    return rows


def read_demo(out: str) -> list[Row]:
    s = _num(r"demo end to end: ([\d.]+) s", out, "demo time")
    quick = "(small settings)" in out
    return [
        Row(
            "`alignloop demo` end to end" + (" (quick: small settings)" if quick else ""),
            "<= 10 min (aim 5)",
            f"{s / 60:.1f} min",
            None if quick else s <= 600,
        )
    ]


BENCHES = [
    Bench(
        "generation",
        lambda a: ["benchmarks/generation.py"],
        lambda a: ["benchmarks/generation.py", "--quick"],
        read_generation,
    ),
    Bench(
        "generation-eos",
        lambda a: ["benchmarks/generation.py", "--stop-at-eos", "--max-new-tokens", "64"],
        lambda a: [],  # the same script as "generation"
        read_generation,
    ),
    Bench(
        "ppo",
        lambda a: ["benchmarks/ppo.py", "--rounds", "2", "--steps", "6"],
        lambda a: (
            "benchmarks/ppo.py --rounds 1 --steps 3 --batch 8 --response-length 8 --epochs 1 "
            "--minibatches 2".split()
        ),
        read_ppo,
    ),
    Bench(
        "ppo-small",
        lambda a: "benchmarks/ppo.py --size small --rounds 2 --steps 2 --warmup 0".split(),
        lambda a: [],  # a GPT-2-small-sized step takes minutes on 2 cores: not part of the smoke run
        read_ppo,
    ),
    Bench(
        "ppo-small-lora",
        lambda a: "benchmarks/ppo.py --size small --lora --rounds 2 --steps 2 --warmup 0".split(),
        lambda a: [],
        read_ppo,
    ),
    Bench(
        "ppo-lora-memory",
        lambda a: ["benchmarks/ppo.py", "--lora-memory", "--rounds", "1", "--grad-accum", "4"],
        lambda a: [],  # a GPT-2-small-sized step takes minutes on 2 cores: not part of the smoke run
        read_lora,
        {
            "PPO peak memory, LoRA / full copy (124M, 4 micro-batch(es))": "activations, not weights, "
            "dominate a 124M model's peak at batch 8 x 96 tokens (its logits alone are 8 x 96 x 50257 "
            "floats, 150 MB, several copies in the backward pass).",
        },
    ),
    Bench(
        "ppo-lora-memory-1",
        lambda a: ["benchmarks/ppo.py", "--lora-memory", "--rounds", "1", "--grad-accum", "1"],
        lambda a: [],
        read_lora,
        {
            "PPO peak memory, LoRA / full copy (124M, 1 micro-batch(es))": "LoRA saves the same state "
            "in both rows (gradients, AdamW moments and the reference copy of 124M fp32 weights, ~2 GB); "
            "with the whole batch of 8 x 96 tokens in one micro-batch the LoRA run's peak is its "
            "activations: LoRA on every linear layer needs the same layer inputs kept for the backward "
            "pass as full fine-tuning (the LoRA peak is about 0.9 GB higher at 1 micro-batch than at 4), so "
            "it does not shrink them. Micro-batches of 2 (`grad_accum=4`, the same update) "
            "bring the ratio under 0.55x: the row above; so does `gradient_checkpointing=true`: the row below.",
        },
    ),
    Bench(
        "ppo-lora-memory-1-gc",
        lambda a: (
            "benchmarks/ppo.py --lora-memory --rounds 1 --grad-accum 1 --gradient-checkpointing".split()
        ),
        lambda a: [],
        read_lora,
    ),
    Bench(
        "grpo",
        lambda a: "benchmarks/grpo.py --rounds 2 --steps 3".split(),
        lambda a: (
            # GRPO only: two more fresh processes (each pays the imports) is what the smoke run can afford
            "benchmarks/grpo.py --algorithms grpo --rounds 1 --steps 3 --warmup 1 --prompts 2 --group 2 "
            "--response-length 8 --epochs 1 --minibatches 1".split()
        ),
        read_grpo,
    ),
    Bench(
        "reward",
        lambda a: ["benchmarks/reward.py"],
        lambda a: "benchmarks/reward.py --steps 5 --rounds 1 --warmup 1 --sets-per-step 2".split(),
        read_reward,
    ),
    Bench(
        "reward-small",
        lambda a: (
            "benchmarks/reward.py --size small --sets-per-step 2 --steps 6 --warmup 1 --rounds 2".split()
        ),
        lambda a: [],
        read_reward,
    ),
    Bench(
        "dpo",
        lambda a: ["benchmarks/dpo.py", "--threads", str(a.threads), "--rounds", "5"],  # a steadier median
        lambda a: (
            f"benchmarks/dpo.py --threads {a.threads} --rounds 1 --steps 4 --warmup 1 --n-pairs 64 "
            "--batch 8".split()
        ),
        read_dpo,
    ),
    Bench(
        "dpo-small",
        lambda a: (
            f"benchmarks/dpo.py --size small --threads {a.threads} --rounds 2 --steps 6 --warmup 1 --batch 8 "
            "--n-pairs 64".split()
        ),
        lambda a: [],
        read_dpo,
    ),
    Bench(
        "labelling",
        lambda a: ["benchmarks/labelling.py"],
        lambda a: ["benchmarks/labelling.py", "--quick"],
        read_labelling,
        {
            "Labelling app, SQLite, 50 clients, 1 worker @ 300/s": "CPU time, not the store: one worker "
            "is one Python process needing the CPU milliseconds per submission in the labelling table "
            "(HTTP, JSON, one SQLite transaction; its `subm/s/core` column is what one whole core "
            "gives). 300/s needs most of one core for the server alone; with the load generator on "
            "the same 2 cores and the load average above the core count (see the top of this page) "
            "the server does not get it. Nothing was lost or doubled; the unpaced row shows the "
            "capacity it did get.",
        },
    ),
    Bench(
        "demo",
        lambda a: ["benchmarks/run_all.py", "--demo-child"],
        lambda a: ["benchmarks/run_all.py", "--demo-child", "--quick"],
        read_demo,
    ),
]

NOTES = [
    "PPO: the three sides (alignloop, TRL 1.12's `trl.experimental.ppo.PPOTrainer`, the floor) share the "
    "policy, the reward model (a 2x128 GPT-2 classifier), batch, prompt length, fixed response length, "
    "epochs, minibatches, fp32, fused AdamW and gradient checkpointing off. TRL's value model is a separate "
    "network initialised from the reward model (its recipe), so here the small classifier; alignloop and "
    "the floor use a value head on the policy's trunk. The floor is plain torch + transformers doing the "
    "passes a step needs, with the LM head on the response columns and log_softmax+gather log-probs; "
    "alignloop can come out below it (it computes the log-probs chunked): read that row as 'no overhead "
    "left to find'. At 124M one process per side per round and one timed step each (a step takes minutes "
    "on the loaded machine): those ratios rest on few samples.",
    "Memory: peak RSS (VmHWM) of each side's own fresh process after identical imports; the PPO tables also "
    "give peak minus RSS after those imports (the same point in every process). `getrusage().ru_maxrss` "
    "was dropped: across fork/exec it carries the parent's high-water mark into the child.",
    "LoRA memory rows: one PPO step of the 124M policy with LoRA (reference = adapter disabled) vs full "
    "fine-tuning (reference = frozen copy), one process each.",
    "Reward: both sides under TRL 1.16's interpreter, one epoch over the same pairs, same pairs per step, "
    "same max length, TRL's gradient checkpointing off. alignloop scores each distinct completion of a "
    "ranked set once (4 sequences a set of 6 pairs), TRL's RewardTrainer each pair's chosen and rejected (12).",
    "DPO: both sides under TRL 1.16's interpreter, reference log-probs precomputed on both, gradient "
    "checkpointing off, padding-free off; alignloop forwards each prompt once and both responses from its "
    "KV cache, TRL forwards prompt + chosen and prompt + rejected.",
    "GRPO / RLOO: both sides under TRL 1.16's interpreter (`--python`, default its venv), the PPO "
    "benchmark's tiny policy and reward model, fixed-length completions, full fine-tuning with a frozen "
    "reference, the same group size, epochs and minibatches (settings printed in the table). Memory target "
    "on each process's peak minus its RSS after the identical imports; the whole-process peak RSS is "
    "mostly those imports at this size.",
    "Labelling: the paced rows are the issue's target (300 submissions/s offered by 50 keep-alive "
    "clients); the target row is the default server (1 worker). `--workers 2` is shown beside it: on 2 "
    "cores shared with the load generator (~0.5-1 ms CPU per submission) and the machine's other load, "
    "a second worker adds CPU per submission (SQLite write lock handed between processes) more than it "
    "adds capacity. The unpaced rows are the most the server answered, with the 50 clients' own queue "
    "in their latency.",
    "Generation: `alignloop generate` (records written) against a `model.generate` loop and, at fixed "
    "length, a bare KV-cache loop; to EOS, finished rows leave our batch and its KV cache.",
]

# a demo small enough for a smoke run (the same knobs tests/test_demo.py turns down)
SMALL_DEMO = [
    "prompts.n_train=3", "prompts.n_eval=4", "generate.k=3", "generate.sampling.max_new_tokens=12",
    "generate.distinct=8", "label.per_set=1", "reward.train.epochs=1", "ppo.config.steps=2", "ppo.config.batch_size=4",
    "ppo.config.minibatch_size=2", "ppo.variants={}", "dpo.config.max_steps=2", "dpo.config.batch_size=2",
    "evaluate.samples_per_prompt=1", "evaluate.n_boot=50", "evaluate.max_new_tokens=12",
]  # fmt: skip


def demo_child(quick: bool) -> int:
    """Time ``alignloop demo`` end to end in a fresh folder (the CLI in a subprocess, as a user runs it)."""
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        cmd = [sys.executable, "-m", "alignloop", "demo", "--quiet", "--out", str(Path(tmp) / "demo")]
        if quick:
            cmd += [f"--set={s}" for s in SMALL_DEMO]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    print(proc.stdout[-1500:])
    print(f"demo end to end: {seconds:.0f} s{' (small settings)' if quick else ''}")
    return 0


# ----------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------


def default_threads() -> int:
    """All cores on a quiet machine, 1 when it is oversubscribed (as alignloop.models.configure_threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores else cores


def child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "ALIGNLOOP_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",  # spin-waiting OpenMP workers make torch ~10x slower under load
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Result:
    bench: Bench
    command: list[str]
    seconds: float
    code: int
    stdout: str
    stderr: str
    rows: list[Row]
    error: str = ""


def run_one(b: Bench, a: argparse.Namespace) -> Result | None:
    args = b.quick(a) if a.quick else b.argv(a)
    if not args:
        return None
    if a.page_from:  # a run saved earlier by --outputs
        saved = Path(a.page_from) / f"{b.name}.json"
        if not saved.is_file():
            return None
        d = json.loads(saved.read_text())
        res = Result(b, d["command"], d["seconds"], 0, d["stdout"], "", [])
        res.rows = b.read(res.stdout)
        return res
    cmd = [sys.executable, *args]
    print(f"== {b.name}: {shlex.join(['python', *args])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(a.threads), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    res = Result(b, args, seconds, proc.returncode, proc.stdout, proc.stderr, [])
    if proc.returncode:
        res.error = f"exit code {proc.returncode}"
    else:
        try:
            res.rows = b.read(proc.stdout)
        except ValueError as e:
            res.error = f"unreadable output: {e}"
    if a.outputs and not res.error:
        Path(a.outputs).mkdir(parents=True, exist_ok=True)
        saved = {"command": args, "seconds": seconds, "stdout": proc.stdout, "load": os.getloadavg()[0]}
        (Path(a.outputs) / f"{b.name}.json").write_text(json.dumps(saved))
    if res.error:
        print(f"   FAILED ({res.error}) after {seconds:.0f} s\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    else:
        print(proc.stdout.rstrip())
        print(f"   ({seconds:.0f} s)", flush=True)
    return res


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for mod in ("torch", "transformers", "peft", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed: say so rather than fail
            versions[mod] = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "src", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "commit": (commit.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else ""),
    }


def table(results: list[Result]) -> list[str]:
    lines = ["| what | target | measured | met |", "|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.bench.name} | | FAILED: {r.error} | no |")
        for row in r.rows:
            met = "informative" if row.met is None else ("yes" if row.met else "**no**")
            lines.append(f"| {row.what} | {row.target} | {row.measured} | {met} |")
    return lines


def page(results: list[Result], a: argparse.Namespace, load: tuple[float, float], started: str) -> str:
    m = machine()
    cmd = "python benchmarks/run_all.py" + (" --quick" if a.quick else "") + f" --threads {a.threads}"
    how = (
        f"- Commit: {m['commit']}; the parts were run separately (`--outputs`, page written with "
        f"`--page-from`) on {started[:10]}: each table below gives its own load average at start and end."
        if a.page_from
        else f"- Commit: {m['commit']}, run started {started}, took {sum(r.seconds for r in results) / 60:.0f} "
        f"min\n- Load average (1 min) at the start {load[0]:.1f}, at the end {load[1]:.1f}."
    )
    out = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py` from what the benchmark scripts printed; do not edit by hand. "
        "The rules every comparison follows are in `benchmarks/README.md`: each side in its own fresh "
        "process after the same imports, on the same data, lengths, batch, epochs and precision (fp32; TRL "
        "gets `bf16=False`), with the options that change the work set the same way and printed by each "
        "benchmark next to its ratio; sides alternated A B A B, warm-up dropped, medians; peak memory is "
        "each process's own RSS high-water mark (VmHWM). Every side runs with the same torch threads "
        f"({a.threads}, `OMP_NUM_THREADS`/`ALIGNLOOP_THREADS`, `OMP_WAIT_POLICY=PASSIVE`).",
        "",
        f"- Machine: {m['cpu']}, {m['memory']} RAM, {m['os']}, Python {m['python']}",
        f"- Libraries (this interpreter; the reward and DPO tables print both sides' own): {m['libraries']}",
        how,
        "- The machine is shared (2 cores, up to 8 engineers): wall-clock times drift with the load, so "
        "read the ratios, and where the load average was far above the core count, the CPU-time ratios "
        "(each process's CPU seconds per step, read the same way on both sides).",
        f"- Reproduce: `{cmd}` (`--only ppo,dpo` for some of them; each script also runs alone, "
        "`--help` for its knobs)",
        "",
        "## Targets (issues 14 and 30)",
        "",
        *table(results),
        "",
    ]
    limits = [
        (row.what, r.bench.limits[row.what])
        for r in results
        for row in r.rows
        if row.met is False and row.what in r.bench.limits
    ]
    if limits:
        out += ["## What limits the targets not met", ""]
        out += [f"- **{what}**: {why}" for what, why in limits]
        out.append("")
    out += ["## How to read them", ""]
    out += [f"- {note}" for note in NOTES]
    out += ["", "## Each benchmark's own table", ""]
    for r in results:
        out += [
            f"### {r.bench.name}",
            "",
            f"`python {shlex.join(r.command)}` ({r.seconds:.0f} s)",
            "",
            "```",
            (r.stdout.strip() or "(no output)") if not r.error else r.stderr.strip()[-3000:],
            "```",
            "",
        ]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every benchmark as a smoke run (for CI)")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    ap.add_argument("--only", help="comma-separated benchmark names: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every side (default: "
                    "all cores, or 1 when the load average exceeds them)")  # fmt: skip
    ap.add_argument("--outputs", help="also save each benchmark's output to DIR/<name>.json")
    ap.add_argument(
        "--page-from", help="write the page from outputs saved by --outputs in DIR (parts run separately)"
    )
    ap.add_argument("--demo-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.demo_child:
        return demo_child(a.quick)
    a.threads = a.threads or default_threads()
    names = [b.name for b in BENCHES]
    chosen = a.only.split(",") if a.only else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load0 = os.getloadavg()[0]
    print(f"{len(chosen)} benchmarks, {a.threads} thread(s) each, load average {load0:.1f}", flush=True)
    results = [r for b in BENCHES if b.name in chosen for r in [run_one(b, a)] if r is not None]
    load1 = os.getloadavg()[0]
    print()
    print("\n".join(table(results)))
    failed = [r.bench.name for r in results if r.error]
    if not a.no_write and (a.page_from or not a.only) and not a.quick:
        DOC.write_text(page(results, a, (load0, load1), started) + "\n")
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

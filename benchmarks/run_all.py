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


def read_ppo(out: str) -> list[Row]:
    rows = []
    if "alignloop / TRL" in out:
        t = _num(r"alignloop / TRL 1\.12:\s+time ([\d.]+)x", out, "PPO time ratio vs TRL")
        m = _num(r"alignloop / TRL 1\.12:.*memory ([\d.]+)x", out, "PPO memory ratio vs TRL")
        rows.append(Row("PPO step time / TRL 1.12 PPOTrainer", "<= 0.5x", f"{t:.2f}x", _at_most(t, 0.5)))
        rows.append(Row("PPO training memory / TRL 1.12", "<= 0.8x", f"{m:.2f}x", _at_most(m, 0.8)))
    else:
        rows.append(Row("PPO step time / TRL 1.12 PPOTrainer", "<= 0.5x", "not run (trl missing)", False))
    f = _num(r"alignloop / floor:\s+time ([\d.]+)x", out, "PPO time ratio vs floor")
    rows.append(Row("PPO step time / bare-torch floor", "<= 1.25x", f"{f:.2f}x", _at_most(f, 1.25)))
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


def read_reward(out: str) -> list[Row]:
    r = _num(r"ratio \(alignloop / TRL pairs per second\): ([\d.]+)x", out, "reward pairs/s ratio")
    return [Row("Reward training pairs/s / TRL RewardTrainer (sets of 4)", ">= 2x", f"{r:.2f}x", r >= 2.0)]


def read_dpo(out: str) -> list[Row]:
    r = _num(r"pairs / second \(wall\)\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", out, "DPO pairs/s ratio")
    c = _num(r"pairs / CPU-second\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", out, "DPO pairs/CPU-s ratio")
    m = _num(r"peak RSS \(MB\)\s+\d+\s+\d+\s+([\d.]+)x", out, "DPO peak RSS ratio")
    return [
        Row("DPO pairs/s / TRL DPOTrainer (precomputed reference)", ">= 1.5x", f"{r:.2f}x", r >= 1.5),
        Row("DPO pairs per CPU-second / TRL", "(CPU time)", f"{c:.2f}x", None),
        Row("DPO peak memory / TRL", "(no target)", f"{m:.2f}x", None),
    ]


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
        {
            "PPO step time / bare-torch floor": "the update (4 epochs x 4 minibatches of forward/backward/AdamW) "
            "is most of both sides; what is left over is the step's bookkeeping (GAE, whitening, "
            "statistics, logging) and the separate reference pass (the floor does the same passes).",
        },
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
        "reward",
        lambda a: ["benchmarks/reward.py"],
        lambda a: "benchmarks/reward.py --steps 5 --rounds 1 --warmup 1 --sets-per-step 2".split(),
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
        {
            "DPO pairs/s / TRL DPOTrainer (precomputed reference)": "arithmetic: a step is the same "
            "forward/backward of the same model on both sides (profiled: ~95% of our step is the model's "
            "forward and backward). With 32-token prompts and 24-token responses TRL runs 2 x (32 + 24) = "
            "112 positions a pair, alignloop 32 + 2 x 24 = 80 (each prompt once, both responses from its "
            "KV cache): 1.4x fewer; TRL's per-step overhead gives the rest. Longer prompts widen the gap.",
        },
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
    "PPO: the three sides (alignloop, TRL 1.12, floor) share model, batch, fixed response length, epochs "
    "and minibatches (see `benchmarks/ppo.py`). The floor is the plain-torch step in `ppo.py`; it runs the "
    "LM head over the prompt positions as well (no `logits_to_keep`) and samples with `torch.multinomial` "
    "through HF's forward, so alignloop, which keeps only the response columns, can come out below it: "
    "read that row as 'no overhead left to find', not as a tight bound.",
    "LoRA memory: a random-init GPT-2-small-sized model (124M), batch 8, 64 prompt + 32 response tokens, "
    "one process per side; LoRA's reference is the same base with the adapter disabled, the full side "
    "keeps a frozen copy. Peak RSS of the whole process.",
    "Reward: ranked sets of 4 (6 pairs each); alignloop scores each completion once per step (4 sequences "
    "a set), TRL's RewardTrainer scores each pair's chosen and rejected (12).",
    "DPO: reference log-probs precomputed on both sides; wall-clock and CPU-time ratios are both shown "
    "because the machine is shared.",
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
    "label.per_set=1", "reward.train.epochs=1", "ppo.config.steps=2", "ppo.config.batch_size=4",
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
    out = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/run_all.py` from what the benchmark scripts printed in one run; do not edit "
        "by hand. Each script alternates its sides (A B A B) in fresh processes, drops warm-up steps and "
        "quotes medians; the ratios are from this one run. Every side of every comparison runs with the "
        f"same torch threads ({a.threads}, `OMP_NUM_THREADS`/`ALIGNLOOP_THREADS`, `OMP_WAIT_POLICY=PASSIVE`) "
        "and fp32 (TRL gets `bf16=False`; its default bf16 is ~10x slower on this CPU).",
        "",
        f"- Machine: {m['cpu']}, {m['memory']} RAM, {m['os']}, Python {m['python']}",
        f"- Libraries: {m['libraries']}",
        f"- Commit: {m['commit']}, run started {started}, took {sum(r.seconds for r in results) / 60:.0f} min",
        f"- Load average (1 min) at the start {load[0]:.1f}, at the end {load[1]:.1f}: the machine is shared, "
        "so single absolute times drift; read the ratios.",
        f"- Reproduce: `{cmd}` (`--only ppo,dpo` for some of them; each script also runs alone, "
        "`--help` for its knobs)",
        "",
        "## Targets (issue 14)",
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
    if not a.no_write and not a.only and not a.quick:
        DOC.write_text(page(results, a, (load0, load1), started) + "\n")
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

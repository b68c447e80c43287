"""What the benchmark scripts share: the fairness rules of ``benchmarks/README.md`` in code.

Each benchmark runs as a script (``python benchmarks/<name>.py``), so this folder is on ``sys.path``
and the scripts ``import common``. The parent process builds the models and data, then runs every
side in its own fresh child process (:func:`run_side`), alternating the sides A B A B; each child
first imports the SAME modules (:func:`import_all`), whichever side it is, and reports its step times
and its own peak RSS (:func:`peak_rss_mb`, the high-water mark of that process alone).
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRL116_PYTHON = Path(os.environ.get("ALIGNLOOP_TRL116_PYTHON", "/work/venv-trl116/bin/python"))


def _status_kb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): ``VmHWM``, the high-water mark of its own
    address space. (Not ``getrusage().ru_maxrss``: across fork/vfork + exec it carries the parent's
    high-water mark over, so a child of a parent that built a 124M model would report the parent's peak.)"""
    return _status_kb("VmHWM") / 1024


def import_all(extra: tuple[str, ...] = ()) -> None:
    """Import everything any side of any benchmark imports, so every side starts from the same RSS.

    The third-party stack (torch, transformers, datasets, accelerate, peft, tokenizers, safetensors,
    and TRL with its trainers when installed) and alignloop's trainer modules; ``extra`` adds the
    modules of one benchmark's TRL side (e.g. ``trl.experimental.ppo``).
    """
    import importlib

    for name in (
        "torch", "transformers", "datasets", "accelerate", "peft", "tokenizers", "safetensors.torch",
        "alignloop.models", "alignloop.generation", "alignloop.rl.ppo", "alignloop.offline.dpo",
        "alignloop.reward.train", "trl", *extra,
    ):  # fmt: skip
        importlib.import_module(name)


def versions() -> dict[str, str]:
    """Library versions of this process (printed by every side next to its settings)."""
    out = {}
    for mod in ("torch", "transformers", "trl", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "-"
    return out


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of every side: same threads, passive OpenMP waiting, alignloop from this tree."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), ALIGNLOOP_THREADS=str(threads))
    return env


def run_side(python: str | Path, script: str, args: list[str], threads: int | None = None) -> dict[str, Any]:
    """Run ``script --side ...`` with ``python`` in a fresh process; its last stdout line is its JSON result."""
    proc = subprocess.run(
        [str(python), script, *args], capture_output=True, text=True, env=child_env(threads), cwd=ROOT
    )
    if proc.returncode:
        sys.exit(f"side {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_threads() -> int:
    """Torch threads for every side: all cores on a quiet machine, 1 when it is oversubscribed (OpenMP
    workers spin-waiting for cores make torch many times slower; the rule of alignloop.models)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cores else cores


class CpuClock:
    """Samples (wall time, process CPU time) every few ms in a thread, so a step's CPU time can be read
    between two wall-clock step ends. CPU time is what a step costs whatever else the machine runs."""

    def __init__(self, every: float = 0.005):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), time.process_time()))
            time.sleep(every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_at(self, t: float) -> float:
        i = bisect.bisect_left(self.samples, (t, -1.0))
        i = min(max(i, 1), len(self.samples) - 1)
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)

    def intervals(self, ends: list[float]) -> list[float]:
        """Process CPU seconds between consecutive wall-clock (``time.time()``) step ends."""
        cpu = [self.cpu_at(t) for t in ends]
        return [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def word_tokenizer(vocab: int) -> Any:
    """A word-level fast tokenizer: ``<pad> <eos> <unk> <bos>`` (ids 0-3), then ``w0 w1 ...``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<bos>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


def gpt2_config(vocab: int, positions: int, heads: int, size: str = "tiny", **extra: Any) -> Any:
    """A random-init GPT-2 whose special ids match :func:`word_tokenizer`: ``tiny`` is 2 layers x width
    128; ``small`` is GPT-2-small's shape (12 layers x width 768, 12 heads, 124M with vocab 50257)."""
    from transformers import GPT2Config

    shape = {"n_embd": 128, "n_layer": 2, "n_head": heads} if size == "tiny" else {}
    return GPT2Config(
        vocab_size=vocab, n_positions=positions, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        **shape, **extra,
    )  # fmt: skip

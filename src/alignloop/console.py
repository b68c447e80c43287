"""What reaches the user's console: the one place that decides which third-party output is shown.

Three levels, set once by the command line (:func:`configure`):

- default: our progress lines and bars; third-party chatter that is not the user's business is
  filtered here (transformers' FutureWarnings and DeprecationWarnings, its "LOAD REPORT" tables
  with ANSI codes, its advisory log lines, its "Loading weights" / "Writing model shards" bars);
  hub download bars stay (a first download can take minutes).
- ``-v`` / ``--verbose``: nothing filtered.
- ``-q`` / ``--quiet``: errors and the final summary only (no bars at all).

The settings go through environment variables too, so processes started by a launcher
(``accelerate launch``, torchrun) and worker processes inherit them.

:class:`HackingDigest` keeps the reward-hacking warnings readable: the first in full, then a
summary line every ``every`` steps or when the kinds change, and a count at the end. Every
warning is still recorded in the metrics by the caller.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from alignloop.runs import say, set_quiet

_VERBOSE = False


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set the console level for this process and the processes it starts."""
    global _VERBOSE
    _VERBOSE = verbose and not quiet
    set_quiet(quiet)
    if _VERBOSE:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # LOAD REPORT tables, deprecation notes
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if _LOGGING in sys.modules:  # transformers came first: apply the settings now
        _tame_transformers(sys.modules[_LOGGING])
    elif not any(isinstance(f, _AfterTransformersLogging) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersLogging())  # transformers is imported lazily


_LOGGING = "transformers.utils.logging"


def _tame_transformers(hf_logging: Any) -> None:
    """transformers' log level follows ``TRANSFORMERS_VERBOSITY``; its own bars ("Loading weights",
    "Writing model shards") are hidden, download bars (unit "B") kept unless ``-q``."""
    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        hf_logging.set_verbosity_error()
    if hasattr(hf_logging, "set_tqdm_hook"):
        hf_logging.set_tqdm_hook(_only_download_bars)


class _AfterTransformersLogging:
    """A meta-path finder that tames ``transformers.utils.logging`` right after it is first
    imported, wherever that happens (every stage imports transformers inside its functions)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _LOGGING:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_tame(module: Any) -> None:
            exec_module(module)
            if not _VERBOSE:
                _tame_transformers(module)

        spec.loader.exec_module = exec_and_tame  # type: ignore[method-assign]
        return spec


def _only_download_bars(factory: Any, args: tuple, kwargs: dict) -> Any:
    if kwargs.get("unit") != "B" or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


class HackingDigest:
    """Reward-hacking warnings for people, aggregated.

    ``add(step, warns)`` with the step's ``(kind, message)`` list prints: the first warning of
    set of kinds in full; while the same kinds keep firing (quiet steps in between included), one
    summary line at most every ``every`` steps; a full line again when the set of kinds changes.
    ``close(steps)`` prints one count line.
    """

    def __init__(self, tag: str, every: int = 10):
        self.tag, self.every = tag, max(1, every)
        self.counts: dict[str, int] = {}
        self._kinds: tuple[str, ...] = ()  # the kinds of the last step that warned
        self._since: dict[str, int] = {}  # counts since the last printed line
        self._last_line = -1  # step of the last printed line
        self._latest = ""

    def add(self, step: int, warns: list[tuple[str, str]]) -> list[str]:
        """Record one step's warnings; return the lines printed (also sent to :func:`say`)."""
        lines: list[str] = []
        kinds = tuple(sorted({k for k, _ in warns}))
        for kind, message in warns:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self._since[kind] = self._since.get(kind, 0) + 1
            self._latest = message
        if kinds and kinds != self._kinds:
            new = [m for k, m in warns if k not in self._kinds]
            lines.append(
                f"[{self.tag}] reward-hacking warning at step {step}: {'; '.join(new or [self._latest])}"
            )
            self._kinds, self._since, self._last_line = kinds, {}, step
        elif kinds and step - self._last_line >= self.every and self._since:
            tally = ", ".join(f"{k} x{n}" for k, n in sorted(self._since.items()))
            lines.append(
                f"[{self.tag}] reward-hacking warnings in steps {self._last_line + 1}-{step}: {tally} "
                f"(latest: {self._latest})"
            )
            self._since, self._last_line = {}, step
        for line in lines:
            say(line)
        return lines

    def close(self, steps: int) -> str | None:
        """The closing count (None and nothing printed when there was no warning)."""
        if not self.counts:
            return None
        tally = ", ".join(f"{k} x{n}" for k, n in sorted(self.counts.items()))
        line = (
            f"[{self.tag}] reward-hacking warnings over {steps} steps: {tally} "
            "(every one is in metrics.jsonl)"
        )
        say(line)
        return line

"""Run folders: every stage writes ``manifest.json`` and ``metrics.json`` into its folder.

A stage is started with :func:`start_stage`. The manifest records the command, the full
resolved config, each input with its sha256, package versions, the seed, the device and the
start/end times. On ``--resume`` a stage whose finished manifest matches its inputs and
config (same fingerprint) is skipped, and its previous metrics are returned::

    run = start_stage(out, "reward", config=cfg, inputs={"pairs": pairs_path}, resume=True)
    if run.skipped:
        return run.metrics
    for step in progress(range(n), desc="reward"):
        run.log(step, loss=...)
    run.finish({"accuracy": acc})

Only the main process (``RANK`` 0 under torchrun/accelerate) writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from alignloop import __version__

T = TypeVar("T")
_QUIET = False
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors")


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress bars, no chatter; errors are still printed."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str) -> None:
    """A line of progress for people (stderr), silent under ``--quiet`` and on non-main ranks."""
    if not _QUIET and is_main_process():
        if "tqdm" in sys.modules:  # a bar may be on screen: tqdm.write clears it, prints, redraws it
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


def progress(it: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar on stderr, off under ``--quiet`` and on non-main ranks."""
    from tqdm.auto import tqdm

    return iter(
        tqdm(
            it,
            total=total,
            desc=desc,
            unit=unit,
            disable=_QUIET or not is_main_process(),
            dynamic_ncols=True,
            leave=False,
        )
    )


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = (
        [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith("."))
    )
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def describe_input(value: str | Path) -> dict[str, Any]:
    """A local file/folder gets its sha256, and so does a world model (``world:base``: its shipped
    folder; ``world:gold``: the judge's code); anything else (a hub id, a URL) is kept as a name."""
    p = Path(value)
    if p.exists():
        return {"path": str(p.resolve()), "sha256": sha256_path(p)}
    world = _world_files(str(value))
    if world is not None:
        return {"id": str(value), "path": str(world), "sha256": sha256_path(world)}
    return {"id": str(value), "sha256": None}


def _world_files(spec: str) -> Path | None:
    """What a ``world:NAME[:label]`` spec is made of: the shipped model folder, or for the gold
    judge its source file. None for anything else."""
    if not spec.startswith("world:"):
        return None
    import importlib.util

    found = importlib.util.find_spec("alignloop.world")
    if found is None or found.origin is None:
        return None
    world = Path(found.origin).parent
    name = spec.split(":")[1]
    path = world / "judge.py" if name == "gold" else world / "shipped" / name
    return path if path.exists() else None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"alignloop": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


def _config_dict(config: Any) -> dict[str, Any]:
    from pydantic import BaseModel

    if config is None:
        return {}
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(dict(config), default=str))


def fingerprint(config: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> str:
    blob = json.dumps(
        {"config": config, "inputs": {k: v.get("sha256") or v.get("id") for k, v in inputs.items()}},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageRun:
    """One stage's run folder. Created by :func:`start_stage`."""

    dir: Path
    name: str
    manifest: dict[str, Any]
    skipped: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    _trackers: Any = None  # alignloop.tracking.Trackers on the main process, else None
    _last_step: int = 0

    prefix: str = ""  # "pairs.jsonl." for a stage whose output is one file (start_file_stage)

    @property
    def manifest_path(self) -> Path:
        return self.dir / f"{self.prefix}manifest.json"

    def log(self, step: int, **values: Any) -> None:
        """Append one line of step metrics to ``metrics.jsonl`` and send it to the trackers
        (:mod:`alignloop.tracking`)."""
        if not is_main_process():
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        with open(self.dir / f"{self.prefix}metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self._last_step = step
        if self._trackers is not None:
            self._trackers.log(step, row)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table (e.g. the evaluation's policies x metrics) for the trackers; files hold it already."""
        if self._trackers is not None:
            self._trackers.table(name, columns, rows)

    def finish(self, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``metrics.json`` and mark the manifest complete (atomically)."""
        self.metrics = {k: _plain(v) for k, v in (metrics or {}).items()}
        if is_main_process():
            write_json_atomic(self.dir / f"{self.prefix}metrics.json", self.metrics)
            self.manifest["status"] = "complete"
            self.manifest["end_time"] = _now()
            self.manifest["seconds"] = round(time.time() - self.manifest["_t0"], 3)
            write_json_atomic(self.manifest_path, {k: v for k, v in self.manifest.items() if k != "_t0"})
        if self._trackers is not None:
            self._trackers.summary(self._last_step, self.metrics)
            self._trackers.close()
            self._trackers = None
        return self.metrics

    def fail(self, reason: str) -> None:
        if is_main_process():
            self.manifest["status"] = "failed"
            self.manifest["error"] = reason
            write_json_atomic(self.manifest_path, {k: v for k, v in self.manifest.items() if k != "_t0"})
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    return v


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def start_stage(
    out: str | Path,
    name: str,
    *,
    config: Any = None,  # a pydantic model or a mapping
    inputs: Mapping[str, str | Path] | None = None,
    seed: int | None = None,
    command: list[str] | None = None,
    resume: bool = False,
    track: bool = True,
    prefix: str = "",
) -> StageRun:
    """Open (or, on ``resume``, possibly skip) the stage folder ``out``.

    With ``track`` the trackers chosen by ``report_to`` (:mod:`alignloop.tracking`) get the
    config, the lineage (inputs with their hashes), the step metrics and the final metrics.

    The stage is skipped when ``resume`` is set and the folder holds a complete manifest with
    the same fingerprint (config + input hashes) and a ``metrics.json``.
    """
    out = Path(out)
    cfg = _config_dict(config)
    ins = {k: describe_input(v) for k, v in (inputs or {}).items()}
    fp = fingerprint(cfg, ins)
    manifest_path = out / f"{prefix}manifest.json"
    if resume and manifest_path.is_file() and (out / f"{prefix}metrics.json").is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("status") == "complete" and old.get("fingerprint") == fp:
                say(f"[{name}] inputs and config unchanged since {old.get('end_time')}: skipped (--resume)")
                metrics = json.loads((out / f"{prefix}metrics.json").read_text())
                return StageRun(out, name, old, skipped=True, metrics=metrics, prefix=prefix)
        except (json.JSONDecodeError, OSError):
            pass
    manifest = {
        "stage": name,
        "command": command if command is not None else sys.argv,
        "config": cfg,
        "inputs": ins,
        "fingerprint": fp,
        "seed": seed,
        "versions": package_versions(),
        "device": device_info(),
        "host": platform.node(),
        "start_time": _now(),
        "status": "running",
        "_t0": time.time(),
    }
    trackers = None
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / f"{prefix}metrics.jsonl").exists():
            (out / f"{prefix}metrics.jsonl").unlink()
        write_json_atomic(manifest_path, {k: v for k, v in manifest.items() if k != "_t0"})
        if track:
            from alignloop.tracking import open_trackers

            shown = {
                "stage": name,
                "config": cfg,
                "lineage": ins,
                "seed": seed,
                "versions": manifest["versions"],
            }
            trackers = open_trackers(out, name, shown, resume)
    return StageRun(out, name, manifest, _trackers=trackers, prefix=prefix)


def start_file_stage(path: str | Path, name: str, **kwargs: Any) -> StageRun:
    """:func:`start_stage` for a stage whose output is one file (``pairs.jsonl``): its manifest and
    metrics go beside it, as ``pairs.jsonl.manifest.json`` and ``pairs.jsonl.metrics.json``."""
    path = Path(path)
    return start_stage(path.parent, name, prefix=f"{path.name}.", track=False, **kwargs)


@contextmanager
def stage_guard(run: StageRun) -> Iterator[StageRun]:
    """Mark the manifest failed if the body raises, then re-raise."""
    try:
        yield run
    except BaseException as e:
        run.fail(f"{type(e).__name__}: {e}")
        raise


def unchanged_since(out: str | Path, config: Any) -> bool | None:
    """Whether the stage folder ``out`` was run with this config and inputs still as they were.

    None when ``out`` has no manifest. Inputs are re-hashed from the paths the manifest recorded; a
    named input (``world:base``) is re-hashed where that name points now, so a run folder copied to
    another checkout (or after the one it ran in is gone) still resumes when its world model is the same.
    A caller that resumes stages (the loop) restarts a stage from scratch when this is False,
    rather than continuing a checkpoint made with other settings.
    """
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    if old.get("config") != _config_dict(config):
        return False
    for rec in old.get("inputs", {}).values():
        if rec.get("id") is not None:
            if describe_input(rec["id"])["sha256"] != rec.get("sha256"):
                return False
            continue
        p = rec.get("path")
        if p is not None and (not Path(p).exists() or sha256_path(p) != rec.get("sha256")):
            return False
    return True


def read_metrics(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def read_metrics_log(folder: str | Path) -> list[dict[str, Any]]:
    p = Path(folder) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

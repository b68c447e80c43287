"""Checkpoint folders that are either whole or detectably damaged (shared by the trainers).

A checkpoint is written into a hidden temporary folder, every file's size and SHA-256 go into its
``state.json``, everything is fsynced, and one rename makes it the checkpoint: a kill leaves either
the old folder or the new one, never half of one. On ``--resume`` :func:`verify_folder` re-reads the
sizes and hashes, so a file truncated or altered afterwards (a full disk, a copy cut short) is found
and the trainer falls back to the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from alignloop.errors import UserError
from alignloop.runs import say, write_json_atomic

T = TypeVar("T")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_folder(final: Path, write: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Call ``write(tmp)`` on a fresh hidden folder, record each file's size and SHA-256 in its
    ``state.json`` (with ``info``), fsync everything and rename it to ``final``."""
    tmp = fresh_folder(final)
    write(tmp)
    seal_folder(tmp, final, info)


def fresh_folder(final: Path) -> Path:
    """The empty hidden folder that becomes ``final`` once sealed."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def seal_folder(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    """Record each file of ``tmp`` (size, SHA-256) in its ``state.json`` with ``info``, fsync, and
    rename it to ``final`` (several processes may have written into ``tmp``: one seals it)."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
    write_json_atomic(tmp / "state.json", {**info, "files": files})
    for f in tmp.iterdir():  # on disk before the rename makes them the checkpoint
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    remove_folder(final)
    os.replace(tmp, final)


def write_step(root: Path, step: int, write: Callable[[Path], None], info: dict[str, Any], keep: int) -> Path:
    """``root/step-<step>`` written by :func:`write_folder`; then only the newest ``keep`` step folders
    stay (the older kept one is the fallback when the newest is found damaged)."""
    final = step_folder(root, step)
    write_folder(final, write, info)
    prune(root, keep)
    return final


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` step folders of ``root`` (and delete what a killed prune left hidden)."""
    for left in root.glob(".old-step-*"):  # hidden already: deleting it part-way is harmless
        shutil.rmtree(left, ignore_errors=True)
    for old in sorted(root.glob("step-*"))[:-keep]:
        remove_folder(old)


def remove_folder(folder: Path) -> None:
    """Delete ``folder`` so that a kill part-way never leaves half of it under its own name: one
    rename hides it first (``.old-<name>``), then the hidden copy is deleted. A hidden copy left by an
    earlier kill is deleted here too."""
    hidden = folder.with_name(f".old-{folder.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    if folder.exists():
        os.replace(folder, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def verify_folder(folder: Path) -> dict[str, Any]:
    """``folder``'s ``state.json``, after checking every file it lists: raises ``ValueError`` saying what
    is wrong when ``state.json`` is unreadable or a file is missing, truncated or altered."""
    try:
        info = json.loads((folder / "state.json").read_text())
        files = info["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"state.json unreadable ({type(e).__name__}: {e})") from None
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            raise ValueError(f"{name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise ValueError(f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written (truncated)")
        if file_sha256(f) != want["sha256"]:
            raise ValueError(f"{name} does not match the SHA-256 recorded when it was written")
    return info


def newest_intact(root: Path, check: Callable[[Path], T], trainer: str) -> tuple[Path, T] | None:
    """The newest ``root/step-*`` folder that ``check`` accepts, with what ``check`` returned.

    ``check`` raises ``ValueError`` saying what is wrong with a damaged folder: that one is reported
    (``[trainer] warning: ... falling back to the previous one``) and the one before it is tried.
    None when there is no checkpoint at all; a :class:`UserError` when every one is damaged.
    """
    found = sorted(root.glob("step-*"), reverse=True)
    problems = []
    for folder in found:
        try:
            return folder, check(folder)
        except ValueError as e:
            problems.append(f"{folder.name}: {e}")
            say(
                f"[{trainer}] warning: checkpoint {folder} is damaged ({e}); falling back to the previous one"
            )
    if found:
        raise UserError(
            "every checkpoint is damaged (" + "; ".join(problems) + ")",
            str(root),
            "run without --resume to start over",
        )
    return None


def truncate_metrics_log(folder: Path, step: int) -> None:
    """Drop ``folder/metrics.jsonl`` rows logged after ``step`` (a resumed run logs them again);
    a torn last line from a kill is dropped too."""
    p = folder / "metrics.jsonl"
    if not p.is_file():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    p.write_text("".join(x + "\n" for x in keep))

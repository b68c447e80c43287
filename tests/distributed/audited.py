"""Run ``alignloop <args>`` with every file write of this process recorded (a Python audit hook).

Launched by the distributed tests in place of ``-m alignloop``, one copy per process::

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/audited.py reward train ...

Each process appends the paths it opens for writing, creates, renames or deletes to
``$ALIGNLOOP_AUDIT_DIR/rank-<RANK>.txt`` (one path a line), so a test can check that only
rank 0 touched the run folder. Writes done in native code (safetensors' Rust writer) are not
seen, but the folders and temporary files around them are.
"""

from __future__ import annotations

import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.rename", "os.symlink"}


def _install(log_path: str) -> None:
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # opened before the hook: not recorded
    busy = False

    def record(path: object) -> None:
        nonlocal busy
        if busy or not isinstance(path, (str, bytes, os.PathLike)):
            return
        busy = True
        try:
            log.write(os.path.abspath(os.fsdecode(path)) + "\n")
        finally:
            busy = False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing:
                record(path)
        elif event in PATH_EVENTS:
            record(args[0])
            if event == "os.rename":
                record(args[1])

    sys.addaudithook(hook)


if __name__ == "__main__":
    audit_dir = os.environ["ALIGNLOOP_AUDIT_DIR"]
    os.makedirs(audit_dir, exist_ok=True)
    _install(os.path.join(audit_dir, f"rank-{os.environ.get('RANK', '0')}.txt"))
    from alignloop.cli import main

    sys.exit(main(sys.argv[1:]))

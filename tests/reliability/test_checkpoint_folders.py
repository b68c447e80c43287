"""A kill while old checkpoints are pruned never leaves half a checkpoint under its own name.

CI once caught it (a DPO run killed while ``prune`` deleted the oldest step folder left
``step-00000002`` without its weights file): deleting a folder file by file is not atomic, so the
folder is first renamed out of sight and then deleted.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from alignloop.checkpoints import prune, remove_folder, verify_folder, write_folder

FILES = 1500  # enough that deleting one folder takes a while (about 0.1 s), so the kills land part-way

PRUNE = """
import sys
from pathlib import Path
from alignloop.checkpoints import prune
print("go", flush=True)
prune(Path(sys.argv[1]), 1)
"""


def _checkpoint(root: Path, step: int) -> None:
    def write(tmp: Path) -> None:
        for i in range(FILES):
            (tmp / f"part-{i:05d}.bin").write_bytes(bytes([i % 256]) * 16)

    write_folder(root / f"step-{step:08d}", write, {"step": step})


def test_a_kill_while_pruning_leaves_only_whole_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    part_way = 0
    for delay in (0.0, 0.03, 0.08):
        for step in (1, 2, 3):
            if not (root / f"step-{step:08d}").exists():
                _checkpoint(root, step)
        proc = subprocess.Popen([sys.executable, "-c", PRUNE, str(root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "go\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        visible = sorted(root.glob("step-*"))
        assert visible and visible[-1].name == "step-00000003"
        for folder in visible:  # every folder under its own name is whole
            assert verify_folder(folder)["step"] == int(folder.name.split("-")[1])
        part_way += any(p.name.startswith(".old-") for p in root.iterdir())
    assert part_way, "no kill landed while a folder was being deleted: the test did not test anything"

    prune(root, 1)  # the next prune also clears what a killed one left hidden
    assert [p.name for p in root.iterdir()] == ["step-00000003"]


def test_remove_folder_replaces_a_hidden_leftover_and_tolerates_a_missing_folder(tmp_path):
    old = tmp_path / ".old-best-1"
    old.mkdir()
    (old / "x").write_text("left by a kill")
    remove_folder(tmp_path / "best-1")  # nothing under that name: only the leftover goes
    assert list(tmp_path.iterdir()) == []

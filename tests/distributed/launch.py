"""Launch alignloop as several real processes (gloo on CPU, loopback only) and read what they wrote."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
AUDITED = str(HERE / "audited.py")
CONFIGS = HERE.parents[1] / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_bin() -> str:
    found = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert found, "accelerate's launcher is not installed"
    return found


def command(args: list[str], processes: int, launcher: str = "accelerate") -> list[str]:
    """The command line that runs ``alignloop <args>`` (audited) on ``processes`` processes.

    ``processes=1``: plain python, no launcher. ``accelerate``: ``accelerate launch --multi_gpu`` (on a CPU
    that is gloo DDP; ``--cpu`` would silently start ONE process). ``accelerate-config``: ``accelerate
    launch --config_file configs/accelerate/cpu.yaml``. ``fsdp``: the same with fsdp.yaml (FSDP2). ``torchrun``: ``torch.distributed.run``.
    """
    if processes == 1:
        return [sys.executable, AUDITED, *args]
    port = str(free_port())
    if launcher == "accelerate-config":  # the shipped CPU config file instead of flags
        return [
            accelerate_bin(), "launch", "--config_file", str(CONFIGS / "cpu.yaml"), "--num_processes", str(processes),
            "--main_process_port", port, AUDITED, *args,
        ]  # fmt: skip
    if launcher == "fsdp":  # the shipped FSDP2 config; fp32 on a CPU (the file says bf16 for GPUs)
        return [
            accelerate_bin(), "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", str(processes),
            "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", port, AUDITED, *args,
        ]  # fmt: skip
    if launcher == "accelerate":
        return [
            accelerate_bin(), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", port, AUDITED, *args,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", port, AUDITED, *args,
    ]  # fmt: skip


def environment(audit_dir: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNLOOP_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["ALIGNLOOP_AUDIT_DIR"] = str(audit_dir)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run(args: list[str], processes: int, audit_dir: Path, launcher: str = "accelerate", timeout: float = 300):
    """Run to the end; fail the test with the output on a non-zero exit."""
    res = subprocess.run(
        command(args, processes, launcher),
        env=environment(audit_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def run_and_kill(
    args: list[str],
    processes: int,
    audit_dir: Path,
    when: Callable[[], bool],
    launcher: str = "accelerate",
    timeout: float = 300,
) -> None:
    """Start the run, SIGKILL the launcher and every process under it as soon as ``when()`` holds, wait.

    The launchers start their workers in sessions of their own, so the tree is walked (psutil, which
    accelerate needs anyway) and each process of it is killed by its id.
    """

    proc = subprocess.Popen(
        command(args, processes, launcher), env=environment(audit_dir),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + timeout
    try:
        while not when() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"the run ended (exit {proc.returncode}) before it could be killed:\n{proc.stderr.read()[-4000:]}"
        )
        assert when(), "timed out waiting for the moment to kill the run"
    finally:
        _kill_tree(proc.pid)
        proc.communicate(timeout=60)


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def written_by(audit_dir: Path, rank: int, under: Path) -> list[str]:
    """Paths under ``under`` that process ``rank`` wrote, created, renamed or removed."""
    log = audit_dir / f"rank-{rank}.txt"
    assert log.is_file(), f"process {rank} never ran (no {log})"
    root = str(under.resolve())
    return [p for p in log.read_text().splitlines() if p == root or p.startswith(root + os.sep)]

"""The labelling app under load and a crash: 50 labellers over HTTP, ``kill -9`` mid-load, restart.

The server is a real ``alignloop label serve`` process; the 50 labellers run in another
process (:mod:`alignloop.feedback.loadtest`), each a keep-alive connection that retries a
request broken by the crash with the same body (the same client-made submission id). After the
restart every labeller goes on until nothing is left; then every submission the server
acknowledged must be in the store exactly once, and nothing else may be. With a one-second
lease the sets held at the crash expire while the server is down: a retried submission is then
stored if its set still has room, or refused with the lease's 409 (never acknowledged, never
stored), and the released slots go to other labellers. Counts and time are
bounded (a fixed number of sets, a deadline); traffic stays on 127.0.0.1. Times are printed,
never asserted.
"""

from __future__ import annotations

import signal
import time

from alignloop.feedback import loadtest
from alignloop.feedback import store as st
from alignloop.records import CompletionSet

CLIENTS = 50
SETS = 120  # x k=2 labellers = 240 submissions
KILL_AFTER = 60  # labels stored before the crash


def fill(db: str) -> dict[str, str]:
    st.create_project(db, per_set=2)
    st.import_sets(
        db,
        [
            CompletionSet(
                prompt_id=f"s{i}",
                prompt=f"question {i}?",
                completions=[{"id": f"c{j}", "text": f"answer {i}.{j}"} for j in range(4)],
            )
            for i in range(SETS)
        ],
    )
    return {f"l{i:02d}": st.invite(db, f"l{i:02d}")["token"] for i in range(CLIENTS)}


def wait_for_labels(db: str, n: int, timeout: float = 120) -> int:
    start = time.monotonic()
    while (got := st.project_progress(db)["labels"]) < n:
        assert time.monotonic() - start < timeout, f"only {got} labels after {timeout} s"
        time.sleep(0.05)
    return got


def test_fifty_labellers_at_once_lose_and_double_nothing(db_url, tmp_path, capsys):
    """The load alone, no crash: its figures are printed (benchmarks/labelling.py measures)."""
    tokens = fill(db_url)
    port = loadtest.free_port()
    server = loadtest.start_server(db_url, port)
    try:
        cpu0 = loadtest.process_cpu_seconds(server.pid)
        load = loadtest.start_load(f"http://127.0.0.1:{port}", tokens, tmp_path, duration=150)
        out = loadtest.finish_load(load, tmp_path, timeout=200)
        cpu = loadtest.process_cpu_seconds(server.pid) - cpu0
    finally:
        loadtest.stop_server(server)
    result = loadtest.audit(db_url, out["acked"])
    fig = out["figures"]
    with capsys.disabled():
        print(
            f"\n[load] {db_url.split(':')[0]}: {fig['clients']} labellers, {fig['submissions']} submissions, "
            f"{fig['submissions_per_s']} subm/s, submit p50 {fig['submit_p50_ms']} ms p99 {fig['submit_p99_ms']} ms, "
            f"server CPU {1000 * cpu / max(1, fig['submissions']):.2f} ms/submission, "
            f"lost {result['lost']} doubled {result['doubled']} unacknowledged {result['unacknowledged']}"
        )
    assert out["refused"] == [] and out["unanswered"] == [] and out["network_errors"] == 0
    assert result["lost"] == result["doubled"] == result["unacknowledged"] == 0
    assert result["mismatched"] == result["inconsistent"] == 0
    assert result["acknowledged"] == SETS * 2
    st.close_store(db_url)


def test_kill_9_mid_load_then_restart_keeps_every_acknowledged_submission_once(db_url, tmp_path, capsys):
    """With one-second leases, so that the sets held when the server dies expire before it is back."""
    crash_and_check(db_url, tmp_path, workers=1, capsys=capsys, lease=1.0)


def test_kill_9_with_two_server_processes_on_one_sqlite_file(tmp_path, capsys):
    """Two worker processes write the same SQLite file (WAL); the crash takes both down."""
    crash_and_check(f"sqlite:///{tmp_path / 'labels.db'}", tmp_path, workers=2, capsys=capsys)


def crash_and_check(db: str, tmp_path, workers: int, capsys, lease: float | None = None) -> None:
    tokens = fill(db)
    port = loadtest.free_port()
    url = f"http://127.0.0.1:{port}"
    server = loadtest.start_server(
        db, port, workers=workers, extra=["--lease-seconds", str(lease)] if lease else None
    )
    load = loadtest.start_load(url, tokens, tmp_path, duration=150)
    try:
        wait_for_labels(db, KILL_AFTER)
        loadtest.stop_server(server, signal.SIGKILL)  # the whole process group, mid-load
        at_kill = st.project_progress(db)["labels"]
        time.sleep(0.3)
        server = loadtest.start_server(
            db, port, workers=workers, extra=["--lease-seconds", str(lease)] if lease else None
        )
        out = loadtest.finish_load(load, tmp_path, timeout=200)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        loadtest.stop_server(server)
    result = loadtest.audit(db, out["acked"])
    released = st.project_progress(db)["released"]
    # with leases, the only refusal allowed is a late submission to a set that filled meanwhile
    too_late = [r for r in out["refused"] if r["status"] == 409 and "not stored" in r["detail"]]
    with capsys.disabled():
        print(
            f"\n[kill -9] {db.split(':')[0]}, {workers} worker(s), lease {lease or 'default'}: killed at "
            f"{at_kill} of {SETS * 2} labels, {out['network_errors']} broken requests retried; slots released "
            f"{released}, late submissions refused {len(too_late)}; audit {result}"
        )
    assert at_kill < SETS * 2 and out["network_errors"] > 0  # the crash came mid-load
    if lease is None:
        assert released == {}
    # with one-second leases, whether a set held at the crash is still unsubmitted when the server is back
    # depends on the restart's speed (PostgreSQL: some expire; SQLite restarts first and the retries land):
    # expiry itself is tested deterministically in tests/feedback (leases); here what must hold either way
    # is below: nothing lost or doubled, and the only refusals are late submissions to filled sets
    assert set(released) <= {"lease expired"}
    assert out["refused"] == (too_late if lease is not None else []) and out["unanswered"] == []
    stored = {r["submission_id"] for r in st.submission_ledger(db)["labels"]}
    assert not any(r["submission_id"] in stored for r in too_late)  # refused means not stored
    assert result["lost"] == 0
    assert result["doubled"] == 0
    assert result["unacknowledged"] == 0
    assert result["mismatched"] == 0 and result["inconsistent"] == 0
    # the work was finished after the restart: every set has its k labels, each acknowledged
    assert result["acknowledged"] == result["stored"] == SETS * 2
    assert st.project_progress(db)["complete"]
    st.close_store(db)

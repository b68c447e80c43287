"""The labelling app under load: 50 labellers at once over HTTP on loopback (issue 14).

Each side starts a real ``alignloop label serve`` on a fresh copy of one SQLite database
(K=4 completions a set, k=3 labellers a set), and a load generator in its own process drives
50 keep-alive connections, each a labeller looping ``POST /api/next`` + ``POST .../submit``
(:mod:`alignloop.feedback.loadtest`). The sides alternate (A B C D A B C D) in one run:

    1 worker            alignloop label serve --db sqlite:///...      (the default)
    2 workers           alignloop label serve --db sqlite:///... --workers 2
    1 worker @ 300/s    the same, the labellers paced to 300 submissions/s all together
    2 workers @ 300/s

Unpaced, each labeller submits again the moment it is answered: that finds the most the server
can do, and its latency is mostly the queue the 50 clients make themselves (50 clients at X
subm/s wait about 50/X s a cycle). Paced at the issue's 300/s, latency is the service time at
that load, which is what a labeller feels.

Per side: submissions/s, submit p50/p99 latency, server CPU milliseconds per submission (the
next + submit pair; CPU time, so it does not depend on what else the machine runs) and the
submissions/s one fully used core would give at that cost. After every run the store is
audited: lost (acknowledged, not stored), doubled, and stored-but-unacknowledged are all 0.

    python benchmarks/labelling.py                 # 50 clients, 15 s per run, 2 rounds
    python benchmarks/labelling.py --quick         # a smoke run: 3 s per run, 1 round

Wall-clock figures depend on the machine's other load (the load average is printed); the
CPU-per-submission figure and the ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from alignloop.feedback import loadtest
from alignloop.feedback import store as st
from alignloop.records import CompletionSet


def make_database(path: Path, n_sets: int, clients: int) -> dict[str, str]:
    """A SQLite store with ``n_sets`` sets of 4 completions (k=3) and ``clients`` labellers."""
    db = f"sqlite:///{path}"
    st.create_project(db, per_set=3)
    st.import_sets(
        db,
        [
            CompletionSet(
                prompt_id=f"s{i}",
                prompt=f"Question {i}: how do I keep a cat off the table?",
                completions=[
                    {"id": f"c{j}", "text": f"Answer {j} to question {i}. " + "Some words of advice. " * 8}
                    for j in range(4)
                ],
            )
            for i in range(n_sets)
        ],
    )
    tokens = {f"labeller{i:02d}": st.invite(db, f"labeller{i:02d}")["token"] for i in range(clients)}
    st.close_store(db)
    return tokens


def one_run(
    template: Path, folder: Path, tokens: dict[str, str], workers: int, rate: float | None, seconds: float
) -> dict:
    """Copy the template database, serve it, load it for ``seconds``, audit it."""
    folder.mkdir(parents=True)
    path = folder / "labels.db"
    shutil.copy(template, path)
    db = f"sqlite:///{path}"
    port = loadtest.free_port()
    server = loadtest.start_server(db, port, workers=workers)
    try:
        cpu0 = loadtest.process_cpu_seconds(server.pid)
        load = loadtest.start_load(f"http://127.0.0.1:{port}", tokens, folder, duration=seconds, rate=rate)
        out = loadtest.finish_load(load, folder, timeout=seconds + 120)
        cpu = loadtest.process_cpu_seconds(server.pid) - cpu0
    finally:
        loadtest.stop_server(server)
    fig = out["figures"]
    fig["server_cpu_ms_per_submission"] = 1000 * cpu / max(1, fig["submissions"])
    fig["refused"] = len(out["refused"])
    fig.update(loadtest.audit(db, out["acked"]))
    st.close_store(db)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 s per run, one round")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=15.0, help="load duration of each run")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds")
    ap.add_argument("--sets", type=int, default=4000, help="sets in the database (x3 labels each)")
    ap.add_argument("--rate", type=float, default=300.0, help="submissions/s of the paced sides")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.sets = 3.0, 1, 600

    paced = f"@ {args.rate:g}/s"
    sides = {
        "1 worker": (1, None),
        "2 workers": (2, None),
        f"1 worker {paced}": (1, args.rate),
        f"2 workers {paced}": (2, args.rate),
    }
    results: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.db"
        print(
            f"making a store: {args.sets} sets x 4 completions, k=3, {args.clients} labellers ...", flush=True
        )
        tokens = make_database(template, args.sets, args.clients)
        for r in range(args.rounds):
            for i, (name, (workers, rate)) in enumerate(sides.items()):
                fig = one_run(template, Path(tmp) / f"{r}-{i}", tokens, workers, rate, args.seconds)
                results[name].append(fig)
                print(
                    f"  round {r + 1} {name:18} {fig['submissions_per_s']:7.1f} submissions/s  "
                    f"p99 {fig['submit_p99_ms']:7.1f} ms  {fig['server_cpu_ms_per_submission']:5.2f} ms CPU  "
                    f"lost {fig['lost']} doubled {fig['doubled']}  (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )

    def med(name: str, key: str) -> float:
        return statistics.median(f[key] for f in results[name])

    print()
    print(
        f"{args.clients} labellers over HTTP on loopback, SQLite (WAL), medians of {args.rounds} runs of "
        f"{args.seconds:g} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"(client and server share them)"
    )
    head = (
        f"{'':20}{'subm/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/subm':>13}{'subm/s/core':>13}"
        f"{'lost':>6}{'doubled':>9}{'unacked':>9}{'refused':>9}"
    )
    print(head)
    for name in sides:
        cpu = med(name, "server_cpu_ms_per_submission")
        print(
            f"{name:20}{med(name, 'submissions_per_s'):>9.1f}{med(name, 'submit_p50_ms'):>9.1f}"
            f"{med(name, 'submit_p99_ms'):>9.1f}{cpu:>13.2f}{1000 / cpu:>13.0f}"
            f"{sum(f['lost'] for f in results[name]):>6}{sum(f['doubled'] for f in results[name]):>9}"
            f"{sum(f['unacknowledged'] for f in results[name]):>9}{sum(f['refused'] for f in results[name]):>9}"
        )
    a, b = "1 worker", "2 workers"
    print(
        f"ratio (2 workers / 1 worker): submissions/s {med(b, 'submissions_per_s') / med(a, 'submissions_per_s'):.2f}x, "
        f"p99 {med(b, 'submit_p99_ms') / med(a, 'submit_p99_ms'):.2f}x, "
        f"CPU per submission {med(b, 'server_cpu_ms_per_submission') / med(a, 'server_cpu_ms_per_submission'):.2f}x"
    )
    client_cpu = statistics.median(
        1000 * f["client_cpu_s"] / max(1, f["submissions"]) for fs in results.values() for f in fs
    )
    print(f"load generator: {client_cpu:.2f} ms CPU per submission (its own process)")
    for name in sides:
        if paced in name:
            ok = med(name, "submissions_per_s") >= 0.97 * args.rate and med(name, "submit_p99_ms") < 100
            print(
                f"target ({args.rate:g} subm/s sustained, p99 < 100 ms, lost = doubled = 0), {name}: "
                f"{'met' if ok else 'NOT met'} here ({med(name, 'submissions_per_s'):.0f} subm/s, "
                f"p99 {med(name, 'submit_p99_ms'):.0f} ms)"
            )
    bad = sum(
        f["lost"] + f["doubled"] + f["unacknowledged"] + f["inconsistent"]
        for fs in results.values()
        for f in fs
    )
    if bad:
        print("STORE AUDIT FAILED: see lost / doubled / unacked above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")

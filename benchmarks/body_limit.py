"""One attacker's 100 MB uploads against the labelling app: refused at once, nobody else stalls (issue 21).

Two real ``alignloop label serve`` processes (SQLite, one worker each) run side by side:

    limit 1 MB      the default (--max-body-mb 1): bodies over 1 MB get 413 before being read
    no limit        --max-body-mb 1000: what the app did before the limit (the body is read and
                    parsed on the event loop, before authentication)

An attacker process sends 100 MB bodies back to back, without a token, to a labeller's submit
route (alternately with Content-Length and chunked), while this process times ``GET /healthz``
on fresh connections. Phases alternate in one run (A B C D, A B C D): each server idle, then
under attack. Per phase: /healthz median, p99 and max; the attacker's answers (413, or what the
unlimited server said) with their median and max latency, and how many MB each upload got into
the socket before the answer (the server reads no more than that).

    python benchmarks/body_limit.py            # 4 s a phase, 2 rounds
    python benchmarks/body_limit.py --quick    # 1.5 s a phase, 1 round
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from alignloop.feedback import loadtest
from alignloop.feedback import store as st

MB = 1 << 20


def attack(port: int, seconds: float, results) -> None:
    """Back-to-back 100 MB anonymous uploads for ``seconds`` (in its own process)."""
    end = time.monotonic() + seconds
    out = []
    chunked = False
    while time.monotonic() < end:
        got = loadtest.oversized_upload(port, "POST", "/api/assignments/1/submit", 100 * MB, chunked=chunked)
        out.append((got.get("status"), got.get("seconds"), got["sent"]))
        chunked = not chunked
    results.put(out)


def phase(port: int, seconds: float, attacked: bool) -> dict:
    results: mp.Queue = mp.Queue()
    attacker = mp.Process(target=attack, args=(port, seconds, results)) if attacked else None
    if attacker:
        attacker.start()
        time.sleep(0.2)  # the first upload is under way
    health = []
    end = time.monotonic() + seconds - (0.2 if attacked else 0)
    while time.monotonic() < end:
        health.append(loadtest.healthz_seconds(port))
        time.sleep(0.01)
    uploads = results.get() if attacker else []
    if attacker:
        attacker.join()
    return {"health": health, "uploads": uploads}


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{1000 * values[min(len(values) - 1, int(q * len(values)))]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.5, 1
    folder = Path(tempfile.mkdtemp(prefix="bench-body-limit-"))
    sides = {"limit 1 MB": ["--max-body-mb", "1"], "no limit": ["--max-body-mb", "1000"]}
    servers, ports = {}, {}
    for i, (name, extra) in enumerate(sides.items()):
        db = f"sqlite:///{folder / f'{i}.db'}"
        st.create_project(db, per_set=1)
        st.close_store(db)
        ports[name] = loadtest.free_port()
        servers[name] = loadtest.start_server(db, ports[name], extra=extra)
    collected: dict[tuple[str, bool], dict] = {}
    try:
        for _ in range(args.rounds):
            for name in sides:
                for attacked in (False, True):
                    got = phase(ports[name], args.seconds, attacked)
                    into = collected.setdefault((name, attacked), {"health": [], "uploads": []})
                    into["health"] += got["health"]
                    into["uploads"] += got["uploads"]
    finally:
        for proc in servers.values():
            loadtest.stop_server(proc)
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.rounds} x {args.seconds} s a phase"
    )
    print(
        "| server | attack | /healthz n | p50 ms | p99 ms | max ms | uploads: answers | answer p50 ms | max ms | MB sent before the answer (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, attacked), got in collected.items():
        h, u = got["health"], got["uploads"]
        codes: dict = {}
        for status, _, _ in u:
            codes[status] = codes.get(status, 0) + 1
        answered = [s for status, s, _ in u if s is not None]
        sent = statistics.median([b / MB for _, _, b in u]) if u else 0
        print(
            f"| {name} | {'100 MB uploads' if attacked else 'none'} | {len(h)} | {ms(h, 0.5)} | {ms(h, 0.99)} | "
            f"{ms(h, 1.0)} | {codes or '-'} | {ms(answered, 0.5)} | {ms(answered, 1.0)} | {sent:.1f} |"
        )


if __name__ == "__main__":
    main()

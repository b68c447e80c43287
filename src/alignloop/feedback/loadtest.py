"""Many labellers at once over HTTP: the load generator behind the benchmark and the fault tests.

Each simulated labeller is one keep-alive HTTP/1.1 connection (plain asyncio streams: a full
HTTP client costs more CPU than the server it is measuring) that loops::

    POST /api/next                        -> an assignment, or none left: stop
    POST /api/assignments/{id}/submit     {"submission_id": <made here>, "ranks": ...}

A request that fails on the network (the server was killed, the connection dropped) is retried
with the *same* body, so the same submission id, until the server answers or the deadline
passes: a submission stored just before a crash is then acknowledged as a duplicate, never
stored twice. Every acknowledged (2xx) submission is recorded, so a caller can check the store
holds exactly those, each once.

Run it in its own process (``python -m alignloop.feedback.loadtest --url U --tokens FILE``) so
its CPU does not count as the server's; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class Dropped(Exception):
    """The connection broke before a whole answer arrived."""


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port`` that reconnects when it breaks."""

    def __init__(self, host: str, port: int, token: str):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request and read its answer: ``(status, body)``; raises :class:`Dropped`."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n".encode() + self.auth
            if body is not None:
                head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            self.writer.write(head + b"\r\n" + (body or b""))
            assert self.reader is not None
            lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            data = await self.reader.readexactly(length) if length else b""
            if close:
                await self.close()
            return status, data
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await self.close()
            raise Dropped() from None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _labeller(
    url: tuple[str, int],
    name: str,
    token: str,
    deadline: float,
    max_sets: int | None,
    out: dict[str, Any],
    seed: int,
    interval: float = 0.0,
) -> None:
    conn = Connection(url[0], url[1], token)
    rng = random.Random(seed)
    due = time.monotonic() + interval * rng.random()  # paced clients start spread out

    async def call(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes] | None:
        """The request, retried on network failures until the deadline; None when time ran out."""
        wait = 0.05
        while time.monotonic() < deadline:
            try:
                return await conn.request(method, path, body)
            except Dropped:
                out["network_errors"] += 1
                await asyncio.sleep(wait)
                wait = min(wait * 2, 0.5)
        return None

    n = 0
    try:
        while (max_sets is None or n < max_sets) and time.monotonic() < deadline:
            if interval:  # paced: one submission every `interval` seconds (none to catch up)
                if due >= deadline:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due = max(due + interval, time.monotonic())
            t0 = time.perf_counter()
            got = await call("POST", "/api/next")
            if got is None:
                break
            status, data = got
            out["next_latency"].append(time.perf_counter() - t0)
            if status != 200:
                out["refused"].append({"path": "/api/next", "status": status, "detail": data[:300].decode()})
                if status >= 500:
                    await asyncio.sleep(0.05)
                    continue
                break
            a = json.loads(data)["assignment"]
            if a is None:
                break
            cids = [c["id"] for c in a["completions"]]
            order = list(range(1, len(cids) + 1))
            rng.shuffle(order)
            sid = f"{name}-{n}-{secrets.token_hex(8)}"
            if a["mode"] == "thumbs":
                payload: dict[str, Any] = {"thumbs": {c: rng.choice(("up", "down")) for c in cids}}
            else:
                payload = {"ranks": dict(zip(cids, order, strict=True))}
            body = json.dumps({"submission_id": sid, **payload}).encode()
            path = f"/api/assignments/{a['assignment_id']}/submit"
            while True:  # a 5xx is retried with the same submission id, like a network error
                t0 = time.perf_counter()
                got = await call("POST", path, body)
                if got is None:
                    out["unanswered"].append(sid)
                    return
                status, data = got
                if status < 500:
                    break
                out["refused"].append({"path": path, "status": status, "detail": data[:300].decode()})
                await asyncio.sleep(0.05)
            out["submit_latency"].append(time.perf_counter() - t0)
            if status == 200:
                answer = json.loads(data)
                out["acked"].append({"submission_id": sid, "labeller": name, "set_id": a["set_id"], **answer})
                n += 1
            else:
                detail = data[:300].decode()
                out["refused"].append(
                    {"path": path, "status": status, "detail": detail, "submission_id": sid}
                )
    finally:
        await conn.close()


async def run_load(
    url: str,
    tokens: dict[str, str],
    *,
    duration: float = 30.0,
    max_sets: int | None = None,
    seed: int = 0,
    rate: float | None = None,
) -> dict[str, Any]:
    """Every labeller in ``tokens`` (name -> token) labels at once until nothing is left for them,
    ``max_sets`` each, or ``duration`` seconds.

    Without ``rate`` each labeller submits again as soon as it is answered (a closed loop: the
    server is saturated, and latency is mostly the queue the clients make themselves). With
    ``rate`` (submissions/s, all labellers together) each labeller is paced to its share, as
    people are: latency is then the service time at that load.

    Returns the acknowledged submissions (``acked``: submission id, labeller, set id, status,
    label id), the refusals, submissions never answered, network errors, and the figures:
    submissions/s, submit and next latency percentiles (ms).
    """
    parts = urlsplit(url)
    where = (parts.hostname or "127.0.0.1", parts.port or 80)
    out: dict[str, Any] = {
        "acked": [],
        "refused": [],
        "unanswered": [],
        "network_errors": 0,
        "submit_latency": [],
        "next_latency": [],
    }
    interval = len(tokens) / rate if rate else 0.0
    start = time.perf_counter()
    deadline = time.monotonic() + duration
    await asyncio.gather(
        *(
            _labeller(where, name, tok, deadline, max_sets, out, seed * 100_003 + i, interval)
            for i, (name, tok) in enumerate(sorted(tokens.items()))
        )
    )
    wall = time.perf_counter() - start
    sub, nxt = out.pop("submit_latency"), out.pop("next_latency")
    out["figures"] = {
        "clients": len(tokens),
        "target_rate": rate,
        "wall_s": round(wall, 3),
        "submissions": len(out["acked"]),
        "submissions_per_s": round(len(out["acked"]) / wall, 1) if wall else 0.0,
        "submit_p50_ms": round(_percentile(sub, 50) * 1000, 1),
        "submit_p99_ms": round(_percentile(sub, 99) * 1000, 1),
        "next_p50_ms": round(_percentile(nxt, 50) * 1000, 1),
        "next_p99_ms": round(_percentile(nxt, 99) * 1000, 1),
    }
    return out


# ---------------------------------------------------------------------------------------------
# The harness: a real ``alignloop label serve`` process, the generator in its own process, audit


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """Read until the end of an HTTP response head: (status code, the raw head)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1]), head


def oversized_upload(
    port: int, method: str, path: str, size: int, token: str | None = None, chunked: bool = False
) -> dict[str, Any]:
    """Send ``method path`` to 127.0.0.1:``port`` with a ``size``-byte JSON body, as fast as the
    server takes it, until the server answers (the body-limit tests and benchmark).

    The body is declared with ``Content-Length`` or sent chunked without one. Returns
    ``{"status", "head", "seconds" (from the end of the request head to the status line),
    "sent" (body bytes the client got into the socket by then)}``.
    """
    import threading

    sock = socket.create_connection(("127.0.0.1", port))
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
    sock.sendall((head + "\r\n").encode())
    t0 = time.perf_counter()
    out: dict[str, Any] = {"sent": 0}

    def read() -> None:
        try:
            out["status"], out["head"] = _status(sock)
            out["seconds"] = time.perf_counter() - t0
        except (OSError, IndexError, ValueError):  # closed without an answer
            out["status"], out["head"], out["seconds"] = None, b"", None

    reader = threading.Thread(target=read)
    reader.start()
    block = b"[" + b"1," * 32767 + b"1]"  # 64 KiB of a JSON list
    piece = (f"{len(block):x}\r\n".encode() + block + b"\r\n") if chunked else block
    sock.settimeout(0.2)
    while reader.is_alive() and out["sent"] < size:
        try:
            sock.sendall(piece)
            out["sent"] += len(block)
        except OSError:  # the server stopped reading (answered and closed), or a timeout
            break
    reader.join(timeout=60)
    sock.close()
    return out


def healthz_seconds(port: int) -> float:
    """Seconds for one ``GET /healthz`` on a new connection to 127.0.0.1:``port``."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        code, _ = _status(s)
    if code != 200:
        raise RuntimeError(f"/healthz answered {code}")
    return time.perf_counter() - t0


def start_server(
    db_url: str, port: int, workers: int = 1, timeout: float = 60.0, extra: list[str] | None = None
) -> subprocess.Popen:
    """Start ``alignloop label serve`` on 127.0.0.1:``port`` and wait until it answers /healthz.

    The server gets its own process group, so :func:`stop_server` (or ``kill -9``) reaches
    every worker process. ``extra``: more ``label serve`` options.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignloop", "label", "serve", "--db", db_url, "--port", str(port)]
        + (["--workers", str(workers)] if workers != 1 else [])
        + (extra or []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() - start > timeout:
            stop_server(proc)
            raise RuntimeError(f"the server did not answer within {timeout} s")
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the server's whole process group (SIGKILL: the crash) and reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    if proc.stderr is not None:
        proc.stderr.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children so far (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def start_load(url: str, tokens: dict[str, str], folder: Path, **options: Any) -> subprocess.Popen:
    """:func:`run_load` in its own process; :func:`finish_load` collects its JSON answer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokens.json").write_text(json.dumps(tokens))
    args = [sys.executable, "-m", "alignloop.feedback.loadtest", "--url", url]
    args += ["--tokens", str(folder / "tokens.json"), "--out", str(folder / "load.json")]
    for key, value in options.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_load(proc: subprocess.Popen, folder: Path, timeout: float = 300) -> dict[str, Any]:
    """Wait for a :func:`start_load` process; its result, with ``figures["client_cpu_s"]``."""
    start = time.monotonic()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the load generator did not finish within {timeout} s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr is not None:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed: {err}")
    out = json.loads((folder / "load.json").read_text())
    out["figures"]["client_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    return out


def audit(db_url: str, acked: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare what the server acknowledged with what the store holds.

    ``lost``: acknowledged but not stored; ``doubled``: stored more than once (the same
    submission id twice, or the same labeller twice on a set); ``unacknowledged``: stored but
    never acknowledged; ``inconsistent``: sets whose counters disagree with their rows or hold
    more than k labels. All four are 0 in a correct store.
    """
    from alignloop.feedback.store import submission_ledger

    ledger = submission_ledger(db_url)
    stored = Counter(r["submission_id"] for r in ledger["labels"])
    pairs = Counter((r["labeller"], r["set_id"]) for r in ledger["labels"])
    acked_ids = {a["submission_id"] for a in acked}
    by_id = {r["submission_id"]: r for r in ledger["labels"]}
    wrong = [
        a["submission_id"]
        for a in acked
        if a["submission_id"] in by_id
        and (by_id[a["submission_id"]]["label_id"], by_id[a["submission_id"]]["set_id"])
        != (a["label_id"], a["set_id"])
    ]
    bad_sets = [
        s
        for s in ledger["sets"]
        if s["n_done"] != s["labels"]
        or s["n_assigned"] != s["labels"] + s["open"]
        or s["labels"] > s["per_set"]
    ]
    return {
        "acknowledged": len(acked_ids),
        "stored": len(ledger["labels"]),
        "lost": len(acked_ids - set(stored)),
        "doubled": sum(n - 1 for n in stored.values() if n > 1) + sum(n - 1 for n in pairs.values() if n > 1),
        "unacknowledged": len(set(stored) - acked_ids),
        "mismatched": len(wrong),
        "inconsistent": len(bad_sets),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--tokens", required=True, help="JSON file: {labeller name: token}")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-sets", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, help="pace all labellers together to this many submissions/s")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    args = ap.parse_args(argv)
    tokens = json.loads(Path(args.tokens).read_text())
    result = asyncio.run(
        run_load(
            args.url, tokens, duration=args.duration, max_sets=args.max_sets, seed=args.seed, rate=args.rate
        )
    )
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

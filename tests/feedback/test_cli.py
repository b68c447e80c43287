"""``alignloop label ...``: start-up time without torch, import/invite/revoke, simulated labellers.
(Bad command lines: tests/reliability/test_app_bad_inputs.py.)"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import httpx
import pytest

from alignloop.feedback import store as st
from alignloop.records import CompletionSet, write_jsonl


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_sets(n: int, k: int = 4, seed: int = 0) -> list[CompletionSet]:
    """Completion sets made of the embedded world's prompts and sampled responses."""
    from alignloop.world import grammar as g

    rng = random.Random(seed)
    prompts = [p for p in g.all_prompts() if p.family != "summary"][:n]
    return [
        CompletionSet(
            prompt_id=f"w{i}",
            prompt=p.text,
            completions=[{"id": f"c{j}", "text": g.sample_response(p, rng)[1]} for j in range(k)],
        )
        for i, p in enumerate(prompts)
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_answer(db: str, token: str) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) from starting ``alignloop label serve`` to its first answer."""
    port = free_port()
    client = httpx.Client(timeout=0.5)  # made before the clock starts: a new client per try costs ~0.1 s CPU
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignloop", "label", "serve", "--db", db, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while True:
            try:
                r = client.get(
                    f"http://127.0.0.1:{port}/api/me", headers={"Authorization": f"Bearer {token}"}
                )
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.perf_counter() - start > 20:
                    raise AssertionError(proc.stderr.read().decode()) from None
                time.sleep(0.005)
        took = time.perf_counter() - start
        cpu = cpu_seconds(proc.pid)
        assert r.status_code == 200 and r.json()["name"] == "ada"
        return took, cpu
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_answers_within_a_second(db):
    """The server needs under a second of CPU from start to its first answer.

    On an idle core that is the wall time. The CI machine is shared (other test files train
    models next to this one), so wall time there is the neighbours' doing as much as ours:
    it is printed, and asserted only loosely; the CPU time is what this code controls.
    """
    st.create_project(db)
    st.import_sets(db, world_sets(2))
    token = st.invite(db, "ada")["token"]
    st.close_store(db)
    runs = [first_answer(db, token) for _ in range(2)]
    print("first answer after start: " + ", ".join(f"{w:.3f} s wall / {c:.3f} s CPU" for w, c in runs))
    assert min(c for _, c in runs) < 1.0
    assert min(w for w, _ in runs) < 10.0


def test_the_server_process_never_imports_torch(db):
    """What ``label serve`` runs, up to answering requests, in a fresh interpreter."""
    code = f"""
import sys
from alignloop.cli import build_parser
args = build_parser().parse_args(["label", "serve", "--db", {db!r}])
from fastapi.testclient import TestClient
from alignloop.feedback import store
from alignloop.feedback.app import create_app
app = create_app(args.db)
store.create_project(args.db, exist_ok=True)
tok = store.invite(args.db, "t")["token"]
adm = store.create_admin(args.db)["token"]
c = TestClient(app)
assert c.get("/api/next", headers={{"Authorization": "Bearer " + tok}}).status_code == 200
assert c.get("/admin", headers={{"Authorization": "Bearer " + adm}}).status_code == 200
assert c.get("/instructions", headers={{"Authorization": "Bearer " + tok}}).status_code == 200
print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout and "transformers" not in out.stdout


def test_import_invite_progress_revoke(cli, db, tmp_path):
    path = tmp_path / "sets.jsonl"
    write_jsonl(path, world_sets(3))
    code, out, err = cli("label", "import", "--db", db, "--completions", path, "--per-set", "2")
    assert code == 0, err
    assert json.loads(out) == {"added": 3, "unchanged": 0}
    assert json.loads(cli("label", "import", "--db", db, "--completions", path, "--per-set", "2")[1]) == {
        "added": 0,
        "unchanged": 3,
    }
    code, out, err = cli("label", "import", "--db", db, "--completions", path, "--per-set", "5")
    assert code == 2 and "per_set=2" in err and "Traceback" not in err
    code, out, _ = cli("label", "invite", "--db", db, "ada", "--url", "http://h:9")
    assert code == 0 and out.strip().startswith("http://h:9/login?token=")
    token = out.strip().split("token=")[1]
    assert st.authenticate(db, token).name == "ada"
    code, _, err = cli("label", "invite", "--db", db, "ada")
    assert code == 2 and err.count("\n") == 1 and "--new-link" in err
    prog = json.loads(cli("label", "progress", "--db", db)[1])
    assert prog["sets"] == 3 and prog["labels_needed"] == 6
    assert cli("label", "revoke", "--db", db, "ada")[0] == 0
    assert st.authenticate(db, token) is None
    code, _, err = cli("label", "revoke", "--db", db, "nobody")
    assert code == 2 and "no labeller named 'nobody'" in err
    admin_link = cli("label", "admin", "--db", db)[1].strip()
    assert st.authenticate(db, admin_link.split("token=")[1]).kind == "admin"


def test_simulate_over_http_labels_every_set_k_times(db, live_server, cli):
    st.create_project(db, per_set=3)
    st.import_sets(db, world_sets(6))
    admin = st.create_admin(db)["token"]
    code, out, err = cli("label", "simulate", "--url", live_server, "--admin-token", admin, "--seed", "1")
    assert code == 0, err
    counts = json.loads(out)
    assert len(counts) == 3 and sum(counts.values()) == 18
    prog = st.project_progress(db)
    assert prog["complete"] and prog["labels"] == 18
    sets, rankings, labellers = st.load_labels(db)
    by_set: dict[str, set[str]] = {}
    for r in rankings:
        by_set.setdefault(r.set_id, set()).add(r.labeller)
        assert set(r.ranks) == {"c0", "c1", "c2", "c3"}
    assert all(len(v) == 3 for v in by_set.values()) and len(by_set) == 6
    # a second run finds nothing left to do
    code, out, _ = cli("label", "simulate", "--url", live_server, "--admin-token", admin, "--seed", "1")
    assert code == 0 and sum(json.loads(out).values()) == 0


def test_simulate_through_the_store_with_a_chosen_profile(db, cli):
    st.create_project(db, per_set=1, mode="thumbs")
    st.import_sets(db, world_sets(4))
    code, out, err = cli("label", "simulate", "--db", db, "--profile", "careful")
    assert code == 0, err
    assert list(json.loads(out).values()) == [4]
    _, rankings, _ = st.load_labels(db)
    assert len(rankings) == 4 and all(set(r.thumbs.values()) <= {"up", "down"} for r in rankings)
    code, _, err = cli("label", "simulate", "--db", db, "--profile", "nobody")
    assert code == 2 and "choose from" in err


@pytest.mark.parametrize("n_clients", [8])
def test_concurrent_http_labellers_never_exceed_k(db, live_server, n_clients):
    """Many labellers at once over real HTTP: each set gets exactly k distinct labellers."""
    from alignloop.feedback.simulate import simulate

    st.create_project(db, per_set=2)
    st.import_sets(db, world_sets(10))
    admin = st.create_admin(db)["token"]

    def first(prompt, completions, mode):
        return {c["id"]: i + 1 for i, c in enumerate(completions)}

    counts = simulate([(f"u{i}", first) for i in range(n_clients)], url=live_server, admin_token=admin)
    assert sum(counts.values()) == 20
    prog = st.project_progress(db)
    assert all(s["labels"] == 2 == s["assigned"] for s in prog["per_set_progress"])
    _, rankings, _ = st.load_labels(db)
    pairs = [(r.set_id, r.labeller) for r in rankings]
    assert len(pairs) == len(set(pairs)) == 20

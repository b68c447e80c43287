"""Fixtures for the labelling app: a filled project, the app in-process, and a live server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from alignloop.feedback import store as st
from alignloop.records import CompletionSet


def _make_sets(n: int, k: int = 3, prefix: str = "p") -> list[CompletionSet]:
    return [
        CompletionSet(
            prompt_id=f"{prefix}{i}",
            prompt=f"question {i}?",
            completions=[{"id": f"c{j}", "text": f" answer {i}.{j}"} for j in range(k)],  # continuations
            model="tiny",
            sampling={"temperature": 1.0},
        )
        for i in range(n)
    ]


@pytest.fixture()
def make_sets():
    """``make_sets(n, k=3, prefix="p")``: n completion sets p0.. with k completions c0.. each."""
    return _make_sets


@pytest.fixture()
def db(db_url):
    yield db_url
    st.close_store(db_url)


@pytest.fixture()
def people(db):
    """A project with 3 sets of 3 completions (k=2), labellers ada and bob, and an admin."""
    st.create_project(db, per_set=2)
    st.import_sets(db, _make_sets(3))
    return {
        "db": db,
        "ada": st.invite(db, "ada")["token"],
        "bob": st.invite(db, "bob")["token"],
        "admin": st.create_admin(db)["token"],
    }


@pytest.fixture()
def client(people):
    from fastapi.testclient import TestClient

    from alignloop.feedback.app import create_app

    with TestClient(create_app(people["db"]), base_url="http://testserver") as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def serve_app():
    """``serve_app(app) -> base URL``: serve an app with uvicorn on a free loopback port (in a
    thread) until the test ends."""
    import uvicorn

    running = []

    def start(app) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def live_server(db, serve_app):
    """The app on ``db`` served by uvicorn on a free loopback port (in a thread); its base URL."""
    from alignloop.feedback.app import create_app

    return serve_app(create_app(db))

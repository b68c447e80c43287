"""Simulated labellers: the embedded world's labeller profiles label a project like people do.

With a server URL each simulated labeller is a real HTTP client of the JSON API (its own login
token, ``GET /api/next``, ``POST /api/assignments/{id}/submit`` with a client-made submission
id, retried with the same id after a network error); with a database URL they go through the
store directly. A labeller is a ``decide(prompt, completions, mode) -> ranks | thumbs`` function.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from alignloop.errors import UserError
from alignloop.feedback import store

Decide = Callable[[str, list[dict[str, str]], str], dict[str, Any]]


def world_panel(names: list[str] | None = None, seed: int = 0) -> list[tuple[str, Decide]]:
    """The world's simulated labellers as ``(name, decide)``; ``names`` picks profiles by name or kind."""
    try:
        from alignloop.world import labellers as wl
    except ImportError as e:
        raise UserError(
            f"the embedded world's simulated labellers are not available ({e})",
            fix="install alignloop with the world package",
        ) from None
    panel = wl.default_panel(seed)
    if names:
        chosen = [p for p in panel if p.name in names or getattr(p, "kind", None) in names]
        if not chosen:
            known = ", ".join(sorted({p.name for p in panel} | {p.kind for p in panel}))
            raise UserError(
                f"no simulated labeller matches {', '.join(names)}", "--profile", f"choose from {known}"
            )
        panel = chosen
    out = []
    for i, profile in enumerate(panel):
        rng = random.Random(seed * 1000 + i)

        def decide(
            prompt: str, completions: list[dict[str, str]], mode: str, p: Any = profile, r: Any = rng
        ) -> dict:
            if mode == "thumbs":
                return dict(wl.thumbs(p, prompt, completions, r))
            return dict(wl.rank(p, prompt, completions, r))

        out.append((f"sim-{profile.name}", decide))
    return out


def _body(a: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    return {
        "submission_id": secrets.token_hex(16),
        ("thumbs" if a["mode"] == "thumbs" else "ranks"): decision,
    }


def label_via_store(db_url: str, labeller_id: int, decide: Decide, max_sets: int | None = None) -> int:
    """Label until nothing is left for this labeller (or ``max_sets``); returns the number stored."""
    n = 0
    while max_sets is None or n < max_sets:
        a = store.next_assignment(db_url, labeller_id)
        if a is None:
            break
        body = _body(a, decide(a["prompt"], a["completions"], a["mode"]))
        store.submit(
            db_url,
            labeller_id,
            a["assignment_id"],
            body["submission_id"],
            body.get("ranks"),
            body.get("thumbs"),
        )
        n += 1
    return n


def label_via_http(
    url: str, token: str, decide: Decide, max_sets: int | None = None, retries: int = 5, client: Any = None
) -> int:
    """The same loop as a real HTTP client of the app at ``url``; returns the number stored.

    A request that fails on the network is retried with the same submission id, so a
    submission that reached the store before the connection broke is counted once.
    """
    import httpx

    own = client is None
    client = client or httpx.Client(base_url=url.rstrip("/"), timeout=30)
    headers = {"Authorization": f"Bearer {token}"}

    def call(method: str, path: str, **kw: Any) -> Any:
        for attempt in range(retries + 1):
            try:
                r = client.request(method, path, headers=headers, **kw)
            except httpx.TransportError:
                if attempt == retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code >= 500 and attempt < retries:
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code >= 400:
                detail = (
                    r.json().get("detail", r.text) if "json" in r.headers.get("content-type", "") else r.text
                )
                raise UserError(f"{method} {path} answered {r.status_code}: {detail}", url)
            return r.json()
        raise AssertionError("unreachable")

    n = 0
    try:
        while max_sets is None or n < max_sets:
            a = call("GET", "/api/next")["assignment"]
            if a is None:
                break
            body = _body(a, decide(a["prompt"], a["completions"], a["mode"]))
            call("POST", f"/api/assignments/{a['assignment_id']}/submit", json=body)
            n += 1
    finally:
        if own:
            client.close()
    return n


def invite_via_http(url: str, admin_token: str, name: str, project: str | None = None) -> str:
    """Create (or re-link) labeller ``name`` through the admin API; returns their token."""
    import httpx

    try:
        r = httpx.post(
            f"{url.rstrip('/')}/api/admin/labellers",
            json={"name": name, "project": project, "new_link": True},
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=30,
        )
    except httpx.TransportError as e:
        raise UserError(
            f"cannot reach the labelling app at {url}: {e}",
            "--url",
            "start 'alignloop label serve' or check the address",
        ) from None
    except httpx.InvalidURL as e:
        raise UserError(f"not a URL: {url!r} ({e})", "--url", "use e.g. http://127.0.0.1:8000") from None
    if r.status_code >= 400:
        detail = (
            r.json().get("detail", r.text) if "json" in r.headers.get("content-type", "") else r.text[:200]
        )
        raise UserError(
            f"inviting {name!r} failed with {r.status_code}: {detail}", url, "check --admin-token"
        )
    return r.json()["token"]


def simulate(
    labellers: list[tuple[str, Decide]],
    *,
    db_url: str | None = None,
    url: str | None = None,
    admin_token: str | None = None,
    project: str | None = None,
    max_sets: int | None = None,
) -> dict[str, int]:
    """Run every labeller (one thread each) until the project has nothing left for them.

    Returns ``{labeller name: sets labelled}``.
    """
    if (db_url is None) == (url is None):
        raise UserError("give exactly one of --db and --url")
    jobs: list[Callable[[], int]] = []
    for name, decide in labellers:
        if url is not None:
            if not admin_token:
                raise UserError(
                    "--url needs an admin token", "--admin-token", "run 'alignloop label admin --db URL'"
                )
            token = invite_via_http(url, admin_token, name, project)
            jobs.append(lambda t=token, d=decide: label_via_http(url, t, d, max_sets))
        else:
            assert db_url is not None
            lid = store.invite(db_url, name, project, new_link=True)["id"]
            jobs.append(lambda i=lid, d=decide: label_via_store(db_url, i, d, max_sets))
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, job: Callable[[], int]) -> None:
        try:
            counts[name] = job()
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(name, job)) for (name, _), job in zip(labellers, jobs, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return counts

"""Simulated labellers: the embedded world's labeller profiles label a project like people do.

With a server URL each simulated labeller is a real HTTP client of the JSON API (its own login
token, ``POST /api/next``, ``POST /api/assignments/{id}/submit`` with a client-made submission
id, retried with the same id after a network error), one thread each; with a database URL they
take turns through the store in a fixed order, in one thread, so which labeller gets which set
repeats run after run. A labeller is a ``decide(assignment) -> ranks | thumbs`` function of the
assignment (``set_id``, ``prompt``, ``completions``, ``mode``).

Reproducible: the world's labellers draw each judgement from a stream seeded by (seed, labeller,
set) (:func:`alignloop.world.labellers.judgement_rng`), so a set gets the same ranking from the
same labeller whatever the thread timing, worker count or order of the sets.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from alignloop.errors import UserError
from alignloop.feedback import store

Decide = Callable[[dict[str, Any]], dict[str, Any]]


def world_panel(names: list[str] | None = None, seed: int = 0) -> list[tuple[str, Decide]]:
    """The world's simulated labellers as ``(name, decide)``; ``names`` picks profiles by name or kind
    (an opt-in taste such as ``"terse"`` joins the default panel only when named)."""
    try:
        from alignloop.world import labellers as wl
        from alignloop.world.prompts import chat_text
    except ImportError as e:
        raise UserError(
            f"the embedded world's simulated labellers are not available ({e})",
            fix="install alignloop with the world package",
        ) from None
    # the default panel, plus any opt-in taste asked for by kind (e.g. "terse"; docs/labelling.md)
    panel = wl.panel(seed, [n for n in names or () if n in wl.TASTES])
    if names:
        chosen = [p for p in panel if p.name in names or getattr(p, "kind", None) in names]
        if not chosen:
            known = ", ".join(sorted({p.name for p in panel} | {p.kind for p in panel} | set(wl.TASTES)))
            raise UserError(
                f"no simulated labeller matches {', '.join(names)}", "--profile", f"choose from {known}"
            )
        panel = chosen
    out = []
    for profile in panel:

        def decide(a: dict[str, Any], p: Any = profile) -> dict:
            rng = wl.judgement_rng(seed, p.name, a["set_id"])  # one stream per (seed, labeller, set)
            prompt = chat_text(a["prompt"])  # a conversation as the world's chat template renders it
            if a["mode"] == "thumbs":
                return dict(wl.thumbs(p, prompt, a["completions"], rng))
            return dict(wl.rank(p, prompt, a["completions"], rng))

        out.append((f"sim-{profile.name}", decide))
    return out


def _body(a: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    return {
        "submission_id": secrets.token_hex(16),
        ("thumbs" if a["mode"] == "thumbs" else "ranks"): decision,
    }


def label_via_store(
    db_url: str, labellers: list[tuple[str, int, Decide]], max_sets: int | None = None
) -> dict[str, int]:
    """Labellers ``(name, id, decide)`` take turns (one set each, in list order) until nothing is
    left for any of them (or each has ``max_sets``); returns ``{name: sets stored}``.

    One thread and a fixed order: the store hands out the least-assigned set with the lowest id,
    so who labels which set is the same on every run.
    """
    counts = {name: 0 for name, _, _ in labellers}
    active = list(labellers)
    while active:
        for who in list(active):
            name, labeller_id, decide = who
            a = (
                store.next_assignment(db_url, labeller_id)
                if max_sets is None or counts[name] < max_sets
                else None
            )
            if a is None:
                active.remove(who)
                continue
            body = _body(a, decide(a))
            store.submit(
                db_url,
                labeller_id,
                a["assignment_id"],
                body["submission_id"],
                body.get("ranks"),
                body.get("thumbs"),
            )
            counts[name] += 1
    return counts


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
            a = call("POST", "/api/next")["assignment"]
            if a is None:
                break
            body = _body(a, decide(a))
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
    """Label ``project`` (default: the only one) until it has nothing left for these labellers.

    Through the store (``db_url``) they take turns in one thread; over HTTP (``url``) each is
    its own client thread. A simulated labeller whose name is taken in another project of the
    database labels as ``name@project``. Returns ``{labeller name: sets labelled}``.
    """
    if (db_url is None) == (url is None):
        raise UserError("give exactly one of --db and --url")
    if url is not None and not admin_token:
        raise UserError("--url needs an admin token", "--admin-token", "run 'alignloop label admin --db URL'")
    if db_url is not None:
        project = store.find_project(db_url, project)["name"]  # one clear error naming the projects
        invited = []
        for name, decide in labellers:
            made = _invite_in(lambda n: store.invite(db_url, n, project, new_link=True), name, project)
            invited.append((made["name"], made["id"], decide))
        return label_via_store(db_url, invited, max_sets)
    assert url is not None and admin_token is not None
    jobs: list[tuple[str, Callable[[], int]]] = []
    for name, decide in labellers:
        made = _invite_in(
            lambda n: {"name": n, "token": invite_via_http(url, admin_token, n, project)}, name, project
        )
        jobs.append((made["name"], lambda t=made["token"], d=decide: label_via_http(url, t, d, max_sets)))
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str, job: Callable[[], int]) -> None:
        try:
            counts[name] = job()
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {name: counts[name] for name, _ in jobs}


def _invite_in(invite: Callable[[str], dict[str, Any]], name: str, project: str | None) -> dict[str, Any]:
    """``invite(name)``, or ``invite(name@project)`` when ``name`` belongs to another project."""
    try:
        return invite(name)
    except UserError as e:
        if project is None or store.OTHER_PROJECT not in str(e):
            raise
        return invite(f"{name}@{project}")

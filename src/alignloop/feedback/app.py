"""The labelling web app: server-rendered pages, one small JS file, and a JSON API under ``/api``.

Who you are comes from your login token: ``Authorization: Bearer TOKEN`` for API clients; a
browser exchanges its login link for a server-side session (``GET /login?token=...`` shows a
confirmation page, its same-origin ``POST`` starts the session: a foreign page cannot log a
browser in as someone else). The session cookie holds a random secret (stored hashed), expires
when unused, rotates as it is used, and ends on logout or when the login is revoked. A
state-changing request authenticated by the cookie must carry the session's CSRF token
(``X-CSRF-Token`` header or a ``csrf_token`` form field) and, when the browser sends one, a
same-origin ``Origin`` (behind a trusted TLS proxy, the origin it forwards): another site
cannot post on a labeller's behalf. Request bodies over the limit get 413 unread. Model text is shown as text everywhere (Jinja2
autoescape on the pages, ``textContent`` in JS) under a strict Content-Security-Policy.

The API (``/docs`` shows it):
- labeller: ``GET /api/me``, ``POST /api/me/acknowledge``, ``GET /api/next`` (the open set),
  ``POST /api/next`` (the open set or a newly reserved one),
  ``GET /api/assignments/{id}``, ``POST /api/assignments/{id}/submit``,
  ``POST /api/assignments/{id}/skip``, ``GET /api/progress``;
- admin: ``GET /api/admin/projects``, ``POST /api/admin/projects``,
  ``POST /api/admin/projects/{name}/sets``, ``GET /api/admin/progress``,
  ``POST /api/admin/labellers``, ``POST /api/admin/labellers/{name}/revoke``,
  ``POST /api/admin/release``, ``GET /api/admin/report``, ``GET /api/admin/export``.

Leases: ``/api/next`` reserves a set for ``lease_seconds`` (``label serve --lease-seconds``,
default 30 minutes; ``expires_at`` in the answer); then the slot goes back to the pool. A
labeller's late submission is still stored if the set needs it, else a 409 says why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Iterable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Form, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.concurrency import run_in_threadpool

from alignloop.errors import UserError
from alignloop.feedback import store
from alignloop.feedback.store import Principal, Rejected
from alignloop.records import CompletionSet

HERE = FilePath(__file__).parent
# The largest request body accepted (the biggest legitimate one is an admin's set import through
# the API; 'label import' reads files directly). Larger bodies get 413 before anything reads them.
MAX_BODY_BYTES = 1 << 20
SESSION_HOURS = 12.0  # a browser session ends after this long unused (each use renews it)
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Chromium send "Origin: null"
    (b"x-frame-options", b"DENY"),
]


# ---------------------------------------------------------------------------------------------
# Request and response bodies (they make the OpenAPI schema)


# ids are 32-bit integers in the store (PostgreSQL INTEGER); larger ones cannot name anything
AssignmentId = Annotated[int, Path(ge=1, le=2_147_483_647, description="an assignment id from /api/next")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmitBody(Body):
    submission_id: str = Field(
        min_length=8, max_length=100, description="made by the client, once per submission; a retry reuses it"
    )
    ranks: dict[str, StrictInt | Literal["F"]] | None = Field(
        None, description="rank mode: every completion id -> 1 (best)..K, equal ranks = tie, or 'F' (fail)"
    )
    thumbs: dict[str, Literal["up", "down"]] | None = Field(
        None, description="thumbs mode: id -> 'up' | 'down'"
    )


class SkipBody(Body):
    reason: str = Field(min_length=1, max_length=2000)


class ProjectBody(Body):
    name: str = Field(min_length=1, max_length=200)
    criterion: str = Field("helpfulness", max_length=200)
    instructions: str | None = Field(
        None, max_length=100_000, description="Markdown; default: the course notes'"
    )
    mode: Literal["rank", "thumbs"] = "rank"
    per_set: int = Field(3, ge=1, le=1000)


class InviteBody(Body):
    name: str = Field(min_length=1, max_length=200)
    project: str | None = None
    new_link: bool = False


class ReleaseBody(Body):
    set_id: str | None = Field(None, description="free this set's open assignments (give set_id or labeller)")
    labeller: str | None = Field(None, description="free this labeller's open assignments")
    project: str | None = Field(None, description="the set's project (default: the only one)")


class Progress(BaseModel):
    done: int
    skipped: int
    open: int
    remaining: int
    total: int
    tie_rate: float
    tie_warning: bool


class CompletionOut(BaseModel):
    id: str
    text: str


class MessageOut(BaseModel):
    role: str = Field(description="system, user or assistant")
    content: str


class AssignmentOut(BaseModel):
    assignment_id: int
    status: str
    expires_at: str | None = Field(None, description="when an open assignment's hold on its set ends")
    reason: str | None = Field(None, description="why a released assignment was released")
    set_id: str
    mode: str
    criterion: str
    prompt: str | list[MessageOut] = Field(
        description="the prompt's text, or its conversation (TRL's message list; the completions are the next "
        "assistant turn)"
    )
    completions: list[CompletionOut]
    label: dict[str, Any] | None = None


class NextOut(BaseModel):
    assignment: AssignmentOut | None
    progress: Progress


class SubmitOut(BaseModel):
    status: Literal["stored", "duplicate"]
    label_id: int


class Error(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": Error} for c in (400, 401, 403, 404, 409, 413, 422)}


# ---------------------------------------------------------------------------------------------
# Who is asking


async def _call(request: Request, fn: Any, *args: Any) -> Any:
    """A store call on the event loop (SQLite, one process) or the thread pool (see create_app)."""
    if request.app.state.inline_store:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def _forwarded(request: Request, header: str) -> str | None:
    """The first value of an ``X-Forwarded-*`` header, only from a proxy the admin trusts."""
    proxies = request.app.state.trust_proxy
    client = request.client.host if request.client else ""
    if not proxies or ("*" not in proxies and client not in proxies):
        return None
    value = request.headers.get(header)
    return value.split(",")[0].strip() if value else None


def _origin(url: str) -> str:
    """``scheme://host[:port]`` with the scheme's default port left out ("" if ``url`` is junk)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def public_origin(request: Request) -> str:
    """The origin the browser sees: this server's, or the one a trusted proxy reports with
    ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` (a proxy may rewrite ``Host`` to its upstream)."""
    scheme = (_forwarded(request, "x-forwarded-proto") or request.url.scheme).lower()
    host = _forwarded(request, "x-forwarded-host") or request.headers.get("host", "")
    return _origin(f"{scheme}://{host}")


def _same_origin(request: Request, required: bool = False) -> bool:
    """The request's ``Origin`` (else its ``Referer``) is this app's public origin. Without
    either, True unless ``required`` (not every browser sends Origin on a same-site form post;
    the CSRF token still guards those)."""
    sent = request.headers.get("origin") or request.headers.get("referer")
    if not sent:
        return not required
    return _origin(sent) == public_origin(request) != ""


def cookie_name(request: Request) -> str:
    """The session cookie's name: per deployment (cookies ignore ports, so two apps on one host
    must not share a name), with the ``__Host-`` prefix over HTTPS (Secure, whole site, this
    host only)."""
    base = request.app.state.cookie_name
    return f"__Host-{base}" if public_origin(request).startswith("https:") else base


def session_cookie(request: Request, value: str, max_age: float, name: str | None = None) -> str:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Lax, Path=/, and Secure over HTTPS."""
    from http.cookies import SimpleCookie

    name = name or cookie_name(request)
    jar: SimpleCookie = SimpleCookie()
    jar[name] = value
    morsel = jar[name]
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Lax"
    morsel["max-age"] = str(math.ceil(max_age))
    if public_origin(request).startswith("https:"):
        morsel["secure"] = True
    return morsel.OutputString()


async def _form_csrf(request: Request) -> str | None:
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get("csrf_token")
        return value if isinstance(value, str) else None
    return None


async def who(request: Request) -> Principal:
    """The labeller or admin making the request: by ``Authorization: Bearer TOKEN`` (API
    clients) or by the browser's session cookie. 401 without either.

    A session is looked up on every request (no cache: logout and revocation take effect at
    once). A state-changing request made with the cookie needs the session's CSRF token and a
    same-origin ``Origin``. A session older than a rotation period is replaced by a fresh
    secret, sent back with this answer (``SecurityHeaders`` adds the cookie).
    """
    db = request.app.state.db_url
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        p = await _call(request, store.authenticate, db, auth[7:].strip())
        if p is None:
            raise Rejected(401, "missing, invalid or revoked login token", "open your login link again")
        return p
    live = await _call(request, store.session, db, request.cookies.get(cookie_name(request)))
    if live is None:
        raise Rejected(401, "missing, invalid or revoked login token", "open your login link again")
    request.state.session = live
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        sent = request.headers.get("x-csrf-token") or await _form_csrf(request)
        if not sent or not hmac.compare_digest(sent, live.csrf) or not _same_origin(request):
            raise Rejected(403, "cross-site request refused (missing or wrong CSRF token)", "reload the page")
    if live.rotate:
        hours = request.app.state.session_hours
        new = await _call(request, store.rotate_session, db, live, hours)
        if new is not None:
            request.state.set_cookie = session_cookie(request, new["secret"], hours * 3600)
    return live.principal


def _csrf(request: Request) -> str:
    """The CSRF token a page embeds in its forms (its session's; none for a Bearer client)."""
    live = getattr(request.state, "session", None)
    return live.csrf if live is not None else ""


async def labeller(p: Annotated[Principal, Depends(who)]) -> Principal:
    if p.kind != "labeller":
        raise Rejected(403, "only labellers can do this")
    return p


async def admin(p: Annotated[Principal, Depends(who)]) -> Principal:
    if p.kind != "admin":
        raise Rejected(403, "only admins can do this")
    return p


Labeller = Annotated[Principal, Depends(labeller)]
Admin = Annotated[Principal, Depends(admin)]


# ---------------------------------------------------------------------------------------------
# Pages: templates and Markdown are loaded on first use, so the server starts fast


_ENV: Any = None
_MD: Any = None


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A page from ``templates/`` (autoescaped)."""
    global _ENV
    if _ENV is None:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        _ENV = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True)
        )
        _ENV.globals["api_docs"] = swagger_ui_assets() is not None  # link to /docs only if it exists
    return HTMLResponse(_ENV.get_template(name).render(**context), status_code=status)


def markdown(text: str) -> Any:
    """Markdown -> HTML with raw HTML escaped, images as links and unsafe link schemes dropped."""
    global _MD
    if _MD is None:
        from markdown_it import MarkdownIt

        # no raw HTML, and no images: an image in the instructions would load from anywhere
        _MD = MarkdownIt("commonmark", {"html": False}).disable("image")
    from markupsafe import Markup

    return Markup(_MD.render(text))


def page_error(status: int, message: str, fix: str = "") -> HTMLResponse:
    return render("message.html", status=status, title="Sorry", message=message, fix=fix, me=None)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(
    db_url: str,
    *,
    inline_store: bool | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    trust_proxy: Iterable[str] = (),
    session_hours: float = SESSION_HOURS,
    name: str | None = None,
    lease_seconds: float = store.DEFAULT_LEASE_SECONDS,
) -> FastAPI:
    """The labelling app on database ``db_url`` (the schema is migrated when it opens).

    ``inline_store``: run the labellers' store calls on the event loop (see the labeller API
    below). By default only for SQLite: pass False when several server processes share the file.
    ``max_body_bytes``: larger request bodies are refused (413) before they are read.
    ``trust_proxy``: addresses of reverse proxies whose ``X-Forwarded-Proto``/``-Host`` are
    believed ("*": any client; only when the app is reachable through the proxy alone).
    ``session_hours``: a browser session ends after this long unused. ``name``: this
    deployment's name in the session cookie's name (default: from the database URL).
    ``lease_seconds``: how long a reserved set stays held for its labeller (a bad value is a
    :class:`UserError` here, before anything is served).
    """
    if not session_hours > 0:
        raise UserError(
            f"the session lifetime must be more than 0 hours, got {session_hours!r}", "--session-hours"
        )
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        raise UserError(f"bad deployment name {name!r}", "--name", "use 1 to 40 letters, digits, '-' or '_'")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise UserError(
            f"the request body limit must be at least 1 byte, got {max_body_bytes!r}", "--max-body-mb"
        )
    lease_seconds = store.check_lease(lease_seconds)
    engine = store.open_store(db_url)
    if inline_store is None:
        inline_store = engine.dialect.name == "sqlite"
    app = LabellingApp(
        title="alignloop labelling app",
        description="Humans rank (or thumb) model completions; every label is kept exactly once.",
        docs_url=None,  # our own /docs below: Swagger UI from a package, under the app's CSP
        redoc_url=None,
    )
    app.state.db_url = db_url
    app.state.inline_store = inline_store
    app.state.max_body_bytes = max_body_bytes
    session_hours = float(session_hours)
    app.state.trust_proxy = frozenset(trust_proxy)
    app.state.session_hours = session_hours
    app.state.cookie_name = "alignloop-" + (
        name or hashlib.sha256(store.normalise_url(db_url).encode()).hexdigest()[:10]
    )
    app.state.lease_seconds = lease_seconds
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    swagger = swagger_ui_assets()
    app.state.api_docs = swagger is not None
    if swagger is not None:
        app.mount("/docs/assets", StaticFiles(directory=swagger), name="swagger-ui")

        @app.get("/docs", include_in_schema=False)
        def api_docs() -> Response:
            """Swagger UI for /openapi.json, served by the app itself (no CDN, no inline script)."""
            return render("docs.html", me=None)

    db = db_url

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, e: Rejected) -> Response:
        if request.url.path.startswith("/api"):
            return JSONResponse({"detail": e.line()}, status_code=e.status)
        if e.status == 401:
            return page_error(401, "This page needs your login link.", "Open the link you were given again.")
        return page_error(e.status, e.line())

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError) -> Response:
        if request.url.path.startswith("/api"):
            return JSONResponse({"detail": e.line()}, status_code=400)
        return page_error(400, e.line())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid request"))
        return JSONResponse({"detail": msg}, status_code=422)

    # -- health ---------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    # -- labeller API -----------------------------------------------------------------------------
    # The labellers' hot routes are ``async``. On SQLite with one server process they call the
    # store right on the event loop: each call is well under a millisecond of CPU with no network
    # wait, and skipping the thread-pool hop saves ~30% of the CPU a submission costs. With
    # several processes on one SQLite file (``--workers``) a call may wait for another process's
    # write, and on PostgreSQL every statement is a round trip to the server: neither may stall
    # the loop, so those calls go to the thread pool (PostgreSQL then runs many transactions at
    # once). The slow, rare routes (admin pages, report, export, import)
    # are plain functions on the thread pool.

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if inline_store:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    @app.get("/api/me", responses=ERRORS, tags=["labeller"])
    def api_me(me: Annotated[Principal, Depends(who)]) -> dict[str, Any]:
        """Who the token belongs to; for a labeller also their project and progress."""
        out: dict[str, Any] = {"kind": me.kind, "name": me.name}
        if me.kind == "labeller":
            out["project"] = store.labeller_project(db, me.id)
            out["acknowledged"] = me.acknowledged
            out["progress"] = store.labeller_progress(db, me.id)
        return out

    @app.post("/api/me/acknowledge", responses=ERRORS, tags=["labeller"])
    def api_acknowledge(me: Labeller) -> dict[str, Any]:
        """Record that the labeller has read the instructions."""
        store.acknowledge(db, me.id)
        return {"acknowledged": True}

    @app.get("/api/next", responses=ERRORS, tags=["labeller"])
    async def api_open(me: Labeller) -> NextOut:
        """The labeller's open set, or null: reads only (``POST /api/next`` reserves a new set)."""
        a, progress = await call(store.next_with_progress, db, me.id, False)
        return NextOut.model_validate({"assignment": a, "progress": progress})

    @app.post("/api/next", responses=ERRORS, tags=["labeller"])
    async def api_next(me: Labeller) -> NextOut:
        """The labeller's open set, or a newly reserved one (the least-labelled set they have not
        done); null when none is left for them."""
        a, progress = await call(store.next_with_progress, db, me.id, True, lease_seconds)
        return NextOut.model_validate({"assignment": a, "progress": progress})

    @app.get("/api/assignments/{assignment_id}", responses=ERRORS, tags=["labeller"])
    async def api_assignment(assignment_id: AssignmentId, me: Labeller) -> AssignmentOut:
        """One of your assignments (another labeller's is 404)."""
        return AssignmentOut.model_validate(await call(store.get_assignment, db, me.id, assignment_id))

    @app.post("/api/assignments/{assignment_id}/submit", responses=ERRORS, tags=["labeller"])
    async def api_submit(assignment_id: AssignmentId, body: SubmitBody, me: Labeller) -> SubmitOut:
        """Submit a ranking (or thumbs). The same ``submission_id`` again is stored once.

        (Progress is left out on purpose: this is the hot path; ``/api/next`` carries it.)
        """
        out = await call(
            store.submit, db, me.id, assignment_id, body.submission_id, ranks=body.ranks, thumbs=body.thumbs
        )
        return SubmitOut.model_validate(out)

    @app.post("/api/assignments/{assignment_id}/skip", responses=ERRORS, tags=["labeller"])
    async def api_skip(assignment_id: AssignmentId, body: SkipBody, me: Labeller) -> dict[str, Any]:
        """Skip an open set with a reason; it goes to another labeller."""
        return await call(store.skip, db, me.id, assignment_id, body.reason)

    @app.get("/api/progress", responses=ERRORS, tags=["labeller"])
    async def api_progress(me: Labeller) -> Progress:
        """Done / total, skipped, and the tie rate (warned above 20%)."""
        return Progress.model_validate(await call(store.labeller_progress, db, me.id))

    # -- admin API -------------------------------------------------------------------------------

    @app.get("/api/admin/projects", responses=ERRORS, tags=["admin"])
    def api_projects(me: Admin) -> list[dict[str, Any]]:
        return store.list_projects(db)

    @app.post("/api/admin/projects", responses=ERRORS, tags=["admin"])
    def api_create_project(body: ProjectBody, me: Admin) -> dict[str, Any]:
        return store.create_project(
            db,
            body.name,
            criterion=body.criterion,
            instructions=body.instructions,
            mode=body.mode,
            per_set=body.per_set,
        )

    @app.post("/api/admin/projects/{project}/sets", responses=ERRORS, tags=["admin"])
    def api_import(project: str, body: list[CompletionSet], me: Admin) -> dict[str, int]:
        """Import completion sets (the same set again is unchanged; all or nothing)."""
        return store.import_sets(db, body, project=project)

    @app.get("/api/admin/progress", responses=ERRORS, tags=["admin"])
    def api_admin_progress(me: Admin, project: str | None = None) -> dict[str, Any]:
        return store.project_progress(db, project)

    @app.post("/api/admin/labellers", responses=ERRORS, tags=["admin"])
    def api_invite(body: InviteBody, me: Admin, request: Request) -> JSONResponse:
        """Create a labeller; the answer holds their login link (shown once, never cached)."""
        made = store.invite(db, body.name, body.project, base_url=_base(request), new_link=body.new_link)
        return JSONResponse(made, headers=NO_STORE)

    @app.post("/api/admin/labellers/{name}/revoke", responses=ERRORS, tags=["admin"])
    def api_revoke(name: str, me: Admin) -> dict[str, Any]:
        """Revoke a labeller's login; their open assignments are released at once."""
        return {"revoked": name, **store.revoke(db, name)}

    @app.post("/api/admin/release", responses=ERRORS, tags=["admin"])
    def api_release(body: ReleaseBody, me: Admin) -> dict[str, Any]:
        """Free the open assignments of a set or of a labeller: their slots go back to the pool."""
        return store.release(db, set_id=body.set_id, labeller=body.labeller, project=body.project)

    @app.get("/api/admin/report", responses=ERRORS, tags=["admin"])
    def api_report(me: Admin, project: str | None = None) -> dict[str, Any]:
        """Agreement per labeller and flagged labellers (from ``alignloop.preference``)."""
        return agreement(db, project)

    @app.get("/api/admin/export", responses=ERRORS, tags=["admin"])
    def api_export(
        me: Admin, project: str | None = None, kind: Literal["rankings", "sets"] = Query("rankings")
    ) -> Response:
        """Rankings (or completion sets) as JSONL records."""
        sets, rankings, _ = store.load_labels(db, project)
        rows = rankings if kind == "rankings" else sets
        body = "".join(json.dumps(r.model_dump(mode="json", exclude_none=True)) + "\n" for r in rows)
        return Response(
            body,
            media_type="application/x-ndjson",
            headers={"content-disposition": attachment(f"{project or 'all'}-{kind}.jsonl")},
        )

    # -- pages -----------------------------------------------------------------------------------

    # Login: the link's GET only shows a confirmation page (a foreign page that sends the
    # browser to someone's link changes nothing); its same-origin POST, carrying the nonce the
    # page set in a SameSite=Strict cookie, exchanges the link's token for a server-side session.

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, token: str = "") -> Response:
        p = store.authenticate(db, token)
        if p is None:
            return page_error(401, "This login link is not valid (or was revoked).", "Ask for a new link.")
        current = store.session(db, request.cookies.get(cookie_name(request)))
        nonce = secrets.token_urlsafe(24)
        resp = render(
            "login.html",
            me=None,
            title="Log in",
            login_name=p.name,
            kind=p.kind,
            token=token,
            nonce=nonce,
            current=current.principal.name if current is not None else None,
        )
        resp.headers.update(NO_STORE)
        resp.headers.append("set-cookie", _login_nonce_cookie(request, nonce, 600))
        return resp

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request, token: Annotated[str, Form()] = "", nonce: Annotated[str, Form()] = ""
    ) -> Response:
        expected = request.cookies.get(_login_nonce_name(request)) or ""
        if not (nonce and expected and hmac.compare_digest(nonce, expected) and _same_origin(request, True)):
            return page_error(
                403,
                "Login refused: it did not come from this site's login page.",
                "Open your login link again.",
            )
        made = store.start_session(db, token, session_hours)
        if made is None:
            return page_error(401, "This login link is not valid (or was revoked).", "Ask for a new link.")
        old = store.session(db, request.cookies.get(cookie_name(request)))
        if old is not None:  # one login per browser: the previous session ends
            store.end_session(db, old.family)
        resp = RedirectResponse("/", status_code=303)
        resp.headers.update(NO_STORE)
        resp.headers.append("set-cookie", session_cookie(request, made["secret"], session_hours * 3600))
        resp.headers.append("set-cookie", _login_nonce_cookie(request, "", 0))
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, me: Annotated[Principal, Depends(who)]) -> Response:
        live = getattr(request.state, "session", None)
        if live is not None:
            store.end_session(db, live.family)  # unusable everywhere, not only in this browser
        resp = render("message.html", title="Logged out", message="You are logged out.", fix="", me=None)
        resp.headers.append("set-cookie", session_cookie(request, "", 0))
        return resp

    @app.get("/", include_in_schema=False)
    def home(me: Annotated[Principal, Depends(who)]) -> Response:
        if me.kind == "admin":
            return RedirectResponse("/admin", status_code=303)
        return RedirectResponse("/label" if me.acknowledged else "/instructions", status_code=303)

    @app.get("/instructions", include_in_schema=False)
    def instructions(request: Request, me: Labeller) -> Response:
        project = store.labeller_project(db, me.id)
        return render(
            "instructions.html",
            me=me,
            csrf=_csrf(request),
            project=project,
            body=markdown(project["instructions"]),
        )

    # Pages never reserve a set on GET (a prefetch or a foreign link must change nothing): GET
    # /label shows the open set or a "Next set" button; the POSTs (acknowledge, next, skip, and
    # the page's submit) reserve the next set.

    @app.post("/instructions", include_in_schema=False)
    def acknowledge(me: Labeller) -> Response:
        store.acknowledge(db, me.id)
        store.next_assignment(db, me.id, lease_seconds)
        return RedirectResponse("/label", status_code=303)

    @app.get("/label", include_in_schema=False)
    def label_open(request: Request, me: Labeller) -> Response:
        if not me.acknowledged:
            return RedirectResponse("/instructions", status_code=303)
        return _label_page(request, me, store.next_with_progress(db, me.id, reserve=False)[0])

    @app.post("/label/next", include_in_schema=False)
    def label_next(me: Labeller) -> Response:
        store.next_assignment(db, me.id, lease_seconds)
        return RedirectResponse("/label", status_code=303)

    @app.get("/label/{assignment_id}", include_in_schema=False)
    def label_one(request: Request, assignment_id: AssignmentId, me: Labeller) -> Response:
        return _label_page(request, me, store.get_assignment(db, me.id, assignment_id))

    @app.post("/label/{assignment_id}/skip", include_in_schema=False)
    def skip_form(assignment_id: AssignmentId, me: Labeller, reason: Annotated[str, Form()] = "") -> Response:
        store.skip(db, me.id, assignment_id, reason)
        store.next_assignment(db, me.id, lease_seconds)
        return RedirectResponse("/label", status_code=303)

    def _label_page(request: Request, me: Principal, a: dict[str, Any] | None) -> Response:
        project = store.labeller_project(db, me.id)
        return render(
            "label.html",
            me=me,
            csrf=_csrf(request),
            project=project,
            a=a,
            progress=store.labeller_progress(db, me.id),
        )

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request, me: Admin, project: str | None = None) -> Response:
        return _admin_page(request, me, project)

    @app.post("/admin/invite", include_in_schema=False)
    def admin_invite(
        request: Request, me: Admin, name: Annotated[str, Form()] = "", project: Annotated[str, Form()] = ""
    ) -> Response:
        made = store.invite(db, name, project or None, base_url=_base(request))
        page = _admin_page(request, me, project or None, invited=made)
        page.headers.update(NO_STORE)
        return page

    @app.post("/admin/revoke", include_in_schema=False)
    def admin_revoke(
        request: Request, me: Admin, name: Annotated[str, Form()] = "", project: Annotated[str, Form()] = ""
    ) -> Response:
        freed = store.revoke(db, name)["released"]
        notice = f"Revoked {name}'s login link" + (f"; {freed} held set(s) released." if freed else ".")
        return _admin_page(request, me, project or None, notice=notice)

    @app.post("/admin/release", include_in_schema=False)
    def admin_release(
        request: Request, me: Admin, set_id: Annotated[str, Form()] = "", project: Annotated[str, Form()] = ""
    ) -> Response:
        freed = store.release(db, set_id=set_id, project=project or None)["released"]
        return _admin_page(request, me, project or None, notice=f"Released {freed} hold(s) on set {set_id}.")

    def _admin_page(request: Request, me: Principal, project: str | None, **extra: Any) -> Response:
        projects = store.list_projects(db)
        prog = (
            store.project_progress(db, project or (projects[0]["name"] if projects else None))
            if projects
            else None
        )
        report = agreement(db, prog["project"]) if prog else {"available": False, "why": "no project yet"}
        by_name = {r["name"]: r for r in report.get("labellers", [])}
        return render(
            "admin.html",
            me=me,
            csrf=_csrf(request),
            projects=projects,
            prog=prog,
            report=report,
            by_name=by_name,
            **extra,
        )

    return app


def app_from_environment() -> FastAPI:
    """The app on ``$ALIGNLOOP_LABEL_DB`` with the ``create_app`` settings in
    ``$ALIGNLOOP_LABEL_SETTINGS`` (JSON): what each ``label serve --workers N`` process runs."""
    import os

    settings = json.loads(os.environ.get("ALIGNLOOP_LABEL_SETTINGS", "{}"))
    return create_app(os.environ["ALIGNLOOP_LABEL_DB"], inline_store=False, **settings)


NO_STORE = {"cache-control": "no-store"}  # answers holding a login link or token


def attachment(filename: str) -> str:
    """A ``Content-Disposition`` for a download named ``filename`` (RFC 6266 with RFC 5987).

    The exact name, UTF-8 and percent-encoded, goes in ``filename*``; ``filename`` carries an
    ASCII stand-in (other characters, quotes and backslashes as ``_``) for old clients. Control
    characters (CR/LF could split the header) and path separators become ``_`` in both.
    """
    import unicodedata
    from urllib.parse import quote

    name = "".join("_" if unicodedata.category(c).startswith("C") or c in "/\\" else c for c in filename)
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


def swagger_ui_assets() -> FilePath | None:
    """The folder of Swagger UI's files that the ``fastapi-offline`` package ships (its
    ``swagger-ui-bundle.js`` and ``swagger-ui.css``), or None when it is not installed: then
    there is no ``/docs`` page and the admin pages do not link to one."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = FilePath(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _base(request: Request) -> str:
    """The app's address for login links: its public origin (behind a trusted proxy, the proxy's)."""
    return public_origin(request) + request.scope.get("root_path", "")


def _login_nonce_name(request: Request) -> str:
    return cookie_name(request) + "-login"


def _login_nonce_cookie(request: Request, nonce: str, max_age: float) -> str:
    # SameSite=Strict: only a request from this site's own page carries it back
    return session_cookie(request, nonce, max_age, _login_nonce_name(request)).replace(
        "SameSite=Lax", "SameSite=Strict"
    )


def agreement(db_url: str, project: str | None) -> dict[str, Any]:
    """The consensus engineer's feedback report, or ``{"available": False, "why"}``."""
    try:
        from alignloop.preference.report import feedback_report
    except ImportError as e:
        return {"available": False, "why": f"alignloop.preference is not installed ({e})"}
    sets, rankings, _ = store.load_labels(db_url, project)
    if not rankings:
        return {"available": False, "why": "no labels yet"}
    return {"available": True, **feedback_report(sets, rankings)}


class LabellingApp(FastAPI):
    """FastAPI with two ASGI layers outside Starlette's error handler, so that they hold for every
    answer, a 500 included: the security headers (outermost), then the request body limit."""

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(BodyLimit(super().build_middleware_stack(), self.state.max_body_bytes))


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413, before anything reads them.

    A declared ``Content-Length`` over the limit is refused at once: the app (routing, body
    parsing, authentication) is never called and the body is never read. A body without one
    (chunked) is counted as it streams in; the read that passes the limit raises a 413 that the
    app answers (the part already read is dropped). Either way no large body is ever parsed, so
    one upload cannot hold the event loop.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    from starlette.exceptions import HTTPException

                    # Connection: close, or the server would read (and drop) the rest of the body
                    raise HTTPException(413, _too_large_line(self.max_bytes), headers={"connection": "close"})
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Any) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large_line(max_bytes: int) -> str:
    return (
        f"request body larger than the server's limit of {max_bytes} bytes: send less "
        "(the admin sets the limit with 'label serve --max-body-mb')"
    )


def too_large(max_bytes: int) -> Response:
    # Connection: close: the unread body is never read, so the connection cannot be reused
    return JSONResponse(
        {"detail": _too_large_line(max_bytes)}, status_code=413, headers={"connection": "close"}
    )


class SecurityHeaders:
    """ASGI middleware adding the security headers (CSP, nosniff, no referrer, no framing) to
    every answer, and the new cookie of a session rotated while answering."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
                cookie = scope.get("state", {}).get("set_cookie")  # a rotated session (see who)
                if cookie:
                    message["headers"].append((b"set-cookie", cookie.encode("latin-1")))
            await send(message)

        await self.app(scope, receive, send_with_headers)

"""The labelling web app: server-rendered pages, one small JS file, and a JSON API under ``/api``.

Who you are comes from your login token: ``Authorization: Bearer TOKEN`` for API clients, or
the HttpOnly cookie that ``/login?token=...`` sets for browsers. A state-changing request
authenticated by the cookie must carry the page's CSRF token (``X-CSRF-Token`` header or a
``csrf_token`` form field) and, when the browser sends one, a same-host ``Origin``: another
site cannot post on a labeller's behalf. Model text is shown as text everywhere (Jinja2
autoescape on the pages, ``textContent`` in JS) under a strict Content-Security-Policy.

The API (``/docs`` shows it):
- labeller: ``GET /api/me``, ``POST /api/me/acknowledge``, ``GET /api/next``,
  ``GET /api/assignments/{id}``, ``POST /api/assignments/{id}/submit``,
  ``POST /api/assignments/{id}/skip``, ``GET /api/progress``;
- admin: ``GET /api/admin/projects``, ``POST /api/admin/projects``,
  ``POST /api/admin/projects/{name}/sets``, ``GET /api/admin/progress``,
  ``POST /api/admin/labellers``, ``POST /api/admin/labellers/{name}/revoke``,
  ``GET /api/admin/report``, ``GET /api/admin/export``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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
COOKIE = "alignloop_token"
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


class AssignmentOut(BaseModel):
    assignment_id: int
    status: str
    set_id: str
    mode: str
    criterion: str
    prompt: str
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


ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": Error} for c in (400, 401, 403, 404, 409, 422)}


# ---------------------------------------------------------------------------------------------
# Who is asking


def csrf_token(token: str) -> str:
    """The CSRF token of a login token: a keyed hash only the holder of the token can make."""
    return hmac.new(token.encode(), b"alignloop-csrf", hashlib.sha256).hexdigest()


def _token(request: Request) -> tuple[str | None, str]:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), "header"
    return request.cookies.get(COOKIE), "cookie"


async def _form_csrf(request: Request) -> str | None:
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get("csrf_token")
        return value if isinstance(value, str) else None
    return None


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:  # not every browser sends Origin on a same-site form post; the token still guards
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def who(request: Request) -> Principal:
    """The labeller or admin making the request (401 without a valid token; CSRF-checked)."""
    token, via = _token(request)
    if request.app.state.inline_store:  # see "labeller API" in create_app
        p = store.authenticate(request.app.state.db_url, token)
    else:
        p = await run_in_threadpool(store.authenticate, request.app.state.db_url, token)
    if p is None:
        raise Rejected(401, "missing, invalid or revoked login token", "open your login link again")
    if via == "cookie" and request.method not in ("GET", "HEAD", "OPTIONS"):
        sent = request.headers.get("x-csrf-token") or await _form_csrf(request)
        if not sent or not hmac.compare_digest(sent, csrf_token(token or "")) or not _same_origin(request):
            raise Rejected(403, "cross-site request refused (missing or wrong CSRF token)", "reload the page")
    return p


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
    global _ENV
    if _ENV is None:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        _ENV = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True)
        )
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


def create_app(db_url: str, *, inline_store: bool | None = None) -> FastAPI:
    """The labelling app on database ``db_url`` (the schema is migrated when it opens).

    ``inline_store``: run the labellers' store calls on the event loop (see the labeller API
    below). By default only for SQLite: pass False when several server processes share the file.
    """
    engine = store.open_store(db_url)
    if inline_store is None:
        inline_store = engine.dialect.name == "sqlite"
    app = FastAPI(
        title="alignloop labelling app",
        description="Humans rank (or thumb) model completions; every label is kept exactly once.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.db_url = db_url
    app.state.inline_store = inline_store
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
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
    async def api_next(me: Labeller) -> NextOut:
        """The labeller's open set, or a new one (the least-labelled set they have not done)."""
        a, progress = await call(store.next_with_progress, db, me.id)
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
    def api_invite(body: InviteBody, me: Admin, request: Request) -> dict[str, Any]:
        """Create a labeller; the answer holds their login link (shown once)."""
        return store.invite(db, body.name, body.project, base_url=_base(request), new_link=body.new_link)

    @app.post("/api/admin/labellers/{name}/revoke", responses=ERRORS, tags=["admin"])
    def api_revoke(name: str, me: Admin) -> dict[str, Any]:
        store.revoke(db, name)
        return {"revoked": name}

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
        name = f"{project or 'all'}-{kind}.jsonl"
        return Response(
            body,
            media_type="application/x-ndjson",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    # -- pages -----------------------------------------------------------------------------------

    @app.get("/login", include_in_schema=False)
    def login(request: Request, token: str = "") -> Response:
        p = store.authenticate(db, token)
        if p is None:
            return page_error(401, "This login link is not valid (or was revoked).", "Ask for a new link.")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            max_age=90 * 86400,
        )
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(me: Annotated[Principal, Depends(who)]) -> Response:
        resp = render("message.html", title="Logged out", message="You are logged out.", fix="", me=None)
        resp.delete_cookie(COOKIE)
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
            csrf=csrf_token(_token(request)[0] or ""),
            project=project,
            body=markdown(project["instructions"]),
        )

    @app.post("/instructions", include_in_schema=False)
    def acknowledge(me: Labeller) -> Response:
        store.acknowledge(db, me.id)
        return RedirectResponse("/label", status_code=303)

    @app.get("/label", include_in_schema=False)
    def label_next(request: Request, me: Labeller) -> Response:
        if not me.acknowledged:
            return RedirectResponse("/instructions", status_code=303)
        return _label_page(request, me, store.next_assignment(db, me.id))

    @app.get("/label/{assignment_id}", include_in_schema=False)
    def label_one(request: Request, assignment_id: AssignmentId, me: Labeller) -> Response:
        return _label_page(request, me, store.get_assignment(db, me.id, assignment_id))

    @app.post("/label/{assignment_id}/skip", include_in_schema=False)
    def skip_form(assignment_id: AssignmentId, me: Labeller, reason: Annotated[str, Form()] = "") -> Response:
        store.skip(db, me.id, assignment_id, reason)
        return RedirectResponse("/label", status_code=303)

    def _label_page(request: Request, me: Principal, a: dict[str, Any] | None) -> Response:
        project = store.labeller_project(db, me.id)
        return render(
            "label.html",
            me=me,
            csrf=csrf_token(_token(request)[0] or ""),
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
        return _admin_page(request, me, project or None, invited=made)

    @app.post("/admin/revoke", include_in_schema=False)
    def admin_revoke(
        request: Request, me: Admin, name: Annotated[str, Form()] = "", project: Annotated[str, Form()] = ""
    ) -> Response:
        store.revoke(db, name)
        return _admin_page(request, me, project or None, notice=f"Revoked {name}'s login link.")

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
            csrf=csrf_token(_token(request)[0] or ""),
            projects=projects,
            prog=prog,
            report=report,
            by_name=by_name,
            **extra,
        )

    return app


def app_from_environment() -> FastAPI:
    """The app on ``$ALIGNLOOP_LABEL_DB``: what each ``label serve --workers N`` process runs."""
    import os

    return create_app(os.environ["ALIGNLOOP_LABEL_DB"], inline_store=False)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


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


class SecurityHeaders:
    """ASGI middleware adding the security headers (CSP, nosniff, no referrer, no framing)."""

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
            await send(message)

        await self.app(scope, receive, send_with_headers)

"""The labelling store: every label kept safe, on SQLite (WAL) by default or PostgreSQL by URL.

This is the Python API the web app, the command line and the loop (``alignloop demo --human``)
use. Every function takes the database URL; engines are made once per URL and the schema is
brought to the newest Alembic revision the first time a URL is opened::

    create_project(db, "default", per_set=3)            # criterion, instructions, mode, k
    import_sets(db, read("sets.jsonl", CompletionSet))   # -> {"added", "unchanged", "collapsed"}
    link = invite(db, "ada")["link"]                     # the token is shown once, stored hashed
    a = next_assignment(db, labeller_id)                 # least-labelled set ada has not done
    submit(db, labeller_id, a["assignment_id"], submission_id, ranks={"c0": 1, "c1": "F"})
    project_progress(db)["complete"]                     # every set has its k labels
    sets, rankings, labellers = load_labels(db)

Each submission is one transaction. A submission carries a client-made id: the same id again
(a double click, a retry after a lost response) returns the stored label and counts once.
Assignment: a set is reserved for at most ``per_set`` distinct labellers (an atomic
``n_assigned < per_set`` update), a labeller gets the least-assigned set they have not seen,
and a skipped set goes back to the pool for others.

Leases: a reservation holds its slot for ``lease_seconds`` (default 30 minutes). An open
assignment past its lease is *released* (status "released", the slot back in the pool) by the
next request for work or the next progress read; revoking a labeller releases their open
assignments at once, and ``release`` frees a set's or a labeller's by hand. A released
assignment is not forgotten: its labeller's late submission is stored if the set still needs a
label (the slot is taken again) and refused with a clear 409 if it does not; the same labeller
asking for work again may get the set back.

The labellers' hot path (``authenticate``, ``next_with_progress``, ``submit``) is SQLAlchemy
Core on prebuilt statements, a handful per transaction; the rarer admin functions use the ORM.
On SQLite, writers queue on an in-process lock plus an ``flock`` on ``<file>.writer-lock``
before ``BEGIN IMMEDIATE`` (see ``_write_lock``), so no writer polls SQLite's busy handler.
``submission_ledger`` lists what is stored, for audits (``alignloop.feedback.loadtest``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl  # POSIX: the cross-process writer lock
except ImportError:  # Windows: threads queue on the lock, processes on SQLite's busy timeout
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from alignloop.errors import UserError
from alignloop.feedback.models import (
    Admin,
    Assignment,
    BrowserSession,
    CompletionRow,
    CompletionSetRow,
    Label,
    Labeller,
    Project,
    utcnow,
)
from alignloop.records import CompletionSet, Ranking, adopt_text_convention

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD_REVISION = "0003"  # the newest file in migrations/versions (a test checks)
MODES = ("rank", "thumbs")
TIE_WARNING_RATE = 0.2  # "ties sparingly": warn when more than 20% of a labeller's sets have a tie
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
OTHER_PROJECT = "works in project"
DEFAULT_LEASE_SECONDS = 1800.0  # an open assignment holds its set for a working session, then is released  # in the error for a labeller invited into a second project

DEFAULT_INSTRUCTIONS = """\
# How to rank

You will see a prompt and several completions a model wrote for it. Rank the completions
according to which one provides the **best answer to the prompt**.

- **What is the best answer?** Decide on (a) the **correctness** of the answer and (b) its
  **informativeness**. Use your best judgment: the most useful response is at least somewhat
  correct and minimally informative about what the prompt asks for.
- **Ties, sparingly.** If two completions are equally correct and informative and there is no
  clear winner, you may give them the same rank, but please only do this sparingly.
- **F for fail.** If a completion is nonsensical, irrelevant, highly ungrammatical or confusing,
  or does not clearly respond to the prompt, mark it **F** rather than ranking it.
- **Longer is not always better.** A succinct, coherent answer may be better than a longer one
  if it is at least as correct and informative.

## Keys

- Up / Down (or J / K): move between completions. Digits **1-9**: give the selected completion
  that rank (1 = best; the same digit twice makes a tie). **F**: fail. **U** or Backspace: undo.
  **Enter**: submit. You can also drag the completions into order.
- Every completion must be ranked or failed before you submit. **S** skips the set (give a
  reason).

*Source: the ranking instructions of Chung et al. 2022, "Scaling Instruction-Finetuned
Language Models", as quoted in the course notes.*
"""

DEFAULT_THUMBS_INSTRUCTIONS = """\
# How to rate

You will see a prompt and several completions a model wrote for it. Give each completion a
thumbs **up** if it is a correct and informative answer to the prompt, and a thumbs **down** if
it is wrong, unhelpful, nonsensical, irrelevant or ungrammatical. Longer is not always better.

Keys: Up / Down (or J / K) move, **Y** = thumbs up, **N** = thumbs down, **U** = undo,
**Enter** = submit, **S** = skip (give a reason).
"""


class Rejected(UserError):
    """A request the store refuses; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, status: int, what: str, fix: str | None = None):
        self.status = status
        super().__init__(what, fix=fix)


# ---------------------------------------------------------------------------------------------
# Engines and migrations


_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()
# SQLite has one writer at a time. Left to SQLite's busy handler, waiting writers poll with
# sleeps of up to 100 ms (the long latency tail under load). So writers queue on a lock that
# hands over at once: a Python lock between the threads of a process, and an flock() on
# "<database file>.writer-lock" between processes (``label serve --workers N``, a CLI import next
# to a running server). The kernel drops the flock of a process that dies, even by kill -9.
_WRITE_LOCKS: dict[int, tuple[threading.Lock, Path | None]] = {}
# one open descriptor per lock file and process (a forked child shares its parent's descriptor,
# and with it the lock, so it opens its own)
_LOCK_FILES: dict[tuple[int, Path], int] = {}


def normalise_url(db_url: str) -> str:
    """A database URL; a bare file path (``labels.db``) means SQLite in that file."""
    db_url = str(db_url).strip()
    if "://" not in db_url:
        if not db_url:
            raise UserError("empty database URL", "--db", "use e.g. sqlite:///labels.db")
        return f"sqlite:///{db_url}"
    if db_url.startswith("postgresql://"):
        db_url = "postgresql+psycopg://" + db_url[len("postgresql://") :]
    return db_url


def open_store(db_url: str, migrate: bool = True) -> Engine:
    """The engine for ``db_url`` (made once per URL), with the schema at the newest revision.

    SQLite gets WAL journaling, ``synchronous=NORMAL``, foreign keys and a busy timeout; its
    write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of
    failing. Bad URLs and unreachable servers are a :class:`UserError`.
    """
    url = normalise_url(db_url)
    with _LOCK:
        engine = _ENGINES.get(url)
        if engine is not None:
            return engine
        engine = _make_engine(url)
        try:
            if migrate:
                migrate_store(engine)
            else:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
        except DatabaseError as e:  # e.g. --db names a file that is not an SQLite database
            engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
            raise UserError(
                f"cannot open {make_url(url).render_as_string()} as a labelling store: {reason}",
                "--db",
                "point --db at a new file or at an existing labelling database",
            ) from None
        _ENGINES[url] = engine
        return engine


def close_store(db_url: str) -> None:
    """Dispose of the engine for ``db_url`` (tests, and before deleting a database file)."""
    engine = _ENGINES.pop(normalise_url(db_url), None)
    if engine is not None:
        _SET_CACHE.pop(engine.url, None)
        _, lock_file = _WRITE_LOCKS.pop(id(engine), (None, None))
        fd = _LOCK_FILES.pop((os.getpid(), lock_file), None) if lock_file is not None else None
        if fd is not None:
            os.close(fd)
        engine.dispose()


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"not a database URL: {url!r}", "--db", "use sqlite:///labels.db or postgresql://user@host/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise UserError(
                    f"folder does not exist (or is not a folder): {folder}",
                    "--db",
                    "create it or choose another path",
                )
        try:
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        except NoSuchModuleError:
            raise UserError(
                f"unknown database kind in {url!r}", "--db", "use sqlite:// or postgresql://"
            ) from None
        _sqlite_setup(engine)
        on_disk = parsed.database and parsed.database != ":memory:" and fcntl is not None
        lock_file = Path(f"{Path(parsed.database).expanduser().resolve()}.writer-lock") if on_disk else None
        _WRITE_LOCKS[id(engine)] = (threading.Lock(), lock_file)
        return engine
    try:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)
    except (NoSuchModuleError, ArgumentError, ImportError) as e:  # ImportError: the dialect's driver
        raise UserError(
            f"cannot use database {parsed.render_as_string()}: {e}", "--db", "use sqlite:// or postgresql://"
        ) from None
    try:
        with engine.connect():
            pass
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise UserError(f"cannot connect to {parsed.render_as_string()}: {reason}", "--db") from None
    return engine


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _connection)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, fast
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()


def migrate_store(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when it is already there)."""
    with engine.connect() as conn:  # fast path: up to date, so alembic need not even be imported
        if (
            inspect(conn).has_table("alembic_version")
            and conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD_REVISION
        ):
            return
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _connection(engine, write=True) as conn:
        if conn.dialect.name == "postgresql":  # two processes opening a fresh database
            conn.execute(text("SELECT pg_advisory_xact_lock(7215021)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def _connection(engine: Engine, write: bool = False) -> Iterator[Connection]:
    """One transaction on a pooled connection: committed at the end, rolled back on any error.

    On SQLite the driver runs in autocommit mode and we open the transaction ourselves: a
    deferred transaction that reads and then writes fails at once when another writer got in
    between, so a write transaction takes the write lock up front (``BEGIN IMMEDIATE``), after
    :func:`_write_lock`. (Issuing it here rather than from an engine "begin" event keeps the
    engine free of event listeners, which SQLAlchemy would dispatch on every statement.)
    """
    with _write_lock(engine) if write else nullcontext(), engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
        else:
            conn.begin()  # so that an ORM session bound to conn joins it rather than owning it
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


@contextmanager
def _reading(db_url: str) -> Iterator[Session]:
    with _connection(open_store(db_url)) as conn, Session(bind=conn, expire_on_commit=False) as s:
        yield s


@contextmanager
def _write_lock(engine: Engine) -> Iterator[None]:
    """Hold the SQLite writer lock of this database, across threads and processes (PostgreSQL:
    nothing to do, its row locks queue writers without polling)."""
    got = _WRITE_LOCKS.get(id(engine))
    if got is None:
        yield
        return
    lock, lock_file = got
    with lock:
        if lock_file is None:
            yield
            return
        key = (os.getpid(), lock_file)
        fd = _LOCK_FILES.get(key)
        if fd is None:
            fd = _LOCK_FILES[key] = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def _writing(db_url: str) -> Iterator[Session]:
    """One short write transaction: committed at the end, rolled back on any error."""
    with (
        _connection(open_store(db_url), write=True) as conn,
        Session(bind=conn, expire_on_commit=False) as s,
    ):
        yield s
        s.flush()  # the session joins our transaction; _connection commits it


def hash_token(token: str) -> str:
    """sha256 hex of a login token (tokens are 32 random bytes, so a plain hash is enough)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _iso(t: datetime | None) -> str:
    if t is None:
        return ""
    if t.tzinfo is None:  # SQLite hands back naive datetimes; we only ever store UTC
        t = t.replace(tzinfo=timezone.utc)
    return t.isoformat()


# ---------------------------------------------------------------------------------------------
# The text rule: what every text that enters the store (or a query) must be


def check_text(field: str, value: Any) -> None:
    """Refuse text the databases cannot hold alike: a NUL character, or a lone surrogate.

    PostgreSQL cannot store NUL in text (SQLite would, so without this rule the same input
    would work on one database and fail on the other), and a lone surrogate is not encodable
    as UTF-8. Strings inside dicts and lists (a set's extra fields) are checked too. Raises
    :class:`Rejected` (400) naming ``field``; every function below that takes text from outside
    calls it first, so nothing is stored half-way.
    """
    if isinstance(value, str):
        if "\x00" in value:
            raise Rejected(400, f"{field} contains a NUL character (\\x00)", "remove it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(
                400, f"{field} is not valid Unicode (a lone surrogate)", "fix its encoding"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(f"{field}: key", k)
            check_text(f"{field}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(f"{field}[{i}]", v)


def check_sets(sets: Iterable[CompletionSet]) -> list[CompletionSet]:
    """:func:`check_text` on every text of completion sets (before anything is written)."""
    sets = list(sets)
    for cs in sets:
        check_text("prompt_id", cs.prompt_id)
        if MESSAGES_MARK in (cs.model_extra or {}):
            raise UserError(
                f"set {cs.prompt_id!r} has a field named {MESSAGES_MARK!r}, which the store keeps for itself",
                fix="rename that field",
            )
        for key, value in cs.model_dump(mode="json").items():
            check_text(f"set {cs.prompt_id!r}: {key}", value)
    return sets


# ---------------------------------------------------------------------------------------------
# Projects, sets, people


def _project_dict(p: Project) -> dict[str, Any]:
    return {
        "name": p.name,
        "criterion": p.criterion,
        "instructions": p.instructions,
        "mode": p.mode,
        "per_set": p.per_set,
    }


def create_project(
    db_url: str,
    name: str = "default",
    *,
    criterion: str = "helpfulness",
    instructions: str | None = None,
    mode: str = "rank",
    per_set: int = 3,
    exist_ok: bool = False,
) -> dict[str, Any]:
    """Create a labelling project (criterion, Markdown instructions, mode, k labellers per set).

    ``instructions=None`` uses the course notes' ranking instructions (or the thumbs ones).
    With ``exist_ok`` an existing project with the same settings is returned as it is; one with
    other settings is an error (its labels were collected under those settings).
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}", "--mode", "use 'rank' or 'thumbs'")
    if not isinstance(per_set, int) or per_set < 1:
        raise UserError(f"labellers per set must be at least 1, got {per_set!r}", "--per-set")
    check_text("name", name)
    check_text("criterion", criterion)
    check_text("instructions", instructions)
    name = name.strip()
    if not name:
        raise UserError("empty project name", "--project")
    if instructions is None:
        instructions = DEFAULT_INSTRUCTIONS if mode == "rank" else DEFAULT_THUMBS_INSTRUCTIONS
    with _writing(db_url) as s:
        p = s.scalar(select(Project).where(Project.name == name))
        if p is not None:
            if not exist_ok:
                raise UserError(f"project {name!r} already exists", "--project", "choose another name")
            if (p.mode, p.per_set) != (mode, per_set):
                raise UserError(
                    f"project {name!r} exists with mode={p.mode} per_set={p.per_set}, "
                    f"not mode={mode} per_set={per_set}",
                    "--project",
                    "use those settings or a new project name",
                )
            return _project_dict(p)
        p = Project(name=name, criterion=criterion, instructions=instructions, mode=mode, per_set=per_set)
        s.add(p)
        s.flush()
        return _project_dict(p)


def list_projects(db_url: str) -> list[dict[str, Any]]:
    with _reading(db_url) as s:
        return [_project_dict(p) for p in s.scalars(select(Project).order_by(Project.id))]


def find_project(db_url: str, name: str | None = None) -> dict[str, Any]:
    """The project ``name`` (None: the only one); a missing or ambiguous name is one clear error."""
    with _reading(db_url) as s:
        return _project_dict(_find_project(s, name))


def _find_project(s: Session, name: str | None) -> Project:
    check_text("project", name)
    if name is None:
        projects = list(s.scalars(select(Project).order_by(Project.id)))
        if len(projects) == 1:
            return projects[0]
        if not projects:
            raise UserError(
                "the database has no labelling project yet", fix="run 'alignloop label import' first"
            )
        known = ", ".join(p.name for p in projects)
        raise UserError("the database has several projects", "--project", f"name one of: {known}")
    p = s.scalar(select(Project).where(Project.name == name))
    if p is None:
        known = ", ".join(s.scalars(select(Project.name).order_by(Project.id))) or "none"
        raise UserError(f"no project {name!r}", "--project", f"projects: {known}")
    return p


# A conversational prompt (TRL's message list, records.check_messages) is kept in the text column
# ``prompt`` as its JSON, and the set's extra fields mark it, so that a text prompt that happens to
# look like JSON stays text. What the store hands out (assignments, load_labels) is the list again.
MESSAGES_MARK = "alignloop_prompt_is_messages"


def _prompt_column(prompt: str | list[dict[str, Any]]) -> str:
    """The ``prompt`` column's text: a text prompt as it is, a message list as its JSON."""
    return json.dumps(prompt, ensure_ascii=False) if isinstance(prompt, list) else prompt


def _prompt_value(column: str, extra: dict[str, Any] | None) -> str | list[dict[str, Any]]:
    """The prompt a set was imported with, from its column text and extra fields."""
    return json.loads(column) if (extra or {}).get(MESSAGES_MARK) else column


def _set_fields(cs: CompletionSet) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    data = cs.model_dump(mode="json")
    comps = [(c["id"], c["text"]) for c in data.pop("completions")]
    for key in ("prompt_id", "prompt", "model"):
        data.pop(key)
    if isinstance(cs.prompt, list):
        data[MESSAGES_MARK] = True
    return data, comps


def distinct_completions(comps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(id, text)`` with each text once (its first id kept): labellers never rank a text against itself."""
    seen: set[str] = set()
    out = []
    for cid, t in comps:
        if t not in seen:
            seen.add(t)
            out.append((cid, t))
    return out


def import_sets(db_url: str, sets: Iterable[CompletionSet], project: str | None = None) -> dict[str, int]:
    """Add completion sets to a project, all in one transaction.

    Returns ``{"added", "unchanged", "collapsed"}``: ``collapsed`` counts the completions left out
    because their text is already in their set (the first id of each text is kept), so labellers
    never see the same text twice in one set. Sets in the old text convention (no space between
    prompt and completion) are converted, as files are when read. Importing the same file twice adds nothing; a set id
    that exists with other content, or a set with two completions of the same id, is a UserError
    and nothing is added.
    """
    added = unchanged = collapsed = 0
    sets = check_sets(sets)
    rows = [(i, cs.model_dump(mode="json")) for i, cs in enumerate(sets, 1)]
    if adopt_text_convention(rows, "the imported sets"):  # old convention (e.g. through the API): converted
        sets = [CompletionSet.model_validate(r) for _, r in rows]
    with _writing(db_url) as s:
        p = _find_project(s, project)
        existing = {
            r.set_id: r
            for r in s.scalars(select(CompletionSetRow).where(CompletionSetRow.project_id == p.id))
        }
        seen: set[str] = set()
        for cs in sets:
            extra, comps = _set_fields(cs)
            ids = [cid for cid, _ in comps]
            if len(set(ids)) != len(ids):
                raise UserError(
                    f"set {cs.prompt_id!r} has two completions with the same id", fix="ids must be unique"
                )
            if cs.prompt_id in seen:
                raise UserError(
                    f"set {cs.prompt_id!r} appears twice in the input", fix="set ids must be unique"
                )
            seen.add(cs.prompt_id)
            distinct = distinct_completions(comps)
            collapsed += len(comps) - len(distinct)
            comps = distinct
            old = existing.get(cs.prompt_id)
            if old is not None:
                old_comps = [
                    (c.cid, c.text)
                    for c in s.scalars(
                        select(CompletionRow)
                        .where(CompletionRow.set_pk == old.id)
                        .order_by(CompletionRow.position)
                    )
                ]
                if old.prompt != _prompt_column(cs.prompt) or old_comps != comps:
                    raise UserError(
                        f"set {cs.prompt_id!r} is already in project {p.name!r} with other content",
                        fix="give changed sets new prompt ids, or import into a new project",
                    )
                unchanged += 1
                continue
            row = CompletionSetRow(
                project_id=p.id,
                set_id=cs.prompt_id,
                prompt=_prompt_column(cs.prompt),
                model=cs.model,
                extra=extra,
            )
            row.n_assigned = row.n_done = 0
            s.add(row)
            s.flush()
            s.add_all(
                CompletionRow(set_pk=row.id, cid=cid, position=i, text=t) for i, (cid, t) in enumerate(comps)
            )
            added += 1
    return {"added": added, "unchanged": unchanged, "collapsed": collapsed}


def _login(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/login?token={token}"


def invite(
    db_url: str,
    name: str,
    project: str | None = None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    new_link: bool = False,
) -> dict[str, Any]:
    """Create labeller ``name`` in a project; returns ``{"id", "name", "token", "link"}``.

    The token is returned once and stored hashed. ``new_link`` issues a fresh token for an
    existing labeller (the old link stops working; a revoked labeller is restored). A labeller
    works in one project: naming another project for an existing labeller is an error.
    """
    check_text("name", name)
    check_text("project", project)
    name = name.strip()
    if not name or len(name) > 200:
        raise UserError("a labeller name must have 1 to 200 characters")
    token = secrets.token_urlsafe(32)
    with _writing(db_url) as s:
        who = s.scalar(select(Labeller).where(Labeller.name == name))
        if who is not None and project is not None:
            p = _find_project(s, project)
            if who.project_id != p.id:
                other = s.scalar(select(Project.name).where(Project.id == who.project_id))
                raise Rejected(
                    409,
                    f"labeller {name!r} {OTHER_PROJECT} {other!r}, not {p.name!r}",
                    "invite them under another name for this project",
                )
        if who is not None:
            if not new_link:
                raise UserError(
                    f"labeller {name!r} already exists", fix="use --new-link to replace their login link"
                )
            who.token_hash, who.revoked = hash_token(token), False
            s.execute(
                delete(BrowserSession).where(BrowserSession.labeller_id == who.id)
            )  # old link's sessions
        else:
            p = _find_project(s, project)
            who = Labeller(name=name, project_id=p.id, token_hash=hash_token(token), revoked=False)
            s.add(who)
        s.flush()
        return {"id": who.id, "name": who.name, "token": token, "link": _login(base_url, token)}


def create_admin(
    db_url: str, name: str = "admin", *, base_url: str = DEFAULT_BASE_URL, new_link: bool = True
) -> dict[str, Any]:
    """An admin login (the admin pages and ``/api/admin``); returns ``{"name", "token", "link"}``.

    Calling it again for the same name replaces the token (the old one stops working).
    """
    check_text("name", name)
    token = secrets.token_urlsafe(32)
    with _writing(db_url) as s:
        adm = s.scalar(select(Admin).where(Admin.name == name))
        if adm is None:
            s.add(Admin(name=name, token_hash=hash_token(token), revoked=False))
        elif not new_link:
            raise UserError(f"admin {name!r} already exists", fix="issue a new link to replace the old one")
        else:
            adm.token_hash, adm.revoked = hash_token(token), False
            s.execute(delete(BrowserSession).where(BrowserSession.admin_id == adm.id))
    return {"name": name, "token": token, "link": _login(base_url, token)}


def has_admin(db_url: str) -> bool:
    """Whether any (unrevoked) admin login exists."""
    with _reading(db_url) as s:
        return s.scalar(select(func.count()).select_from(Admin).where(Admin.revoked.is_(False))) > 0


def revoke(db_url: str, name: str, admin: bool = False) -> dict[str, Any]:
    """Revoke a labeller's (or an admin's) login link and end their browser sessions at once.
    Their labels stay; a labeller's open assignments are released at once (their sets go back to
    the pool). Returns ``{"released"}``."""
    check_text("name", name)
    table = Admin if admin else Labeller
    with _writing(db_url) as s:
        ids = list(s.scalars(select(table.id).where(table.name == name)))
        if not ids:
            raise Rejected(404, f"no {'admin' if admin else 'labeller'} named {name!r}")
        s.execute(update(table).where(table.id.in_(ids)).values(revoked=True))
        owner = BrowserSession.admin_id if admin else BrowserSession.labeller_id
        s.execute(delete(BrowserSession).where(owner.in_(ids)))
        if admin:
            return {"released": 0}
        c = s.connection()
        rows = c.execute(select(_A.c.id, _A.c.set_pk).where(_A.c.labeller_id.in_(ids), _A.c.status == "open"))
        return {"released": len(_release(c, rows.all(), "labeller revoked", utcnow()))}


def release(
    db_url: str, *, set_id: str | None = None, labeller: str | None = None, project: str | None = None
) -> dict[str, Any]:
    """Free by hand the open assignments of one set (``set_id``, in ``project``) or of one
    labeller: their slots go back to the pool at once. Returns ``{"released": n, "sets": [ids]}``.

    An unknown set, labeller or project is one :class:`UserError`; nothing open is not an error.
    """
    if (set_id is None) == (labeller is None):
        raise UserError("give exactly one of --set and --labeller", fix="e.g. --set p17 or --labeller ada")
    for field, value in (("set", set_id), ("labeller", labeller), ("project", project)):
        check_text(field, value)
    with _writing(db_url) as s:
        c = s.connection()
        if labeller is not None:
            lid = c.execute(select(_L.c.id).where(_L.c.name == labeller)).scalar()
            if lid is None:
                known = (
                    ", ".join(c.execute(select(_L.c.name).order_by(_L.c.id).limit(20)).scalars()) or "none"
                )
                raise UserError(f"no labeller named {labeller!r}", "--labeller", f"labellers: {known}")
            mine = _A.c.labeller_id == lid
        else:
            p = _find_project(s, project)
            sp = c.execute(select(_S.c.id).where(_S.c.project_id == p.id, _S.c.set_id == set_id)).scalar()
            if sp is None:
                raise UserError(
                    f"no set {set_id!r} in project {p.name!r}", "--set", "set ids are the prompt ids imported"
                )
            mine = _A.c.set_pk == sp
        rows = c.execute(
            select(_A.c.id, _A.c.set_pk, _S.c.set_id)
            .join(_S, _S.c.id == _A.c.set_pk)
            .where(mine, _A.c.status == "open")
            .order_by(_A.c.id)
        ).all()
        freed = set(_release(c, [(aid, sp) for aid, sp, _ in rows], "released by hand", utcnow()))
    return {"released": len(freed), "sets": [sid for aid, _, sid in rows if aid in freed]}


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: ``kind`` is "labeller" or "admin"."""

    kind: str
    id: int
    name: str
    project_id: int | None = None
    acknowledged: bool = False


# The hot path (authenticate, next, submit, progress) is SQLAlchemy Core on the tables: one
# short transaction per call, a few indexed statements, no ORM session or identity map. The
# statements are built once here; SQLAlchemy caches their compiled SQL.
_L, _AD, _P = Labeller.__table__, Admin.__table__, Project.__table__
_S, _C, _A, _LB = CompletionSetRow.__table__, CompletionRow.__table__, Assignment.__table__, Label.__table__

_Q_LABELLER_BY_HASH = select(_L.c.id, _L.c.name, _L.c.project_id, _L.c.revoked, _L.c.acknowledged_at).where(
    _L.c.token_hash == bindparam("h")
)
_Q_ADMIN_BY_HASH = select(_AD.c.id, _AD.c.name, _AD.c.revoked).where(_AD.c.token_hash == bindparam("h"))
_Q_WHO = (  # the labeller, their project, and their open assignment if they have one
    select(
        _L.c.revoked,
        _L.c.project_id,
        _P.c.per_set,
        _P.c.mode,
        _A.c.id.label("open_id"),
        _A.c.set_pk.label("open_set"),
        _A.c.expires_at.label("open_expires"),
    )
    .join(_P, _P.c.id == _L.c.project_id)
    .outerjoin(_A, and_(_A.c.labeller_id == _L.c.id, _A.c.status == "open"))
    .where(_L.c.id == bindparam("lid"))
    .order_by(_A.c.id)
    .limit(1)
)
_MY = _A.alias("mine")  # the labeller's own assignment of a set, if any (one: a unique pair)
_Q_CANDIDATES = (  # sets with room the labeller has not had, or had and was released from
    select(_S.c.id, _MY.c.id.label("released_id"))
    .select_from(_S.outerjoin(_MY, and_(_MY.c.set_pk == _S.c.id, _MY.c.labeller_id == bindparam("lid"))))
    .where(
        _S.c.project_id == bindparam("pid"),
        _S.c.n_assigned < bindparam("k"),
        or_(_MY.c.id.is_(None), _MY.c.status == "released"),
    )
    .order_by(_S.c.n_assigned, _S.c.id)
    .limit(8)
)
_Q_RESERVE = (
    update(_S)
    .where(_S.c.id == bindparam("sp"), _S.c.n_assigned < bindparam("k"))
    .values(n_assigned=_S.c.n_assigned + 1)
)
_Q_SET = (
    select(_S.c.set_id, _S.c.prompt, _S.c.extra, _P.c.mode, _P.c.criterion)
    .join(_P, _P.c.id == _S.c.project_id)
    .where(_S.c.id == bindparam("sp"))
)
_Q_COMPLETIONS = select(_C.c.cid, _C.c.text).where(_C.c.set_pk == bindparam("sp")).order_by(_C.c.position)
_Q_ASSIGNMENT = (
    select(_A.c.labeller_id, _A.c.status, _A.c.set_pk, _A.c.expires_at, _A.c.skip_reason, _P.c.per_set)
    .join(_S, _S.c.id == _A.c.set_pk)
    .join(_P, _P.c.id == _S.c.project_id)
    .where(_A.c.id == bindparam("aid"))
)
_Q_LABEL_BY_SUBMISSION = select(_LB.c.id, _LB.c.assignment_id).where(_LB.c.submission_id == bindparam("sid"))
_Q_LABEL_OF_ASSIGNMENT = select(_LB.c.ranks, _LB.c.thumbs, _LB.c.submission_id).where(
    _LB.c.assignment_id == bindparam("aid")
)


def _count(table: Any, *where: Any) -> Any:
    return select(func.count()).select_from(table).where(*where).scalar_subquery()


_MINE = _A.c.labeller_id == bindparam("lid")
# a labeller's progress in one statement: their assignments by status, their ranked sets with a
# tie, sets with room left, and those of them they have already seen (remaining = the difference)
_Q_PROGRESS = select(
    _count(_A, _MINE, _A.c.status == "done").label("done"),
    _count(_A, _MINE, _A.c.status == "open").label("open"),
    _count(_A, _MINE, _A.c.status == "skipped").label("skipped"),
    _count(_LB, _LB.c.labeller_id == bindparam("lid"), _LB.c.has_tie).label("ties"),
    _count(_S, _S.c.project_id == bindparam("pid"), _S.c.n_assigned < bindparam("k")).label("with_room"),
    select(func.count())
    .select_from(_A.join(_S, _S.c.id == _A.c.set_pk))
    .where(_MINE, _A.c.status != "released", _S.c.n_assigned < bindparam("k"))
    .scalar_subquery()
    .label("seen_with_room"),
)
_Q_NEW_ASSIGNMENT = insert(_A).values(
    set_pk=bindparam("sp"),
    labeller_id=bindparam("lid"),
    status="open",
    created_at=bindparam("now"),
    expires_at=bindparam("exp"),
)
_Q_REOPEN = (  # the labeller takes a set back they were released from
    update(_A)
    .where(_A.c.id == bindparam("aid"), _A.c.status == "released")
    .values(status="open", expires_at=bindparam("exp"), skip_reason=None, closed_at=None)
)
_Q_EXPIRED = (
    select(_A.c.id, _A.c.set_pk)
    .where(_A.c.status == "open", _A.c.expires_at < bindparam("now"))
    .order_by(_A.c.id)
    .limit(500)
)
_Q_RELEASE = (
    update(_A)
    .where(_A.c.id == bindparam("aid"), _A.c.status == "open")
    .values(status="released", skip_reason=bindparam("why"), closed_at=bindparam("now"))
)
_Q_UNRESERVE = update(_S).where(_S.c.id == bindparam("sp")).values(n_assigned=_S.c.n_assigned - 1)
_Q_NEW_LABEL = insert(_LB).values(
    submission_id=bindparam("sid"),
    assignment_id=bindparam("aid"),
    set_pk=bindparam("sp"),
    labeller_id=bindparam("lid"),
    ranks=bindparam("ranks", type_=_LB.c.ranks.type),
    thumbs=bindparam("thumbs", type_=_LB.c.thumbs.type),
    has_tie=bindparam("tie"),
    created_at=bindparam("now"),
)
_Q_CLOSE = (  # "open" or "released" -> "done" (a released one only after taking a slot again)
    update(_A)
    .where(_A.c.id == bindparam("aid"), _A.c.status == bindparam("was"))
    .values(status="done", closed_at=bindparam("now"), skip_reason=None)
)
_Q_COUNT_DONE = update(_S).where(_S.c.id == bindparam("sp")).values(n_done=_S.c.n_done + 1)


def check_lease(seconds: Any, where: str = "--lease-seconds") -> float:
    """A lease length in seconds: a positive, finite number, else one clear :class:`UserError`."""
    import math

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise UserError(f"a lease must be a number of seconds, got {seconds!r}", where)
    if seconds <= 0:
        raise UserError(
            f"a lease must be longer than 0 seconds, got {seconds:g}", where, "e.g. 1800 (30 minutes)"
        )
    return float(seconds)


def _release(c: Connection, rows: Iterable[Any], why: str, now: datetime) -> list[int]:
    """Release open assignments ``rows`` (``(id, set_pk)``): each slot goes back to its set's pool.

    An assignment that is no longer open (submitted or released meanwhile) is left alone.
    Returns the ids released.
    """
    done = []
    for aid, set_pk in rows:
        if c.execute(_Q_RELEASE, {"aid": aid, "why": why, "now": now}).rowcount:
            c.execute(_Q_UNRESERVE, {"sp": set_pk})
            done.append(aid)
    return done


def _release_expired(c: Connection, now: datetime) -> int:
    """Release every open assignment whose lease ended before ``now`` (an indexed look-up)."""
    n = 0
    while True:
        rows = c.execute(_Q_EXPIRED, {"now": now}).all()
        n += len(_release(c, rows, "lease expired", now))
        if len(rows) < 500:
            return n


def _deadlock(e: OperationalError) -> bool:
    """PostgreSQL aborted this transaction to break a deadlock (or a serialization conflict):
    nothing of it was written, so it can simply run again."""
    return getattr(getattr(e, "orig", None), "sqlstate", None) in ("40P01", "40001")


def _release_due(db_url: str) -> None:
    """Release ended leases in a short transaction of their own, before a request for work or a
    read (progress, the open set on GET), so their slots are free and what is shown is true now.
    The write lock is taken only when a lease has ended (one indexed look-up otherwise)."""
    with _tx(db_url) as c:
        due = c.execute(_Q_EXPIRED, {"now": utcnow()}).first() is not None
    for _attempt in range(4):
        if not due:
            return
        try:
            with _tx(db_url, write=True) as c:
                _release_expired(c, utcnow())
            return
        except OperationalError as e:
            if not _deadlock(e):
                raise


def _tx(db_url: str, write: bool = False) -> Any:
    """One short Core transaction on ``db_url`` (``write``: SQLite takes the write lock up front)."""
    return _connection(open_store(db_url), write)


def authenticate(db_url: str, token: str | None) -> Principal | None:
    """The labeller or admin whose (unrevoked) token this is, else None.

    One indexed lookup of the token's sha256 on every request: no cache, so a revoked link
    stops working at once, in every server process.
    """
    if not token or len(token) > 200:
        return None
    h = hash_token(token)
    with _tx(db_url) as c:
        who = c.execute(_Q_LABELLER_BY_HASH, {"h": h}).first()
        if who is not None:
            if who.revoked:
                return None
            return Principal("labeller", who.id, who.name, who.project_id, who.acknowledged_at is not None)
        adm = c.execute(_Q_ADMIN_BY_HASH, {"h": h}).first()
        if adm is not None and not adm.revoked:
            return Principal("admin", adm.id, adm.name)
    return None


# ---------------------------------------------------------------------------------------------
# Browser sessions: the login link is exchanged for one (see models.BrowserSession)


@dataclass(frozen=True)
class LiveSession:
    """A live browser session: who, the family's CSRF token, and whether it is due to rotate."""

    principal: Principal
    id: int
    family: str
    csrf: str
    rotate: bool


SESSION_ROTATE_SECONDS = 15 * 60  # a session in use is replaced by a fresh one this often
SESSION_GRACE_SECONDS = 60  # the replaced one still answers this long (requests already in flight)

_BS = BrowserSession.__table__
_Q_SESSION = (
    select(
        _BS.c.id,
        _BS.c.family,
        _BS.c.csrf,
        _BS.c.created_at,
        _BS.c.expires_at,
        _L.c.id.label("lid"),
        _L.c.name.label("lname"),
        _L.c.project_id,
        _L.c.revoked.label("lrevoked"),
        _L.c.acknowledged_at,
        _AD.c.id.label("aid"),
        _AD.c.name.label("aname"),
        _AD.c.revoked.label("arevoked"),
    )
    .outerjoin(_L, _L.c.id == _BS.c.labeller_id)
    .outerjoin(_AD, _AD.c.id == _BS.c.admin_id)
    .where(_BS.c.token_hash == bindparam("h"))
)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC


def start_session(db_url: str, token: str | None, hours: float) -> dict[str, Any] | None:
    """Exchange a login link's token for a new browser session lasting ``hours`` of idleness.

    Returns ``{"secret", "csrf", "principal", "expires_at"}`` (the secret goes in the cookie and
    is stored only as its sha256), or None when the token is not a valid, unrevoked login.
    Expired sessions of every login are deleted on the way.
    """
    p = authenticate(db_url, token)
    if p is None:
        return None
    secret, csrf, now = secrets.token_urlsafe(32), secrets.token_hex(32), utcnow()
    expires = now + timedelta(hours=hours)
    with _tx(db_url, write=True) as c:
        c.execute(delete(_BS).where(_BS.c.expires_at < now))
        c.execute(
            insert(_BS).values(
                token_hash=hash_token(secret),
                family=secrets.token_hex(16),
                labeller_id=p.id if p.kind == "labeller" else None,
                admin_id=p.id if p.kind == "admin" else None,
                csrf=csrf,
                created_at=now,
                expires_at=expires,
            )
        )
    return {"secret": secret, "csrf": csrf, "principal": p, "expires_at": expires}


def session(db_url: str, secret: str | None) -> LiveSession | None:
    """The live session whose cookie secret this is (one indexed look-up), else None.

    None when the secret is unknown, the session expired, it was ended (logout) or its login
    was revoked: no cache, so each takes effect at the next request in every process.
    """
    if not secret or len(secret) > 200:
        return None
    with _tx(db_url) as c:
        row = c.execute(_Q_SESSION, {"h": hash_token(secret)}).first()
    now = utcnow()
    if row is None or _aware(row.expires_at) <= now:
        return None
    if row.lid is not None and not row.lrevoked:
        p = Principal("labeller", row.lid, row.lname, row.project_id, row.acknowledged_at is not None)
    elif row.aid is not None and not row.arevoked:
        p = Principal("admin", row.aid, row.aname)
    else:
        return None
    age = (now - _aware(row.created_at)).total_seconds()
    return LiveSession(p, row.id, row.family, row.csrf, rotate=age > SESSION_ROTATE_SECONDS)


def rotate_session(db_url: str, old: LiveSession, hours: float) -> dict[str, Any] | None:
    """Replace a session by a fresh secret (same login, family and CSRF token, expiry renewed);
    the old secret keeps answering for :data:`SESSION_GRACE_SECONDS`. None if it was ended
    meanwhile (or another request rotated it first): the caller keeps the old cookie."""
    secret, now = secrets.token_urlsafe(32), utcnow()
    expires = now + timedelta(hours=hours)
    grace = now + timedelta(seconds=SESSION_GRACE_SECONDS)
    with _tx(db_url, write=True) as c:
        cut = c.execute(
            update(_BS).where(_BS.c.id == old.id, _BS.c.expires_at > grace).values(expires_at=grace)
        ).rowcount
        if not cut:
            return None
        c.execute(
            insert(_BS).values(
                token_hash=hash_token(secret),
                family=old.family,
                labeller_id=old.principal.id if old.principal.kind == "labeller" else None,
                admin_id=old.principal.id if old.principal.kind == "admin" else None,
                csrf=old.csrf,
                created_at=now,
                expires_at=expires,
            )
        )
    return {"secret": secret, "expires_at": expires}


def end_session(db_url: str, family: str) -> None:
    """Logout: every secret of this session (rotated ones included) stops working at once."""
    with _tx(db_url, write=True) as c:
        c.execute(delete(_BS).where(_BS.c.family == family))


def acknowledge(db_url: str, labeller_id: int) -> None:
    """The labeller has read the instructions (asked once; they stay one click away)."""
    with _writing(db_url) as s:
        s.execute(
            update(Labeller)
            .where(Labeller.id == labeller_id, Labeller.acknowledged_at.is_(None))
            .values(acknowledged_at=utcnow())
        )


def labeller_project(db_url: str, labeller_id: int) -> dict[str, Any]:
    with _reading(db_url) as s:
        p = s.scalar(
            select(Project)
            .join(Labeller, Labeller.project_id == Project.id)
            .where(Labeller.id == labeller_id)
        )
        if p is None:
            raise Rejected(404, "no such labeller")
        return _project_dict(p)


# ---------------------------------------------------------------------------------------------
# Assignment, submission, skip


# What a set shows (its id, prompt, completions, and its project's mode and criterion) never
# changes after import (a changed set is refused), so each process keeps it once read: the hot
# path then reads only the rows that do change. Bounded; dropped with the engine (close_store).
_SET_CACHE: dict[Any, dict[int, dict[str, Any]]] = {}
_SET_CACHE_SIZE = 50_000


def _set_content(c: Connection, set_pk: int) -> dict[str, Any]:
    cache = _SET_CACHE.setdefault(c.engine.url, {})
    got = cache.get(set_pk)
    if got is None:
        row = c.execute(_Q_SET, {"sp": set_pk}).one()
        got = {
            "set_id": row.set_id,
            "mode": row.mode,
            "criterion": row.criterion,
            "prompt": _prompt_value(row.prompt, row.extra),
            "completions": [{"id": cid, "text": t} for cid, t in c.execute(_Q_COMPLETIONS, {"sp": set_pk})],
        }
        if len(cache) >= _SET_CACHE_SIZE:
            cache.clear()
        cache[set_pk] = got
    return got


def _assignment_out(
    c: Connection, assignment_id: int, set_pk: int, status: str, expires_at: datetime | None = None
) -> dict[str, Any]:
    content = _set_content(c, set_pk)
    return {
        "assignment_id": assignment_id,
        "status": status,
        "expires_at": _iso(expires_at) or None,
        **content,
        "completions": [dict(x) for x in content["completions"]],  # callers may change their copy
    }


def _next(
    c: Connection, labeller_id: int, reserve: bool = True, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> tuple[dict[str, Any] | None, Any]:
    """(the labeller's open or newly reserved assignment or None, their project row) in ``c``.
    ``reserve=False``: the open assignment only (None if there is none); nothing is written.
    """
    now = utcnow()
    who = c.execute(_Q_WHO, {"lid": labeller_id}).first()
    if who is None or who.revoked:
        raise Rejected(403, "this login link has been revoked")
    if who.open_id is not None:
        return _assignment_out(c, who.open_id, who.open_set, "open", who.open_expires), who
    if not reserve:
        return None, who
    k = who.per_set
    expires = now + timedelta(seconds=lease_seconds)
    for _round in range(20):  # only PostgreSQL can lose a race here (SQLite holds the write lock)
        candidates = c.execute(_Q_CANDIDATES, {"pid": who.project_id, "k": k, "lid": labeller_id}).all()
        if not candidates:
            return None, who
        for set_pk, released_id in candidates:
            # the reservation: one conditional update, so a set never has more than k assignments
            if not c.execute(_Q_RESERVE, {"sp": set_pk, "k": k}).rowcount:
                continue
            if released_id is None:
                aid = c.execute(
                    _Q_NEW_ASSIGNMENT, {"sp": set_pk, "lid": labeller_id, "now": now, "exp": expires}
                ).inserted_primary_key[0]
            elif c.execute(_Q_REOPEN, {"aid": released_id, "exp": expires}).rowcount:
                aid = released_id  # a set they were released from, back to them
            else:  # their late submission took the slot meanwhile (PostgreSQL): give it back
                c.execute(_Q_UNRESERVE, {"sp": set_pk})
                continue
            return _assignment_out(c, aid, set_pk, "open", expires), who
    raise Rejected(409, "every free set was taken while looking", "retry")


def next_assignment(
    db_url: str, labeller_id: int, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> dict[str, Any] | None:
    """The labeller's open assignment, or a new one on the least-assigned set they have not seen.

    Returns None when nothing is left for them. A set never gets more than ``per_set``
    assignments: the reservation is one conditional update (``n_assigned < per_set``). A new
    reservation holds the set for ``lease_seconds`` (``expires_at`` in the answer).
    """
    return next_with_progress(db_url, labeller_id, lease_seconds=lease_seconds)[0]


def next_with_progress(
    db_url: str, labeller_id: int, reserve: bool = True, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(next_assignment, labeller_progress)`` in one transaction (what ``POST /api/next`` answers).

    ``reserve=False`` (``GET /api/next``, ``GET /label``): the open assignment if there is one,
    else None; a read-only transaction that reserves nothing. A new reservation holds its set
    for ``lease_seconds``.
    """
    lease_seconds = check_lease(lease_seconds)
    _release_due(db_url)  # ended leases first (their own short transaction), so their slots are free
    for _attempt in range(4):
        try:
            with _tx(db_url, write=reserve) as c:
                a, who = _next(c, labeller_id, reserve, lease_seconds)
                return a, _progress(c, labeller_id, who)
        except IntegrityError:  # the same labeller asked twice at once: the other request won
            continue
        except OperationalError as e:  # PostgreSQL broke a deadlock by aborting us: start over
            if not _deadlock(e):
                raise
    raise Rejected(409, "two requests for the next set at once", "retry")


MAX_ID = 2_147_483_647  # ids are 32-bit in the store (PostgreSQL INTEGER)


def _check_id(assignment_id: Any) -> None:
    if (
        not isinstance(assignment_id, int)
        or isinstance(assignment_id, bool)
        or not 1 <= assignment_id <= MAX_ID
    ):
        raise Rejected(404, f"you have no assignment {assignment_id!r}")


def get_assignment(db_url: str, labeller_id: int, assignment_id: int) -> dict[str, Any]:
    """One of the labeller's own assignments; anyone else's is "not found" (no existence leak).

    A released one says why (``reason``); its labeller may still submit it (see :func:`submit`).
    """
    _check_id(assignment_id)
    _release_due(db_url)
    with _tx(db_url) as c:
        a = c.execute(_Q_ASSIGNMENT, {"aid": assignment_id}).first()
        if a is None or a.labeller_id != labeller_id:
            raise Rejected(404, f"you have no assignment {assignment_id}")
        out = _assignment_out(c, assignment_id, a.set_pk, a.status, a.expires_at)
        if a.status == "released":
            out["reason"] = a.skip_reason
        lab = c.execute(_Q_LABEL_OF_ASSIGNMENT, {"aid": assignment_id}).first()
        if lab is not None:
            out["label"] = {"ranks": lab.ranks, "thumbs": lab.thumbs, "submission_id": lab.submission_id}
        return out


def validate_ranks(cids: list[str], ranks: dict[str, Any]) -> bool:
    """Check a ranking covers exactly ``cids`` with ranks 1..K or "F"; return whether it has a tie.

    Raises :class:`Rejected` (422) naming the first problem.
    """
    if not isinstance(ranks, dict) or not ranks:
        raise Rejected(422, "'ranks' must map every completion id to a rank or 'F'")
    unknown = [c for c in ranks if c not in cids]
    if unknown:
        raise Rejected(
            422,
            f"unknown completion id {unknown[0]!r}",
            f"this set's completions are {', '.join(map(repr, cids))}",
        )
    missing = [c for c in cids if c not in ranks]
    if missing:
        raise Rejected(
            422,
            f"completions not ranked: {', '.join(map(repr, missing))}",
            "rank or fail ('F') every completion before submitting",
        )
    k = len(cids)
    for cid in cids:
        r = ranks[cid]
        if r == "F":
            continue
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= k:
            raise Rejected(
                422, f"rank of {cid!r} is {r!r}", f"ranks go from 1 (best) to {k}, or 'F' for fail"
            )
    ranked = [r for r in ranks.values() if r != "F"]
    return len(set(ranked)) < len(ranked)


def validate_thumbs(cids: list[str], thumbs: dict[str, Any]) -> None:
    """Check thumbs cover exactly ``cids`` with "up" or "down"; raises :class:`Rejected` (422)."""
    if not isinstance(thumbs, dict) or not thumbs:
        raise Rejected(422, "'thumbs' must map every completion id to 'up' or 'down'")
    unknown = [c for c in thumbs if c not in cids]
    if unknown:
        raise Rejected(
            422,
            f"unknown completion id {unknown[0]!r}",
            f"this set's completions are {', '.join(map(repr, cids))}",
        )
    missing = [c for c in cids if c not in thumbs]
    if missing:
        raise Rejected(
            422, f"completions not rated: {', '.join(map(repr, missing))}", "rate every completion"
        )
    for cid in cids:
        if thumbs[cid] not in ("up", "down"):
            raise Rejected(422, f"thumb of {cid!r} is {thumbs[cid]!r}", "use 'up' or 'down'")


def submit(
    db_url: str,
    labeller_id: int,
    assignment_id: int,
    submission_id: str,
    ranks: dict[str, Any] | None = None,
    thumbs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store one labeller's ranking (or thumbs) of an assignment, in one transaction.

    Returns ``{"status": "stored" | "duplicate", "label_id"}``. The same ``submission_id``
    again returns "duplicate" and changes nothing. An assignment released meanwhile (lease
    expired, released by hand) is stored if its set still needs a label (the slot is taken
    again). Refusals (:class:`Rejected`, nothing stored): 404 not your assignment, 409 already
    submitted / skipped / id reused / released and the set has all its labels, 422 unknown
    completion id, missing completion, rank out of range, wrong mode.
    """
    _check_id(assignment_id)
    if not isinstance(submission_id, str) or not 8 <= len(submission_id) <= 100:
        raise Rejected(
            422, "'submission_id' must be a string of 8 to 100 characters", "make one per submission"
        )
    check_text("submission_id", submission_id)
    for attempt in range(4):
        try:
            with _tx(db_url, write=True) as c:
                a = c.execute(_Q_ASSIGNMENT, {"aid": assignment_id}).first()
                if a is None or a.labeller_id != labeller_id:
                    raise Rejected(404, f"you have no assignment {assignment_id}")
                # an open assignment has no label, so a new submission id needs no look-up: if the
                # id was used before, the insert below breaks its unique index and we come back
                old = (
                    c.execute(_Q_LABEL_BY_SUBMISSION, {"sid": submission_id}).first()
                    if a.status != "open" or attempt
                    else None
                )
                if old is not None:
                    if old.assignment_id != assignment_id:
                        raise Rejected(
                            409, f"submission id {submission_id!r} was already used for another set"
                        )
                    return {"status": "duplicate", "label_id": old.id}
                if a.status == "done":
                    raise Rejected(
                        409, f"assignment {assignment_id} was already submitted", "each set is labelled once"
                    )
                if a.status == "skipped":
                    raise Rejected(409, f"assignment {assignment_id} was skipped", "ask for the next set")
                content = _set_content(c, a.set_pk)
                cids = [x["id"] for x in content["completions"]]
                has_tie = False
                if content["mode"] == "rank":
                    if thumbs:
                        raise Rejected(422, "this project ranks completions: send 'ranks', not 'thumbs'")
                    has_tie = validate_ranks(cids, ranks or {})
                    ranks, thumbs = {cid: ranks[cid] for cid in cids}, {}  # type: ignore[index]
                else:
                    if ranks:
                        raise Rejected(422, "this project uses thumbs: send 'thumbs', not 'ranks'")
                    validate_thumbs(cids, thumbs or {})
                    ranks, thumbs = {}, {cid: thumbs[cid] for cid in cids}  # type: ignore[index]
                now = utcnow()
                if (
                    a.status == "released"
                    and not c.execute(_Q_RESERVE, {"sp": a.set_pk, "k": a.per_set}).rowcount
                ):
                    raise _too_late(content["set_id"], a.skip_reason)
                label_id = c.execute(
                    _Q_NEW_LABEL,
                    {
                        "sid": submission_id,
                        "aid": assignment_id,
                        "sp": a.set_pk,
                        "lid": labeller_id,
                        "ranks": ranks,
                        "thumbs": thumbs,
                        "tie": has_tie,
                        "now": now,
                    },
                ).inserted_primary_key[0]
                if not c.execute(_Q_CLOSE, {"aid": assignment_id, "now": now, "was": a.status}).rowcount:
                    # released between our read and this write (PostgreSQL; SQLite holds the lock)
                    if not c.execute(_Q_RESERVE, {"sp": a.set_pk, "k": a.per_set}).rowcount:
                        raise _too_late(content["set_id"], "released")
                    c.execute(_Q_CLOSE, {"aid": assignment_id, "now": now, "was": "released"})
                c.execute(_Q_COUNT_DONE, {"sp": a.set_pk})
                return {"status": "stored", "label_id": label_id}
        except IntegrityError:  # the id was used before, or a concurrent retry won the race: re-read
            continue
        except OperationalError as e:  # PostgreSQL broke a deadlock by aborting us: start over
            if not _deadlock(e):
                raise
    raise Rejected(409, f"submission {submission_id!r} conflicts with a concurrent one", "retry")


def _too_late(set_id: str, why: str | None) -> Rejected:
    return Rejected(
        409,
        f"your hold on set {set_id!r} was released ({why or 'released'}) and the set has all the labels "
        "it needs: this ranking was not stored",
        "thank you; ask for the next set",
    )


def skip(db_url: str, labeller_id: int, assignment_id: int, reason: str) -> dict[str, Any]:
    """Skip an open assignment with a reason; the set goes back to the pool for other labellers."""
    check_text("reason", reason)
    reason = (reason or "").strip()
    if not reason:
        raise Rejected(422, "a skip needs a reason", "say why, e.g. 'I cannot judge this topic'")
    if len(reason) > 2000:
        raise Rejected(422, "the skip reason is longer than 2000 characters")
    _check_id(assignment_id)
    for _attempt in range(3):
        try:
            return _skip(db_url, labeller_id, assignment_id, reason)
        except OperationalError as e:  # PostgreSQL broke a deadlock by aborting us: start over
            if not _deadlock(e):
                raise
    return _skip(db_url, labeller_id, assignment_id, reason)


def _skip(db_url: str, labeller_id: int, assignment_id: int, reason: str) -> dict[str, Any]:
    with _tx(db_url, write=True) as c:
        a = c.execute(_Q_ASSIGNMENT, {"aid": assignment_id}).first()
        if a is None or a.labeller_id != labeller_id:
            raise Rejected(404, f"you have no assignment {assignment_id}")
        if a.status == "skipped":
            return {"status": "duplicate"}
        if a.status == "done":
            raise Rejected(409, f"assignment {assignment_id} was already submitted")
        for was in (a.status, "released"):  # open -> skipped frees the slot; released holds none
            n = c.execute(
                update(_A)
                .where(_A.c.id == assignment_id, _A.c.status == was)
                .values(status="skipped", skip_reason=reason, closed_at=utcnow())
            ).rowcount
            if n:
                if was == "open":
                    c.execute(_Q_UNRESERVE, {"sp": a.set_pk})
                return {"status": "skipped"}
        raise Rejected(409, f"assignment {assignment_id} was already submitted")


# ---------------------------------------------------------------------------------------------
# Progress and export


def _progress(c: Connection, labeller_id: int, who: Any) -> dict[str, Any]:
    n = c.execute(_Q_PROGRESS, {"lid": labeller_id, "pid": who.project_id, "k": who.per_set}).one()
    done, opened, remaining = n.done, n.open, n.with_room - n.seen_with_room
    tie_rate = n.ties / done if done and who.mode == "rank" else 0.0
    return {
        "done": done,
        "skipped": n.skipped,
        "open": opened,
        "remaining": remaining,
        "total": done + opened + remaining,
        "tie_rate": round(tie_rate, 4),
        "tie_warning": tie_rate > TIE_WARNING_RATE,
    }


def labeller_progress(db_url: str, labeller_id: int) -> dict[str, Any]:
    """``{"done", "skipped", "open", "remaining", "total", "tie_rate", "tie_warning"}`` for one labeller.

    ``total`` = done + open + sets they could still be given; ``tie_rate`` = share of their
    ranked sets with a tie; ``tie_warning`` when it passes 20%.
    """
    _release_due(db_url)
    with _tx(db_url) as c:
        who = c.execute(_Q_WHO, {"lid": labeller_id}).first()
        if who is None:
            raise Rejected(404, "no such labeller")
        return _progress(c, labeller_id, who)


def project_progress(db_url: str, project: str | None = None) -> dict[str, Any]:
    """Progress of a project: per set (labels / k), per labeller (done, skipped, open, ties), and
    every skip with its reason (``skips``: set_id, labeller, reason, at).

    ``complete`` is True when every set has its ``per_set`` labels. Leases that have ended are
    released first, so ``held`` lists only live holds: ``[{"set_id", "labeller", "since",
    "expires_at"}]``; ``released`` counts the slots given back, by reason ("lease expired",
    "labeller revoked", "released by hand").
    """
    _release_due(db_url)
    with _reading(db_url) as s:
        p = _find_project(s, project)
        held = s.execute(
            select(CompletionSetRow.set_id, Labeller.name, Assignment.created_at, Assignment.expires_at)
            .join(CompletionSetRow, CompletionSetRow.id == Assignment.set_pk)
            .join(Labeller, Labeller.id == Assignment.labeller_id)
            .where(CompletionSetRow.project_id == p.id, Assignment.status == "open")
            .order_by(Assignment.id)
        ).all()
        released = s.execute(
            select(Assignment.skip_reason, func.count())
            .join(CompletionSetRow, CompletionSetRow.id == Assignment.set_pk)
            .where(CompletionSetRow.project_id == p.id, Assignment.status == "released")
            .group_by(Assignment.skip_reason)
            .order_by(Assignment.skip_reason)
        ).all()
        sets = s.execute(
            select(CompletionSetRow.set_id, CompletionSetRow.n_done, CompletionSetRow.n_assigned)
            .where(CompletionSetRow.project_id == p.id)
            .order_by(CompletionSetRow.id)
        ).all()
        people = s.scalars(select(Labeller).where(Labeller.project_id == p.id).order_by(Labeller.id)).all()
        status = s.execute(
            select(Assignment.labeller_id, Assignment.status, func.count())
            .join(Labeller, Labeller.id == Assignment.labeller_id)
            .where(Labeller.project_id == p.id)
            .group_by(Assignment.labeller_id, Assignment.status)
        ).all()
        skips = s.execute(
            select(CompletionSetRow.set_id, Labeller.name, Assignment.skip_reason, Assignment.closed_at)
            .join(CompletionSetRow, CompletionSetRow.id == Assignment.set_pk)
            .join(Labeller, Labeller.id == Assignment.labeller_id)
            .where(CompletionSetRow.project_id == p.id, Assignment.status == "skipped")
            .order_by(Assignment.id)
        ).all()
        ties = dict(
            s.execute(
                select(Label.labeller_id, func.count())
                .join(Labeller, Labeller.id == Label.labeller_id)
                .where(Labeller.project_id == p.id, Label.has_tie)
                .group_by(Label.labeller_id)
            ).all()
        )
    per: dict[int, dict[str, int]] = {}
    for lid, st, n in status:
        per.setdefault(lid, {})[st] = n
    labellers = []
    for who in people:
        c = per.get(who.id, {})
        done = c.get("done", 0)
        labellers.append(
            {
                "name": who.name,
                "revoked": who.revoked,
                "acknowledged": who.acknowledged_at is not None,
                "done": done,
                "skipped": c.get("skipped", 0),
                "open": c.get("open", 0),
                "released": c.get("released", 0),
                "tie_rate": round(ties.get(who.id, 0) / done, 4) if done else 0.0,
            }
        )
    labels = sum(n for _, n, _ in sets)
    return {
        "project": p.name,
        "mode": p.mode,
        "per_set": p.per_set,
        "sets": len(sets),
        "labels": labels,
        "labels_needed": len(sets) * p.per_set,
        "sets_complete": sum(1 for _, n, _ in sets if n >= p.per_set),
        "complete": bool(sets) and all(n >= p.per_set for _, n, _ in sets),
        "per_set_progress": [{"set_id": sid, "labels": n, "assigned": a} for sid, n, a in sets],
        "labellers": labellers,
        "skips": [
            {"set_id": sid, "labeller": name, "reason": reason or "", "at": _iso(at)}
            for sid, name, reason, at in skips
        ],
        "held": [
            {"set_id": sid, "labeller": who, "since": _iso(since), "expires_at": _iso(exp) or None}
            for sid, who, since, exp in held
        ],
        "released": {why or "released": n for why, n in released},
    }


def load_labels(
    db_url: str, project: str | None = None
) -> tuple[list[CompletionSet], list[Ranking], list[dict[str, Any]]]:
    """Everything collected: ``(sets, rankings, labellers)``.

    ``sets`` are the imported completion sets, ``rankings`` one per submitted label
    (``labeller`` = the labeller's name; ``ranks`` or ``thumbs``), ``labellers`` are
    ``{"id", "name", "revoked", "project"}``. ``project=None`` means every project.
    """
    with _reading(db_url) as s:
        q_projects = select(Project)
        if project is not None:
            q_projects = q_projects.where(Project.id == _find_project(s, project).id)
        projects = {p.id: p for p in s.scalars(q_projects)}
        rows = s.scalars(
            select(CompletionSetRow)
            .where(CompletionSetRow.project_id.in_(projects))
            .order_by(CompletionSetRow.id)
        ).all()
        by_pk = {r.id: r for r in rows}
        comps: dict[int, list[dict[str, str]]] = {}
        for c in s.scalars(
            select(CompletionRow)
            .join(CompletionSetRow, CompletionSetRow.id == CompletionRow.set_pk)
            .where(CompletionSetRow.project_id.in_(projects))
            .order_by(CompletionRow.set_pk, CompletionRow.position)
        ):
            comps.setdefault(c.set_pk, []).append({"id": c.cid, "text": c.text})
        people = s.scalars(
            select(Labeller).where(Labeller.project_id.in_(projects)).order_by(Labeller.id)
        ).all()
        names = {w.id: w.name for w in people}
        labels = s.scalars(
            select(Label)
            .join(CompletionSetRow, CompletionSetRow.id == Label.set_pk)
            .where(CompletionSetRow.project_id.in_(projects))
            .order_by(Label.id)
        ).all()
    sets = [
        CompletionSet.model_validate(
            {
                **{k: v for k, v in r.extra.items() if k != MESSAGES_MARK},
                "prompt_id": r.set_id,
                "prompt": _prompt_value(r.prompt, r.extra),
                "model": r.model,
                "completions": comps.get(r.id, []),
            }
        )
        for r in rows
    ]
    rankings = []
    for lab in labels:
        rec: dict[str, Any] = {
            "set_id": by_pk[lab.set_pk].set_id,
            "labeller": names[lab.labeller_id],
            "created_at": _iso(lab.created_at),
        }
        rec["ranks" if lab.ranks else "thumbs"] = lab.ranks or lab.thumbs
        rankings.append(Ranking.model_validate(rec))
    labellers = [
        {"id": w.id, "name": w.name, "revoked": w.revoked, "project": projects[w.project_id].name}
        for w in people
    ]
    return sets, rankings, labellers


def submission_ledger(db_url: str) -> dict[str, Any]:
    """What the store holds, for audits (the load and kill tests, ``benchmarks/labelling.py``).

    ``{"labels": [{"submission_id", "label_id", "labeller", "set_id"}], "sets": [{"set_id",
    "n_assigned", "n_done", "labels", "open", "per_set"}]}``: ``labels`` is the number of label
    rows of the set and ``open`` its open assignments, so a consistent store has
    ``n_done == labels``, ``n_assigned == labels + open`` and ``labels <= per_set``.
    """
    with _tx(db_url) as c:
        labels = c.execute(
            select(_LB.c.submission_id, _LB.c.id, _L.c.name, _S.c.set_id)
            .join(_L, _L.c.id == _LB.c.labeller_id)
            .join(_S, _S.c.id == _LB.c.set_pk)
            .order_by(_LB.c.id)
        ).all()
        n_labels = dict(c.execute(select(_LB.c.set_pk, func.count()).group_by(_LB.c.set_pk)).all())
        n_open = dict(
            c.execute(
                select(_A.c.set_pk, func.count()).where(_A.c.status == "open").group_by(_A.c.set_pk)
            ).all()
        )
        sets = c.execute(
            select(_S.c.id, _S.c.set_id, _S.c.n_assigned, _S.c.n_done, _P.c.per_set)
            .join(_P, _P.c.id == _S.c.project_id)
            .order_by(_S.c.id)
        ).all()
    return {
        "labels": [
            {"submission_id": sid, "label_id": lid, "labeller": name, "set_id": set_id}
            for sid, lid, name, set_id in labels
        ],
        "sets": [
            {
                "set_id": r.set_id,
                "n_assigned": r.n_assigned,
                "n_done": r.n_done,
                "labels": n_labels.get(r.id, 0),
                "open": n_open.get(r.id, 0),
                "per_set": r.per_set,
            }
            for r in sets
        ],
    }

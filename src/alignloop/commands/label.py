"""``alignloop label serve | import | invite | revoke | release | admin | progress | simulate``: the labelling app."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from alignloop.commands import command, group


def register(sub: Any) -> None:
    g = group(sub, "label", help="the labelling web app: humans rank completions in a browser")

    s = command(
        g,
        "serve",
        help="serve the labelling app (pages for labellers and admins, JSON API under /api)",
        example=(
            "alignloop label serve --db sqlite:///labels.db --port 8000\n"
            "alignloop label serve --db sqlite:///labels.db --max-body-mb 20   # larger API set imports"
        ),
        func=_serve,
    )
    _db(s)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; see docs/labelling.md for a TLS proxy)",
    )
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (default: 1; one per CPU core for many labellers)",
    )
    s.add_argument(
        "--max-body-mb",
        type=float,
        default=1.0,
        help="refuse request bodies larger than this (413, before reading them; default: 1)",
    )
    s.add_argument(
        "--trust-proxy",
        metavar="ADDRESSES",
        default="",
        help="comma-separated addresses of a TLS reverse proxy whose X-Forwarded-Proto/-Host to believe "
        "(e.g. 127.0.0.1; '*' = any, only if nothing else can reach the app)",
    )
    s.add_argument(
        "--session-hours",
        type=float,
        default=12.0,
        help="a browser session ends after this many hours unused (default: 12)",
    )
    s.add_argument(
        "--name",
        help="this deployment's name, part of the session cookie's name (default: from --db); "
        "give apps on the same host different names",
    )
    s.add_argument(
        "--lease-seconds",
        type=float,
        default=1800.0,
        metavar="S",
        help="how long a set stays held for the labeller it was given to before it goes back to the "
        "pool (default: 1800 = 30 minutes; a late submission is still stored if the set needs it)",
    )

    i = command(
        g,
        "import",
        help="load completion sets into a labelling project (created if it does not exist)",
        example=(
            "alignloop label import --db sqlite:///labels.db --completions sets.jsonl --per-set 3\n"
            "alignloop label import --db sqlite:///tone.db --completions sets.jsonl --project tone "
            "--criterion harmlessness --instructions tone.md --mode thumbs\n"
            "alignloop label import --db sqlite:///labels.db --completions sets.jsonl --budget 5 "
            "--select uncertainty --reward runs/demo/reward   # the 5 sets the reward model is least sure of"
        ),
        func=_import,
    )
    _db(i)
    i.add_argument("--completions", required=True, metavar="FILE", help="completion sets (JSONL)")
    i.add_argument("--project", default="default", help="project name (default: default)")
    i.add_argument("--per-set", type=int, default=3, help="labellers each set needs, k (default: 3)")
    i.add_argument("--mode", default="rank", choices=("rank", "thumbs"), help="rank (default) or thumbs")
    i.add_argument("--criterion", default="helpfulness", help="what labellers judge (default: helpfulness)")
    i.add_argument(
        "--instructions",
        metavar="FILE",
        help="Markdown instructions (default: the course notes' ranking ones)",
    )
    i.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help="send only N of the file's sets to labellers (default: all of them)",
    )
    i.add_argument(
        "--select",
        default="random",
        choices=("random", "uncertainty"),
        help="which N sets: random (default, a seeded draw) or uncertainty (those where --reward is least "
        "sure: the smallest gap between its two best completions, plus a --random-share of random sets)",
    )
    i.add_argument("--reward", metavar="SPEC", help="the current reward model, for --select uncertainty")
    i.add_argument(
        "--random-share",
        type=float,
        default=0.2,
        metavar="F",
        help="share of the budget drawn at random under --select uncertainty, for calibration (default: 0.2)",
    )
    i.add_argument("--seed", type=int, default=0, help="seed of the random draws (default: 0)")

    v = command(
        g,
        "invite",
        help="create a labeller and print their login link (the token is stored hashed)",
        example="alignloop label invite --db sqlite:///labels.db bob --url http://labels.example.org:8000",
        func=_invite,
    )
    _db(v)
    v.add_argument("name", metavar="NAME", help="the labeller's name")
    v.add_argument("--project", help="project (default: the only one)")
    v.add_argument("--url", default="http://127.0.0.1:8000", help="the app's address, for the link")
    v.add_argument("--new-link", action="store_true", help="replace an existing labeller's link")

    r = command(
        g,
        "revoke",
        help="revoke a labeller's login link (their labels stay)",
        example="alignloop label revoke --db sqlite:///labels.db ada",
        func=_revoke,
    )
    _db(r)
    r.add_argument("name", metavar="NAME")
    r.add_argument("--admin", action="store_true", help="revoke an admin login instead")

    rl = command(
        g,
        "release",
        help="free held sets by hand: one set's open assignments, or all of one labeller's",
        example=(
            "alignloop label release --db sqlite:///labels.db --set p17\n"
            "alignloop label release --db sqlite:///labels.db --labeller ada"
        ),
        func=_release,
    )
    _db(rl)
    which = rl.add_mutually_exclusive_group(required=True)
    which.add_argument("--set", dest="set_id", metavar="ID", help="the set (its prompt id)")
    which.add_argument("--labeller", metavar="NAME", help="every set this labeller holds")
    rl.add_argument("--project", help="the set's project (default: the only one)")

    a = command(
        g,
        "admin",
        help="print a login link for the admin pages (replaces that admin's previous link)",
        example="alignloop label admin --db sqlite:///labels.db --url http://127.0.0.1:8000",
        func=_admin,
    )
    _db(a)
    a.add_argument("--name", default="admin", help="admin name (default: admin)")
    a.add_argument("--url", default="http://127.0.0.1:8000", help="the app's address, for the link")

    p = command(
        g,
        "progress",
        help="labels collected per set and per labeller (JSON)",
        example="alignloop label progress --db sqlite:///labels.db",
        func=_progress,
    )
    _db(p)
    p.add_argument("--project", help="project (default: the only one)")

    m = command(
        g,
        "simulate",
        help="label a project with the embedded world's simulated labellers (over HTTP with --url)",
        example=(
            "alignloop label simulate --db sqlite:///labels.db\n"
            "alignloop label simulate --url http://127.0.0.1:8000 --admin-token $TOKEN --profile careful"
        ),
        func=_simulate,
    )
    where = m.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", metavar="URL", help="label through the store directly")
    where.add_argument("--url", metavar="URL", help="label through a running app's JSON API")
    m.add_argument(
        "--admin-token",
        default=os.environ.get("ALIGNLOOP_ADMIN_TOKEN"),
        help="admin token for --url, to invite the simulated labellers (default: $ALIGNLOOP_ADMIN_TOKEN)",
    )
    m.add_argument(
        "--profile",
        action="append",
        default=[],
        help="simulated labeller name or kind (repeatable; terse: an opt-in labeller who prefers shorter answers)",
    )
    m.add_argument("--project", help="project (default: the only one)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-sets", type=int, help="stop each labeller after this many sets")


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db", required=True, metavar="URL", help="sqlite:///labels.db or postgresql://user@host/db"
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from alignloop.errors import UserError
    from alignloop.feedback import store
    from alignloop.feedback.app import create_app
    from alignloop.runs import say

    if not 1 <= args.workers <= 64:
        raise UserError(f"--workers must be 1 to 64, got {args.workers}", "--workers")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1 to 65535, got {args.port}", "--port")
    if not args.max_body_mb > 0:
        raise UserError(f"--max-body-mb must be more than 0, got {args.max_body_mb}", "--max-body-mb")
    max_body = max(1, int(args.max_body_mb * (1 << 20)))
    store.check_lease(args.lease_seconds)
    _check_address(args.host, args.port)
    settings = {
        "max_body_bytes": max_body,
        "trust_proxy": [a.strip() for a in args.trust_proxy.split(",") if a.strip()],
        "session_hours": args.session_hours,
        "name": args.name,
        "lease_seconds": args.lease_seconds,
    }
    # opens (and migrates) the database once, before any worker starts
    app = create_app(args.db, **settings)
    if not store.has_admin(args.db):
        link = store.create_admin(args.db, base_url=f"http://{args.host}:{args.port}")["link"]
        say(f"admin login (shown once; 'alignloop label admin' makes a new one): {link}")
    say(f"labelling app on http://{args.host}:{args.port}  (API docs: /docs)")
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    else:  # each worker process builds its own app from the URL in the environment
        os.environ["ALIGNLOOP_LABEL_DB"] = args.db
        os.environ["ALIGNLOOP_LABEL_SETTINGS"] = json.dumps(settings)
        uvicorn.run(
            "alignloop.feedback.app:app_from_environment",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="warning",
        )
    return 0


def _check_address(host: str, port: int) -> None:
    """A clear error now for a port in use or an address not on this machine (uvicorn would log
    the OSError and exit 1 after the start-up messages)."""
    import socket

    from alignloop.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(
            f"unknown host {host!r}: {e.strerror}", "--host", "use 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(addr)
        except OSError as e:
            fix = (
                "stop the other server or choose another --port"
                if e.errno == 98
                else "use 127.0.0.1 or 0.0.0.0"
            )
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}", "--host/--port", fix) from None


def _import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alignloop.errors import UserError
    from alignloop.feedback import store
    from alignloop.records import CompletionSet, read
    from alignloop.runs import is_quiet, say

    sets = read(args.completions, CompletionSet)
    try:  # the text rule before anything is written: a bad line creates no project either
        store.check_sets(sets)
    except store.Rejected as e:
        raise UserError(e.what, args.completions, e.fix) from None
    instructions = None
    if args.instructions:
        path = Path(args.instructions)
        if not path.is_file():
            raise UserError(f"file not found: {path}", "--instructions")
        instructions = path.read_text(encoding="utf-8")
    from alignloop.preference import selection

    pool = len(sets)  # choose() checks the selection before anything is scored or written
    sets, picked = selection.choose(
        sets, args.completions, args.budget, args.select, args.reward, args.random_share, args.seed
    )
    store.create_project(
        args.db,
        args.project,
        criterion=args.criterion,
        instructions=instructions,
        mode=args.mode,
        per_set=args.per_set,
        exist_ok=True,
    )
    out = store.import_sets(args.db, sets, project=args.project)
    if picked:
        out["selection"] = selection.summary(picked, pool)
        say(
            f"selected {len(picked)} of {pool} sets ({args.select}: {out['selection']['uncertain']} least sure, "
            f"{out['selection']['random']} random)"
        )
    say(
        f"project {args.project!r}: {out['added']} sets added, {out['unchanged']} already there, "
        f"{out['collapsed']} duplicate completions collapsed (same text twice in a set)"
    )
    if not is_quiet():
        print(json.dumps(out))
    return 0


def _invite(args: argparse.Namespace) -> int:
    from alignloop.feedback import store

    made = store.invite(args.db, args.name, args.project, base_url=args.url, new_link=args.new_link)
    print(made["link"])
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from alignloop.errors import UserError
    from alignloop.feedback import store

    try:
        freed = store.revoke(args.db, args.name, admin=args.admin)["released"]
    except store.Rejected as e:
        raise UserError(e.what, "NAME") from None
    print(f"revoked {args.name}" + (f"; {freed} held set(s) released" if freed else ""), file=sys.stderr)
    return 0


def _release(args: argparse.Namespace) -> int:
    from alignloop.feedback import store

    out = store.release(args.db, set_id=args.set_id, labeller=args.labeller, project=args.project)
    who = f"set {args.set_id!r}" if args.set_id is not None else f"labeller {args.labeller!r}"
    print(f"released {out['released']} open assignment(s) of {who}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def _admin(args: argparse.Namespace) -> int:
    from alignloop.feedback import store

    print(store.create_admin(args.db, args.name, base_url=args.url)["link"])
    return 0


def _progress(args: argparse.Namespace) -> int:
    from alignloop.feedback import store

    print(json.dumps(store.project_progress(args.db, args.project), indent=2))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from alignloop.feedback.simulate import simulate, world_panel

    counts = simulate(
        world_panel(args.profile or None, seed=args.seed),
        db_url=args.db,
        url=args.url,
        admin_token=args.admin_token,
        project=args.project,
        max_sets=args.max_sets,
    )
    print(json.dumps(counts))
    return 0

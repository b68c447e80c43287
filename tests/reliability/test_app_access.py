"""Access control of the labelling app: every route x {no token, wrong token, revoked labeller,
labeller, other labeller, admin}.

"labeller" owns the assignment a route names; "other labeller" is a second labeller of the same
project who does not. Only the allowed cells pass; every refused request leaves the store
exactly as it was (every row of every table compared). A route added to the app without a row
here fails :func:`test_the_matrix_covers_every_route`. Tokens stored hashed and revocation are
checked at the end.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from alignloop.feedback import store as st
from alignloop.feedback.app import create_app
from alignloop.records import CompletionSet

WHO = ("none", "wrong", "revoked", "labeller", "other", "admin")
LABELLER_ONLY = {"labeller": 200, "other": 200, "admin": 403}
OWNER_ONLY = {"labeller": 200, "other": 404, "admin": 403}
ADMIN_ONLY = {"labeller": 403, "other": 403, "admin": 200}
ANY_LOGIN = {"labeller": 200, "other": 200, "admin": 200}

RANKS = {"c0": 1, "c1": 2, "c2": "F"}
NEW_SET = [
    {"prompt_id": "new", "prompt": "?", "completions": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]}
]

# (method, path, json body, form body, allowed statuses for labeller / other / admin)
MATRIX = [
    ("GET", "/api/me", None, None, ANY_LOGIN),
    ("POST", "/api/me/acknowledge", None, None, LABELLER_ONLY),
    ("GET", "/api/next", None, None, LABELLER_ONLY),
    ("POST", "/api/next", None, None, LABELLER_ONLY),
    ("GET", "/api/progress", None, None, LABELLER_ONLY),
    ("GET", "/api/assignments/{aid}", None, None, OWNER_ONLY),
    (
        "POST",
        "/api/assignments/{aid}/submit",
        {"submission_id": "{who}-submission", "ranks": RANKS},
        None,
        OWNER_ONLY,
    ),
    ("POST", "/api/assignments/{aid}/skip", {"reason": "cannot judge"}, None, OWNER_ONLY),
    ("GET", "/api/admin/projects", None, None, ADMIN_ONLY),
    ("POST", "/api/admin/projects", {"name": "second"}, None, ADMIN_ONLY),
    ("POST", "/api/admin/projects/default/sets", NEW_SET, None, ADMIN_ONLY),
    ("GET", "/api/admin/progress", None, None, ADMIN_ONLY),
    ("POST", "/api/admin/labellers", {"name": "dan"}, None, ADMIN_ONLY),
    ("POST", "/api/admin/labellers/carol/revoke", None, None, ADMIN_ONLY),
    ("POST", "/api/admin/release", {"labeller": "bob"}, None, ADMIN_ONLY),
    ("GET", "/api/admin/report", None, None, ADMIN_ONLY),
    ("GET", "/api/admin/export", None, None, ADMIN_ONLY),
    ("GET", "/", None, None, {"labeller": 303, "other": 303, "admin": 303}),
    ("GET", "/instructions", None, None, LABELLER_ONLY),
    ("POST", "/instructions", None, {}, {"labeller": 303, "other": 303, "admin": 403}),
    ("GET", "/label", None, None, LABELLER_ONLY),
    ("GET", "/label/{aid}", None, None, OWNER_ONLY),
    ("POST", "/label/next", None, {}, {"labeller": 303, "other": 303, "admin": 403}),
    (
        "POST",
        "/label/{aid}/skip",
        None,
        {"reason": "cannot judge"},
        {"labeller": 303, "other": 404, "admin": 403},
    ),
    ("GET", "/admin", None, None, ADMIN_ONLY),
    ("POST", "/admin/invite", None, {"name": "erin"}, ADMIN_ONLY),
    ("POST", "/admin/revoke", None, {"name": "carol"}, ADMIN_ONLY),
    ("POST", "/admin/release", None, {"set_id": "p0"}, ADMIN_ONLY),
    ("POST", "/logout", None, {}, ANY_LOGIN),
]
PUBLIC = {"/healthz", "/login", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/static"}


def world(db: str) -> dict:
    st.create_project(db, per_set=3)
    st.import_sets(
        db,
        [
            CompletionSet(
                prompt_id=f"p{i}",
                prompt=f"q{i}?",
                completions=[{"id": f"c{j}", "text": f"a{j}"} for j in range(3)],
            )
            for i in range(3)
        ],
    )
    tokens = {name: st.invite(db, name)["token"] for name in ("ada", "bob", "carol", "rev")}
    for name in ("ada", "bob"):
        st.acknowledge(db, st.authenticate(db, tokens[name]).id)
    st.revoke(db, "rev")
    tokens["admin"] = st.create_admin(db)["token"]
    aid = st.next_assignment(db, st.authenticate(db, tokens["ada"]).id)["assignment_id"]
    st.next_assignment(db, st.authenticate(db, tokens["bob"]).id)  # bob has an open set of his own
    return {
        "aid": aid,
        "token": {
            "none": None,
            "wrong": "x" * 43,
            "revoked": tokens["rev"],
            "labeller": tokens["ada"],
            "other": tokens["bob"],
            "admin": tokens["admin"],
        },
    }


@pytest.mark.parametrize("case", MATRIX, ids=[f"{m} {p}" for m, p, *_ in MATRIX])
def test_access_matrix(app_db, case, dump):
    method, path, body, form, allowed = case
    w = world(app_db)
    path = path.format(aid=w["aid"])
    expect = {"none": 401, "wrong": 401, "revoked": 401, **allowed}
    order = sorted(WHO, key=lambda who: expect[who] < 400)  # refusals first, then the allowed
    with TestClient(create_app(app_db), base_url="http://testserver", follow_redirects=False) as client:
        for who in order:
            token = w["token"][who]
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            kw: dict = {}
            if body is not None:
                kw["json"] = (
                    {k: v.format(who=who) if isinstance(v, str) else v for k, v in body.items()}
                    if isinstance(body, dict)
                    else body
                )
            if form is not None:
                kw["data"] = form
            before = dump(app_db)
            r = client.request(method, path, headers=headers, **kw)
            assert r.status_code == expect[who], (who, method, path, r.status_code, r.text[:200])
            if expect[who] >= 400:
                assert dump(app_db) == before, (who, method, path)
                if path.startswith("/api"):
                    assert isinstance(r.json()["detail"], str)


def test_the_matrix_covers_every_route(app_db):
    app = create_app(app_db)
    covered = {
        (m, p.replace("{aid}", "{assignment_id}").replace("default", "{project}").replace("carol", "{name}"))
        for m, p, *_ in MATRIX
    }
    routes = set()
    for r in app.routes:
        if any(r.path == p or r.path.startswith(p + "/") for p in PUBLIC):
            continue
        for m in getattr(r, "methods", None) or ():
            if m != "HEAD":
                routes.add((m, r.path))
    assert routes == covered, (routes - covered, covered - routes)


def test_public_routes_reveal_nothing(app_db, dump):
    store_rows = dump
    w = world(app_db)
    with TestClient(create_app(app_db), follow_redirects=False) as client:
        assert client.get("/healthz").text == "ok"
        schema = client.get("/openapi.json").text
        assert w["token"]["labeller"] not in schema and "q0?" not in schema
        assert client.get("/login?token=" + "x" * 43).status_code == 401
        assert client.get("/login?token=" + w["token"]["revoked"]).status_code == 401
        # the link's GET only asks: no session cookie, nothing stored, not cached
        before = store_rows(app_db)
        ok = client.get("/login?token=" + w["token"]["labeller"])
        assert ok.status_code == 200 and "Log in as ada" in ok.text
        assert ok.headers["cache-control"] == "no-store"
        assert [c for c in ok.headers.get_list("set-cookie") if not c.split("=")[0].endswith("-login")] == []
        assert store_rows(app_db) == before


def test_tokens_are_stored_hashed_and_a_revoked_link_stops_at_once(app_db, dump):
    w = world(app_db)
    dump = repr(dump(app_db))
    for who in ("labeller", "other", "admin", "revoked"):
        assert w["token"][who] not in dump  # only sha256 digests are stored
        assert st.hash_token(w["token"][who]) in dump
    with TestClient(create_app(app_db)) as client:
        ada = {"Authorization": f"Bearer {w['token']['labeller']}"}
        assert client.get("/api/me", headers=ada).status_code == 200
        st.revoke(app_db, "ada")  # the CLI's 'label revoke' does exactly this
        assert client.get("/api/me", headers=ada).status_code == 401
        assert client.get(f"/api/assignments/{w['aid']}", headers=ada).status_code == 401
        new = st.invite(app_db, "ada", new_link=True)["token"]
        assert client.get("/api/me", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        assert client.get("/api/me", headers=ada).status_code == 401  # the old link stays dead

"""The web app over HTTP (FastAPI's TestClient on the real app and database): cross-labeller
isolation (the full access matrix is tests/reliability/test_app_access.py), CSRF, bad payloads,
idempotent submissions, escaping, export, OpenAPI."""

from __future__ import annotations

import json

import pytest

from alignloop.feedback import store as st


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def state(db: str) -> tuple:
    """Everything a request could change: labels, assignment counts, labellers, acknowledgements."""
    sets, rankings, labellers = st.load_labels(db)
    prog = st.project_progress(db)
    return [r.model_dump() for r in rankings], prog, labellers, [s.model_dump() for s in sets]


def test_a_labeller_cannot_read_or_write_another_labellers_assignment(client, people, app_login):
    a = client.post("/api/next", headers=bearer(people["ada"])).json()["assignment"]
    aid = a["assignment_id"]
    ranks = {c["id"]: i + 1 for i, c in enumerate(a["completions"])}
    before = state(people["db"])
    bob = bearer(people["bob"])
    assert client.get(f"/api/assignments/{aid}", headers=bob).status_code == 404
    r = client.post(
        f"/api/assignments/{aid}/submit", headers=bob, json={"submission_id": "bob-sub-1", "ranks": ranks}
    )
    assert r.status_code == 404 and "no assignment" in r.json()["detail"]
    assert (
        client.post(f"/api/assignments/{aid}/skip", headers=bob, json={"reason": "mine now"}).status_code
        == 404
    )
    # the pages too: bob's browser (cookie) cannot open or skip ada's set
    bob_csrf = app_login(client, people["bob"])
    before = state(people["db"])
    page = client.get(f"/label/{aid}")
    assert page.status_code == 404 and a["prompt"] not in page.text
    skip = client.post(f"/label/{aid}/skip", data={"reason": "x", "csrf_token": bob_csrf})
    assert skip.status_code == 404
    client.cookies.clear()
    assert state(people["db"]) == before
    # ada herself can
    assert (
        client.get(f"/api/assignments/{aid}", headers=bearer(people["ada"])).json()["set_id"] == a["set_id"]
    )
    # once ada has labelled the set, bob can be given it too (k=2) but never sees her label
    ada_sub = {"submission_id": "ada-sub-1", "ranks": ranks}
    assert (
        client.post(f"/api/assignments/{aid}/submit", headers=bearer(people["ada"]), json=ada_sub).status_code
        == 200
    )
    seen = []
    while (b := client.post("/api/next", headers=bob).json()["assignment"]) is not None:
        seen.append(b["set_id"])
        assert b["label"] is None
        client.post(f"/api/assignments/{b['assignment_id']}/skip", headers=bob, json={"reason": "looking"})
    assert a["set_id"] in seen


@pytest.mark.parametrize(
    "payload,status,detail",
    [
        ({"ranks": {"c0": 1, "c1": 2, "nope": 3}}, 422, "unknown completion id 'nope'"),
        ({"ranks": {"c0": 1, "c1": 2, "c2": 9}}, 422, "rank of 'c2' is 9"),
        ({"ranks": {"c0": 1, "c1": 2, "c2": -1}}, 422, "rank of 'c2' is -1"),
        ({"ranks": {"c0": 1}}, 422, "completions not ranked: 'c1', 'c2'"),
        ({"ranks": {"c0": "1", "c1": 2, "c2": 3}}, 422, "ranks.c0"),
        ({"ranks": {"c0": 1.5, "c1": 2, "c2": 3}}, 422, "ranks.c0"),
        ({"thumbs": {"c0": "up", "c1": "up", "c2": "up"}}, 422, "send 'ranks'"),
        ({}, 422, "'ranks' must map"),
        ({"ranks": {"c0": 1, "c1": 2, "c2": 3}, "extra": 1}, 422, "extra"),
        ({"submission_id": "short", "ranks": {"c0": 1, "c1": 2, "c2": 3}}, 422, "submission_id"),
    ],
)
def test_bad_payloads_get_a_clear_4xx_and_change_nothing(client, people, payload, status, detail):
    ada = bearer(people["ada"])
    aid = client.post("/api/next", headers=ada).json()["assignment"]["assignment_id"]
    before = state(people["db"])
    body = {"submission_id": "submission-0001", **payload}
    r = client.post(f"/api/assignments/{aid}/submit", headers=ada, json=body)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"], r.json()
    assert isinstance(r.json()["detail"], str)
    assert state(people["db"]) == before


def test_malformed_json_and_unknown_assignment(client, people):
    ada = bearer(people["ada"])
    before = state(people["db"])
    r = client.post(
        "/api/assignments/1/submit", headers={**ada, "content-type": "application/json"}, content=b"{"
    )
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    r = client.post(
        "/api/assignments/999/submit", headers=ada, json={"submission_id": "x" * 10, "ranks": {"a": 1}}
    )
    assert r.status_code == 404
    assert client.get("/api/assignments/abc", headers=ada).status_code == 422
    assert state(people["db"]) == before


def test_duplicate_submissions(client, people):
    ada = bearer(people["ada"])
    a = client.post("/api/next", headers=ada).json()["assignment"]
    url = f"/api/assignments/{a['assignment_id']}/submit"
    body = {"submission_id": "double-click-1", "ranks": {"c0": 1, "c1": 1, "c2": "F"}}
    first = client.post(url, headers=ada, json=body)
    assert first.status_code == 200 and first.json()["status"] == "stored"
    after = state(people["db"])
    again = client.post(url, headers=ada, json=body)  # a retry after a lost response
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert again.json()["label_id"] == first.json()["label_id"]
    other = client.post(url, headers=ada, json={**body, "submission_id": "double-click-2"})
    assert other.status_code == 409 and "already submitted" in other.json()["detail"]
    assert state(people["db"]) == after
    prog = client.get("/api/progress", headers=ada).json()
    assert prog["done"] == 1
    assert prog["tie_warning"] is True  # 1 of 1 sets with a tie


def test_csrf_cookie_posts_need_the_page_token_and_same_origin(client, people, app_login):
    db = people["db"]
    good = app_login(client, people["ada"])
    # a form post from another site: no token, or the attacker's guess
    assert client.post("/instructions", data={}).status_code == 403
    assert client.post("/instructions", data={"csrf_token": "0" * 64}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert not st.authenticate(db, people["ada"]).acknowledged
    # right token but another site's Origin
    r = client.post("/instructions", data={"csrf_token": good}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert not st.authenticate(db, people["ada"]).acknowledged
    # JSON API with the cookie but without the header
    assert client.post("/api/next").status_code == 403
    a = client.post("/api/next", headers={"X-CSRF-Token": good}).json()["assignment"]
    url = f"/api/assignments/{a['assignment_id']}/submit"
    body = {"submission_id": "csrf-test-1", "ranks": {"c0": 1, "c1": 2, "c2": 3}}
    assert client.post(url, json=body).status_code == 403
    assert st.load_labels(db)[1] == []
    # the page's own requests pass
    r = client.post(
        "/instructions",
        data={"csrf_token": good},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/label"
    assert st.authenticate(db, people["ada"]).acknowledged
    assert client.post(url, json=body, headers={"X-CSRF-Token": good}).status_code == 200
    client.cookies.clear()


def test_login_link_sets_an_httponly_cookie_and_pages_flow(client, people):
    import re

    page = client.get(f"/login?token={people['ada']}")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
    r = client.post(
        "/login", data={"token": people["ada"], "nonce": nonce}, headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    cookie = next(c for c in r.headers.get_list("set-cookie") if not c.split("=")[0].endswith("-login"))
    assert cookie.startswith("alignloop-") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert people["ada"] not in cookie and "Secure" not in cookie  # a fresh secret; plain HTTP here
    r = client.get("/", follow_redirects=False)
    assert r.headers["location"] == "/instructions"
    page = client.get("/instructions")
    assert "sparingly" in page.text and 'id="acknowledge"' in page.text
    assert client.get("/label", follow_redirects=False).headers["location"] == "/instructions"
    assert client.get("/login?token=nonsense").status_code == 401
    client.cookies.clear()
    client.cookies.clear()


def test_the_admin_link_leads_to_the_admin_pages(client, people, app_login):
    app_login(client, people["admin"])
    assert client.get("/", follow_redirects=False).headers["location"] == "/admin"
    client.cookies.clear()


def test_model_text_and_names_are_escaped_in_pages(client, people, make_sets, app_login):
    db = people["db"]
    st.create_project(db, "xss", per_set=1)
    sets = make_sets(1, prefix="x")
    sets[0].prompt = "<b>bold?</b>\n   indented"
    sets[0].completions[0].text = "<script>alert(1)</script>"
    sets[0].completions[1].text = '<img src=x onerror="alert(2)">'
    st.import_sets(db, sets, project="xss")
    tok = st.invite(db, "<i>mallory</i>", project="xss")["token"]
    st.acknowledge(db, st.authenticate(db, tok).id)
    csrf = app_login(client, tok)
    assert 'id="next-set"' in client.get("/label").text  # showing the page reserves nothing
    html = client.post("/label/next", data={"csrf_token": csrf}).text  # -> 303 -> the reserved set
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=" in html
    assert "<i>mallory</i>" not in html and "&lt;i&gt;mallory&lt;/i&gt;" in html
    assert "&lt;b&gt;bold?&lt;/b&gt;\n   indented" in html
    client.cookies.clear()
    app_login(client, people["admin"])
    admin = client.get("/admin?project=xss").text
    assert "<i>mallory</i>" not in admin and "&lt;i&gt;mallory&lt;/i&gt;" in admin
    r = client.get("/label")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    client.cookies.clear()


def test_instructions_markdown_keeps_raw_html_as_text(client, people):
    db = people["db"]
    st.create_project(
        db, "md", instructions="# Title\n\n<script>alert(1)</script>\n\n[x](javascript:alert(1))"
    )
    tok = st.invite(db, "md-person", project="md")["token"]
    page = client.get("/instructions", headers=bearer(tok)).text
    assert "<h1>Title</h1>" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert 'href="javascript:' not in page


def test_admin_api_progress_invite_revoke_export(client, people):
    adm = bearer(people["admin"])
    ada = bearer(people["ada"])
    a = client.post("/api/next", headers=ada).json()["assignment"]
    body = {"submission_id": "export-test-1", "ranks": {"c0": 2, "c1": 1, "c2": "F"}}
    assert (
        client.post(f"/api/assignments/{a['assignment_id']}/submit", headers=ada, json=body).status_code
        == 200
    )
    prog = client.get("/api/admin/progress", headers=adm).json()
    assert prog["labels"] == 1 and prog["labels_needed"] == 6 and not prog["complete"]
    assert {x["name"]: x["done"] for x in prog["labellers"]} == {"ada": 1, "bob": 0}
    rows = [json.loads(line) for line in client.get("/api/admin/export", headers=adm).text.splitlines()]
    assert rows == [
        {
            "set_id": a["set_id"],
            "labeller": "ada",
            "ranks": body["ranks"],
            "thumbs": {},
            "created_at": rows[0]["created_at"],
        }
    ]
    sets = client.get("/api/admin/export?kind=sets", headers=adm).text.splitlines()
    assert len(sets) == 3
    made = client.post("/api/admin/labellers", headers=adm, json={"name": "cy"}).json()
    assert made["link"].startswith("http://testserver/login?token=")
    assert client.get("/api/me", headers=bearer(made["token"])).json()["name"] == "cy"
    assert client.post("/api/admin/labellers/cy/revoke", headers=adm).status_code == 200
    assert client.get("/api/me", headers=bearer(made["token"])).status_code == 401
    assert client.post("/api/admin/labellers/nobody/revoke", headers=adm).status_code == 404
    page = client.get("/admin", headers=adm)
    assert page.status_code == 200 and "1 of 6 labels" in page.text
    rep = client.get("/api/admin/report", headers=adm).json()
    assert "available" in rep


def test_admin_imports_sets_over_the_api(client, people):
    adm = bearer(people["admin"])
    r = client.post("/api/admin/projects", headers=adm, json={"name": "api", "mode": "thumbs", "per_set": 1})
    assert r.status_code == 200 and r.json()["mode"] == "thumbs"
    sets = [
        {
            "prompt_id": "q",
            "prompt": "hi",
            "completions": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}],
        }
    ]
    assert client.post("/api/admin/projects/api/sets", headers=adm, json=sets).json() == {
        "added": 1,
        "unchanged": 0,
        "collapsed": 0,
    }
    assert client.post("/api/admin/projects/nope/sets", headers=adm, json=sets).status_code == 400
    bad = client.post("/api/admin/projects/api/sets", headers=adm, json=[{"prompt_id": "z"}])
    assert bad.status_code == 422


def test_skip_and_progress(client, people):
    ada = bearer(people["ada"])
    a = client.post("/api/next", headers=ada).json()["assignment"]
    assert (
        client.post(
            f"/api/assignments/{a['assignment_id']}/skip", headers=ada, json={"reason": ""}
        ).status_code
        == 422
    )
    r = client.post(f"/api/assignments/{a['assignment_id']}/skip", headers=ada, json={"reason": "unsure"})
    assert r.json() == {"status": "skipped"}
    prog = client.get("/api/progress", headers=ada).json()
    assert prog["skipped"] == 1 and prog["total"] == 2
    b = client.post("/api/next", headers=ada).json()["assignment"]
    assert b["set_id"] != a["set_id"]


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for p in (
        "/api/next",
        "/api/assignments/{assignment_id}/submit",
        "/api/admin/export",
        "/api/admin/labellers",
    ):
        assert p in paths
    body = schema["components"]["schemas"]["SubmitBody"]
    assert set(body["properties"]) == {"submission_id", "ranks", "thumbs"}


def test_showing_the_next_set_reserves_nothing_only_post_does(client, people, app_login):
    db, ada = people["db"], bearer(people["ada"])
    before = state(db)
    r = client.get("/api/next", headers=ada)
    assert r.status_code == 200 and r.json()["assignment"] is None and r.json()["progress"]["remaining"] == 3
    st.acknowledge(db, st.authenticate(db, people["ada"]).id)
    before = state(db)
    csrf = app_login(client, people["ada"])  # follows / -> /label: a page with a "Next set" button
    page = client.get("/label")
    assert 'id="next-set"' in page.text and "Next set (3 left)" in page.text
    assert state(db) == before  # no assignment made by any GET
    got = client.post("/label/next", data={"csrf_token": csrf})
    assert "question" in got.text and st.project_progress(db)["per_set_progress"][0]["assigned"] == 1
    # the open set is what GET shows from now on, and POST gives the same one again
    a = client.get("/api/next", headers=ada).json()["assignment"]
    assert a is not None and client.post("/api/next", headers=ada).json()["assignment"] == a


def test_admin_sees_skip_reasons(client, people, app_login):
    ada = bearer(people["ada"])
    a = client.post("/api/next", headers=ada).json()["assignment"]
    reason = "I cannot judge <b>chemistry</b>"
    assert (
        client.post(
            f"/api/assignments/{a['assignment_id']}/skip", headers=ada, json={"reason": reason}
        ).status_code
        == 200
    )
    skips = client.get("/api/admin/progress", headers=bearer(people["admin"])).json()["skips"]
    assert [(k["set_id"], k["labeller"], k["reason"]) for k in skips] == [(a["set_id"], "ada", reason)]
    app_login(client, people["admin"])
    page = client.get("/admin").text
    assert "I cannot judge &lt;b&gt;chemistry&lt;/b&gt;" in page and 'id="skips"' in page

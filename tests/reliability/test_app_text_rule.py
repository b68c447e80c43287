"""The one text rule at the store boundary, on SQLite and PostgreSQL: a NUL character in any text
field or query parameter is a 400 naming the field, never a 500, and changes nothing. Also:
500s carry the security headers, and export file names survive any project name."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient

from alignloop.feedback import store as st
from alignloop.feedback.app import attachment, create_app
from alignloop.records import CompletionSet

NUL = "a\x00b"
SET = {
    "prompt_id": "s",
    "prompt": "q?",
    "completions": [{"id": "c0", "text": "x"}, {"id": "c1", "text": "y"}],
}


def with_nul(path: list, value=NUL) -> list:
    """The set import body with ``value`` put at ``path`` inside the one set."""
    one = {**SET, "completions": [dict(c) for c in SET["completions"]]}
    target = one
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return [one]


# (where the NUL goes, method, path, caller, JSON body, the field the detail must name)
CASES = [
    ("project name", "POST", "/api/admin/projects", "admin", {"name": NUL}, "name"),
    ("criterion", "POST", "/api/admin/projects", "admin", {"name": "p2", "criterion": NUL}, "criterion"),
    (
        "instructions",
        "POST",
        "/api/admin/projects",
        "admin",
        {"name": "p2", "instructions": NUL},
        "instructions",
    ),
    ("set id", "POST", "/api/admin/projects/default/sets", "admin", with_nul(["prompt_id"]), "prompt_id"),
    ("prompt", "POST", "/api/admin/projects/default/sets", "admin", with_nul(["prompt"]), "set 's': prompt"),
    (
        "completion text",
        "POST",
        "/api/admin/projects/default/sets",
        "admin",
        with_nul(["completions", 1, "text"]),
        "set 's': completions[1].text",
    ),
    (
        "completion id",
        "POST",
        "/api/admin/projects/default/sets",
        "admin",
        with_nul(["completions", 0, "id"]),
        "set 's': completions[0].id",
    ),
    ("extra field", "POST", "/api/admin/projects/default/sets", "admin", with_nul(["note"]), "set 's': note"),
    ("import project (path)", "POST", "/api/admin/projects/a%00b/sets", "admin", [SET], "project"),
    ("invite name", "POST", "/api/admin/labellers", "admin", {"name": NUL}, "name"),
    ("invite project", "POST", "/api/admin/labellers", "admin", {"name": "dan", "project": NUL}, "project"),
    ("revoke name (path)", "POST", "/api/admin/labellers/a%00b/revoke", "admin", None, "name"),
    ("progress project (query)", "GET", "/api/admin/progress?project=a%00b", "admin", None, "project"),
    ("report project (query)", "GET", "/api/admin/report?project=a%00b", "admin", None, "project"),
    ("export project (query)", "GET", "/api/admin/export?project=a%00b", "admin", None, "project"),
    ("skip reason", "POST", "/api/assignments/{aid}/skip", "ada", {"reason": NUL}, "reason"),
    (
        "submission id",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "submission-" + NUL, "ranks": {"c0": 1, "c1": 2}},
        "submission_id",
    ),
    ("admin page project (query)", "GET", "/admin?project=a%00b", "admin", None, "project"),
]


@pytest.fixture()
def app_world(db_url, dump):
    st.create_project(db_url, per_set=2)
    st.import_sets(db_url, [CompletionSet.model_validate(SET)])
    tokens = {"ada": st.invite(db_url, "ada")["token"], "admin": st.create_admin(db_url)["token"]}
    aid = st.next_assignment(db_url, st.authenticate(db_url, tokens["ada"]).id)["assignment_id"]
    yield db_url, tokens, aid
    st.close_store(db_url)


def test_a_nul_anywhere_is_a_400_naming_the_field_and_changes_nothing(app_world, dump):
    db, tokens, aid = app_world
    with TestClient(create_app(db), raise_server_exceptions=False) as client:
        for where, method, path, who, body, field in CASES:
            before = dump(db)
            r = client.request(
                method,
                path.format(aid=aid),
                headers={"Authorization": f"Bearer {tokens[who]}"},
                json=body,
            )
            assert r.status_code == 400, (where, r.status_code, r.text[:300])
            text = r.json()["detail"] if path.startswith("/api") else r.text
            assert f"{field} contains a NUL character" in text, (where, text[:300])
            assert dump(db) == before, where


def test_a_500_carries_the_security_headers(app_db):
    app = create_app(app_db)

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)  # the real app with one route that fails
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/broken")
    assert r.status_code == 500
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert "RuntimeError" not in r.text


@pytest.mark.parametrize(
    ("project", "expected"),
    [("日本語", "日本語-rankings.jsonl"), ('a"b', 'a"b-rankings.jsonl'), ("a\r\nb", "a__b-rankings.jsonl")],
)
def test_export_file_names_survive_any_project_name(app_db, project, expected):
    st.create_project(app_db, project, per_set=1)
    st.import_sets(app_db, [CompletionSet.model_validate(SET)], project=project)
    admin = st.create_admin(app_db)["token"]
    with TestClient(create_app(app_db)) as client:
        r = client.get(
            "/api/admin/export", params={"project": project}, headers={"Authorization": f"Bearer {admin}"}
        )
    assert r.status_code == 200 and r.text.count("\n") == 0  # no labels yet: an empty JSONL file
    header = r.headers["content-disposition"]
    assert header == attachment(f"{project}-rankings.jsonl")
    # the exact name in filename* (RFC 5987), an ASCII stand-in in filename (Chromium's choice
    # between them: tests/feedback/test_browser.py downloads these exports)
    plain = header.split('filename="', 1)[1].split('"', 1)[0]
    assert plain.isascii() and "\r" not in plain and "\n" not in plain
    assert unquote(header.split("filename*=UTF-8''", 1)[1]) == expected

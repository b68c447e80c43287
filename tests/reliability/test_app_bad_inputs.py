"""Bad input to the labelling app and its commands: each gets one clear line, never a traceback.

The table covers command-line arguments, data files (``label import``), database URLs, the
label section of recipes, and JSON API payloads. A command answers ``alignloop: error: ...``
on one line with exit code 2; the API answers a 4xx whose ``detail`` is one line, and the store
is unchanged. Every message asserted here is listed, with its fix, in docs/troubleshooting.md
(:func:`test_every_message_is_in_the_troubleshooting_page` keeps the two in step).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alignloop.feedback import store as st
from alignloop.feedback.app import create_app
from alignloop.records import CompletionSet

ROOT = Path(__file__).resolve().parents[2]


def line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


def comps(*ids: str) -> list[dict]:
    # continuations in the text convention (prompt + completion; DESIGN.md): a leading space
    return [{"id": i, "text": f" text {i}"} for i in ids]


FILES = {
    "good.jsonl": line({"prompt_id": "a", "prompt": "x", "completions": comps("c0", "c1")}),
    "notjson.jsonl": "not json\n",
    "empty.jsonl": "",
    "noprompt.jsonl": line({"prompt_id": "b", "completions": comps("c0", "c1")}),
    "badtype.jsonl": line({"prompt_id": "b", "prompt": "x", "completions": "c0 c1"}),
    "nocomp.jsonl": line({"prompt_id": "b", "prompt": "x", "completions": []}),
    "dupcid.jsonl": line({"prompt_id": "d", "prompt": "x", "completions": comps("c0", "c0")}),
    "dupset.jsonl": line({"prompt_id": "e", "prompt": "x", "completions": comps("c0", "c1")}) * 2,
    "changed.jsonl": line({"prompt_id": "a", "prompt": "CHANGED", "completions": comps("c0", "c1")}),
    "nul.jsonl": line({"prompt_id": "n1", "prompt": "x", "completions": comps("c0", "c1")})
    + line({"prompt_id": "n2", "prompt": "x", "completions": [{"id": "c0", "text": "a\x00b"}]}),
    "rawnul.jsonl": '{"prompt_id": "n3", "prompt": "x\x00", "completions": [{"id": "c0", "text": "a"}]}\n',
    "notadb.db": "hello, I am a text file\n",
    "r_key.yaml": "name: t\nlabel:\n  per_sett: 2\n",
    "r_k0.yaml": "name: t\nlabel:\n  per_set: 0\n",
    "r_mode.yaml": "name: t\nlabel:\n  mode: robots\n",
    "r_lease.yaml": "name: t\nlabel:\n  lease_seconds: 0\n",
}

# (id, arguments with {dir}/{db}/{db2}/{busy} filled in, what the one line must contain)
CLI = [
    ("import-missing-file", "label import --db {db} --completions {dir}/none.jsonl", "file not found"),
    (
        "import-not-json",
        "label import --db {db} --completions {dir}/notjson.jsonl",
        "invalid JSON (Expecting value)",
    ),
    (
        "import-empty-file",
        "label import --db {db} --completions {dir}/empty.jsonl",
        "no valid completionset records",
    ),
    (
        "import-no-prompt",
        "label import --db {db} --completions {dir}/noprompt.jsonl",
        "'prompt' field required",
    ),
    (
        "import-wrong-type",
        "label import --db {db} --completions {dir}/badtype.jsonl",
        "'completions' input should be a valid list",
    ),
    (
        "import-no-completions",
        "label import --db {db} --completions {dir}/nocomp.jsonl",
        "'completions' list should have at least 1 item",
    ),
    (
        "import-duplicate-completion",
        "label import --db {db} --completions {dir}/dupcid.jsonl --per-set 2",
        "has two completions with the same id",
    ),
    (
        "import-duplicate-set",
        "label import --db {db} --completions {dir}/dupset.jsonl --per-set 2",
        "appears twice in the input",
    ),
    (
        "import-changed-set",
        "label import --db {db} --completions {dir}/changed.jsonl --per-set 2",
        "is already in project 'default' with other content",
    ),
    (
        "import-nul",
        "label import --db {db} --completions {dir}/nul.jsonl --per-set 2 --project nul",
        "set 'n2': completions[0].text contains a NUL character (\\x00) in",
    ),
    (
        "import-raw-nul",
        "label import --db {db} --completions {dir}/rawnul.jsonl --per-set 2 --project nul",
        "invalid JSON (Invalid control character",
    ),
    (
        "import-other-k",
        "label import --db {db} --completions {dir}/good.jsonl --per-set 5",
        "exists with mode=rank per_set=2",
    ),
    (
        "import-k-zero",
        "label import --db {db} --completions {dir}/good.jsonl --per-set 0 --project p2",
        "labellers per set must be at least 1",
    ),
    (
        "import-missing-instructions",
        "label import --db {db} --completions {dir}/good.jsonl --per-set 2 --instructions {dir}/no.md",
        "in --instructions",
    ),
    ("db-no-folder", "label progress --db sqlite:///{dir}/no/such/x.db", "folder does not exist"),
    ("db-not-a-database", "label progress --db sqlite:///{dir}/notadb.db", "file is not a database"),
    ("db-empty-url", "label progress --db ''", "empty database URL"),
    ("db-not-a-url", "label progress --db not-a-url://x", "not a database URL"),
    ("db-unknown-kind", "label progress --db mysql://x/y", "cannot use database mysql://x/y"),
    ("db-unreachable", "label progress --db postgresql://nobody@127.0.0.1:1/x", "cannot connect to"),
    ("db-no-project", "label invite --db sqlite:///{dir}/fresh.db ada", "has no labelling project yet"),
    ("db-several-projects", "label progress --db {db2}", "the database has several projects"),
    ("unknown-project", "label invite --db {db} bob --project nope", "no project 'nope'"),
    ("invite-twice", "label invite --db {db} ada", "use --new-link to replace their login link"),
    ("invite-empty-name", "label invite --db {db} ''", "a labeller name must have 1 to 200 characters"),
    ("revoke-unknown", "label revoke --db {db} nobody", "no labeller named 'nobody'"),
    ("serve-port-range", "label serve --db {db} --port 70000", "--port must be 1 to 65535"),
    ("serve-workers", "label serve --db {db} --workers 0", "--workers must be 1 to 64"),
    ("serve-lease-zero", "label serve --db {db} --lease-seconds 0", "a lease must be longer than 0 seconds"),
    (
        "serve-lease-negative",
        "label serve --db {db} --lease-seconds -5",
        "a lease must be longer than 0 seconds",
    ),
    ("release-unknown-set", "label release --db {db} --set nope", "no set 'nope' in project 'default'"),
    ("release-unknown-labeller", "label release --db {db} --labeller nobody", "no labeller named 'nobody'"),
    ("simulate-missing-project", "label simulate --db {db} --project nope", "no project 'nope'"),
    ("serve-port-busy", "label serve --db {db} --port {busy}", "Address already in use"),
    ("serve-unknown-host", "label serve --db {db} --host nohost.invalid", "unknown host 'nohost.invalid'"),
    ("serve-foreign-address", "label serve --db {db} --host 192.0.2.1", "Cannot assign requested address"),
    ("serve-max-body", "label serve --db {db} --max-body-mb 0", "--max-body-mb must be more than 0"),
    (
        "serve-session-hours",
        "label serve --db {db} --session-hours 0",
        "the session lifetime must be more than 0 hours",
    ),
    ("serve-name", "label serve --db {db} --name 'a b'", "bad deployment name 'a b' in --name"),
    ("simulate-no-token", "label simulate --url http://127.0.0.1:1", "--url needs an admin token"),
    (
        "simulate-unreachable",
        "label simulate --url http://127.0.0.1:1 --admin-token x",
        "cannot reach the labelling app",
    ),
    ("simulate-profile", "label simulate --db {db} --profile nobody", "no simulated labeller matches nobody"),
    ("recipe-unknown-key", "run {dir}/r_key.yaml --out {dir}/run", "unknown config key 'label.per_sett'"),
    ("recipe-k-zero", "run {dir}/r_k0.yaml --out {dir}/run", "bad value 0 for config key 'label.per_set'"),
    (
        "recipe-mode",
        "run {dir}/r_mode.yaml --out {dir}/run",
        "bad value 'robots' for config key 'label.mode'",
    ),
    (
        "recipe-max-body",
        "run {dir}/r_key.yaml --out {dir}/run --set label.max_body_mb=0",
        "bad value 0 for config key 'label.max_body_mb'",
    ),
    (
        "recipe-lease",
        "run {dir}/r_lease.yaml --out {dir}/run",
        "bad value 0 for config key 'label.lease_seconds'",
    ),
    (
        "recipe-set-override",
        "run {dir}/r_key.yaml --out {dir}/run --set label.per_set=abc",
        "bad value 'abc' for config key 'label.per_set'",
    ),
]

RANKS = {"c0": 1, "c1": 2, "c2": 3}
# (id, method, path, caller, JSON body, status, what the one-line detail must contain)
API = [
    ("no-token", "GET", "/api/next", None, None, 401, "missing, invalid or revoked login token"),
    ("wrong-role", "GET", "/api/admin/progress", "ada", None, 403, "only admins can do this"),
    ("labeller-only", "GET", "/api/next", "admin", None, 403, "only labellers can do this"),
    (
        "unknown-completion",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001", "ranks": {**RANKS, "nope": 1}},
        422,
        "unknown completion id 'nope'",
    ),
    (
        "rank-range",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001", "ranks": {**RANKS, "c2": 9}},
        422,
        "rank of 'c2' is 9",
    ),
    (
        "rank-missing",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001", "ranks": {"c0": 1}},
        422,
        "completions not ranked: 'c1', 'c2'",
    ),
    (
        "rank-as-string",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001", "ranks": {**RANKS, "c0": "1"}},
        422,
        "ranks.c0",
    ),
    (
        "thumbs-in-rank-project",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001", "thumbs": {"c0": "up", "c1": "up", "c2": "down"}},
        422,
        "this project ranks completions: send 'ranks', not 'thumbs'",
    ),
    (
        "no-ranks",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001"},
        422,
        "'ranks' must map every completion id to a rank or 'F'",
    ),
    (
        "short-submission-id",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s1", "ranks": RANKS},
        422,
        "submission_id: String should have at least 8 characters",
    ),
    (
        "extra-field",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "s-00000001", "ranks": RANKS, "score": 5},
        422,
        "score: Extra inputs are not permitted",
    ),
    (
        "not-your-assignment",
        "POST",
        "/api/assignments/{bid}/submit",
        "ada",
        {"submission_id": "s-00000001", "ranks": RANKS},
        404,
        "you have no assignment",
    ),
    (
        "id-too-large",
        "GET",
        "/api/assignments/9223372036854775808",
        "ada",
        None,
        422,
        "assignment_id: Input should be less than or equal to 2147483647",
    ),
    (
        "already-submitted",
        "POST",
        "/api/assignments/{done}/submit",
        "ada",
        {"submission_id": "s-00000002", "ranks": RANKS},
        409,
        "was already submitted",
    ),
    (
        "submission-id-reused",
        "POST",
        "/api/assignments/{aid}/submit",
        "ada",
        {"submission_id": "first-submission", "ranks": RANKS},
        409,
        "was already used for another set",
    ),
    (
        "skip-no-reason",
        "POST",
        "/api/assignments/{aid}/skip",
        "ada",
        {"reason": ""},
        422,
        "reason: String should have at least 1 character",
    ),
    (
        "import-unknown-project",
        "POST",
        "/api/admin/projects/nope/sets",
        "admin",
        [{"prompt_id": "z", "prompt": "?", "completions": comps("a", "b")}],
        400,
        "no project 'nope'",
    ),
    (
        "project-k-zero",
        "POST",
        "/api/admin/projects",
        "admin",
        {"name": "zero", "per_set": 0},
        422,
        "per_set: Input should be greater than or equal to 1",
    ),
    (
        "release-neither",
        "POST",
        "/api/admin/release",
        "admin",
        {},
        400,
        "give exactly one of --set and --labeller",
    ),
    ("release-unknown-set", "POST", "/api/admin/release", "admin", {"set_id": "nope"}, 400, "no set 'nope'"),
    (
        "release-unknown-labeller",
        "POST",
        "/api/admin/release",
        "admin",
        {"labeller": "nobody"},
        400,
        "no labeller named 'nobody'",
    ),
    (
        "set-without-completions",
        "POST",
        "/api/admin/projects/default/sets",
        "admin",
        [{"prompt_id": "z", "prompt": "?"}],
        422,
        "completions: Field required",
    ),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs")
    for name, text in FILES.items():
        (folder / name).write_text(text)
    db = f"sqlite:///{folder / 'labels.db'}"
    st.create_project(db, per_set=2)
    st.import_sets(db, [CompletionSet.model_validate_json(FILES["good.jsonl"])])
    st.invite(db, "ada")
    db2 = f"sqlite:///{folder / 'two.db'}"
    st.create_project(db2, "one")
    st.create_project(db2, "two")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"dir": str(folder), "db": db, "db2": db2, "busy": str(busy.getsockname()[1])}
    busy.close()
    for url in (db, db2, f"sqlite:///{folder / 'fresh.db'}"):
        st.close_store(url)


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_a_bad_command_line_gets_one_clear_line(cli, workspace, case):
    import shlex

    _, args, expected = case
    code, out, err = cli(*shlex.split(args.format(**workspace)))
    assert code == 2, (args, out, err)
    assert err.startswith("alignloop: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err + out


@pytest.fixture()
def api(tmp_path):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    st.create_project(db, per_set=1)
    st.import_sets(
        db,
        [
            CompletionSet(prompt_id=f"p{i}", prompt=f"q{i}?", completions=comps("c0", "c1", "c2"))
            for i in range(3)
        ],
    )
    tokens = {"ada": st.invite(db, "ada")["token"], "bob": st.invite(db, "bob")["token"]}
    tokens["admin"] = st.create_admin(db)["token"]
    ada, bob = (st.authenticate(db, tokens[n]).id for n in ("ada", "bob"))
    done = st.next_assignment(db, ada)["assignment_id"]
    st.submit(db, ada, done, "first-submission", ranks=RANKS)
    ids = {"done": done, "aid": st.next_assignment(db, ada)["assignment_id"]}
    ids["bid"] = st.next_assignment(db, bob)["assignment_id"]
    yield db, tokens, ids
    st.close_store(db)


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_a_bad_api_request_gets_one_clear_line_and_changes_nothing(api, dump, case):
    db, tokens, ids = api
    _, method, path, who, body, status, expected = case
    headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
    with TestClient(create_app(db)) as client:
        before = dump(db)
        r = client.request(method, path.format(**ids), headers=headers, json=body)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and expected in detail, detail
        assert dump(db) == before


def test_malformed_json_body(api, dump):
    db, tokens, ids = api
    with TestClient(create_app(db)) as client:
        before = dump(db)
        r = client.post(
            f"/api/assignments/{ids['aid']}/submit",
            content=b'{"submission_id": ',
            headers={"Authorization": f"Bearer {tokens['ada']}", "Content-Type": "application/json"},
        )
        assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
        assert dump(db) == before


def test_a_cross_site_post_with_the_cookie_is_refused(api, dump, app_login):
    db, tokens, ids = api
    with TestClient(create_app(db)) as client:
        app_login(client, tokens["ada"])
        before = dump(db)
        r = client.post(f"/api/assignments/{ids['aid']}/skip", json={"reason": "forged"})
        assert r.status_code == 403 and "cross-site request refused" in r.json()["detail"]
        assert dump(db) == before


def test_a_nul_line_imports_nothing(cli, workspace):
    """The NUL line is the second: the first set is not imported and no project is created."""
    code, _, err = cli(
        "label",
        "import",
        "--db",
        workspace["db"],
        "--completions",
        f"{workspace['dir']}/nul.jsonl",
        "--project",
        "nul",
    )
    assert code == 2 and err.count("\n") == 1
    assert [p["name"] for p in st.list_projects(workspace["db"])] == ["default"]


def test_every_message_is_in_the_troubleshooting_page():
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    expected = [c[2] for c in CLI] + [c[6] for c in API] + ["JSON decode error", "cross-site request refused"]
    assert len(expected) >= 30
    missing = [m for m in expected if m not in page]
    assert missing == [], missing

"""Assignment leases over the real app and database: a held set goes back to the pool when its
lease ends, when its labeller is revoked, or by hand; a late submission is stored when the set
still needs it and refused with one clear line when it does not; nothing is lost or doubled."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from alignloop.errors import UserError
from alignloop.feedback import store as st
from alignloop.feedback.app import create_app

LEASE = 1.5  # seconds: long enough for a request under load, short enough to wait out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ranks_of(a: dict) -> dict[str, int]:
    return {c["id"]: i + 1 for i, c in enumerate(a["completions"])}


@pytest.fixture()
def team(db, make_sets):
    """One set that needs k=2 labels; labellers ada, bob, cy; an admin; the app with short leases."""
    st.create_project(db, per_set=2)
    st.import_sets(db, make_sets(1))
    tokens = {name: st.invite(db, name)["token"] for name in ("ada", "bob", "cy")}
    tokens["admin"] = st.create_admin(db)["token"]
    with TestClient(create_app(db, lease_seconds=LEASE)) as client:
        yield db, client, tokens


def take(client: TestClient, token: str) -> dict | None:
    r = client.post("/api/next", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["assignment"]


def submit(client: TestClient, token: str, a: dict, sid: str):
    body = {"submission_id": sid, "ranks": ranks_of(a)}
    return client.post(f"/api/assignments/{a['assignment_id']}/submit", headers=bearer(token), json=body)


def test_a_labeller_who_disappears_loses_the_slot_after_the_lease(team):
    db, client, t = team
    ada = take(client, t["ada"])
    bob = take(client, t["bob"])
    assert ada["set_id"] == bob["set_id"] == "p0" and ada["expires_at"]
    assert take(client, t["cy"]) is None  # both slots held
    prog = st.project_progress(db)
    assert [h["labeller"] for h in prog["held"]] == ["ada", "bob"] and prog["released"] == {}
    assert submit(client, t["bob"], bob, "bob-00000001").json()["status"] == "stored"
    time.sleep(LEASE + 0.3)  # ada walked away
    prog = st.project_progress(db)  # reports the expiry without anyone asking for work
    assert prog["held"] == [] and prog["released"] == {"lease expired": 1}
    assert prog["per_set_progress"] == [{"set_id": "p0", "labels": 1, "assigned": 1}]
    assert [(x["name"], x["open"], x["released"]) for x in prog["labellers"]][0] == ("ada", 0, 1)
    cy = take(client, t["cy"])  # the slot went back to the pool
    assert cy["set_id"] == "p0"
    assert submit(client, t["cy"], cy, "cy-000000001").json()["status"] == "stored"
    assert st.project_progress(db)["complete"]
    # ada comes back and submits: the set has its two labels, so a clear 409 and nothing stored
    before = st.submission_ledger(db)
    late = submit(client, t["ada"], ada, "ada-00000001")
    assert late.status_code == 409
    detail = late.json()["detail"]
    assert "\n" not in detail and "was released (lease expired)" in detail and "not stored" in detail
    assert st.submission_ledger(db) == before
    _, rankings, _ = st.load_labels(db)
    assert sorted(r.labeller for r in rankings) == ["bob", "cy"]


def test_a_late_submission_is_stored_when_the_set_still_needs_it(team):
    db, client, t = team
    ada = take(client, t["ada"])
    time.sleep(LEASE + 0.3)
    bob = take(client, t["bob"])  # the expiry is noticed here: bob's request releases ada's slot
    assert bob["set_id"] == "p0" and st.project_progress(db)["released"] == {"lease expired": 1}
    r = submit(client, t["ada"], ada, "ada-00000001")  # one slot left: ada takes it again
    assert r.status_code == 200 and r.json()["status"] == "stored"
    again = submit(client, t["ada"], ada, "ada-00000001")  # her retry is the same label, once
    assert again.json() == {"status": "duplicate", "label_id": r.json()["label_id"]}
    assert take(client, t["cy"]) is None  # ada and bob hold both slots
    assert submit(client, t["bob"], bob, "bob-00000001").json()["status"] == "stored"
    prog = st.project_progress(db)
    assert prog["complete"] and prog["labels"] == 2 and prog["held"] == []
    ledger = st.submission_ledger(db)["sets"][0]
    assert ledger["n_assigned"] == ledger["n_done"] == ledger["labels"] == 2 and ledger["open"] == 0


def test_a_labeller_back_after_expiry_gets_the_set_again(team):
    db, client, t = team
    first = take(client, t["ada"])
    time.sleep(LEASE + 0.3)
    again = take(client, t["ada"])  # released, then handed back to her (it still needs labels)
    assert again["assignment_id"] == first["assignment_id"] and again["expires_at"] > first["expires_at"]
    assert submit(client, t["ada"], again, "ada-00000001").json()["status"] == "stored"
    assert [h["labeller"] for h in st.project_progress(db)["held"]] == []


def test_revoking_a_labeller_frees_their_sets_at_once(team):
    db, client, t = team
    take(client, t["ada"])
    take(client, t["bob"])
    assert take(client, t["cy"]) is None
    r = client.post("/api/admin/labellers/ada/revoke", headers=bearer(t["admin"]))
    assert r.json() == {"revoked": "ada", "released": 1}
    prog = st.project_progress(db)
    assert [h["labeller"] for h in prog["held"]] == ["bob"] and prog["released"] == {"labeller revoked": 1}
    cy = take(client, t["cy"])  # at once, no lease to wait out
    assert cy["set_id"] == "p0"
    assert submit(client, t["cy"], cy, "cy-000000001").json()["status"] == "stored"
    bob = take(client, t["bob"])
    assert submit(client, t["bob"], bob, "bob-00000001").json()["status"] == "stored"
    prog = st.project_progress(db)
    assert prog["complete"] and prog["labels"] == 2  # "2 / 2", not "1 / 2 labels, 2 assigned"


def test_release_by_hand_from_the_command_line_and_the_api(team, cli):
    db, client, t = team
    take(client, t["ada"])
    take(client, t["bob"])
    code, out, err = cli("label", "release", "--db", db, "--labeller", "ada")
    assert code == 0, err
    assert json.loads(out) == {"released": 1, "sets": ["p0"]} and "released 1 open assignment" in err
    cy = take(client, t["cy"])
    assert cy["set_id"] == "p0"
    r = client.post("/api/admin/release", headers=bearer(t["admin"]), json={"set_id": "p0"})
    assert r.json() == {"released": 2, "sets": ["p0", "p0"]}
    assert st.project_progress(db)["released"] == {"released by hand": 3}
    code, out, _ = cli("label", "release", "--db", db, "--set", "p0")  # nothing held: not an error
    assert code == 0 and json.loads(out)["released"] == 0
    # a released labeller's submission still counts while the set has room
    assert submit(client, t["cy"], cy, "cy-000000001").json()["status"] == "stored"


def test_a_lease_must_be_positive(db):
    for bad in (0, -5, float("nan")):
        with pytest.raises(UserError, match="lease must be"):
            create_app(db, lease_seconds=bad)

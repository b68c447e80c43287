"""The labelling store on SQLite and PostgreSQL: import, invite, assignment, submission, export."""

from __future__ import annotations

import threading

import pytest

from alignloop.errors import UserError
from alignloop.feedback import store as st


def snapshot(db: str) -> tuple:
    sets, rankings, labellers = st.load_labels(db)
    prog = st.project_progress(db)
    return (
        [r.model_dump() for r in rankings],
        prog["per_set_progress"],
        [p["done"] for p in prog["labellers"]],
    )


def test_import_is_idempotent_and_round_trips(db, make_sets):
    st.create_project(db, per_set=2)
    sets = make_sets(4)
    assert st.import_sets(db, sets) == {"added": 4, "unchanged": 0, "collapsed": 0}
    assert st.import_sets(db, sets) == {"added": 0, "unchanged": 4, "collapsed": 0}
    changed = make_sets(1)
    changed[0].completions[0].text = " something else"
    with pytest.raises(UserError, match="other content"):
        st.import_sets(db, changed + make_sets(1, prefix="new"))
    loaded, rankings, labellers = st.load_labels(db)
    assert [s.model_dump() for s in loaded] == [
        s.model_dump() for s in sets
    ]  # nothing added by the failed import
    assert rankings == [] and labellers == []


def test_tokens_are_stored_hashed_and_revocable(db):
    st.create_project(db)
    ada = st.invite(db, "ada", base_url="http://x:1")
    assert ada["link"] == f"http://x:1/login?token={ada['token']}"
    with st._reading(db) as s:
        stored = s.scalar(st.select(st.Labeller.token_hash))
    assert stored == st.hash_token(ada["token"]) and ada["token"] not in stored
    assert st.authenticate(db, ada["token"]).name == "ada"
    assert st.authenticate(db, "x" + ada["token"]) is None
    with pytest.raises(UserError, match="already exists"):
        st.invite(db, "ada")
    st.revoke(db, "ada")
    assert st.authenticate(db, ada["token"]) is None
    again = st.invite(db, "ada", new_link=True)
    assert st.authenticate(db, again["token"]).name == "ada"
    adm = st.create_admin(db)
    assert st.authenticate(db, adm["token"]).kind == "admin"


def test_each_set_goes_to_k_distinct_labellers_least_labelled_first(db, make_sets):
    st.create_project(db, per_set=2)
    st.import_sets(db, make_sets(3))
    ids = [st.invite(db, n)["id"] for n in ("a", "b", "c", "d")]
    got: dict[str, list[str]] = {}
    order = []
    for step in range(10):
        for lid in ids:
            a = st.next_assignment(db, lid)
            if a is None:
                continue
            order.append(a["set_id"])
            ranks = {c["id"]: i + 1 for i, c in enumerate(a["completions"])}
            st.submit(db, lid, a["assignment_id"], f"sub-{lid}-{step}-xyz", ranks=ranks)
            got.setdefault(a["set_id"], []).append(lid)
    assert order[:3] == ["p0", "p1", "p2"]  # least-labelled first
    assert sorted(got) == ["p0", "p1", "p2"]
    for labellers in got.values():
        assert len(labellers) == 2 == len(set(labellers))
    assert st.project_progress(db)["complete"]
    assert all(st.next_assignment(db, lid) is None for lid in ids)


def test_skip_returns_the_set_to_the_pool(db, make_sets):
    st.create_project(db, per_set=1)
    st.import_sets(db, make_sets(1))
    a, b = st.invite(db, "a")["id"], st.invite(db, "b")["id"]
    x = st.next_assignment(db, a)
    assert st.next_assignment(db, b) is None  # reserved for a
    with pytest.raises(st.Rejected, match="reason"):
        st.skip(db, a, x["assignment_id"], "  ")
    st.skip(db, a, x["assignment_id"], "I cannot judge this")
    assert st.next_assignment(db, a) is None  # never shown again to a
    y = st.next_assignment(db, b)
    assert y["set_id"] == x["set_id"]
    assert st.labeller_progress(db, a)["skipped"] == 1


@pytest.mark.parametrize(
    "ranks,status,message",
    [
        ({"c0": 1, "c1": 2, "zz": 3}, 422, "unknown completion id 'zz'"),
        ({"c0": 1, "c1": 2, "c2": 4}, 422, "rank of 'c2' is 4"),
        ({"c0": 1, "c1": 2, "c2": 0}, 422, "rank of 'c2' is 0"),
        ({"c0": 1, "c1": 2, "c2": True}, 422, "rank of 'c2' is True"),
        ({"c0": 1, "c1": 2, "c2": "G"}, 422, "rank of 'c2'"),
        ({"c0": 1}, 422, "completions not ranked: 'c1', 'c2'"),
        ({}, 422, "'ranks' must map"),
    ],
)
def test_bad_submissions_are_refused_and_change_nothing(db, ranks, status, message, make_sets):
    st.create_project(db)
    st.import_sets(db, make_sets(2))
    lid = st.invite(db, "a")["id"]
    a = st.next_assignment(db, lid)
    before = snapshot(db)
    with pytest.raises(st.Rejected, match=message) as e:
        st.submit(db, lid, a["assignment_id"], "submission-1", ranks=ranks)
    assert e.value.status == status
    assert snapshot(db) == before


def test_duplicate_submission_counts_once(db, make_sets):
    st.create_project(db)
    st.import_sets(db, make_sets(2))
    lid = st.invite(db, "a")["id"]
    other = st.invite(db, "b")["id"]
    a = st.next_assignment(db, lid)
    ranks = {"c0": 2, "c1": 1, "c2": "F"}
    assert st.submit(db, lid, a["assignment_id"], "submission-1", ranks=ranks)["status"] == "stored"
    after = snapshot(db)
    assert st.submit(db, lid, a["assignment_id"], "submission-1", ranks=ranks)["status"] == "duplicate"
    with pytest.raises(st.Rejected, match="already submitted") as e:
        st.submit(db, lid, a["assignment_id"], "submission-2", ranks={"c0": 1, "c1": 2, "c2": 3})
    assert e.value.status == 409
    with pytest.raises(st.Rejected, match="no assignment") as e:  # b cannot write a's assignment
        st.submit(db, other, a["assignment_id"], "submission-3", ranks=ranks)
    assert e.value.status == 404
    with pytest.raises(st.Rejected, match="no assignment"):
        st.get_assignment(db, other, a["assignment_id"])
    assert snapshot(db) == after
    _, rankings, _ = st.load_labels(db)
    assert [(r.set_id, r.labeller, r.ranks) for r in rankings] == [("p0", "a", ranks)]


def test_concurrent_retries_of_one_submission_store_it_once(db, make_sets):
    st.create_project(db)
    st.import_sets(db, make_sets(1))
    lid = st.invite(db, "a")["id"]
    a = st.next_assignment(db, lid)
    results, errors = [], []

    def send():
        try:
            results.append(
                st.submit(db, lid, a["assignment_id"], "same-submission", ranks={"c0": 1, "c1": 2, "c2": 3})
            )
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r["status"] for r in results) == ["duplicate"] * 7 + ["stored"]
    assert len(st.load_labels(db)[1]) == 1


def test_thumbs_mode(db, make_sets):
    st.create_project(db, "t", mode="thumbs", per_set=1)
    st.import_sets(db, make_sets(1, k=2), project="t")
    lid = st.invite(db, "a", project="t")["id"]
    a = st.next_assignment(db, lid)
    assert a["mode"] == "thumbs"
    with pytest.raises(st.Rejected, match="send 'thumbs'"):
        st.submit(db, lid, a["assignment_id"], "submission-1", ranks={"c0": 1, "c1": 2})
    with pytest.raises(st.Rejected, match="thumb of 'c1'"):
        st.submit(db, lid, a["assignment_id"], "submission-1", thumbs={"c0": "up", "c1": "meh"})
    st.submit(db, lid, a["assignment_id"], "submission-1", thumbs={"c0": "up", "c1": "down"})
    _, rankings, _ = st.load_labels(db, "t")
    assert rankings[0].thumbs == {"c0": "up", "c1": "down"} and rankings[0].ranks == {}


def test_tie_rate_warning(db, make_sets):
    st.create_project(db, per_set=1)
    st.import_sets(db, make_sets(5))
    lid = st.invite(db, "a")["id"]
    for i in range(5):
        a = st.next_assignment(db, lid)
        ranks = {"c0": 1, "c1": 1 if i == 0 else 2, "c2": 3}
        st.submit(db, lid, a["assignment_id"], f"submission-{i}", ranks=ranks)
        prog = st.labeller_progress(db, lid)
        assert prog["tie_rate"] == pytest.approx(1 / (i + 1), abs=1e-3)
        assert prog["tie_warning"] == (1 / (i + 1) > 0.2)
    assert prog["done"] == prog["total"] == 5


def test_migrations_match_the_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from alignloop.feedback.models import Base

    engine = st.open_store(db)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_bad_urls_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="folder does not exist"):
        st.open_store(f"sqlite:///{tmp_path}/nope/labels.db")
    with pytest.raises(UserError, match="cannot connect"):
        st.open_store("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(UserError, match="no labelling project"):
        st.invite(f"sqlite:///{tmp_path}/empty.db", "a")


def test_import_collapses_repeated_texts_so_labellers_never_see_one_twice(db, make_sets):
    st.create_project(db, per_set=1)
    sets = make_sets(3, k=4)
    sets[0].completions[2].text = sets[0].completions[0].text  # one repeat
    sets[1].completions[1].text = sets[1].completions[2].text = sets[1].completions[3].text  # two more
    assert st.import_sets(db, sets) == {"added": 3, "unchanged": 0, "collapsed": 3}
    assert st.import_sets(db, sets) == {"added": 0, "unchanged": 3, "collapsed": 3}  # same content: unchanged
    lid = st.invite(db, "ada")["id"]
    shown = 0
    while (a := st.next_assignment(db, lid)) is not None:
        texts = [c["text"] for c in a["completions"]]
        assert len(texts) == len(set(texts))  # never the same text twice in a set
        shown += len(texts)
        st.submit(
            db,
            lid,
            a["assignment_id"],
            f"submission-{a['set_id']}",
            ranks={c["id"]: 1 for c in a["completions"]},
        )
    assert shown == 3 * 4 - 3
    loaded, _, _ = st.load_labels(db)
    assert [c.id for c in loaded[0].completions] == ["c0", "c1", "c3"]  # the first id of a text is kept


def test_import_reads_old_convention_sets_as_trls(db, make_sets):
    """Sets posted without the completions' leading space (the old convention) are stored as TRL's."""
    st.create_project(db, per_set=1)
    old = make_sets(2)
    for cs in old:
        for c in cs.completions:
            c.text = c.text.lstrip()
    assert st.import_sets(db, old)["added"] == 2
    loaded, _, _ = st.load_labels(db)
    assert [c.text for c in loaded[0].completions] == [" answer 0.0", " answer 0.1", " answer 0.2"]
    mixed = make_sets(1, prefix="m")
    mixed[0].completions[1].text = "answer glued"  # "?" + "answer": no space, beside spaced ones
    with pytest.raises(UserError, match="mixed text conventions"):
        st.import_sets(db, mixed)


def test_conversational_sets_round_trip_and_json_looking_text_stays_text(db):
    from alignloop.feedback.simulate import simulate, world_panel
    from alignloop.records import CompletionSet

    turns = [
        {"role": "user", "content": "what is a dog ?"},
        {"role": "assistant", "content": "a dog is an animal ."},
        {"role": "user", "content": "what is a cat ?"},
    ]
    comps = [{"id": "c0", "text": "a cat is an animal ."}, {"id": "c1", "text": "clap , clap ."}]
    sets = [
        CompletionSet(prompt_id="chat", prompt=turns, completions=comps),
        CompletionSet(
            prompt_id="text",
            prompt='[{"role": "user", "content": "hi"}]',
            completions=[{**c, "text": " " + c["text"]} for c in comps],  # text: continuations
        ),
    ]
    st.create_project(db, per_set=1)
    assert st.import_sets(db, sets)["added"] == 2
    assert st.import_sets(db, sets)["unchanged"] == 2  # the same conversation is the same set
    loaded, _, _ = st.load_labels(db)
    assert [s.model_dump() for s in loaded] == [s.model_dump() for s in sets]
    # the world's simulated labellers judge a conversation as its chat template renders it
    st.create_project(db, "world", per_set=1)
    dog = [{"role": "user", "content": "what is a dog ?"}]
    answers = [
        {"id": "c0", "text": "stop whining , you fool ."},
        {"id": "c1", "text": "a dog is a furry animal that barks ."},
    ]
    st.import_sets(db, [CompletionSet(prompt_id="dog", prompt=dog, completions=answers)], project="world")
    assert list(simulate(world_panel(["careful"]), db_url=db, project="world").values()) == [1]
    _, rankings, _ = st.load_labels(db, "world")
    assert [r.ranks for r in rankings] == [{"c0": 2, "c1": 1}]

"""API fuzzing of the labelling app from its own OpenAPI schema (schemathesis + Hypothesis).

Every operation in ``/openapi.json`` gets generated requests, some fitting the schema and some
not (bodies, path and query values; Hypothesis's strings include NUL and other control
characters) sent as a labeller, as an admin and with no token, on SQLite and on PostgreSQL. The
app must never answer 5xx, a refusal must be one readable line, and a refused request must
leave every row of the store as it was. Examples are derandomized, so a CI run is reproducible;
their number is kept small (the run takes about a minute a database here).
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from alignloop.feedback import store as st
from alignloop.feedback.app import create_app
from alignloop.records import CompletionSet

EXAMPLES = 20  # per operation and mode; x 3 callers


@pytest.mark.slow
def test_no_5xx_and_no_change_from_a_refused_request(db_url, dump):
    app_db = db_url
    st.create_project(app_db, per_set=2)
    st.import_sets(
        app_db,
        [
            CompletionSet(
                prompt_id=f"p{i}",
                prompt=f"q{i}?",
                completions=[{"id": f"c{j}", "text": f"a{j}"} for j in range(3)],
            )
            for i in range(4)
        ],
    )
    ada = st.invite(app_db, "ada")["token"]
    st.next_assignment(app_db, st.authenticate(app_db, ada).id)  # assignment 1 exists and is hers
    admin = st.create_admin(app_db)["token"]
    callers = {
        "labeller": {"Authorization": f"Bearer {ada}"},
        "admin": {"Authorization": f"Bearer {admin}"},
        "none": {},
    }
    app = create_app(app_db)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[str, dict[int, int]] = {}

    with TestClient(app):
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15

        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz_operation(op, mode, app_db, callers, dump, seen)
    print("\nstatus counts per operation:", json.dumps(seen, sort_keys=True))
    totals: dict[int, int] = {}
    for codes in seen.values():
        for code, n in codes.items():
            totals[code] = totals.get(code, 0) + n
    print(
        f"{db_url.split(':')[0]}: {sum(totals.values())} responses, by status {dict(sorted(totals.items()))}"
    )
    st.close_store(app_db)
    # the fuzzer got past the door: some requests were accepted and some refused for their content
    assert any(200 in codes for codes in seen.values())
    assert any(422 in codes for codes in seen.values())


def fuzz_operation(op, mode: GenerationMode, db: str, callers: dict, dump, seen: dict) -> None:
    """Hypothesis-generated requests for one operation (fitting its schema, or not), each sent
    by every caller."""
    label = f"{op.method.upper()} {op.path} {mode.value}"

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(mode))
    def fuzz(case):
        for who, headers in callers.items():
            before = dump(db)
            r = case.call(headers=headers)
            seen.setdefault(label, {}).setdefault(r.status_code, 0)
            seen[label][r.status_code] += 1
            assert r.status_code < 500, (label, who, r.status_code, r.text[:300], case.as_curl_command())
            if r.status_code >= 400:
                detail = json.loads(r.text)["detail"]
                assert isinstance(detail, str) and "\n" not in detail, (label, who, detail)
                assert dump(db) == before, (label, who, r.status_code, case.as_curl_command())

    try:
        fuzz()
    except Unsatisfiable:  # an operation with no parameters and no body has no invalid request
        assert mode is GenerationMode.NEGATIVE, label

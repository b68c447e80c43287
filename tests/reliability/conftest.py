"""Fixtures for the reliability tests of the labelling app (files test_app_*.py)."""

from __future__ import annotations

from typing import Any

import pytest


def store_dump(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the labelling store, in primary-key order: "nothing changed"
    is ``store_dump(db)`` before == after."""
    from sqlalchemy import select

    from alignloop.feedback import store as st
    from alignloop.feedback.models import Base

    engine = st.open_store(db_url)
    out = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


@pytest.fixture()
def dump():
    """:func:`store_dump` as a fixture (test modules cannot import a conftest by name safely)."""
    return store_dump


@pytest.fixture()
def app_db(tmp_path):
    """A fresh SQLite labelling store (access rules live above the database layer)."""
    from alignloop.feedback import store as st

    url = f"sqlite:///{tmp_path / 'labels.db'}"
    yield url
    st.close_store(url)

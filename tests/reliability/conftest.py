"""Fixtures for the reliability tests of the labelling app (files test_app_*.py)."""

from __future__ import annotations

import pytest


@pytest.fixture()
def app_db(tmp_path):
    """A fresh SQLite labelling store (access rules live above the database layer)."""
    from alignloop.feedback import store as st

    url = f"sqlite:///{tmp_path / 'labels.db'}"
    yield url
    st.close_store(url)

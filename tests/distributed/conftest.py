"""Fixtures for the distributed tests (the launch helpers are in launch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def audit(tmp_path) -> Path:
    return tmp_path / "audit"

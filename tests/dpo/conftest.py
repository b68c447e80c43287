"""Fixtures for tests/dpo."""

from __future__ import annotations

from pathlib import Path

import pytest
from dpo_pairs import good_bad_pairs, write_pairs


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl", good_bad_pairs())

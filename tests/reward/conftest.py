"""Fixtures: synthetic preference files (see reward_synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reward_synthetic import make_sets, pairs_of, write


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return write(tmp_path / "pairs.jsonl", pairs_of(make_sets(160, seed=0)))


@pytest.fixture()
def eval_pairs_file(tmp_path) -> Path:
    return write(tmp_path / "eval_pairs.jsonl", pairs_of(make_sets(40, seed=1)))

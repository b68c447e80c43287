#!/usr/bin/env bash
# Run the test suite (README command 2): lint, then every test, including the slow,
# browser and PostgreSQL ones. Uses the virtual environment from scripts/setup.sh.
# Two workers (pytest-xdist, PYTEST_WORKERS to change; 0 runs in this process): most tests are
# one Python thread driving tiny models, so a 2-core machine runs the suite in well under half
# the serial time (measured 2026-12-04: 15 min against 37 min). Tests isolate what they share:
# temp folders, free ports, a fresh PostgreSQL schema each.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
"$PY" -m ruff check .
"$PY" -m pytest -q --timeout=1800 --durations=40 -n "${PYTEST_WORKERS:-2}" --dist worksteal "$@"

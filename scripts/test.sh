#!/usr/bin/env bash
# Run the test suite (README command 2): lint, then every test, including the slow,
# browser and PostgreSQL ones. Uses the virtual environment from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
"$PY" -m ruff check .
"$PY" -m pytest -q --timeout=1800 --durations=40 "$@"

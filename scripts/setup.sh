#!/usr/bin/env bash
# Set up alignloop in a virtual environment (.venv by default, or $VENV).
#
# torch==2.13.0 is installed first and pinned exactly: on a CPU machine that takes the CPU
# wheel instead of gigabytes of CUDA packages; the package's own torch range accepts it, so
# nothing more is pulled. Usage: bash scripts/setup.sh [extra,...]   (default: web,dev,bench)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${1:-web,dev,bench}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS}]"
echo "alignloop installed in $VENV: $("$VENV/bin/alignloop" --version)"

#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"

#!/usr/bin/env bash
# Set up (idempotent), then run every benchmark file (benchmarks/bench_*.py) in one pytest session.
# Each file writes benchmarks/results/<op>.md and <op>.json, headed with this machine: commit them.
# Extra arguments go to pytest; a -k subset writes results/<op>.partial.* and leaves the full
# results alone. bench_lowrank_linear.py alone takes ~5 min on 2 cores (less once the inductor
# cache is warm); run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m pytest benchmarks/bench_*.py -q --benchmark-columns=min,median,iqr,rounds "$@"

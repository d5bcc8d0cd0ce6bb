#!/usr/bin/env bash
# Set up (idempotent), then run the benchmark suite of the fused kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m pytest benchmarks/bench_lowrank_linear.py -q "$@"

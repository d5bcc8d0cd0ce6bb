#!/usr/bin/env bash
# Set up (idempotent), then run the main job: ROSITA on all-MiniLM-L6-v2 for SST-2 (recipe
# rosita_fast/recipes/minilm-sst2.yaml), 17-40 minutes on 2 CPU cores by CPU (at most 60). The
# report goes to runs/minilm-sst2/report.md and report.png. Extra arguments go to `rosita compress`, e.g.
#   bash scripts/main.sh --data-dir /path/to/SST-2 --output-dir runs/other --overwrite
#   bash scripts/main.sh --resume          (continue a killed run)
#   bash scripts/main.sh --threads 1       (on a machine shared with other jobs)
# The benchmark suite of the kernels moved to scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m rosita_fast compress minilm-sst2 --output-dir runs/minilm-sst2 "$@"

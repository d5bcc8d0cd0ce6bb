"""Backend selection for rosita_fast ops.

Every op in ``rosita_fast.ops`` has up to four implementations:

- ``reference``: plain PyTorch, the ground truth; runs anywhere.
- ``cpp``: the C++ CPU kernels of ``rosita_fast._C`` (OpenMP).
- ``triton``: the Triton kernels of ``rosita_fast.kernels``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (that is how the test suite runs every Triton kernel without a GPU).
- ``cuda``: the CUDA C++ kernels of ``rosita_fast._C_cuda``.

Defaults: CPU tensors use ``cpp`` (``reference`` when the C++ extension is missing, announced once
at import); CUDA tensors use ``triton`` (an op may document per-case exceptions, e.g. a rank the
Triton kernel does not tile). ``use_backend(name)`` forces one backend; forcing one that cannot
run the call raises instead of falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

from rosita_fast._extension import HAS_CPP, HAS_CUDA_EXT, load_error

BACKENDS: tuple[str, ...] = ("reference", "cpp", "triton", "cuda")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rosita_fast_backend", default=None
)


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process at all, or None if it can run somewhere."""
    if name == "reference":
        return None
    if name == "cpp":
        return None if HAS_CPP else f"rosita_fast._C did not load: {load_error('_C')}"
    if name == "triton":
        if not _has_triton():
            return "triton is not installed"
        if not (torch.cuda.is_available() or triton_interpreting()):
            return "Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU tensors"
        return None
    if name == "cuda":
        if not HAS_CUDA_EXT:
            return f"rosita_fast._C_cuda is not built/loaded: {load_error('_C_cuda')}"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """The backends this install can run, in the order of :data:`BACKENDS`."""
    return [name for name in BACKENDS if _unavailable_reason(name) is None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every rosita_fast op inside the ``with`` block to use backend ``name``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a backend this install
    cannot run. Inside the block, an op call that the forced backend cannot serve (wrong device,
    unsupported dtype or shape) raises rather than silently using another backend.
    """
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"rosita_fast backend {name!r} is not available: {reason}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by an enclosing :func:`use_backend`, or None."""
    return _forced.get()


def _device_reason(name: str, device: torch.device) -> str | None:
    if name == "reference":
        return None
    if name == "cpp" and device.type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    if name == "cuda" and device.type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if name == "triton" and device.type != "cuda":
        if device.type != "cpu" or not triton_interpreting():
            return (
                "the triton backend runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1"
            )
    return _unavailable_reason(name)


def select_backend(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``implemented`` lists the backends the op has. A forced backend (see :func:`use_backend`) is
    returned if it can run here and raises otherwise; without one, the per-device default is used.
    """
    forced = _forced.get()
    if forced is not None:
        if forced not in implemented:
            raise NotImplementedError(
                f"rosita_fast.{op} has no {forced!r} backend (it has: {', '.join(implemented)})"
            )
        reason = _device_reason(forced, device)
        if reason is not None:
            raise RuntimeError(f"rosita_fast.{op}: cannot use backend {forced!r}: {reason}")
        return forced
    if device.type == "cpu":
        return "cpp" if "cpp" in implemented and HAS_CPP else "reference"
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            if name in implemented and _device_reason(name, device) is None:
                return name
    return "reference"

"""Test support shared by the kernels and the test suite.

:func:`poison_outputs` makes every output or scratch buffer that a rosita_fast kernel allocates
start as NaN (Triton launchers through :func:`empty`, C++ kernels through their ``empty_output``),
so an element that a kernel forgets to write cannot pass a comparison by luck.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rosita_fast._extension import HAS_CPP

_poison = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, filled with NaN while :func:`poison_outputs` is active."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within the block, kernel-allocated buffers start as NaN instead of uninitialised memory."""
    global _poison
    previous = _poison
    _poison = True
    if HAS_CPP:
        torch.ops.rosita_fast.set_poison_outputs(True)
    try:
        yield
    finally:
        _poison = previous
        if HAS_CPP:
            torch.ops.rosita_fast.set_poison_outputs(previous)

"""Test support: :func:`poison_outputs` makes kernel-allocated buffers start as NaN.

Triton launchers allocate through :func:`rosita_fast._poison.empty`, C++ kernels through their
``empty_output``; inside the block both fill new buffers with NaN, so an element that a kernel
forgets to write cannot pass a comparison by luck. Production code never imports this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rosita_fast import _poison
from rosita_fast._extension import HAS_CPP


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within the block, kernel-allocated buffers start as NaN instead of uninitialised memory."""
    previous = _poison.set_poisoning(True)
    if HAS_CPP:
        torch.ops.rosita_fast.set_poison_outputs(True)
    try:
        yield
    finally:
        _poison.set_poisoning(previous)
        if HAS_CPP:
            torch.ops.rosita_fast.set_poison_outputs(previous)

"""Kernel-allocated buffers, optionally poisoned with NaN.

Every output or scratch buffer a Triton launcher allocates goes through :func:`empty` (the C++
kernels have their own ``empty_output``). While poisoning is on (``rosita_fast.testing.
poison_outputs``), such buffers start as NaN, so an element a kernel forgets to write cannot pass a
comparison by luck. Off (the default) it is exactly ``torch.empty``.
"""

from __future__ import annotations

import torch

_poison = False


def poisoning() -> bool:
    """Whether kernel-allocated buffers currently start as NaN."""
    return _poison


def set_poisoning(enable: bool) -> bool:
    """Turn poisoning on or off; returns the previous setting."""
    global _poison
    previous, _poison = _poison, bool(enable)
    return previous


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, filled with NaN while poisoning is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan"))
    return t

"""The counter-based dropout every fused op with dropout shares.

An element's keep/drop decision is a pure function of ``(seed, row, col)``: a 32-bit hash, so the
forward never stores a mask and the backward regenerates it, and the reference, C++ and Triton
backends drop exactly the same elements (the tests compare them element for element). The C++
form is ``csrc/include/rosita_fast/dropout.h``, the Triton form ``kernels/_common.dropout_keep``;
this module is the ground truth and draws the seeds.

Hash (all arithmetic modulo 2^32): ``mix(x)`` is a 32-bit integer finaliser (xor-shift,
multiply, xor-shift, multiply, xor-shift; multipliers below 2^31 so the reference's int64
products never overflow); ``key = mix(row * 0x61C88647 + seed)``,
``h = mix(key ^ (col * 0x27D4EB2F))``. The element is kept when ``h >> 8`` (a uniform 24-bit
number) is at least ``threshold = round(p * 2^24)``, and a kept element is scaled by
``2^24 / (2^24 - threshold)``, the exact inverse of the keep probability, so the expectation is
unchanged. ``row`` and ``col`` are the op's element coordinates (documented per op), taken modulo
2^32.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_dropout", "draw_seed", "dropout_scale", "dropout_threshold", "keep_mask"]

_M32 = 0xFFFFFFFF
_ROW_MUL = 0x61C88647
_COL_MUL = 0x27D4EB2F
_MIX1 = 0x21F0AAAD
_MIX2 = 0x735A2D97
_ONE = 1 << 24


def check_dropout(dropout_p: object, seed: object, op: str) -> tuple[float, int | None]:
    """``(p, seed)`` validated: ``p`` a real number in [0, 1) (returned as float), ``seed`` None or
    an int (taken modulo 2^32). Raises ValueError/TypeError naming ``op`` otherwise."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{op}: dropout_seed must be None or an int, got "
                            f"{type(seed).__name__}")
        seed = int(seed) & _M32
    return p, seed


def draw_seed() -> int:
    """A fresh 32-bit seed from torch's default (CPU) generator, so ``torch.manual_seed`` makes
    the dropout masks reproducible. The seed is a Python int, not a tensor: the ops take it as a
    plain argument."""
    return int(torch.randint(0, 1 << 32, (), dtype=torch.int64))


def dropout_threshold(p: float) -> int:
    """The 24-bit drop threshold of probability ``p``: an element is dropped when its hash's top
    24 bits are below it."""
    return round(p * _ONE)


def dropout_scale(p: float) -> float:
    """The factor a kept element is multiplied by: the inverse of the exact keep probability."""
    return _ONE / (_ONE - dropout_threshold(p))


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MIX1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & _M32
    return x ^ (x >> 15)


def keep_mask(seed: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """The keep decisions (bool) for the elements at ``rows`` x ``cols``: int64 index tensors that
    broadcast against each other (e.g. ``rows[:, None]`` and ``cols[None, :]``)."""
    rows = rows.to(torch.int64) & _M32
    cols = cols.to(torch.int64) & _M32
    key = _mix((rows * _ROW_MUL + (int(seed) & _M32)) & _M32)
    h = _mix(key ^ ((cols * _COL_MUL) & _M32))
    return (h >> 8) >= dropout_threshold(p)

"""Autocast for rosita_fast ops: cast the floating inputs to the autocast dtype, as torch does for
``linear``/``matmul`` (its "lower precision" op list), before an op checks its dtypes.

The cast happens in the op's Python entry point rather than as a dispatcher autocast rule, so the
no-grad fast path (which skips the dispatcher) and traced graphs see the same casts.
"""

from __future__ import annotations

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_inputs(first: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """``(first, *tensors)`` cast to the autocast dtype of ``first``'s device if autocast is on
    there.

    fp64 tensors and non-tensors pass through unchanged (torch's autocast leaves fp64 alone too).
    """
    tensors = (first, *tensors)
    # is_cpu/is_cuda are plain flags; building a torch.device costs more than the whole check.
    device_type = "cpu" if first.is_cpu else "cuda" if first.is_cuda else first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE else t
        for t in tensors
    )

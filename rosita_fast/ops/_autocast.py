"""Autocast for rosita_fast ops: cast the floating inputs to the autocast dtype, as torch does for
``linear``/``matmul`` (its "lower precision" op list), before an op checks its dtypes.

The cast happens in the op's Python entry point rather than as a dispatcher autocast rule, so the
no-grad fast path (which skips the dispatcher) and traced graphs see the same casts.
"""

from __future__ import annotations

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` cast to the autocast dtype of ``device_type`` if autocast is on there.

    fp64 tensors and non-tensors pass through unchanged (torch's autocast leaves fp64 alone too).
    """
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE else t
        for t in tensors
    )

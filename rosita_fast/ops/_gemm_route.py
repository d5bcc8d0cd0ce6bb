"""Which library runs the fp32 GEMMs of the C++ backend: oneDNN or ATen (MKL in torch's wheels).

Neither is fastest on every CPU (``csrc/include/rosita_fast/onednn_linear.h`` has the
measurements): oneDNN fuses the bias, activation or residual add into the GEMM, ATen's GEMM can be
faster enough to outweigh the extra pass over the output. By default (``"auto"``) the first large
enough fp32 product of a process times both libraries once, on a BERT-layer-sized product with
the thread count of that moment, for forward products and for the backward ones separately, and
keeps oneDNN for a kind only where it is at least 5 % faster. ``"onednn"`` and ``"aten"`` force one
library (small products always go to ATen, and bf16 always to oneDNN: see the header). The
environment variable ``ROSITA_FAST_GEMM`` (``auto``, ``onednn`` or ``aten``) sets the route when
``rosita_fast`` is imported. The route changes only speed and rounding, never what is computed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["GEMM_ROUTES", "gemm_route", "set_gemm_route"]

#: The routes :func:`set_gemm_route` takes, in the order of their codes in the C++ library.
GEMM_ROUTES = ("auto", "onednn", "aten")
ENV = "ROSITA_FAST_GEMM"


def _native() -> bool:
    from rosita_fast._extension import HAS_CPP

    return HAS_CPP and hasattr(torch.ops.rosita_fast, "gemm_route_info")


def set_gemm_route(route: str) -> None:
    """Route the C++ backend's fp32 GEMMs: ``"auto"`` (calibrated once per process), ``"onednn"``
    or ``"aten"``. Raises ``ValueError`` for another name and ``RuntimeError`` without the C++
    extension."""
    if route not in GEMM_ROUTES:
        raise ValueError(f"set_gemm_route: route must be one of {GEMM_ROUTES}, got {route!r}")
    if not _native():
        raise RuntimeError("set_gemm_route: the C++ extension (rosita_fast._C) is not loaded")
    torch.ops.rosita_fast.set_gemm_route(GEMM_ROUTES.index(route))


def gemm_route() -> dict[str, Any] | None:
    """The current route, or ``None`` without the C++ extension: ``setting`` (``auto``,
    ``onednn`` or ``aten``), the library fp32 ``forward`` and ``backward`` products use now
    (``"onednn"`` or ``"aten"``), and ``calibration_us``: the calibration's best time per product
    for each library and kind (it runs on the first call if it has not yet; all zeros where
    torch has no oneDNN)."""
    if not _native():
        return None
    setting, fwd, bwd, f_dnn, f_aten, b_dnn, b_aten = torch.ops.rosita_fast.gemm_route_info()
    return {
        "setting": GEMM_ROUTES[int(setting)],
        "forward": "onednn" if fwd else "aten",
        "backward": "onednn" if bwd else "aten",
        "calibration_us": {"forward_onednn": f_dnn, "forward_aten": f_aten,
                           "backward_onednn": b_dnn, "backward_aten": b_aten},
    }


def apply_env_route() -> None:
    """Apply ``ROSITA_FAST_GEMM`` (called when ``rosita_fast.ops`` is imported)."""
    value = os.environ.get(ENV)
    if value is None or value == "":
        return
    if value not in GEMM_ROUTES:
        raise ValueError(f"{ENV}={value!r}: must be one of {GEMM_ROUTES}")
    if _native():
        set_gemm_route(value)

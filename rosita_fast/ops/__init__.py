"""Every rosita_fast op, one module each, declared once with ``torch.library``.

Each op module (``rosita_fast/ops/<op>.py``) holds the op's plain-PyTorch ground truth, input
checks, fake (meta) function, autograd formula and a table from backend name to implementation;
``rosita_fast.ops._registry`` generates the rest (the custom op, the per-backend native ops'
fakes, dispatch by backend, the no-grad fast path). Backends: ``reference`` (plain PyTorch),
``cpp`` (``rosita_fast._C``), ``triton`` (``rosita_fast.kernels``), ``cuda``
(``rosita_fast._C_cuda``); see ``rosita_fast.backends``.

Public entry points (stable): :func:`lowrank_linear`, :func:`attention`, :func:`linear_act`,
:func:`linear_residual_layernorm` (and :func:`pack_linear_weight`, the prepacked weight the last
two take, with :func:`packing_supported`; :func:`gemm_route`, :func:`set_gemm_route` and
:func:`use_gemm_route` pick the library of their fp32 GEMMs), :func:`embedding_layernorm`,
:func:`kd_logits_loss`, :func:`fused_linear_kd_loss`, :func:`hidden_mse_loss`. :data:`OPS` lists
every public op and its backends.
"""

from __future__ import annotations

import warnings

import torch

from rosita_fast._extension import HAS_CPP, warn_cpp_fallback
from rosita_fast.ops._gemm_route import (
    GEMM_ROUTES,
    gemm_route,
    init_route,
    set_gemm_route,
    use_gemm_route,
)
from rosita_fast.ops._registry import REGISTRY, public_ops
from rosita_fast.ops.attention import attention
from rosita_fast.ops.embedding_layernorm import embedding_layernorm
from rosita_fast.ops.fused_linear_kd_loss import fused_linear_kd_loss
from rosita_fast.ops.hidden_mse_loss import hidden_mse_loss
from rosita_fast.ops.kd_logits_loss import kd_logits_loss
from rosita_fast.ops.linear_act import linear_act, pack_linear_weight, packing_supported
from rosita_fast.ops.linear_residual_layernorm import linear_residual_layernorm
from rosita_fast.ops.lowrank_linear import lowrank_linear

__all__ = [
    "GEMM_ROUTES",
    "OPS",
    "REGISTRY",
    "attention",
    "embedding_layernorm",
    "fused_linear_kd_loss",
    "gemm_route",
    "hidden_mse_loss",
    "kd_logits_loss",
    "linear_act",
    "linear_residual_layernorm",
    "lowrank_linear",
    "pack_linear_weight",
    "packing_supported",
    "set_gemm_route",
    "use_gemm_route",
]

#: The public ops and the backends each one implements.
OPS: dict[str, tuple[str, ...]] = public_ops()

if not HAS_CPP:
    warn_cpp_fallback(list(OPS))

init_route()

# Reference on CUDA would be a silent fallback: say so if neither GPU backend can run.
if torch.cuda.is_available():
    from rosita_fast.backends import available_backends

    if not {"triton", "cuda"} & set(available_backends()):
        warnings.warn(
            "rosita_fast: neither triton nor rosita_fast._C_cuda is usable; ops on CUDA tensors "
            "run on the plain-PyTorch reference backend",
            RuntimeWarning,
            stacklevel=2,
        )

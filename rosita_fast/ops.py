"""Every rosita_fast op, declared once with ``torch.library``.

Each op has a fake (meta) implementation, so ``torch.compile`` and tracing see through it, an
autograd formula, and one dispatching implementation that picks the backend per call
(``rosita_fast.backends``): ``reference`` (plain PyTorch), ``cpp`` (``rosita_fast._C``),
``triton`` (``rosita_fast.kernels``) or ``cuda`` (``rosita_fast._C_cuda``).

Public entry points (stable): :func:`lowrank_linear`.
"""

from __future__ import annotations

import warnings

import torch

from rosita_fast import reference
from rosita_fast._extension import HAS_CPP, HAS_CUDA_EXT, warn_cpp_fallback
from rosita_fast.activations import ACTIVATIONS, check_activation
from rosita_fast.backends import forced_backend, select_backend

__all__ = ["lowrank_linear", "OPS"]

#: The public ops and the backends each one implements.
OPS: dict[str, tuple[str, ...]] = {
    "lowrank_linear": ("reference", "cpp", "triton", "cuda"),
}

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ------------------------------------------------------------------------------------------------
# lowrank_linear
# ------------------------------------------------------------------------------------------------


def _lowrank_backend(x: torch.Tensor, rank: int) -> str:
    backend = select_backend("lowrank_linear", x.device, OPS["lowrank_linear"])
    if backend == "triton" and forced_backend() is None:
        from rosita_fast.kernels.lowrank_linear import MAX_RANK

        # Documented per-case default: the Triton kernel keeps the rank on chip up to MAX_RANK;
        # larger ranks (and fp64) go to the CUDA C++ kernels, which have no such limit.
        if rank > MAX_RANK or x.dtype == torch.float64:
            if not HAS_CUDA_EXT:
                raise RuntimeError(
                    f"lowrank_linear: rank {rank} / {x.dtype} is beyond the Triton kernel and "
                    "rosita_fast._C_cuda is not built; use rosita_fast.use_backend('reference')"
                )
            backend = "cuda"
    return backend


def _lowrank_forward(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    backend = _lowrank_backend(x, u.shape[1])
    if backend == "cpp":
        return torch.ops.rosita_fast.lowrank_linear_cpp(x, u, v, bias, ACTIVATIONS[activation])
    if backend == "cuda":
        return torch.ops.rosita_fast.lowrank_linear_cuda(x, u, v, bias, ACTIVATIONS[activation])
    if backend == "triton":
        from rosita_fast.kernels.lowrank_linear import lowrank_linear_forward

        return lowrank_linear_forward(x, u, v, bias, activation)
    return reference.lowrank_linear_forward(x, u, v, bias, activation)


@torch.library.custom_op("rosita_fast::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    return _lowrank_forward(x, u, v, bias, activation)


@_lowrank_linear_op.register_fake
def _(x, u, v, bias, activation):
    return x.new_empty((*x.shape[:-1], u.shape[0]))


@torch.library.custom_op("rosita_fast::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _lowrank_backend(x, u.shape[1])
    if backend == "cpp":
        dx, du, dv, db = torch.ops.rosita_fast.lowrank_linear_backward_cpp(
            grad, x, u, v, bias, ACTIVATIONS[activation]
        )
    elif backend == "cuda":
        dx, du, dv, db = torch.ops.rosita_fast.lowrank_linear_backward_cuda(
            grad, x, u, v, bias, ACTIVATIONS[activation]
        )
    elif backend == "triton":
        from rosita_fast.kernels.lowrank_linear import lowrank_linear_backward

        dx, du, dv, db = lowrank_linear_backward(grad, x, u, v, bias, activation)
    else:
        dx, du, dv, db = reference.lowrank_linear_backward(grad, x, u, v, bias, activation)
    # custom ops cannot return None: an empty tensor stands for "no bias gradient".
    return dx, du, dv, db if db is not None else x.new_empty(0)


@_lowrank_linear_backward_op.register_fake
def _(grad, x, u, v, bias, activation):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), u.new_empty(u.shape), v.new_empty(v.shape), db


def _lowrank_setup_context(ctx, inputs, output):
    x, u, v, bias, activation = inputs
    ctx.save_for_backward(x, u, v, bias)
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad):
    x, u, v, bias = ctx.saved_tensors
    dx, du, dv, db = _lowrank_linear_backward_op(
        grad.contiguous(), x, u, v, bias if ctx.has_bias else None, ctx.activation
    )
    return dx, du, dv, (db if ctx.has_bias else None), None


_lowrank_linear_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


def _register_backend_fakes() -> None:
    # The per-backend C++/CUDA ops are custom ops too; give them fake kernels for tracing.
    def fwd_fake(x, u, v, bias, activation):
        return x.new_empty((*x.shape[:-1], u.shape[0]))

    def bwd_fake(grad, x, u, v, bias, activation):
        db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
        return x.new_empty(x.shape), u.new_empty(u.shape), v.new_empty(v.shape), db

    for suffix, present in (("cpp", HAS_CPP), ("cuda", HAS_CUDA_EXT)):
        if present:
            torch.library.register_fake(f"rosita_fast::lowrank_linear_{suffix}")(fwd_fake)
            torch.library.register_fake(f"rosita_fast::lowrank_linear_backward_{suffix}")(bwd_fake)


_register_backend_fakes()


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lowrank_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"lowrank_linear: {name} has dtype {t.dtype}; supported: "
            f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
        )
    return t


def lowrank_linear(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """Fused low-rank linear layer: ``act(x @ v.T @ u.T + bias)``.

    Args:
        x: input ``[..., in_features]`` (any leading dimensions, any strides).
        u: ``[out_features, rank]`` factor.
        v: ``[rank, in_features]`` factor.
        bias: optional ``[out_features]``.
        activation: ``"none"``, ``"relu"``, ``"gelu"`` (erf form) or ``"gelu_tanh"``.

    Returns ``[..., out_features]`` in ``x``'s dtype. fp16/bf16 accumulate in fp32. The rank must
    not exceed ``min(in_features, out_features)`` (a larger one only costs more than the dense
    layer).

    Backends (``rosita_fast.use_backend``): ``cpp`` (CPU default; row-blocked, OpenMP, bias and
    activation fused while the block is in cache), ``triton`` (CUDA default for rank <= 256;
    the ``[block_m, rank]`` intermediate stays on chip; backward fuses the row-local chain and
    composes the row reductions du, dv, dbias from matmuls), ``cuda`` (cuBLAS products plus one
    fused bias/activation kernel; CUDA default for rank > 256 and fp64; compiled, not run, on the
    GPU-less development machines) and ``reference`` (plain PyTorch).
    Differentiable in ``x``, ``u``, ``v`` and ``bias``.
    """
    x = _check_tensor("x", x)
    u = _check_tensor("u", u)
    v = _check_tensor("v", v)
    check_activation(activation)
    if x.dim() < 1:
        raise ValueError("lowrank_linear: x must have at least one dimension [..., in_features]")
    if u.dim() != 2:
        raise ValueError(
            f"lowrank_linear: u must be 2-D [out_features, rank], got {tuple(u.shape)}"
        )
    if v.dim() != 2:
        raise ValueError(f"lowrank_linear: v must be 2-D [rank, in_features], got {tuple(v.shape)}")
    if x.shape[-1] != v.shape[1]:
        raise ValueError(
            f"lowrank_linear: x has {x.shape[-1]} features but v is {tuple(v.shape)} "
            "([rank, in_features])"
        )
    if u.shape[1] != v.shape[0]:
        raise ValueError(
            f"lowrank_linear: u is {tuple(u.shape)} and v is {tuple(v.shape)}: u.shape[1] must "
            "equal v.shape[0] (the rank)"
        )
    rank, out_f, in_f = v.shape[0], u.shape[0], v.shape[1]
    if rank > min(in_f, out_f):
        raise ValueError(
            f"lowrank_linear: rank {rank} exceeds min(in_features, out_features) = "
            f"{min(in_f, out_f)}"
        )
    for name, t in (("u", u), ("v", v)):
        if t.dtype != x.dtype:
            raise TypeError(f"lowrank_linear: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"lowrank_linear: {name} is on {t.device} but x is on {x.device}")
    if bias is not None:
        bias = _check_tensor("bias", bias)
        if bias.shape != (out_f,):
            raise ValueError(
                f"lowrank_linear: bias must have shape ({out_f},), got {tuple(bias.shape)}"
            )
        if bias.dtype != x.dtype:
            raise TypeError(f"lowrank_linear: bias has dtype {bias.dtype} but x has {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"lowrank_linear: bias is on {bias.device} but x is on {x.device}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, u, v, bias)
    )
    if not needs_grad and not torch.compiler.is_compiling():
        # Eager inference: the same backend selection and kernels, without the custom-op layer's
        # Python autograd wrapper (~30 us a call, which dominates at a few dozen tokens).
        return _lowrank_forward(x, u, v, bias, activation)
    return _lowrank_linear_op(x, u, v, bias, activation)


if not HAS_CPP:
    warn_cpp_fallback(list(OPS))

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

"""``lowrank_linear``: the fused low-rank linear layer ``act(x @ v^T @ u^T + bias)``.

Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fake
functions, the backend tables (reference, C++ ``csrc/cpu/lowrank_linear.cpp``, Triton
``kernels/lowrank_linear.py``, CUDA ``csrc/cuda/lowrank_linear.cu``) and the autograd formula.
"""

from __future__ import annotations

import math

import torch

from rosita_fast.activations import (
    ACTIVATIONS,
    activation_grad,
    apply_activation,
    check_activation,
)
from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._autocast import autocast_inputs
from rosita_fast.ops._registry import define_op, lazy, native

__all__ = ["lowrank_linear", "reference_backward", "reference_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---- ground truth -------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def reference_forward(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """``act(x @ v^T @ u^T + bias)`` in plain PyTorch (fp16/bf16 accumulate in fp32)."""
    return _reference_train(x, u, v, bias, activation)[0]


def _reference_train(x, u, v, bias, activation):
    # (output, h = x v^T as [rows, rank] in the accumulation dtype)
    h = _acc(x.reshape(-1, x.shape[-1])) @ _acc(v).t()
    z = h @ _acc(u).t()
    if bias is not None:
        z = z + _acc(bias)
    out = apply_activation(z, activation).to(x.dtype)
    return out.view(*x.shape[:-1], u.shape[0]), h


def reference_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, du, dv, dbias)`` of :func:`reference_forward`, written out in the same decomposition
    as the kernels (tests compare it, like every backend, with float64 autograd). ``h`` is the
    forward's ``x @ v^T`` (``[rows, rank]``) if it was kept; else it is recomputed."""
    x2d = _acc(x.reshape(-1, x.shape[-1]))
    g2d = _acc(grad.reshape(-1, u.shape[0]))
    u_, v_ = _acc(u), _acc(v)
    h = x2d @ v_.t() if h is None else _acc(h)
    dz = g2d
    if activation != "none":
        z = h @ u_.t()
        if bias is not None:
            z = z + _acc(bias)
        dz = g2d * activation_grad(z, activation)
    g = dz @ u_
    dx = (g @ v_).to(x.dtype).view(x.shape)
    du = (dz.t() @ h).to(u.dtype)
    dv = (g.t() @ x2d).to(v.dtype)
    dbias = dz.sum(0).to(bias.dtype) if bias is not None else None
    return dx, du, dv, dbias


# ---- fakes --------------------------------------------------------------------------------------
# Shared by the public op and the per-backend native ops (whose activation is an int code: a fake
# only looks at shapes).


def _fake_forward(x, u, v, bias, activation):
    return x.new_empty((*x.shape[:-1], u.shape[0]))


def _fake_train(x, u, v, bias, activation):
    acc = x.dtype if x.dtype == torch.float64 else torch.float32
    rows = math.prod(x.shape[:-1])
    return _fake_forward(x, u, v, bias, activation), x.new_empty((rows, u.shape[1]), dtype=acc)


def _fake_backward(grad, x, u, v, bias, activation, h=None):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), u.new_empty(u.shape), v.new_empty(v.shape), db


# ---- backends -----------------------------------------------------------------------------------


def _encode(x, u, v, bias, activation):
    return x, u, v, bias, ACTIVATIONS[activation]


def _encode_bwd(grad, x, u, v, bias, activation, h=None):
    return grad, x, u, v, bias, ACTIVATIONS[activation], h


def _route_to_cuda(backend: str, x: torch.Tensor, u: torch.Tensor) -> str:
    # Documented per-case default: the Triton kernels keep the rank on chip up to MAX_RANK and
    # take no fp64; such calls go to the CUDA C++ kernels, which have neither limit.
    if backend != "triton" or forced_backend() is not None:
        return backend
    from rosita_fast._extension import HAS_CUDA_EXT
    from rosita_fast.kernels.lowrank_linear import MAX_RANK

    if u.shape[1] > MAX_RANK or x.dtype == torch.float64:
        if not HAS_CUDA_EXT:
            raise RuntimeError(
                f"lowrank_linear: rank {u.shape[1]} / {x.dtype} is beyond the Triton kernel and "
                "rosita_fast._C_cuda is not built; use rosita_fast.use_backend('reference')"
            )
        return "cuda"
    return backend


def _route(backend: str, args: tuple) -> str:
    return _route_to_cuda(backend, args[0], args[1])


def _route_backward(backend: str, args: tuple) -> str:
    return _route_to_cuda(backend, args[1], args[2])


_FWD = define_op(
    "lowrank_linear",
    "(Tensor x, Tensor u, Tensor v, Tensor? bias, str activation) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("lowrank_linear_cpp", _encode),
        "triton": lazy("rosita_fast.kernels.lowrank_linear", "lowrank_linear_forward"),
        "cuda": native("lowrank_linear_cuda", _encode),
    },
    _fake_forward,
    route=_route,
)


def _triton_train(x, u, v, bias, activation):
    # The Triton kernels keep h on chip and their backward recomputes it: what this h feeds is
    # only the reference/C++/CUDA backward, so it is a plain GEMM here.
    from rosita_fast.kernels.lowrank_linear import lowrank_linear_forward

    out = lowrank_linear_forward(x, u, v, bias, activation)
    return out, _acc(x.reshape(-1, x.shape[-1]) @ v.t())


# The training forward: the output and h = x v^T ([rows, rank], small), which the backward then
# reuses instead of recomputing the largest-K product. Used by lowrank_linear when autograd records.
_TRAIN = define_op(
    "lowrank_linear_train",
    "(Tensor x, Tensor u, Tensor v, Tensor? bias, str activation) -> (Tensor, Tensor)",
    {
        "reference": _reference_train,
        "cpp": native("lowrank_linear_train_cpp", _encode),
        "triton": _triton_train,
        "cuda": native("lowrank_linear_train_cuda", _encode),
    },
    _fake_train,
    route=_route,
    public=False,
)


def _bias_grad_as_tensor(backward):
    # Custom ops cannot return None: an empty tensor stands for "no bias gradient".
    def run(grad, x, u, v, bias, activation, h=None):
        dx, du, dv, db = backward(grad, x, u, v, bias, activation, h)
        return dx, du, dv, db if db is not None else x.new_empty(0)

    return run


def _triton_backward(grad, x, u, v, bias, activation, h):
    # The Triton backward recomputes h on chip (its dz kernel), so a kept h is not used.
    from rosita_fast.kernels.lowrank_linear import lowrank_linear_backward

    return lowrank_linear_backward(grad, x, u, v, bias, activation)


_BWD = define_op(
    "lowrank_linear_backward",
    "(Tensor grad, Tensor x, Tensor u, Tensor v, Tensor? bias, str activation, Tensor? h=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _bias_grad_as_tensor(reference_backward),
        "cpp": native("lowrank_linear_backward_cpp", _encode_bwd),
        "triton": _bias_grad_as_tensor(_triton_backward),
        "cuda": native("lowrank_linear_backward_cuda", _encode_bwd),
    },
    _fake_backward,
    route=_route_backward,
    public=False,
)


def _setup_context(ctx, inputs, output):
    x, u, v, bias, activation = inputs
    # The training op's output is (out, h): h is kept for the backward; the plain op keeps none.
    h = output[1] if isinstance(output, tuple) else None
    if h is not None:
        # The extra outputs are non-differentiable and never get a gradient: without this autograd
        # would materialize a zero tensor the size of each one before calling the backward.
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, u, v, bias, h)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.has_h = h is not None
    if h is not None:
        ctx.mark_non_differentiable(h)
    # The backward may run on another thread (CUDA's autograd device threads), where a backend
    # forced around the forward with use_backend is not in effect: carry it over.
    ctx.backend = forced_backend()


def _backward(ctx, grad, *unused_grad_h):
    if grad is None:  # (grads are not materialized: see _setup_context)
        return (None,) * 5
    x, u, v, bias, h = ctx.saved_tensors
    args = (grad, x, u, v, bias if ctx.has_bias else None, ctx.activation,
            h if ctx.has_h else None)
    if ctx.backend is not None and forced_backend() != ctx.backend:
        with use_backend(ctx.backend):
            dx, du, dv, db = _BWD(*args)
    else:
        dx, du, dv, db = _BWD(*args)
    return dx, du, dv, (db if ctx.has_bias else None), None


_FWD.register_autograd(_backward, _setup_context)
_TRAIN.register_autograd(_backward, _setup_context)

# ---- public entry point -------------------------------------------------------------------------


def _check(x, u, v, bias, activation) -> None:
    # The common, valid call is recognised with a handful of attribute reads (this runs on every
    # call of the no-grad fast path); anything else goes through the checks that explain.
    try:
        dtype = x.dtype
        valid = (
            u.dtype is dtype and v.dtype is dtype and dtype in _SUPPORTED_DTYPES
            and activation in ACTIVATIONS and x.dim() >= 1 and u.dim() == 2 and v.dim() == 2
            and x.shape[-1] == v.shape[1] and u.shape[1] == v.shape[0]
            and v.shape[0] <= min(v.shape[1], u.shape[0])
            and (bias is None or (bias.dtype is dtype and bias.dim() == 1
                                  and bias.shape[0] == u.shape[0]))
        )
        if valid:
            # is_cpu is a flag; comparing torch.device objects costs ~0.4 us each.
            if x.is_cpu:
                valid = u.is_cpu and v.is_cpu and (bias is None or bias.is_cpu)
            else:
                valid = u.device == x.device and v.device == x.device and (
                    bias is None or bias.device == x.device
                )
    except (AttributeError, TypeError):
        valid = False
    if not valid:
        _explain(x, u, v, bias, activation)


def _explain(x, u, v, bias, activation) -> None:
    """Raise the error that says what is wrong with a call :func:`_check` did not accept."""
    for name, t in (("x", x), ("u", u), ("v", v), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"lowrank_linear: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"lowrank_linear: {name} has dtype {t.dtype}; supported: "
                f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
            )
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
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(
            f"lowrank_linear: bias must have shape ({out_f},), got {tuple(bias.shape)}"
        )
    for name, t in (("u", u), ("v", v), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"lowrank_linear: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"lowrank_linear: {name} is on {t.device} but x is on {x.device}")

    raise AssertionError("lowrank_linear: a call failed the fast check but no explaining one")

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
    layer). Under ``torch.autocast`` the floating inputs (fp64 excepted) are cast to the autocast
    dtype first, like ``torch.nn.functional.linear``.

    Backends (``rosita_fast.use_backend``): ``cpp`` (CPU default; with an activation, row-blocked
    with bias and activation fused while the block is in cache; without one, two BLAS products
    with the bias folded into the second, the same computation as eager), ``triton`` (CUDA
    default for rank <= 256; the ``[block_m, rank]`` intermediate stays on chip), ``cuda`` (cuBLAS
    products plus one fused bias/activation kernel; CUDA default for rank > 256 and fp64;
    compiled, not run, on the GPU-less development machines) and ``reference`` (plain PyTorch).
    Differentiable in ``x``, ``u``, ``v`` and ``bias``. While autograd records, the forward also
    keeps ``h = x @ v.T`` (``[rows, rank]``, fp32 for fp16/bf16 inputs: small next to the output)
    so that the backward need not recompute it (the C++ and CUDA backends; the Triton backward
    recomputes it on chip).
    """
    if isinstance(x, torch.Tensor):
        x, u, v, bias = autocast_inputs(x, u, v, bias)
    _check(x, u, v, bias, activation)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or u.requires_grad or v.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _TRAIN(x, u, v, bias, activation)[0]
    return _FWD.call(x, u, v, bias, activation)

"""``linear_residual_layernorm``: ``LayerNorm(dropout(x @ weight^T + bias) + residual)``, the end of
BERT's SelfOutput and Output blocks (dense, dropout, residual add, LayerNorm).

Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fake
functions, the backend tables (reference, C++ ``csrc/cpu/linear_residual_layernorm.cpp``) and the
autograd formula. The packed weight comes from ``rosita_fast.ops.pack_linear_weight``.

Dropout (``dropout_p > 0``, training) is the counter-based dropout of ``rosita_fast.ops._dropout``:
the element at (row, column) of the dense output ``[rows, out_features]`` is kept or dropped by a
hash of (seed, row, column), so no mask is stored and the backward regenerates it; every backend
drops the same elements for the same seed.
"""

from __future__ import annotations

import math

import torch

from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._autocast import autocast_inputs
from rosita_fast.ops._dropout import check_dropout, draw_seed, dropout_scale, keep_mask
from rosita_fast.ops._registry import define_op, lazy, native
from rosita_fast.ops.linear_act import check_packed, gemm_dtype

__all__ = ["linear_residual_layernorm", "reference_backward", "reference_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---- ground truth -------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _pre_norm(x, weight, bias, residual, dropout_p=0.0, seed=0):
    # y = dropout(x weight^T + bias) + residual as [rows, out_features] in the accumulation dtype.
    # Under dropout the dense output is rounded to the GEMM dtype first, as the kernels' GEMM
    # leaves it before the masked residual pass.
    n = weight.shape[0]
    y = _acc(x.reshape(-1, x.shape[-1])) @ _acc(weight).t()
    if bias is not None:
        y = y + _acc(bias)
    if dropout_p > 0:
        y = _acc(y.to(gemm_dtype(x.dtype))) * _dropout_factor(y.shape, dropout_p, seed, y)
    return y + _acc(residual.reshape(-1, n))


def _dropout_factor(shape, p, seed, like):
    # mask * scale over the [rows, n] dense output (row, column coordinates), in like's dtype.
    rows, n = shape
    keep = keep_mask(seed, torch.arange(rows, device=like.device)[:, None],
                     torch.arange(n, device=like.device)[None, :], p)
    return keep.to(like.dtype) * dropout_scale(p)


def _normalize(y, ln_weight, ln_bias, eps):
    # (LayerNorm of the rows of y, their mean, their 1/std), statistics in y's dtype (fp32/fp64).
    mean = y.mean(-1)
    var = (y - mean[:, None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    xhat = (y - mean[:, None]) * rstd[:, None]
    return xhat * _acc(ln_weight) + _acc(ln_bias), mean, rstd


def reference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(x @ weight^T + bias + residual)`` over the last dimension, in plain PyTorch
    (fp16/bf16 accumulate in fp32; the pre-norm sum is rounded to the GEMM dtype, bf16 for bf16,
    as the product leaves it; statistics in fp32). ``packed`` is ignored (it is the C++ backend's
    form of ``weight``)."""
    return _reference_train(x, weight, bias, residual, ln_weight, ln_bias, eps)[0]


def _reference_train(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p=0.0, seed=0):
    # (output, y = dropout(x weight^T + bias) + residual as [rows, n] in the GEMM dtype, mean,
    # rstd [rows] in the accumulation dtype, computed from that y: the backward's replay is then
    # exact)
    y = _pre_norm(x, weight, bias, residual, dropout_p, seed).to(gemm_dtype(x.dtype))
    out, mean, rstd = _normalize(_acc(y), ln_weight, ln_bias, eps)
    return out.to(x.dtype).view(residual.shape), y, mean, rstd


def reference_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    y: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """``(dx, dweight, dbias, dresidual, dln_weight, dln_bias)`` of :func:`reference_forward`,
    written out in the kernels' decomposition: per row ``xhat = (y - mean) * rstd``,
    ``g' = grad * ln_weight``, ``dy = rstd * (g' - mean(g') - xhat * mean(g' * xhat))`` (which is
    ``dresidual`` and the GEMM output's gradient), then ``dx = dy @ weight``,
    ``dweight = dy^T @ x``, column sums for ``dbias``, ``dln_weight``, ``dln_bias``. ``y``,
    ``mean`` and ``rstd`` are the training forward's if it kept them; else they are recomputed
    (from ``residual``, which is then required). ``dbias`` is None without a bias. With
    ``dropout_p > 0`` (the training forward's ``dropout_p`` and ``seed``) ``dy`` is the residual's
    gradient and the dense output's is ``dz = dy * mask * scale``, which the two products and
    ``dbias`` take."""
    n = weight.shape[0]
    x2d = _acc(x.reshape(-1, x.shape[-1]))
    g = _acc(grad.reshape(-1, n))
    if y is None or mean is None or rstd is None:
        if residual is None:
            raise ValueError("linear_residual_layernorm backward: needs y, mean and rstd or "
                             "residual")
        _, y, mean, rstd = _reference_train(x, weight, bias, residual, ln_weight, ln_bias, eps,
                                            dropout_p, seed)
    y, mean, rstd = _acc(y.reshape(-1, n)), _acc(mean.reshape(-1)), _acc(rstd.reshape(-1))
    xhat = (y - mean[:, None]) * rstd[:, None]
    gg = g * _acc(ln_weight)
    a = gg.mean(-1, keepdim=True)
    b = (gg * xhat).mean(-1, keepdim=True)
    dy = rstd[:, None] * (gg - a - xhat * b)
    dz = dy * _dropout_factor(dy.shape, dropout_p, seed, dy) if dropout_p > 0 else dy
    w = _acc(weight)
    dx = (dz @ w).to(x.dtype).view(x.shape)
    dweight = (dz.t() @ x2d).to(weight.dtype)
    dbias = dz.sum(0).to(bias.dtype) if bias is not None else None
    dresidual = dy.to(x.dtype).view(*x.shape[:-1], n)
    dln_weight = (g * xhat).sum(0).to(ln_weight.dtype)
    dln_bias = g.sum(0).to(ln_bias.dtype)
    return dx, dweight, dbias, dresidual, dln_weight, dln_bias


# ---- fakes --------------------------------------------------------------------------------------


def _fake_forward(x, weight, bias, residual, ln_weight, ln_bias, eps, packed=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fake_train(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p=0.0, seed=0):
    acc = x.dtype if x.dtype == torch.float64 else torch.float32
    rows, n = math.prod(x.shape[:-1]), weight.shape[0]
    return (_fake_forward(x, weight, bias, residual, ln_weight, ln_bias, eps),
            x.new_empty((rows, n), dtype=gemm_dtype(x.dtype)), x.new_empty((rows,), dtype=acc),
            x.new_empty((rows,), dtype=acc))


def _fake_backward(grad, x, weight, bias, residual, ln_weight, ln_bias, eps, y=None, mean=None,
                   rstd=None, dropout_p=0.0, seed=0):
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), db,
            x.new_empty((*x.shape[:-1], weight.shape[0])), ln_weight.new_empty(ln_weight.shape),
            ln_bias.new_empty(ln_bias.shape))


# ---- backends -----------------------------------------------------------------------------------

_TRITON = "rosita_fast.kernels.linear_residual_layernorm"

_FWD = define_op(
    "linear_residual_layernorm",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, "
    "float eps, Tensor? packed=None) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("linear_residual_layernorm_cpp"),
        "triton": lazy(_TRITON, "linear_residual_layernorm_forward"),
    },
    _fake_forward,
)

# The training forward: the output, y = dropout(x weight^T + bias) + residual ([rows, n] in the
# GEMM dtype: x's, fp32 for fp16) and each row's mean and 1/std ([rows], fp32; fp64 for fp64).
# With them the backward replays the forward's normalized rows exactly without the GEMM; they cost
# as much memory as keeping the normalized rows would (plus 8 bytes a row), where keeping only the
# output would cost the backward a third GEMM. Used by linear_residual_layernorm while autograd
# records, and for every call with dropout (the inference op has none).
_TRAIN = define_op(
    "linear_residual_layernorm_train",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, "
    "float eps, float dropout_p=0.0, int seed=0) -> (Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _reference_train,
        "cpp": native("linear_residual_layernorm_train_cpp"),
        "triton": lazy(_TRITON, "linear_residual_layernorm_train"),
    },
    _fake_train,
    public=False,
)


def _bias_grad_as_tensor(*args):
    # Custom ops cannot return None: an empty tensor stands for "no bias gradient".
    dx, dw, db, dres, dlw, dlb = reference_backward(*args)
    return dx, dw, db if db is not None else args[1].new_empty(0), dres, dlw, dlb


_BWD = define_op(
    "linear_residual_layernorm_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor ln_weight, "
    "Tensor ln_bias, float eps, Tensor? y=None, Tensor? mean=None, Tensor? rstd=None, "
    "float dropout_p=0.0, int seed=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _bias_grad_as_tensor,
        "cpp": native("linear_residual_layernorm_backward_cpp"),
        "triton": lazy(_TRITON, "linear_residual_layernorm_backward"),
    },
    _fake_backward,
    public=False,
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, ln_weight, ln_bias, eps = inputs[:7]
    # The training op's output is (out, y, mean, rstd), kept for the backward; the residual is then
    # not needed (nor kept alive). The plain op keeps the residual and the backward recomputes.
    if isinstance(output, tuple):
        _, y, mean, rstd = output
        ctx.dropout = (inputs[7], inputs[8]) if len(inputs) > 8 else (0.0, 0)
        ctx.mark_non_differentiable(y, mean, rstd)
        # The extra outputs are non-differentiable and never get a gradient: without this autograd
        # would materialize a zero tensor the size of each one before calling the backward.
        ctx.set_materialize_grads(False)
        residual = None
    else:
        y = mean = rstd = None
        ctx.dropout = (0.0, 0)
    ctx.save_for_backward(x, weight, bias, residual, ln_weight, ln_bias, y, mean, rstd)
    ctx.present = tuple(t is not None for t in (bias, residual, y))
    ctx.eps = eps
    ctx.n_inputs = len(inputs)
    # The backward may run on another thread, where a backend forced around the forward with
    # use_backend is not in effect: carry it over.
    ctx.backend = forced_backend()


def _backward(ctx, grad, *unused_grads):
    if grad is None:  # (grads are not materialized: see _setup_context)
        return (None,) * ctx.n_inputs
    x, weight, bias, residual, ln_weight, ln_bias, y, mean, rstd = ctx.saved_tensors
    has_bias, has_residual, has_y = ctx.present
    args = (grad, x, weight, bias if has_bias else None, residual if has_residual else None,
            ln_weight, ln_bias, ctx.eps, *((y, mean, rstd) if has_y else (None, None, None)),
            *ctx.dropout)
    if ctx.backend is not None and forced_backend() != ctx.backend:
        with use_backend(ctx.backend):
            dx, dw, db, dres, dlw, dlb = _BWD(*args)
    else:
        dx, dw, db, dres, dlw, dlb = _BWD(*args)
    grads = (dx, dw, db if has_bias else None, dres, dlw, dlb)
    return grads + (None,) * (ctx.n_inputs - len(grads))


_FWD.register_autograd(_backward, _setup_context)
_TRAIN.register_autograd(_backward, _setup_context)

# ---- public entry point -------------------------------------------------------------------------


def _check(x, weight, bias, residual, ln_weight, ln_bias, eps, packed) -> None:
    # The common, valid call is recognised with a handful of attribute reads (this runs on every
    # call of the no-grad fast path); anything else goes through the checks that explain.
    try:
        dtype = x.dtype
        n = weight.shape[0]
        valid = (
            weight.dtype is dtype and residual.dtype is dtype and ln_weight.dtype is dtype
            and ln_bias.dtype is dtype and dtype in _SUPPORTED_DTYPES
            and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and n > 0
            and residual.shape[:-1] == x.shape[:-1] and residual.shape[-1] == n
            and ln_weight.shape == (n,) and ln_bias.shape == (n,)
            and (bias is None or (bias.dtype is dtype and bias.shape == (n,)))
            and isinstance(eps, float) and eps >= 0.0
            and (packed is None or (packed.is_mkldnn and packed.dtype is gemm_dtype(dtype)
                                    and packed.shape == weight.shape))
        )
        if valid:
            # is_cpu is a flag; comparing torch.device objects costs ~0.4 us each.
            if x.is_cpu:
                valid = (weight.is_cpu and residual.is_cpu and ln_weight.is_cpu and ln_bias.is_cpu
                         and (bias is None or bias.is_cpu))
            else:
                dev = x.device
                valid = packed is None and all(
                    t.device == dev for t in (weight, residual, ln_weight, ln_bias)
                    if t is not None) and (bias is None or bias.device == dev)
    except (AttributeError, TypeError):
        valid = False
    if not valid:
        _explain(x, weight, bias, residual, ln_weight, ln_bias, eps, packed)


def _explain(x, weight, bias, residual, ln_weight, ln_bias, eps, packed) -> None:
    """Raise the error that says what is wrong with a call :func:`_check` did not accept."""
    op = "linear_residual_layernorm"
    named = (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
             ("ln_weight", ln_weight), ("ln_bias", ln_bias))
    for name, t in named:
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; supported: "
                f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
            )
    if not isinstance(eps, float) or not eps >= 0.0:
        raise ValueError(f"{op}: eps must be a float >= 0, got {eps!r}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    if weight.dim() != 2:
        raise ValueError(
            f"{op}: weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x has {x.shape[-1]} features but weight is {tuple(weight.shape)} "
            "([out_features, in_features])"
        )
    n = weight.shape[0]
    if n == 0:
        raise ValueError(f"{op}: LayerNorm over 0 features (weight has 0 output features)")
    expected = (*x.shape[:-1], n)
    if tuple(residual.shape) != expected:
        raise ValueError(
            f"{op}: residual must have shape {expected} (x's leading dimensions, out_features), "
            f"got {tuple(residual.shape)}"
        )
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
    for name, t in named[1:]:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    check_packed(packed, weight, op)
    raise AssertionError(f"{op}: a call failed the fast check but no explaining one")


def linear_residual_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    packed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """``LayerNorm(dropout(x @ weight.T + bias) + residual)`` over the last dimension, with affine
    ``ln_weight``/``ln_bias``: BERT's SelfOutput/Output (dense, dropout, residual, LayerNorm).

    Args:
        x: input ``[..., in_features]`` (any leading dimensions, any strides).
        weight: ``[out_features, in_features]``; bias: optional ``[out_features]``.
        residual: ``[..., out_features]`` with ``x``'s leading dimensions (any strides).
        ln_weight, ln_bias: the LayerNorm's affine parameters, ``[out_features]``.
        eps: the LayerNorm's epsilon (a float; BERT's is 1e-12).
        packed: None, or ``pack_linear_weight(weight)``: the C++ backend's prepacked copy of
            ``weight``, an inference-only hint the caller guarantees is current (only its shape
            and dtype are checked). Only the C++ backend uses it; the reference ignores it, and so
            does a call that records autograd, is traced by ``torch.compile``, or whose weight
            autocast casts.
        dropout_p: the probability of dropping an element of the dense output ``x @ weight.T +
            bias`` (kept ones are scaled by the inverse keep probability), in [0, 1). Applied
            whenever it is > 0, like ``F.dropout(..., training=True)``: pass 0 at inference.
            The mask is a hash of (seed, row, column) over the dense output seen as
            ``[rows, out_features]`` (``rosita_fast.ops._dropout``): not stored, regenerated by
            the backward, the same in every backend.
        dropout_seed: the mask's seed (an int, modulo 2^32); None draws one from torch's default
            generator, so ``torch.manual_seed`` makes runs reproducible.

    Returns ``[..., out_features]`` in ``x``'s dtype; fp16/bf16 accumulate in fp32 and the
    LayerNorm statistics are fp32 (fp64 for fp64). Under ``torch.autocast`` the floating inputs
    (fp64 excepted) are cast to the autocast dtype first.

    Backends (``rosita_fast.use_backend``): ``cpp`` (CPU default: one oneDNN GEMM with bias and
    residual add in its epilogue, then a LayerNorm pass over each row while it is in cache,
    parallel over rows; fp16 products run in fp32, fp64 ones in at::addmm) and ``reference``
    (plain PyTorch). Differentiable in every tensor argument. While autograd records, the forward
    keeps the pre-LayerNorm rows ``y`` (the size of the output, in x's dtype; fp32 for fp16) and
    each row's mean and 1/std (fp32), so the backward needs no GEMM beyond its two (dx, dweight).
    ``triton`` (CUDA default) runs the GEMM with the epilogue and a LayerNorm row kernel. With
    dropout the GEMM's epilogue applies the mask before the residual add (C++: the bias only in
    oneDNN's epilogue, then one pass per row for mask, scale and residual).
    """
    if isinstance(x, torch.Tensor):
        cast = autocast_inputs(x, weight, bias, residual, ln_weight, ln_bias)
        if cast[1] is not weight:
            packed = None  # autocast changed the weight: its packed copy is not of it
        x, weight, bias, residual, ln_weight, ln_bias = cast
    if isinstance(eps, int) and not isinstance(eps, bool):
        eps = float(eps)
    if dropout_p != 0.0 or dropout_seed is not None:
        dropout_p, dropout_seed = check_dropout(dropout_p, dropout_seed,
                                                "linear_residual_layernorm")
    if packed is not None and torch.compiler.is_compiling():
        packed = None  # an MKLDNN tensor has no fake (meta) form: traced graphs take the weight
    _check(x, weight, bias, residual, ln_weight, ln_bias, eps, packed)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or residual.requires_grad
        or ln_weight.requires_grad or ln_bias.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if dropout_p > 0:
        seed = draw_seed() if dropout_seed is None else dropout_seed
        return _TRAIN(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p, seed)[0]
    if needs_grad:
        return _TRAIN(x, weight, bias, residual, ln_weight, ln_bias, eps)[0]
    return _FWD.call(x, weight, bias, residual, ln_weight, ln_bias, eps, packed)

"""``attention``: multi-head scaled dot-product attention with a key padding mask, a score bias and
attention-probability dropout.

``out = dropout(softmax(scale * q k^T + bias, masked keys excluded)) v``, per batch and head.

Everything about the op lives here: the plain-PyTorch ground truth, the input checks, the fake
functions, the backend tables (reference, C++ ``csrc/cpu/attention.cpp``, Triton
``kernels/attention.py``) and the autograd formula (flash-attention style: the training forward
keeps the row log-sum-exp of the scores, the backward recomputes the probabilities from it).

Dropout (``dropout_p > 0``, training) is the counter-based dropout of ``rosita_fast.ops._dropout``:
the probability of (batch b, head h, query i, key j) is kept or dropped by a hash of (seed, row
``(b * H + h) * Lq + i``, column ``j``), so no mask is stored, the backward regenerates it, and
every backend drops the same elements for the same seed. ``lse`` stays the undropped softmax's.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from rosita_fast.backends import forced_backend, use_backend
from rosita_fast.ops._autocast import autocast_inputs
from rosita_fast.ops._dropout import check_dropout, draw_seed, dropout_scale, keep_mask
from rosita_fast.ops._registry import define_op, lazy, native

__all__ = ["attention", "reference_backward", "reference_forward"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MIN_HEAD, _MAX_HEAD = 8, 128
_NEG_INF = float("-inf")

# ---- ground truth -------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 accumulate in fp32, like the kernels.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seq_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` ([B, H, L, D]) with the memory layout of every backend's outputs: [B, L, H, D]."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _scores(q, k, mask, bias, scale):
    # scale * q k^T + bias, masked keys at -inf; in the accumulation dtype.
    s = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + _acc(bias)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], _NEG_INF)
    return s


def _dropout_factor(s: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``Z = keep * scale`` (0 where dropped) on the ``[B, H, Lq, Lk]`` grid of the scores ``s``,
    in s's dtype: row ``(b * H + h) * Lq + i``, column ``j``."""
    b, h, lq, lk = s.shape
    rows = torch.arange(b * h * lq, device=s.device).view(b, h, lq, 1)
    cols = torch.arange(lk, device=s.device)
    return keep_mask(seed, rows, cols, p).to(s.dtype) * dropout_scale(p)


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``dropout(softmax(scale * q k^T + bias, masked keys excluded)) v`` in plain PyTorch
    (materializes the ``[B, H, Lq, Lk]`` scores; fp16/bf16 accumulate in fp32). A row whose scores
    are all ``-inf`` (every key masked) gives zeros. The output has the kernels' memory layout.
    ``dropout_p``, ``seed``: the dropout (see the module docstring; ``dropout_p = 0``: none),
    differentiable through autograd like the rest."""
    return _reference_train(q, k, v, mask, bias, scale, dropout_p, seed)[0]


def _reference_train(q, k, v, mask, bias, scale, dropout_p=0.0, seed=0):
    # (output, lse): lse = log-sum-exp of the (undropped) scores per row, -inf for a row with no
    # key left.
    s = _scores(q, k, mask, bias, scale)
    # The max only stabilizes exp: detached, it leaves the (exact) gradient alone.
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0:
        p = p * _dropout_factor(p, dropout_p, seed)
    out = torch.matmul(p, _acc(v)).to(q.dtype)
    lse = (m + torch.log(denom)).squeeze(-1)
    return _seq_major(out), lse


def reference_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    bias_needs_grad: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dbias_full)`` of :func:`reference_forward`, written out in the kernels'
    decomposition: ``delta = rowsum(dO * O)``, ``P = exp(S - lse)``, ``dV = (P Z)^T dO``,
    ``dP = (dO V^T) Z``, ``dS = P (dP - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``, where
    ``Z`` is the dropout's ``keep * scale`` for the forward's ``dropout_p`` and ``seed`` (1 without
    dropout). ``dbias_full`` is ``dS`` at the full ``[B, H, Lq, Lk]`` shape in the accumulation
    dtype (fp32, fp64 for fp64 inputs), or None unless ``bias_needs_grad``; the op reduces it to
    bias's shape.
    """
    s = _scores(q, k, mask, bias, scale)
    lse_ = lse.unsqueeze(-1).to(s.dtype)
    # A row with no key left (lse = -inf) has all scores at -inf: P is 0 there.
    p = torch.exp(s - torch.where(torch.isneginf(lse_), torch.zeros_like(lse_), lse_))
    do = _acc(grad)
    delta = (do * _acc(out)).sum(-1, keepdim=True)
    dp = torch.matmul(do, _acc(v).transpose(-1, -2))
    if dropout_p > 0:
        z = _dropout_factor(p, dropout_p, seed)
        dv = torch.matmul((p * z).transpose(-1, -2), do)
        dp = dp * z
    else:
        dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, _acc(k)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), _acc(q)) * scale
    dbias = ds if bias is not None and bias_needs_grad else None
    return (
        _seq_major(dq.to(q.dtype)),
        _seq_major(dk.to(k.dtype)),
        _seq_major(dv.to(v.dtype)),
        dbias,
    )


# ---- fakes --------------------------------------------------------------------------------------
# Shared by the public ops and the per-backend native ops. Outputs are [B, H, L, D] views of
# [B, L, H, D] memory, so the caller's out.transpose(1, 2).reshape(B, L, H * D) is free.


def _seq_major_empty(t: torch.Tensor, shape) -> torch.Tensor:
    b, h, seq, d = shape
    return t.new_empty((b, seq, h, d)).transpose(1, 2)


def _fake_forward(q, k, v, mask, bias, scale):
    return _seq_major_empty(q, q.shape)


def _fake_train(q, k, v, mask, bias, scale, dropout_p=0.0, seed=0):
    b, h, lq, _ = q.shape
    return _fake_forward(q, k, v, mask, bias, scale), q.new_empty(
        (b, h, lq), dtype=_acc_dtype(q.dtype)
    )


def _fake_backward(grad, q, k, v, out, lse, mask, bias, scale, bias_needs_grad, dropout_p=0.0,
                   seed=0):
    b, h, lq, _ = q.shape
    if bias is not None and bias_needs_grad:
        db = q.new_empty((b, h, lq, k.shape[2]), dtype=_acc_dtype(q.dtype))
    else:
        db = q.new_empty(0)
    return (_seq_major_empty(q, q.shape), _seq_major_empty(k, k.shape),
            _seq_major_empty(v, v.shape), db)


# ---- backends -----------------------------------------------------------------------------------

_SCHEMA_ARGS = "Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? bias, float scale"

_FWD = define_op(
    "attention",
    f"({_SCHEMA_ARGS}) -> Tensor",
    {
        "reference": reference_forward,
        "cpp": native("attention_cpp"),
        "triton": lazy("rosita_fast.kernels.attention", "attention_forward"),
    },
    _fake_forward,
)

# The training forward: the output and lse ([B, H, Lq], fp32; fp64 for fp64 inputs; -inf for a
# row with no key left; of the undropped softmax), from which the backward recomputes the
# probabilities. Used by attention when autograd records, and for every call with dropout (the
# inference op has none). seed: the dropout's, taken modulo 2^32.
_TRAIN = define_op(
    "attention_train",
    f"({_SCHEMA_ARGS}, float dropout_p=0.0, int seed=0) -> (Tensor, Tensor)",
    {
        "reference": _reference_train,
        "cpp": native("attention_train_cpp"),
        "triton": lazy("rosita_fast.kernels.attention", "attention_train"),
    },
    _fake_train,
    public=False,
)


def _bias_grad_as_tensor(backward):
    # Custom ops cannot return None: an empty tensor stands for "no bias gradient".
    def run(grad, q, *args):
        dq, dk, dv, db = backward(grad, q, *args)
        return dq, dk, dv, db if db is not None else q.new_empty(0)

    return run


_BWD = define_op(
    "attention_backward",
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
    "Tensor? bias, float scale, bool bias_needs_grad, float dropout_p=0.0, int seed=0) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    {
        "reference": _bias_grad_as_tensor(reference_backward),
        "cpp": native("attention_backward_cpp"),
        "triton": _bias_grad_as_tensor(
            lazy("rosita_fast.kernels.attention", "attention_backward")
        ),
    },
    _fake_backward,
    public=False,
)


def _reduce_bias_grad(dbias_full: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The gradient of ``bias`` from the one at the full ``[B, H, Lq, Lk]`` score shape: summed
    over the dimensions bias broadcasts along, in bias's dtype."""
    g = dbias_full
    lead = g.dim() - bias.dim()  # a bias with fewer dims broadcasts right-aligned
    if lead > 0:
        g = g.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(bias.shape) if n == 1 and g.shape[i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g.to(bias.dtype)


def _setup_context(ctx, inputs, output):
    # The plain op's inputs end at scale; the training op's add dropout_p and seed, which the
    # backward needs to regenerate the dropout mask.
    q, k, v, mask, bias, scale, *dropout = inputs
    ctx.num_inputs = len(inputs)
    ctx.dropout_p, ctx.seed = dropout if dropout else (0.0, 0)
    # The training op's output is (out, lse): lse is kept for the backward. The plain op (called
    # directly while autograd records) keeps none; its backward recomputes it.
    out, lse = output if isinstance(output, tuple) else (output, None)
    if lse is not None:
        # The extra outputs are non-differentiable and never get a gradient: without this autograd
        # would materialize a zero tensor the size of each one before calling the backward.
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, mask, bias)
    ctx.scale = scale
    ctx.has_lse = lse is not None
    ctx.has_mask = mask is not None
    ctx.has_bias = bias is not None
    if lse is not None:
        ctx.mark_non_differentiable(lse)
    # The backward may run on another thread (CUDA's autograd device threads), where a backend
    # forced around the forward with use_backend is not in effect: carry it over.
    ctx.backend = forced_backend()


def _backward(ctx, grad, *unused_grad_lse):
    if grad is None:  # (grads are not materialized: see _setup_context)
        return (None,) * ctx.num_inputs
    q, k, v, out, lse, mask, bias = ctx.saved_tensors
    mask = mask if ctx.has_mask else None
    bias = bias if ctx.has_bias else None
    bias_needs_grad = bias is not None and ctx.needs_input_grad[4]
    carry = ctx.backend is not None and forced_backend() != ctx.backend
    with use_backend(ctx.backend) if carry else contextlib.nullcontext():
        if not ctx.has_lse:
            lse = _TRAIN(q, k, v, mask, bias, ctx.scale)[1]
        dq, dk, dv, db = _BWD(grad, q, k, v, out, lse, mask, bias, ctx.scale, bias_needs_grad,
                              ctx.dropout_p, ctx.seed)
    dbias = _reduce_bias_grad(db, bias) if bias_needs_grad else None
    return (dq, dk, dv, None, dbias) + (None,) * (ctx.num_inputs - 5)


_FWD.register_autograd(_backward, _setup_context)
_TRAIN.register_autograd(_backward, _setup_context)

# ---- public entry point -------------------------------------------------------------------------


def _bias_fits(shape, full) -> bool:
    return len(shape) == 4 and all(n == 1 or n == f for n, f in zip(shape, full, strict=True))


def _check(q, k, v, mask, bias, scale) -> None:
    # The common, valid call is recognised with a handful of attribute reads (this runs on every
    # call of the no-grad fast path); anything else goes through the checks that explain.
    try:
        dtype = q.dtype
        valid = (
            k.dtype is dtype and v.dtype is dtype and dtype in _SUPPORTED_DTYPES
            and q.dim() == 4 and k.dim() == 4 and v.shape == k.shape
            and isinstance(scale, (float, torch.SymFloat))
        )
        if valid:
            b, h, lq, d = q.shape
            lk = k.shape[2]
            valid = (
                k.shape[0] == b and k.shape[1] == h and k.shape[3] == d
                and d % 8 == 0 and _MIN_HEAD <= d <= _MAX_HEAD
                and b >= 1 and h >= 1 and lq >= 1 and lk >= 1
                and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
                and (mask is None or (mask.dtype is torch.bool and mask.shape == (b, lk)))
                and (bias is None or ((bias.dtype is dtype or bias.dtype is torch.float32)
                                      and _bias_fits(bias.shape, (b, h, lq, lk))))
            )
        if valid:
            # is_cpu is a flag; comparing torch.device objects costs ~0.4 us each.
            others = [t for t in (k, v, mask, bias) if t is not None]
            if q.is_cpu:
                valid = all(t.is_cpu for t in others)
            else:
                valid = all(t.device == q.device for t in others)
    except (AttributeError, TypeError, ValueError):
        valid = False
    if not valid:
        _explain(q, k, v, mask, bias, scale)


def _explain(q, k, v, mask, bias, scale) -> None:
    """Raise the error that says what is wrong with a call :func:`_check` did not accept."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"attention: {name} has dtype {t.dtype}; supported: "
                f"{', '.join(str(d) for d in _SUPPORTED_DTYPES)}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape "
                f"{tuple(t.shape)}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but q has {q.dtype}")
    b, h, lq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape "
            "[batch, heads, seq_k, head_dim]"
        )
    for i, what in ((0, "batch size"), (1, "number of heads"), (3, "head size")):
        if k.shape[i] != q.shape[i]:
            raise ValueError(
                f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in the {what} "
                f"(dim {i})"
            )
    if d % 8 != 0 or not _MIN_HEAD <= d <= _MAX_HEAD:
        raise ValueError(
            f"attention: head size {d} is not supported: it must be a multiple of 8 between "
            f"{_MIN_HEAD} and {_MAX_HEAD}"
        )
    lk = k.shape[2]
    if min(b, h, lq, lk) < 1:
        raise ValueError(
            f"attention: empty input (batch {b}, heads {h}, seq_q {lq}, seq_k {lk}); every "
            "dimension must be at least 1"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(
                f"attention: {name}'s last dimension must be contiguous (stride 1), got strides "
                f"{tuple(t.stride())}; views of a fused [B, L, 3, H, D] projection qualify"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype is not torch.bool:
            raise TypeError(f"attention: mask must be a bool tensor here, got {mask.dtype}")
        if mask.shape != (b, lk):
            raise ValueError(
                f"attention: mask must be a key padding mask of shape (batch, seq_k) = "
                f"({b}, {lk}), got {tuple(mask.shape)}"
            )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"attention: bias must be a torch.Tensor, got {type(bias).__name__}")
        if bias.dtype not in (q.dtype, torch.float32):
            raise TypeError(
                f"attention: bias has dtype {bias.dtype}; it must be q's dtype ({q.dtype}) or "
                "torch.float32"
            )
        if not _bias_fits(bias.shape, (b, h, lq, lk)):
            raise ValueError(
                f"attention: bias of shape {tuple(bias.shape)} does not broadcast to the scores "
                f"[batch, heads, seq_q, seq_k] = {[b, h, lq, lk]} (each dim must be full or 1)"
            )
    if not isinstance(scale, (float, torch.SymFloat)):
        raise TypeError(f"attention: scale must be a float, got {type(scale).__name__}")
    for name, t in (("k", k), ("v", v), ("mask", mask), ("bias", bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")

    raise AssertionError("attention: a call failed the fast check but no explaining one")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Multi-head attention: ``dropout(softmax(scale * q @ k^T + bias, masked keys excluded)) @ v``.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]`` (same dtype). Any strides with a contiguous
            last dimension: typically transposed views of a fused ``[B, L, 3, H, D]`` QKV
            projection, read in place. ``D`` is a multiple of 8 in ``[8, 128]``; ``Lq`` may differ
            from ``Lk``.
        mask: optional key padding mask ``[B, Lk]``, any bool/integer/float dtype, nonzero =
            attend. A query row whose keys are all masked gives zeros (and zero gradients).
        bias: optional additive score bias broadcastable to ``[B, H, Lq, Lk]`` (every dim full
            or 1, fewer dims are right-aligned), e.g. MPNet's relative position bias
            ``[1, H, L, L]``; q's dtype or float32. Differentiable.
        scale: the score scale, default ``1 / sqrt(D)``.
        dropout_p: the probability, in ``[0, 1)``, of dropping an attention probability (a kept
            one is scaled by the inverse of the exact keep probability, so the expectation is
            unchanged); 0 (the default) is no dropout. Unlike ``nn.Dropout`` this does not look
            at ``module.training``: the caller passes 0 at evaluation.
        dropout_seed: the dropout mask's seed (any int, taken modulo 2^32). None (the default)
            draws one from torch's default CPU generator, so ``torch.manual_seed`` reproduces the
            masks; the same seed gives the same mask.

    Returns ``[B, H, Lq, D]`` in q's dtype whose memory is laid out as ``[B, Lq, H, D]``, so
    ``out.transpose(1, 2).reshape(B, Lq, H * D)`` copies nothing. fp16/bf16 accumulate in fp32.
    The ``[B, H, Lq, Lk]`` scores are never materialized by the kernels (online softmax over key
    blocks). Under ``torch.autocast`` q, k, v and bias are cast to the autocast dtype first, like
    ``torch.matmul``.

    Backends (``rosita_fast.use_backend``): ``cpp`` (CPU default; blocked over (batch, head,
    64-query block) work items on all cores, fp64 included), ``triton`` (CUDA default) and
    ``reference`` (plain PyTorch). Differentiable in q, k, v and bias; while autograd records,
    the forward also keeps the row log-sum-exp of the scores (``[B, H, Lq]``, fp32) and the
    backward recomputes the probabilities from it (flash-attention style).

    Dropout: the probability of (batch ``b``, head ``h``, query ``i``, key ``j``) is dropped by a
    hash of ``(seed, row = (b * H + h) * Lq + i, column = j)`` (``rosita_fast.ops._dropout``;
    every backend drops the same elements for the same seed). No mask is stored: the backward
    regenerates it from the seed. The row log-sum-exp is the undropped softmax's. A call with
    ``dropout_p > 0`` always runs the training kernels (also under ``torch.no_grad``); a fully
    masked query row still gives zeros. Under ``torch.compile`` pass ``dropout_seed``: drawing
    one reads a tensor's value, a graph break (an error with ``fullgraph=True``).
    """
    # The default (a float 0.0, no seed) skips the checks: they cost microseconds, the no-grad
    # fast path's whole budget at small sizes.
    if dropout_p.__class__ is not float or dropout_p != 0.0 or dropout_seed is not None:
        dropout_p, dropout_seed = check_dropout(dropout_p, dropout_seed, "attention")
    if isinstance(q, torch.Tensor):
        q, k, v, bias = autocast_inputs(q, k, v, bias)
        if scale is None and q.dim() == 4:
            scale = q.shape[-1] ** -0.5
    if isinstance(mask, torch.Tensor) and mask.dtype is not torch.bool:
        mask = mask != 0
    if isinstance(bias, torch.Tensor) and 0 <= bias.dim() < 4:
        bias = bias[(None,) * (4 - bias.dim())]  # right-aligned broadcasting, as a view
    if isinstance(scale, numbers.Real) and not isinstance(scale, (float, bool)):
        scale = float(scale)  # int, numpy scalars
    _check(q, k, v, mask, bias, scale)
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if dropout_p > 0:
        if dropout_seed is None:
            dropout_seed = draw_seed()
        if needs_grad:
            return _TRAIN(q, k, v, mask, bias, scale, dropout_p, dropout_seed)[0]
        # The inference op has no dropout: the training op's no-grad fast path (its lse is unused).
        return _TRAIN.call(q, k, v, mask, bias, scale, dropout_p, dropout_seed)[0]
    if needs_grad:
        return _TRAIN(q, k, v, mask, bias, scale)[0]
    return _FWD.call(q, k, v, mask, bias, scale)

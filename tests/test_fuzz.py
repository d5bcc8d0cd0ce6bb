"""Property-based fuzzing of every public op's entry point against its float64 reference.

``FUZZ`` maps each op in ``rosita_fast.ops.OPS`` to a hypothesis strategy of call cases and a
checker; ``test_op_inventory`` fails if an op has no entry here. Shapes include 0 and 1, every
dtype the op takes, strided and transposed inputs, every backend this install can run (Triton
through the interpreter). Examples are bounded so the suite stays fast; hypothesis draws new ones
on every run (and replays a failure it has seen before).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_harness import tolerance

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops._dropout import dropout_scale
from rosita_fast.ops.attention import reference_forward as attention_reference
from rosita_fast.ops.embedding_layernorm import reference_forward as embedding_reference
from rosita_fast.ops.linear_act import reference_forward as linear_act_reference
from rosita_fast.ops.linear_residual_layernorm import reference_forward as lrln_reference
from rosita_fast.ops.lowrank_linear import reference_forward as lowrank_reference

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _backends(op: str, dtype: torch.dtype) -> list[str]:
    names = [b for b in ops.OPS[op] if b in rosita_fast.available_backends() and b != "cuda"]
    if dtype == torch.float64:
        names = [b for b in names if b != "triton"]  # documented: Triton takes no fp64
    return names


def _tensor(draw, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0):
    """A random tensor of ``shape``, drawn contiguous, strided (every other element of a wider
    buffer) or transposed (the memory of the reversed shape, viewed back)."""
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"])) if shape else "c"
    if layout == "strided":
        t = (torch.randn(*shape[:-1], 2 * shape[-1]) * scale).to(dtype)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        t = (torch.randn(*reversed(shape)) * scale).to(dtype).permute(
            *reversed(range(len(shape)))
        )
    else:
        t = (torch.randn(*shape) * scale).to(dtype)
    assert t.shape == shape
    return t


def _compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    k: int,
    what: str,
    magnitude: torch.Tensor | None = None,
) -> None:
    """``out`` against the float64 ``ref``: relative Frobenius error within ``tolerance(dtype, k)``.

    ``magnitude`` is the same reference evaluated on the inputs' absolute values (the size of the
    terms being summed). Where a result cancels (tiny shapes: a one-element sum of products of
    opposite signs), rounding an intermediate to fp16/bf16 errs relative to the terms, not to their
    small sum; the bound then scales with ``||magnitude|| / sqrt(k)``, which equals ``||ref||``
    for sums of random signs, so it loosens nothing where nothing cancels.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    out64, ref64 = out.detach().double(), ref.detach().double()
    tol = tolerance(dtype, k)
    scale = ref64.norm().item()
    if magnitude is not None:
        scale = max(scale, magnitude.detach().double().norm().item() / k**0.5)
    err = (out64 - ref64).norm().item()
    # An all-zero reference (e.g. relu of negatives) must be matched absolutely.
    assert err <= tol * max(scale, 1e-30) or (scale == 0 and err <= tol), (
        f"{what}: error {err:.3e} > {tol:.2e} x scale {scale:.3e}"
    )


def _reference_with_grads(reference, args, activation, grad_out, absolute: bool):
    """The float64 reference output and input gradients (on |inputs| and |grad_out| if asked)."""
    args64 = [
        (t.detach().double().abs() if absolute else t.detach().double()).requires_grad_(True)
        if t is not None else None
        for t in args
    ]
    out = reference(*args64, activation)
    g = grad_out.double().abs() if absolute else grad_out.double()
    grads = torch.autograd.grad(out, [a for a in args64 if a is not None], g, allow_unused=True)
    return out, grads, args64


# ---- lowrank_linear --------------------------------------------------------------------------


@st.composite
def _lowrank_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("lowrank_linear", dtype)))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    k = draw(st.integers(1, 70))
    n = draw(st.integers(1, 70))
    r = draw(st.integers(1, min(k, n)))
    x = _tensor(draw, (*lead, k), dtype)
    u = _tensor(draw, (n, r), dtype, scale=r**-0.5)
    v = _tensor(draw, (r, k), dtype, scale=k**-0.5)
    bias = _tensor(draw, (n,), dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from(["none", "relu", "gelu", "gelu_tanh"]))
    grad_out = _tensor(draw, (*lead, n), dtype)
    return backend, dtype, (x, u, v, bias, activation), grad_out


def _check_lowrank(case) -> None:
    backend, dtype, (x, u, v, bias, activation), grad_out = case
    tensors = [t for t in (x, u, v, bias) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.lowrank_linear(x, u, v, bias, activation)
        grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    ref, ref_grads, args64 = _reference_with_grads(
        lowrank_reference, (x, u, v, bias), activation, grad_out, absolute=False
    )
    mag, mag_grads, _ = _reference_with_grads(
        lowrank_reference, (x, u, v, bias), activation, grad_out, absolute=True
    )
    m = out.numel() // max(out.shape[-1], 1)
    k = max(x.shape[-1], u.shape[0], m, 1)
    _compare(out, ref, dtype, k, f"{backend} forward", mag)
    for i, (name, g, rg, mg) in enumerate(
        zip(("x", "u", "v", "bias"), grads, ref_grads, mag_grads, strict=False)
    ):
        if rg is None:
            rg = mg = torch.zeros_like(args64[i])
        _compare(g, rg, dtype, k, f"{backend} d{name}", mg)


# ---- attention -------------------------------------------------------------------------------


def _heads(draw, b: int, seq: int, h: int, d: int, dtype: torch.dtype, n: int) -> list:
    """``n`` tensors ``[b, h, seq, d]`` with a contiguous last dim, drawn as transposed views of one
    fused ``[b, seq, n, h, d]`` projection (how the model layers pass q, k, v), each its own
    ``[b, seq, h, d]`` transposed, or every other ``d``-chunk of a wider buffer."""
    layout = draw(st.sampled_from(["fused", "seq", "strided"]))
    if layout == "fused":
        fused = torch.randn(b, seq, n, h, d).to(dtype)
        return [fused[:, :, i].transpose(1, 2) for i in range(n)]
    if layout == "seq":
        return [torch.randn(b, seq, h, d).to(dtype).transpose(1, 2) for _ in range(n)]
    return [torch.randn(b, h, seq, 2 * d).to(dtype)[..., :d] for _ in range(n)]


@st.composite
def _attention_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    # The Triton backend is checked by tests/test_attention_triton.py.
    backend = draw(st.sampled_from([n for n in _backends("attention", dtype) if n != "triton"]))
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    lq = draw(st.integers(1, 140))
    lk = draw(st.one_of(st.just(lq), st.integers(1, 140)))
    d = 8 * draw(st.integers(1, 16))
    if lq == lk:
        q, k, v = _heads(draw, b, lq, h, d, dtype, 3)
    else:
        (q,), (k, v) = _heads(draw, b, lq, h, d, dtype, 1), _heads(draw, b, lk, h, d, dtype, 2)
    mask = None
    if draw(st.booleans()):  # key padding: a kept prefix per row, possibly empty
        lengths = torch.tensor(draw(st.lists(st.integers(0, lk), min_size=b, max_size=b)))
        mask = torch.arange(lk)[None, :] < lengths[:, None]
        mask = mask.to(draw(st.sampled_from([torch.bool, torch.int64, torch.float32])))
    bias = None
    if draw(st.booleans()):  # every dim full or broadcast; fp64 calls take an fp64 bias
        shape = tuple(n if draw(st.booleans()) else 1 for n in (b, h, lq, lk))
        bias_dtype = dtype if dtype == torch.float64 else draw(
            st.sampled_from([dtype, torch.float32]))
        bias = _tensor(draw, shape, bias_dtype)
    grad_out = _tensor(draw, (b, h, lq, d), dtype)
    dropout = (draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])), draw(st.integers(0, 2**32 - 1)))
    return backend, dtype, (q, k, v, mask, bias), grad_out, dropout


def _attention_magnitudes(q, k, v, mask, bias, scale, grad, out, bias_shape, drop_scale=1.0):
    """The size of the terms each result sums (float64): ``P|v|`` for the output and, with
    ``|dS| <= P (|dP| + |delta|)``, ``scale |dS| |k|``, ``scale |dS|^T |q|``, ``P^T |dO|`` and
    ``|dS|`` (summed to bias's shape) for the gradients. P comes from the reference itself (its
    output for identity values). Under dropout the bounds take the undropped P and ``|dP|`` times
    the kept elements' scale ``drop_scale`` (``|P Z| <= drop_scale P``)."""
    b, h, lk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(lk, dtype=torch.float64).expand(b, h, lk, lk)
    p = attention_reference(q, k, eye, mask, bias, scale)
    dp = grad @ v.transpose(-1, -2)
    delta = (grad * out).sum(-1, keepdim=True)
    ds = p * (drop_scale * dp.abs() + delta.abs())
    mags = [drop_scale * p @ v.abs(), scale * ds @ k.abs(), scale * ds.transpose(-1, -2) @ q.abs(),
            drop_scale * p.transpose(-1, -2) @ grad.abs()]
    if bias_shape is not None:
        dims = tuple(i for i, n in enumerate(bias_shape) if n == 1 and ds.shape[i] != 1)
        mags.append(ds.sum(dims, keepdim=True) if dims else ds)
    return mags


def _check_attention(case) -> None:
    backend, dtype, (q, k, v, mask, bias), grad_out, (drop, drop_seed) = case
    tensors = [t for t in (q, k, v, bias) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.attention(q, k, v, mask, bias, dropout_p=drop, dropout_seed=drop_seed)
        grads = torch.autograd.grad(out, tensors, grad_out)
    args64 = [t.detach().double().requires_grad_(True) for t in tensors]
    q64, k64, v64, bias64 = (*args64[:3], args64[3] if bias is not None else None)
    keep = None if mask is None else mask != 0
    scale = q.shape[-1] ** -0.5
    # The ground truth with dropout: the reference with the same seed (the same elements dropped).
    ref = attention_reference(q64, k64, v64, keep, bias64, scale, drop, drop_seed)
    ref_grads = torch.autograd.grad(ref, args64, grad_out.double())
    with torch.no_grad():
        mags = _attention_magnitudes(q64, k64, v64, keep, bias64, scale, grad_out.double(), ref,
                                     None if bias is None else bias.shape, dropout_scale(drop))
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    _compare(out, ref, dtype, max(lk, d), f"{backend} forward", mags[0])
    names = ("q", "k", "v", "bias")[: len(tensors)]
    for name, g, rg, mg, t in zip(names, grads, ref_grads, mags[1:], tensors, strict=True):
        assert g.dtype == t.dtype, f"{backend} d{name}: dtype {g.dtype} != {t.dtype}"
        # An fp32 bias of a bf16/fp16 call: its gradient carries the call's rounding.
        _compare(g.to(dtype), rg, dtype, max(lq, lk, d), f"{backend} d{name}", mg)


# ---- embedding_layernorm ---------------------------------------------------------------------

_EMB_SLOTS = (1, 3, 5, 6, 7, 9)  # the floating inputs: word, position, token type, ln w/b, proj


@st.composite
def _embedding_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("embedding_layernorm", dtype)))
    b, length, hidden = draw(st.integers(0, 4)), draw(st.integers(0, 6)), draw(st.integers(1, 70))
    vocab, max_pos = draw(st.integers(1, 20)), draw(st.integers(1, 10))
    rank = draw(st.one_of(st.none(), st.integers(1, 20)))
    types = draw(st.one_of(st.none(), st.integers(1, 3)))
    ids = torch.randint(0, vocab, (b, length))
    if draw(st.booleans()):
        ids = ids.int()
    pos_ids = torch.randint(0, max_pos, (draw(st.sampled_from([1, b])), length))
    tt_ids = torch.randint(0, types, (draw(st.sampled_from([1, b])), length)) if types else None
    args = (
        ids,
        _tensor(draw, (vocab, rank or hidden), dtype),
        pos_ids,
        _tensor(draw, (max_pos, hidden), dtype),
        tt_ids,
        _tensor(draw, (types, hidden), dtype) if types else None,
        _tensor(draw, (hidden,), dtype),
        _tensor(draw, (hidden,), dtype),
        draw(st.sampled_from([1e-5, 1e-12])),
        _tensor(draw, (hidden, rank), dtype, scale=rank**-0.5) if rank else None,
        draw(st.one_of(st.none(), st.integers(-vocab, vocab - 1))),
        draw(st.one_of(st.none(), st.integers(-max_pos, max_pos - 1))),
    )
    return backend, dtype, args, _tensor(draw, (b, length, hidden), dtype)


def _embedding_magnitudes(args64, grad):
    """Size of the terms behind each result (float64): the forward's ``(|x| + |mean|) * rstd``
    (``x - mean`` cancels where a row's values nearly agree) through the affine, and the same
    through every gradient with all terms taken absolute (as :func:`_compare`'s ``magnitude``)."""
    ids, word, pos_ids, pos, tt_ids, tt, gamma, beta, eps, proj, _, _ = args64
    b, length = ids.shape
    n, hidden = b * length, gamma.shape[0]
    flat = ids.reshape(n).long()
    rows = {"pos": pos_ids.expand(b, length).reshape(n).long()}
    w, w_mag = word[flat], word[flat].abs()
    if proj is not None:
        w, w_mag = w @ proj.t(), w_mag @ proj.abs().t()
    x, x_mag = w + pos[rows["pos"]], w_mag + pos[rows["pos"]].abs()
    if tt is not None:
        rows["tt"] = tt_ids.expand(b, length).reshape(n).long()
        x, x_mag = x + tt[rows["tt"]], x_mag + tt[rows["tt"]].abs()
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    xh = (x_mag + mu.abs()) * rstd
    out = (xh * gamma.abs() + beta.abs()).view(b, length, hidden)
    dy = grad.reshape(n, hidden).abs()
    g = dy * gamma.abs()
    dx = rstd * (g + g.mean(-1, keepdim=True) + xh * (g * xh).mean(-1, keepdim=True))

    def table(src, idx, like):
        return torch.zeros(like.shape[0], src.shape[1], dtype=src.dtype).index_add_(0, idx, src)

    grads = [
        table(dx @ proj.abs() if proj is not None else dx, flat, word),
        table(dx, rows["pos"], pos),
        table(dx, rows["tt"], tt) if tt is not None else None,
        (dy * xh).sum(0),
        dy.sum(0),
        dx.t() @ word[flat].abs() if proj is not None else None,
    ]
    return out, [m for m in grads if m is not None]


def _check_embedding(case) -> None:
    backend, dtype, args, grad_out = case
    tensors = [args[i] for i in _EMB_SLOTS if args[i] is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.embedding_layernorm(*args)
        grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    args64 = [a.detach().double().requires_grad_(True)
              if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref = embedding_reference(*args64)
    targets64 = [args64[i] for i in _EMB_SLOTS if args64[i] is not None]
    ref_grads = torch.autograd.grad(ref, targets64, grad_out.double(), allow_unused=True)
    with torch.no_grad():
        mag, mag_grads = _embedding_magnitudes(args64, grad_out.double())
    b, length = args[0].shape
    hidden, rank = args[6].shape[0], args[1].shape[1]
    k = max(hidden, rank, 1)
    # The forward's magnitude is per element, not a sum of k terms: undo _compare's 1/sqrt(k).
    _compare(out, ref, dtype, k, f"{backend} forward", mag * k**0.5)
    k = max(k, b * length)
    names = [n for n, i in zip(("word", "pos", "tt", "ln_w", "ln_b", "proj"), _EMB_SLOTS,
                               strict=True) if args[i] is not None]
    for name, g, rg, t, mg in zip(names, grads, ref_grads, targets64, mag_grads, strict=True):
        rg = torch.zeros_like(t) if rg is None else rg
        _compare(g, rg, dtype, k, f"{backend} d{name}", mg)


# ---- linear_act ------------------------------------------------------------------------------


def _width(draw) -> int:
    # Up to 70, or a few hundred: with up to 25 rows the C++ backend takes both its small-product
    # ATen route (fp32 products under 2^20 multiply-adds, 2^18 with a packed weight) and the
    # library of the drawn GEMM route.
    return draw(st.one_of(st.integers(1, 70), st.integers(200, 500)))


@st.composite
def _linear_act_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("linear_act", dtype)))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    k, n = _width(draw), _width(draw)
    x = _tensor(draw, (*lead, k), dtype)
    weight = _tensor(draw, (n, k), dtype, scale=k**-0.5)
    bias = _tensor(draw, (n,), dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from(["none", "relu", "gelu", "gelu_tanh"]))
    grad_out = _tensor(draw, (*lead, n), dtype)
    packed = backend == "cpp" and draw(st.booleans())  # also checked with a packed weight
    return backend, dtype, (x, weight, bias, activation), grad_out, packed


def _check_linear_act(case) -> None:
    backend, dtype, (x, weight, bias, activation), grad_out, packed = case
    tensors = [t for t in (x, weight, bias) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.linear_act(x, weight, bias, activation)
        grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    ref, ref_grads, args64 = _reference_with_grads(
        linear_act_reference, (x, weight, bias), activation, grad_out, absolute=False
    )
    mag, mag_grads, _ = _reference_with_grads(
        linear_act_reference, (x, weight, bias), activation, grad_out, absolute=True
    )
    m = out.numel() // max(out.shape[-1], 1)
    k = max(x.shape[-1], weight.shape[0], m, 1)
    _compare(out, ref, dtype, k, f"{backend} forward", mag)
    for i, (name, g, rg, mg) in enumerate(
        zip(("x", "weight", "bias"), grads, ref_grads, mag_grads, strict=False)
    ):
        if rg is None:
            rg = mg = torch.zeros_like(args64[i])
        _compare(g, rg, dtype, k, f"{backend} d{name}", mg)
    packed_weight = ops.pack_linear_weight(weight) if packed else None
    if packed_weight is not None:
        with torch.no_grad(), rosita_fast.use_backend(backend):
            out = ops.linear_act(x, weight, bias, activation, packed_weight)
        _compare(out, ref, dtype, k, f"{backend} packed forward", mag)


# ---- linear_residual_layernorm ----------------------------------------------------------------


@st.composite
def _lrln_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("linear_residual_layernorm", dtype)))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    k, n = _width(draw), _width(draw)
    args = (
        _tensor(draw, (*lead, k), dtype),
        _tensor(draw, (n, k), dtype, scale=k**-0.5),
        _tensor(draw, (n,), dtype) if draw(st.booleans()) else None,
        _tensor(draw, (*lead, n), dtype),
        _tensor(draw, (n,), dtype),
        _tensor(draw, (n,), dtype),
        draw(st.sampled_from([1e-5, 1e-12])),
    )
    packed = backend == "cpp" and draw(st.booleans())  # also checked with a packed weight
    dropout = (draw(st.sampled_from([0.0, 0.0, 0.2, 0.6])), draw(st.integers(0, 2**32 - 1)))
    return backend, dtype, args, _tensor(draw, (*lead, n), dtype), packed, dropout


def _lrln_magnitudes(args64, grad):
    """Size of the terms behind each result (float64), as for embedding_layernorm: the pre-norm
    rows' terms ``|x| |W|^T + |b| + |residual|`` plus ``|mean|``, times ``rstd`` (``y - mean``
    cancels where a row's values nearly agree), through the affine and, with every term taken
    absolute, through each gradient."""
    x, w, b, res, gamma, beta, eps = args64
    n = w.shape[0]
    x2d, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, n).abs()
    y = x2d @ w.t() + (b if b is not None else 0) + res.reshape(-1, n)
    terms = x2d.abs() @ w.abs().t() + (b.abs() if b is not None else 0) + res.reshape(-1, n).abs()
    mu = y.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((y - mu) ** 2).mean(-1, keepdim=True) + eps)
    xh = (terms + mu.abs()) * rstd
    out = (xh * gamma.abs() + beta.abs()).view(res.shape)
    g = grad * gamma.abs()
    dy = rstd * (g + g.mean(-1, keepdim=True) + xh * (g * xh).mean(-1, keepdim=True))
    grads = [(dy @ w.abs()).view(x.shape), dy.t() @ x2d.abs()]
    if b is not None:
        grads.append(dy.sum(0))
    grads += [dy.view(res.shape), (grad * xh).sum(0), grad.sum(0)]
    return out, grads


def _check_lrln(case) -> None:
    backend, dtype, args, grad_out, packed, (drop, drop_seed) = case
    *tensors, eps = args
    inputs = [t for t in tensors if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.linear_residual_layernorm(*args, dropout_p=drop, dropout_seed=drop_seed)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    args64 = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in tensors]
    if drop > 0:  # the ground truth with dropout: the reference backend in float64
        with rosita_fast.use_backend("reference"):
            ref = ops.linear_residual_layernorm(*args64, eps, dropout_p=drop,
                                                dropout_seed=drop_seed)
    else:
        ref = lrln_reference(*args64, eps)
    targets64 = [t for t in args64 if t is not None]
    ref_grads = torch.autograd.grad(ref, targets64, grad_out.double(), allow_unused=True)
    with torch.no_grad():
        mag, mag_grads = _lrln_magnitudes([*args64, eps], grad_out.double())
        mag_grads = [m * dropout_scale(drop) for m in mag_grads]
    k_in, n = args[0].shape[-1], args[1].shape[0]
    _compare(out, ref, dtype, max(k_in, 1), f"{backend} forward", mag)
    names = [name for name, t in zip(("x", "weight", "bias", "residual", "ln_weight", "ln_bias"),
                                     tensors, strict=True) if t is not None]
    k = max(k_in, n, out.numel() // n, 1)
    for name, g, rg, t, mg in zip(names, grads, ref_grads, targets64, mag_grads, strict=True):
        rg = torch.zeros_like(t) if rg is None else rg
        _compare(g, rg, dtype, k, f"{backend} d{name}", mg)
    packed_weight = ops.pack_linear_weight(args[1]) if packed and drop == 0 else None
    if packed_weight is not None:
        with torch.no_grad(), rosita_fast.use_backend(backend):
            out = ops.linear_residual_layernorm(*args, packed_weight)
        _compare(out, ref, dtype, max(k_in, 1), f"{backend} packed forward", mag)


# ---- kd_logits_loss ---------------------------------------------------------------------------


@st.composite
def _kd_logits_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("kd_logits_loss", dtype)))
    lead = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=2)))
    classes = draw(st.one_of(st.integers(1, 40), st.integers(500, 1100)))
    scale = draw(st.sampled_from([1.0, 8.0]))
    s = _tensor(draw, (*lead, classes), dtype, scale=scale)
    t = _tensor(draw, (*lead, classes), dtype, scale=scale)
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=s[..., 0].numel(),
                                          max_size=s[..., 0].numel())),
                            dtype=torch.bool).reshape(lead)
    temperature = draw(st.sampled_from([1.0, 0.5, 3.0]))
    kind = draw(st.sampled_from(["kl", "soft_ce"]))
    reduction = draw(st.sampled_from(["none", "sum", "mean", "batchmean"]))
    return backend, dtype, s, t, temperature, kind, reduction, mask


def _kd_terms(s64, t64, temperature, kind, reduction, mask):
    """The size of the terms behind a KD loss (float64), for :func:`_compare`'s ``magnitude``:
    per row ``sum_c p (|log p| + |log q|)`` (kl) or ``sum_c p |log q|`` (soft_ce), masked rows 0,
    reduced like the loss. A KL between nearly equal distributions is a small difference of
    O(log C) terms, so fp32 errs relative to them, not to the small loss."""
    logp = torch.log_softmax(t64 / temperature, -1)
    logq = torch.log_softmax(s64 / temperature, -1)
    p = logp.exp()
    row = (p * logq.abs()).sum(-1)
    if kind == "kl":
        row = row + (p * logp.abs()).sum(-1)
    row = row.nan_to_num()
    if mask is not None:
        row = row * mask.reshape(row.shape).to(row.dtype)
    if reduction == "none":
        return row
    total = row.sum()
    if reduction == "mean":
        count = mask.sum() if mask is not None else row.numel()
        return total / max(int(count), 1)
    if reduction == "batchmean":
        return total / max(s64.shape[0], 1)
    return total


def _check_kd_logits(case) -> None:
    backend, dtype, s, t, temperature, kind, reduction, mask = case
    s = s.detach().requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.kd_logits_loss(s, t, temperature, kind, reduction, mask)
        g_out = torch.randn(out.shape, dtype=out.dtype)
        (grad,) = torch.autograd.grad(out, s, g_out)
    s64 = s.detach().double().requires_grad_(True)
    with rosita_fast.use_backend("reference"):
        ref = ops.kd_logits_loss(s64, t.double(), temperature, kind, reduction, mask)
        (ref_grad,) = torch.autograd.grad(ref, s64, g_out.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # The losses accumulate in fp32 from exactly converted inputs; the gradient is rounded to the
    # logits' dtype.
    mag = _kd_terms(s64.detach(), t.double(), temperature, kind, reduction, mask)
    _compare(out, ref, acc, max(s.shape[-1], 1), f"{backend} loss",
             mag * max(s.shape[-1], 1) ** 0.5)
    _compare(grad, ref_grad, dtype, max(s.shape[-1], 1), f"{backend} grad")


# ---- hidden_mse_loss --------------------------------------------------------------------------


@st.composite
def _hidden_mse_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("hidden_mse_loss", dtype)))
    b, t = draw(st.integers(0, 4)), draw(st.integers(0, 40))
    h = draw(st.one_of(st.integers(1, 40), st.integers(300, 800)))
    n_student, n_teacher = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    student = [_tensor(draw, (b, t, h), dtype) for _ in range(n_student)]
    teacher = [_tensor(draw, (b, t, h), dtype) for _ in range(n_teacher)]
    mapping = draw(st.lists(st.integers(0, n_teacher - 1), min_size=n_student,
                            max_size=n_student))
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t)),
                            dtype=torch.bool).reshape(b, t)
    return backend, dtype, student, teacher, mapping, mask


def _check_hidden_mse(case) -> None:
    backend, dtype, student, teacher, mapping, mask = case
    student = [s.detach().requires_grad_(True) for s in student]
    with rosita_fast.use_backend(backend):
        out = ops.hidden_mse_loss(student, teacher, mapping, mask, per_pair=True)
        g_out = torch.rand(out.shape, dtype=out.dtype) + 0.5
        grads = torch.autograd.grad(out, student, g_out)
    s64 = [s.detach().double().requires_grad_(True) for s in student]
    with rosita_fast.use_backend("reference"):
        ref = ops.hidden_mse_loss(s64, [x.double() for x in teacher], mapping, mask,
                                  per_pair=True)
        ref_grads = torch.autograd.grad(ref, s64, g_out.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = max(student[0].numel(), 1)
    if ref.abs().max() > 0:
        _compare(out, ref, acc, k, f"{backend} terms")
    else:
        assert torch.all(out == 0)
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        if rg.numel() and rg.abs().max() > 0:
            _compare(g, rg, dtype, 1, f"{backend} grad {i}")
        else:
            assert torch.all(g == 0)


# ---- fused_linear_kd_loss ---------------------------------------------------------------------


@st.composite
def _fused_linear_kd_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("fused_linear_kd_loss", dtype)))
    n, hs, ht = draw(st.integers(0, 30)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    v = draw(st.integers(1, 300))
    bias = draw(st.booleans())
    args = [_tensor(draw, (n, hs), dtype), _tensor(draw, (v, hs), dtype, scale=hs**-0.5),
            _tensor(draw, (n, ht), dtype), _tensor(draw, (v, ht), dtype, scale=ht**-0.5),
            _tensor(draw, (v,), dtype) if bias else None,
            _tensor(draw, (v,), dtype) if bias else None]
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                            dtype=torch.bool)
    reduction = draw(st.sampled_from(["none", "sum", "mean", "batchmean"]))
    kind = draw(st.sampled_from(["kl", "soft_ce"]))
    chunk = draw(st.sampled_from([1 << 23, 3 * v]))  # one chunk, or 3 tokens a chunk
    return backend, dtype, args, mask, reduction, kind, chunk


def _check_fused_linear_kd(case) -> None:
    import sys

    backend, dtype, args, mask, reduction, kind, chunk = case
    module = sys.modules["rosita_fast.ops.fused_linear_kd_loss"]
    student = [0, 1, 4] if args[4] is not None else [0, 1]
    args = [a.detach().requires_grad_(i in student) if a is not None else None
            for i, a in enumerate(args)]
    saved, module.CHUNK_ELEMENTS = module.CHUNK_ELEMENTS, chunk
    try:
        with rosita_fast.use_backend(backend):
            out = ops.fused_linear_kd_loss(*args, 1.5, kind, reduction, mask)
            g_out = torch.randn(out.shape, dtype=out.dtype)
            grads = torch.autograd.grad(out, [args[i] for i in student], g_out)
    finally:
        module.CHUNK_ELEMENTS = saved
    a64 = [a.detach().double().requires_grad_(i in student) if a is not None else None
           for i, a in enumerate(args)]
    with rosita_fast.use_backend("reference"):
        ref = ops.fused_linear_kd_loss(*a64, 1.5, kind, reduction, mask)
        ref_grads = torch.autograd.grad(ref, [a64[i] for i in student], g_out.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = max(args[1].shape[1], args[3].shape[1], 1)
    # fp16/bf16: the logits are rounded to the dtype by the GEMMs, then go through exp
    low = dtype not in (torch.float32, torch.float64)
    with torch.no_grad():
        def logits(h, w, b):
            return h @ w.t() + (b if b is not None else 0)
        mag = _kd_terms(logits(a64[0], a64[1], a64[4]), logits(a64[2], a64[3], a64[5]), 1.5,
                        kind, reduction, mask)
    _compare(out.to(dtype) if low else out, ref, dtype if low else acc, k * 8,
             f"{backend} loss", mag * (k * 8) ** 0.5)
    for i, g, rg in zip(student, grads, ref_grads, strict=True):
        _compare(g, rg, dtype, k * 8, f"{backend} grad {i}")


@dataclass(frozen=True)
class FuzzEntry:
    cases: Callable[[], st.SearchStrategy]
    check: Callable[[object], None]
    max_examples: int


#: One entry per public op (test_op_inventory checks that none is missing).
FUZZ: dict[str, FuzzEntry] = {
    "attention": FuzzEntry(_attention_cases, _check_attention, max_examples=60),
    "embedding_layernorm": FuzzEntry(_embedding_cases, _check_embedding, max_examples=60),
    "fused_linear_kd_loss": FuzzEntry(_fused_linear_kd_cases, _check_fused_linear_kd,
                                      max_examples=40),
    "hidden_mse_loss": FuzzEntry(_hidden_mse_cases, _check_hidden_mse, max_examples=60),
    "kd_logits_loss": FuzzEntry(_kd_logits_cases, _check_kd_logits, max_examples=60),
    "linear_act": FuzzEntry(_linear_act_cases, _check_linear_act, max_examples=60),
    "linear_residual_layernorm": FuzzEntry(_lrln_cases, _check_lrln, max_examples=60),
    "lowrank_linear": FuzzEntry(_lowrank_cases, _check_lowrank, max_examples=60),
}


# The C++ backend's fp32 GEMM route (oneDNN or ATen, tests/test_gemm_route.py) is drawn too, so
# both libraries see every op's fuzzed shapes whatever this CPU's calibration picks.
_ROUTES = ("onednn", "aten") if "cpp" in rosita_fast.available_backends() else (None,)


@pytest.mark.parametrize("op", sorted(FUZZ))
def test_fuzz_against_float64_reference(op):
    entry = FUZZ[op]

    @settings(max_examples=entry.max_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(entry.cases(), st.sampled_from(_ROUTES))
    def run(case, route):
        with ops.use_gemm_route(route) if route else nullcontext():
            entry.check(case)

    run()

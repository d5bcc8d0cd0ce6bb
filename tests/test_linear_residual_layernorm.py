"""linear_residual_layernorm: every runnable backend against a float64 reference, forward and
backward (all six gradients), packed and unpacked weights, dropout (the same elements dropped as
the reference's hash), the C++ kernel's paths (oneDNN with the fused residual add or ATen, as the
GEMM route picks, and the small-product ATen route, row chunks over threads), autograd
bookkeeping, opcheck, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import DTYPES, rand, runnable_backends, tolerance
from kernel_harness import assert_close as _assert_close

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops._dropout import dropout_scale, keep_mask
from rosita_fast.ops.linear_residual_layernorm import reference_forward
from rosita_fast.testing import poison_outputs

# The Triton backend has its own file (test_linear_residual_layernorm_triton.py): it runs under the
# interpreter, which is slow, and has no float64 kernels.
BACKENDS = [p for p in runnable_backends("linear_residual_layernorm") if p.values[0] != "triton"]
EPS = 1e-5
# (leading dims, in, out): widths 1, 8, 40, 384, 768, 1792 and odd ones (LayerNorm rows of 1, 8,
# 17, 40, 384, 768, 1792: the vectorized row reductions' 16-lane body and tail); rows 1 to 67.
SHAPES = [
    ((1,), 1, 8),
    ((5,), 8, 1),
    ((3, 7), 40, 17),
    ((37,), 384, 40),
    ((2, 19), 768, 384),
    ((3,), 1792, 768),
    ((67,), 129, 1792),
]
NAMES = ("x", "weight", "bias", "residual", "ln_weight", "ln_bias")


def assert_close(out, ref, dtype, what, k=1, magnitude=None):
    """kernel_harness.assert_close, except where a result is far smaller than its terms (a tiny
    shape's gradient: dy sums to zero over each row, so a one-element dx is all cancellation, and a
    LayerNorm over one feature has exactly-zero gradients). ``magnitude``: the size of the terms
    (see _magnitudes); the bound is then relative to max(||ref||, ||magnitude|| / sqrt(k)), as in
    tests/test_fuzz.py."""
    if magnitude is None:
        return _assert_close(out, ref, dtype, what, k=k)
    assert out.shape == ref.shape and torch.isfinite(out).all(), what
    err = (out.detach().double() - ref.detach().double()).norm().item()
    scale = max(ref.detach().double().norm().item(), magnitude.double().norm().item() / k**0.5)
    assert err <= tolerance(dtype, k) * scale, f"{what}: error {err:.3e} vs scale {scale:.3e}"


def _magnitudes(tensors, grad, eps=EPS):
    """The size of the terms behind the output and each gradient (float64), as test_fuzz's
    _lrln_magnitudes: the pre-norm terms plus |mean|, times rstd, through the affine and, with
    every term taken absolute, through the gradients."""
    x, w, b, res, gamma, _ = (t.detach().double() if t is not None else None for t in tensors)
    n = w.shape[0]
    x2d, g = x.reshape(-1, x.shape[-1]), grad.detach().double().reshape(-1, n).abs()
    y = x2d @ w.t() + (b if b is not None else 0) + res.reshape(-1, n)
    terms = x2d.abs() @ w.abs().t() + (b.abs() if b is not None else 0) + res.reshape(-1, n).abs()
    mu = y.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((y - mu) ** 2).mean(-1, keepdim=True) + eps)
    xh = (terms + mu.abs()) * rstd
    gg = g * gamma.abs()
    dy = rstd * (gg + gg.mean(-1, keepdim=True) + xh * (gg * xh).mean(-1, keepdim=True))
    mags = [(dy @ w.abs()).view(x.shape), dy.t() @ x2d.abs()]
    if b is not None:
        mags.append(dy.sum(0))
    return mags + [dy.view(res.shape), (g * xh).sum(0), g.sum(0)]


CPP = pytest.mark.skipif("cpp" not in rosita_fast.available_backends(),
                         reason="the C++ extension is not available")


def _inputs(lead, k, n, dtype, bias=True, contiguous=True, requires_grad=False):
    x = rand(*lead, k, dtype=dtype, contiguous=contiguous)
    w = rand(n, k, dtype=dtype, contiguous=contiguous, scale=k**-0.5)
    b = rand(n, dtype=dtype, contiguous=contiguous) if bias else None
    res = rand(*lead, n, dtype=dtype, contiguous=contiguous)
    lw = (1 + 0.5 * rand(n)).to(dtype)
    lb = rand(n, dtype=dtype)
    tensors = (x, w, b, res, lw, lb)
    for t in tensors:
        if t is not None:
            t.requires_grad_(requires_grad)
    return tensors


def _reference64(tensors, eps=EPS, grad=None):
    args = [t.detach().double().requires_grad_(True) if t is not None else None for t in tensors]
    out = reference_forward(*args, eps)
    if grad is None:
        return out, None
    grads = torch.autograd.grad(out, [a for a in args if a is not None], grad.double())
    return out, grads


def _grads_of(out, tensors, grad_out):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], grad_out)


def _names(tensors):
    return [name for name, t in zip(NAMES, tensors, strict=True) if t is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward(backend, dtype, shape, bias, seed):
    lead, k, n = shape
    contiguous = (seed % 2) == 0  # half the runs on strided views
    tensors = _inputs(lead, k, n, dtype, bias, contiguous, requires_grad=True)
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.linear_residual_layernorm(*tensors, EPS)
        grad_out = torch.randn_like(out)
        grads = _grads_of(out, tensors, grad_out)
    ref, ref_grads = _reference64(tensors, grad=grad_out)
    assert out.dtype == dtype and out.shape == (*lead, n)
    m = out.numel() // n
    assert_close(out, ref, dtype, f"{backend} forward", k=k)
    mags = _magnitudes(tensors, grad_out)
    for name, g, rg, mg in zip(_names(tensors), grads, ref_grads, mags, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, f"{backend} d{name}", k=max(k, n, m), magnitude=mg)


@CPP
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((1,), 768, 768), ((2, 3), 40, 8), ((4, 16), 768, 384),
                                   ((300,), 129, 1792)], ids=str)
def test_packed_weight(dtype, shape, seed):
    lead, k, n = shape
    tensors = _inputs(lead, k, n, dtype, contiguous=(seed % 2) == 0)
    packed = ops.pack_linear_weight(tensors[1], batch_hint=64)
    if not ops.packing_supported(dtype):
        assert packed is None
        pytest.skip(f"oneDNN on this CPU does not serve {dtype} GEMMs: nothing to pack")
    assert packed is not None and packed.is_mkldnn and packed.shape == tensors[1].shape
    with torch.no_grad(), rosita_fast.use_backend("cpp"), poison_outputs():
        out = ops.linear_residual_layernorm(*tensors, EPS, packed)
    ref, _ = _reference64(tensors)
    assert_close(out, ref, dtype, "packed forward", k=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_weight_is_ignored_where_it_cannot_be_used(backend, seed):
    tensors = _inputs((6, 5), 40, 24, torch.float32, requires_grad=True)
    packed = ops.pack_linear_weight(tensors[1])
    with rosita_fast.use_backend(backend):
        out = ops.linear_residual_layernorm(*tensors, EPS, packed)
        with torch.no_grad():
            out_nograd = ops.linear_residual_layernorm(*tensors, EPS, packed)
    grad_out = torch.randn_like(out)
    grads = _grads_of(out, tensors, grad_out)
    ref, ref_grads = _reference64(tensors, grad=grad_out)
    assert_close(out, ref, torch.float32, "forward")
    assert_close(out_nograd, ref, torch.float32, "no-grad forward")
    for name, g, rg in zip(NAMES, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"d{name}", k=30)


@CPP
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_row_chunks(threads, dtype, seed):
    # The LayerNorm passes split rows over threads (at least 2^14 elements a task); the backward
    # pass sums dln_weight, dln_bias and dbias per chunk: 1100 rows of 40 make 1, 2 and 3 chunks.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = _inputs((1100,), 24, 40, dtype, requires_grad=True)
        with rosita_fast.use_backend("cpp"), poison_outputs():
            out = ops.linear_residual_layernorm(*tensors, EPS)
            grad_out = torch.randn_like(out)
            grads = _grads_of(out, tensors, grad_out)
            with torch.no_grad():
                out_nograd = ops.linear_residual_layernorm(*tensors, EPS)
    finally:
        torch.set_num_threads(previous)
    ref, ref_grads = _reference64(tensors, grad=grad_out)
    assert_close(out, ref, dtype, "forward", k=24)
    assert_close(out_nograd, ref, dtype, "no-grad forward", k=24)
    for name, g, rg in zip(NAMES, grads, ref_grads, strict=True):
        assert_close(g, rg, dtype, f"d{name}", k=1100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(backend, bias, seed):
    tensors = _inputs((2, 3), 9, 7, torch.float64, bias, requires_grad=True)
    inputs = tuple(t for t in tensors if t is not None)

    def f(*a):
        a = list(a)
        if not bias:
            a.insert(2, None)
        return ops.linear_residual_layernorm(*a, EPS)

    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_bert_output_block(backend, seed):
    # Independent of the reference module: BERT's Output block at inference
    # (LayerNorm(dense(h) + x), dropout inactive).
    dense, ln = torch.nn.Linear(96, 64), torch.nn.LayerNorm(64, eps=1e-12)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.5 * torch.randn(64))
        ln.bias.copy_(torch.randn(64))
    h, x = rand(3, 11, 96), rand(3, 11, 64)
    with rosita_fast.use_backend(backend), torch.no_grad():
        out = ops.linear_residual_layernorm(h, dense.weight, dense.bias, x, ln.weight, ln.bias,
                                            ln.eps)
        expected = ln(dense(h) + x)
    assert_close(out, expected, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, seed):
    tensors = _inputs((0,), 12, 10, torch.float32, requires_grad=True)
    with rosita_fast.use_backend(backend):
        out = ops.linear_residual_layernorm(*tensors, EPS)
        assert out.shape == (0, 10)
        grads = torch.autograd.grad(out.sum(), tensors)
    assert grads[0].shape == (0, 12) and grads[3].shape == (0, 10)
    for g in (grads[1], grads[2], grads[4], grads[5]):  # no rows: exactly zero
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, seed):
    for rows, k in ((6, 20), (40, 768)):  # MKL route and oneDNN
        x, w, b, res, lw, lb = _inputs((rows,), k, 48, torch.float32)
        res[2, 5] = float("nan")
        with rosita_fast.use_backend(backend):
            out = ops.linear_residual_layernorm(x, w, b, res, lw, lb, EPS)
        assert torch.isnan(out[2]).all(), "a NaN in a row must poison its whole LayerNorm row"
        assert torch.isfinite(torch.cat([out[:2], out[3:]])).all(), "NaN leaked into other rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_row_and_zero_eps(backend, seed):
    # A row whose pre-norm values are all equal normalizes to ln_bias (variance 0, eps > 0).
    x, w, b, res, lw, lb = _inputs((3,), 16, 24, torch.float32)
    with torch.no_grad():
        w.zero_()
        b.zero_()
        res[1] = 2.5
    with rosita_fast.use_backend(backend), torch.no_grad():
        out = ops.linear_residual_layernorm(x, w, b, res, lw, lb, EPS)
    torch.testing.assert_close(out[1], lb, rtol=0, atol=1e-6)


def test_torch_compile_fullgraph(seed):
    tensors = _inputs((3, 5), 32, 48, torch.float32, requires_grad=True)

    def f(x, w, b, res, lw, lb):
        return ops.linear_residual_layernorm(x, w, b, res, lw, lb, 1e-12)

    expected = f(*tensors)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*tensors)
    assert_close(out, expected, torch.float32, "compiled forward")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref_grads = torch.autograd.grad(expected, tensors, grad_out)
    for name, g, rg in zip(NAMES, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"compiled d{name}")
    with torch.no_grad():
        assert_close(compiled(*tensors), expected, torch.float32, "compiled no-grad forward")


@CPP
def test_torch_compile_drops_packed_weight(seed):
    x, w, b, res, lw, lb = _inputs((5,), 32, 48, torch.float32)
    packed = ops.pack_linear_weight(w)

    def f(x, w, b, res):
        return ops.linear_residual_layernorm(x, w, b, res, lw, lb, EPS, packed)

    with torch.no_grad():
        expected = F.layer_norm(F.linear(x, w, b) + res, (48,), lw, lb, EPS)
        out = torch.compile(f, fullgraph=True)(x, w, b, res)
    assert_close(out, expected, torch.float32, "compiled forward with a packed weight")


def test_opcheck(seed):
    tensors = _inputs((3, 4), 10, 9, torch.float32, requires_grad=True)
    op = torch.ops.rosita_fast.linear_residual_layernorm.default
    torch.library.opcheck(op, (*tensors, EPS))
    x, w, _, res, lw, lb = tensors
    torch.library.opcheck(op, (x, w, None, res, lw, lb, EPS))


def test_opcheck_training_ops(seed):
    tensors = _inputs((3, 4), 10, 9, torch.float32, requires_grad=True)
    train = torch.ops.rosita_fast.linear_residual_layernorm_train.default
    backward = torch.ops.rosita_fast.linear_residual_layernorm_backward.default
    torch.library.opcheck(train, (*tensors, EPS))
    _, y, mean, rstd = torch.ops.rosita_fast.linear_residual_layernorm_train(*tensors, EPS)
    x, w, b, res, lw, lb = (t.detach() for t in tensors)
    grad = rand(3, 4, 9)
    torch.library.opcheck(backward, (grad, x, w, b, res, lw, lb, EPS))
    torch.library.opcheck(backward, (grad, x, w, None, None, lw, lb, EPS, y.detach(),
                                     mean.detach(), rstd.detach()))


def test_training_forward_keeps_y_and_statistics(monkeypatch, seed):
    # While autograd records, the forward keeps y (x's dtype) and mean/rstd (fp32); the residual
    # itself is then not kept.
    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["linear_residual_layernorm_backward"].impls
    real, seen = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: seen.append(a) or real(*a))
    tensors = _inputs((2, 3), 20, 16, torch.bfloat16, requires_grad=True)
    with rosita_fast.use_backend("reference"):
        ops.linear_residual_layernorm(*tensors, EPS).float().sum().backward()
    ((_, _, _, _, residual, _, _, _, y, mean, rstd, *dropout),) = seen
    assert dropout in ([], [0.0, 0])
    assert residual is None
    assert y.shape == (6, 16) and y.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (6,) and mean.dtype == rstd.dtype == torch.float32
    x, w, b, res = (t.detach().double() for t in tensors[:4])
    expected = x.reshape(6, 20) @ w.t() + b + res.reshape(6, 16)
    assert_close(y, expected, torch.bfloat16, "saved y", k=20)
    assert_close(mean, expected.mean(-1), torch.bfloat16, "saved mean", k=20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_with_saved_statistics_matches_recompute(backend, dtype, seed):
    tensors = _inputs((130,), 48, 72, dtype)
    grad = rand(130, 72, dtype=dtype)
    with rosita_fast.use_backend(backend):
        out, y, mean, rstd = torch.ops.rosita_fast.linear_residual_layernorm_train(*tensors, EPS)
        # y as the product left it: x's dtype, fp32 for fp16 (products run in fp32 there)
        assert y.dtype == mean.dtype == rstd.dtype == torch.float32
        x, w, b, res, lw, lb = tensors
        kept = torch.ops.rosita_fast.linear_residual_layernorm_backward(
            grad, x, w, b, None, lw, lb, EPS, y, mean, rstd)
        recomputed = torch.ops.rosita_fast.linear_residual_layernorm_backward(
            grad, x, w, b, res, lw, lb, EPS)
    for name, a, c in zip(NAMES, kept, recomputed, strict=True):
        assert_close(a, c, dtype, f"{backend} d{name}", k=130)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_bf16(backend, seed):
    tensors = _inputs((3, 5), 40, 36, torch.float32, requires_grad=True)
    packed = ops.pack_linear_weight(tensors[1])
    with torch.autocast("cpu", dtype=torch.bfloat16), rosita_fast.use_backend(backend):
        out = ops.linear_residual_layernorm(*tensors, EPS)
        with torch.no_grad():
            out_packed = ops.linear_residual_layernorm(*tensors, EPS, packed)
    assert out.dtype == out_packed.dtype == torch.bfloat16
    ref, _ = _reference64([t.detach().to(torch.bfloat16) for t in tensors])
    assert_close(out, ref, torch.bfloat16, f"{backend} autocast forward", k=40)
    assert_close(out_packed, ref, torch.bfloat16, f"{backend} autocast packed forward", k=40)
    out.float().sum().backward()
    for t in tensors:
        assert t.grad is not None and t.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone(seed):
    tensors = _inputs((4,), 10, 8, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear_residual_layernorm(*tensors, EPS).dtype == torch.float64


def test_forced_backend_reaches_a_backward_on_another_thread(monkeypatch, seed):
    import threading

    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["linear_residual_layernorm_backward"].impls
    real, calls = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: calls.append(1) or real(*a))
    tensors = _inputs((4,), 12, 10, torch.float32, requires_grad=True)
    with rosita_fast.use_backend("reference"):
        out = ops.linear_residual_layernorm(*tensors, EPS)
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert calls == [1] and tensors[0].grad is not None


# ---- dropout -------------------------------------------------------------------------------------


def _reference64_dropout(tensors, p, drop_seed, grad=None):
    """The float64 ground truth with dropout: the reference backend's op in float64 (the hash of
    rosita_fast.ops._dropout decides which elements drop)."""
    args = [t.detach().double().requires_grad_(True) if t is not None else None for t in tensors]
    with rosita_fast.use_backend("reference"):
        out = ops.linear_residual_layernorm(*args, EPS, dropout_p=p, dropout_seed=drop_seed)
    if grad is None:
        return out, None
    return out, torch.autograd.grad(out, [a for a in args if a is not None], grad.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((5,), 8, 1), ((3, 7), 40, 17), ((2, 19), 768, 384),
                                   ((67,), 129, 1792)], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_forward_backward(backend, dtype, shape, p, seed):
    lead, k, n = shape
    tensors = _inputs(lead, k, n, dtype, True, (seed % 2) == 0, requires_grad=True)
    drop_seed = seed * 2654435761 % 2**32  # top bit set in about half the runs
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.linear_residual_layernorm(*tensors, EPS, dropout_p=p, dropout_seed=drop_seed)
        grad_out = torch.randn_like(out)
        grads = _grads_of(out, tensors, grad_out)
    ref, ref_grads = _reference64_dropout(tensors, p, drop_seed, grad_out)
    m = out.numel() // n
    assert_close(out, ref, dtype, f"{backend} forward", k=k)
    mags = _magnitudes(tensors, grad_out)
    for name, g, rg, mg in zip(_names(tensors), grads, ref_grads, mags, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, f"{backend} d{name}", k=max(k, n, m),
                     magnitude=dropout_scale(p) * mg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_drops_the_hashed_elements(backend, seed):
    # The training forward's y is dropout(x W^T + b) + residual: against the hash's own mask, and
    # about a fraction p of the elements dropped.
    p, drop_seed = 0.3, seed + 12345
    x, w, b, res, lw, lb = _inputs((50,), 64, 96, torch.float32)
    with rosita_fast.use_backend(backend):
        _, y, _, _ = torch.ops.rosita_fast.linear_residual_layernorm_train(
            x, w, b, res, lw, lb, EPS, p, drop_seed)
    keep = keep_mask(drop_seed, torch.arange(50)[:, None], torch.arange(96)[None, :], p)
    z = x.double() @ w.double().t() + b.double()
    expected = torch.where(keep, z * dropout_scale(p), 0.0) + res.double()
    assert_close(y, expected, torch.float32, "y", k=64)
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - p) < 6 * (p * (1 - p) / keep.numel()) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seeds(backend, seed):
    tensors = _inputs((4, 9), 24, 32, torch.float32)
    with rosita_fast.use_backend(backend):
        def run(**kw):
            return ops.linear_residual_layernorm(*tensors, EPS, dropout_p=0.2, **kw)
        a, b = run(dropout_seed=7), run(dropout_seed=7)
        c = run(dropout_seed=8)
        torch.manual_seed(seed)
        d = run()
        torch.manual_seed(seed)
        e = run()
        zero = ops.linear_residual_layernorm(*tensors, EPS, dropout_p=0.0, dropout_seed=7)
        plain = ops.linear_residual_layernorm(*tensors, EPS)
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.equal(a, c)
    assert torch.equal(zero, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_gradcheck_float64(backend, seed):
    tensors = _inputs((2, 3), 9, 7, torch.float64, True, requires_grad=True)

    def f(*a):
        return ops.linear_residual_layernorm(*a, EPS, dropout_p=0.4, dropout_seed=seed)

    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7)


def test_dropout_opcheck(seed):
    tensors = _inputs((3, 4), 10, 9, torch.float32, requires_grad=True)
    train = torch.ops.rosita_fast.linear_residual_layernorm_train.default
    backward = torch.ops.rosita_fast.linear_residual_layernorm_backward.default
    torch.library.opcheck(train, (*tensors, EPS, 0.25, 99))
    _, y, mean, rstd = train(*tensors, EPS, 0.25, 99)
    x, w, b, res, lw, lb = (t.detach() for t in tensors)
    grad = rand(3, 4, 9)
    torch.library.opcheck(backward, (grad, x, w, b, None, lw, lb, EPS, y.detach(),
                                     mean.detach(), rstd.detach(), 0.25, 99))


def test_dropout_torch_compile(seed):
    tensors = _inputs((3, 5), 16, 24, torch.float32, requires_grad=True)

    def f(*a):
        return ops.linear_residual_layernorm(*a, EPS, dropout_p=0.2, dropout_seed=5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*tensors)
    assert torch.equal(out, f(*tensors))
    out.sum().backward()
    assert all(t.grad is not None for t in tensors)


class TestBadInput:
    def setup_method(self):
        self.args = list(_inputs((4,), 10, 8, torch.float32))

    def call(self, **changes):
        names = dict(zip(NAMES, range(6), strict=True))
        args = list(self.args)
        eps, packed = changes.pop("eps", EPS), changes.pop("packed", None)
        for name, value in changes.items():
            args[names[name]] = value
        return ops.linear_residual_layernorm(*args, eps, packed)

    @pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 2])
    def test_dropout_p_out_of_range(self, p):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            ops.linear_residual_layernorm(*self.args, EPS, dropout_p=p)

    def test_dropout_bad_types(self):
        with pytest.raises(TypeError, match="dropout_p"):
            ops.linear_residual_layernorm(*self.args, EPS, dropout_p="0.1")
        with pytest.raises(TypeError, match="dropout_seed"):
            ops.linear_residual_layernorm(*self.args, EPS, dropout_p=0.1, dropout_seed=1.5)

    def test_feature_mismatch_names_x(self):
        with pytest.raises(ValueError, match="x has 11 features"):
            self.call(x=rand(4, 11))

    def test_residual_shape(self):
        with pytest.raises(ValueError, match="residual must have shape \\(4, 8\\)"):
            self.call(residual=rand(4, 9))
        with pytest.raises(ValueError, match="residual must have shape"):
            self.call(residual=rand(2, 2, 8))

    def test_layernorm_parameter_shapes(self):
        with pytest.raises(ValueError, match="ln_weight must have shape \\(8,\\)"):
            self.call(ln_weight=rand(9))
        with pytest.raises(ValueError, match="ln_bias must have shape \\(8,\\)"):
            self.call(ln_bias=rand(1, 8))
        with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
            self.call(bias=rand(7))

    def test_zero_features(self):
        with pytest.raises(ValueError, match="0 features"):
            ops.linear_residual_layernorm(rand(4, 10), rand(0, 10), None, rand(4, 0), rand(0),
                                          rand(0), EPS)

    def test_eps(self):
        with pytest.raises(ValueError, match="eps must be a float >= 0"):
            self.call(eps=-1.0)
        with pytest.raises(ValueError, match="eps must be a float >= 0"):
            self.call(eps="1e-5")

    def test_dtype_mismatch_names_argument(self):
        with pytest.raises(TypeError, match="residual has dtype torch.float16"):
            self.call(residual=self.args[3].half())
        with pytest.raises(TypeError, match="ln_bias has dtype torch.float64"):
            self.call(ln_bias=self.args[5].double())

    def test_device_mismatch_names_argument(self):
        with pytest.raises(ValueError, match="ln_weight is on meta"):
            self.call(ln_weight=self.args[4].to("meta"))

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            self.call(x=self.args[0].long())

    @CPP
    def test_packed_weight_must_match(self):
        with pytest.raises(TypeError, match="packed must be None or a weight packed"):
            self.call(packed=self.args[1])
        with pytest.raises(ValueError, match="not the packed form"):
            self.call(packed=ops.pack_linear_weight(rand(8, 9)))

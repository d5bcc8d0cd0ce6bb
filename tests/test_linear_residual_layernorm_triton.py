"""The Triton linear_residual_layernorm kernels (``rosita_fast.kernels.linear_residual_layernorm``)
in the CPU interpreter, against the float64 reference of ``rosita_fast.ops.
linear_residual_layernorm`` (``reference_forward``, ``reference_backward``).

Every case forces 16-wide GEMM tiles and a few rows per LayerNorm program (``forced_tiles``), and
most force fewer backward row programs than row blocks, so each loops over several: rows,
features and K of a few dozen, none a multiple of 16, cross several blocks in every dimension.
Covered: with and without bias, fp32 / fp16 / bf16 (and the native fp16 path), strided /
transposed x, weight, residual, LayerNorm parameters and upstream gradient, batched x, rows
longer than the smallest row tile, the backward with the training forward's y / mean / rstd and
recomputed ones, empty batches, NaN-poisoned outputs. Then the public op under
``use_backend("triton")`` (switched on once the op's tables have a triton entry) and the launch
specs the lowering tests compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_harness import (
    assert_close,
    declared_constexprs,
    f64,
    make,
    rand,
    spec_matches_launch,
)
from rosita_fast.kernels import linear_act as la
from rosita_fast.kernels import linear_residual_layernorm as lk

import rosita_fast
from rosita_fast.ops.linear_act import gemm_dtype
from rosita_fast.ops.linear_residual_layernorm import reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

pytestmark = pytest.mark.usefixtures("seed")

BLOCK = 16  # forced GEMM tile of every launch in this file
EPS = 1e-5
TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    id: str
    dtype: torch.dtype
    x_shape: tuple[int, ...]  # [..., K]
    n: int
    bias: str | None  # layout of the bias, None: no bias
    x: str = "contig"
    w: str = "contig"
    residual: str = "contig"
    ln: str = "contig"  # layout of ln_weight / ln_bias
    grad: str = "contig"
    kept: bool = True  # the backward gets the training forward's y, mean, rstd
    rows: int = 4  # rows per LayerNorm program
    programs: int | None = 3  # backward row programs (None: one per row block)
    upcast: bool | None = None  # None: the default (upcast under the interpreter)


CASES = [
    Case("fp32-bias", torch.float32, (60, 45), 50, "contig", x="strided", w="transposed",
         residual="strided", grad="strided"),
    Case("bf16-nobias-recompute", torch.bfloat16, (3, 13, 40), 37, None, residual="transposed",
         kept=False, rows=2),
    Case("fp16-strided_bias_ln", torch.float16, (50, 33), 70, "strided", x="transposed",
         ln="strided", programs=None),
    Case("bf16-bias-batched", torch.bfloat16, (2, 17, 32), 64, "contig", w="strided",
         grad="transposed", rows=8, programs=2),
    Case("fp32-long_rows-recompute", torch.float32, (21, 24), 300, "contig", kept=False,
         programs=4),
    Case("fp16-nobias-expanded_grad", torch.float16, (37, 18), 52, None, x="strided",
         residual="strided", grad="expanded", rows=1, programs=5),
    # the native fp16 path (operands to tl.dot in fp16, dy rounded to fp16; the interpreter
    # multiplies fp16 correctly, bf16 only upcast)
    Case("fp16-native-bias", torch.float16, (40, 48), 36, "contig", grad="strided",
         upcast=False),
    Case("fp16-native-recompute", torch.float16, (2, 15, 32), 50, "strided", x="strided",
         kept=False, upcast=False),
]


def _inputs(case: Case):
    k, n = case.x_shape[-1], case.n
    lead = case.x_shape[:-1]
    x = make(case.x_shape, case.x, case.dtype)
    w = make((n, k), case.w, case.dtype, scale=k ** -0.5)
    bias = make((n,), case.bias, case.dtype) if case.bias is not None else None
    residual = make((*lead, n), case.residual, case.dtype)
    ln_w = make((n,), case.ln, case.dtype, scale=0.2, shift=1.0)
    ln_b = make((n,), case.ln, case.dtype, scale=0.2)
    grad = make((*lead, n), case.grad, case.dtype)
    return x, w, bias, residual, ln_w, ln_b, grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_match_float64(case: Case):
    x, w, bias, residual, ln_w, ln_b, grad = _inputs(case)
    m, k, n = x[..., 0].numel(), x.shape[-1], case.n
    args64 = (x.double(), w.double(), f64(bias), residual.double(), ln_w.double(),
              ln_b.double(), EPS)
    ref_out = reference_forward(*args64)
    ref_grads = reference_backward(grad.double(), *args64)
    args = (x, w, bias, residual, ln_w, ln_b, EPS)
    with la.forced_tiles(BLOCK, rows=case.rows, programs=case.programs), poison_outputs():
        out = lk.linear_residual_layernorm_forward(*args, upcast=case.upcast)
        out_t, y, mean, rstd = lk.linear_residual_layernorm_train(*args, upcast=case.upcast)
        kept = (y, mean, rstd) if case.kept else (None, None, None)
        grads = lk.linear_residual_layernorm_backward(
            grad, x, w, bias, residual if not case.kept else None, ln_w, ln_b, EPS, *kept,
            upcast=case.upcast,
        )
    assert out.dtype == case.dtype and out.shape == residual.shape and out.is_contiguous()
    assert torch.equal(out, out_t), "forward and training forward run the same kernels"
    reduction = max(m, k, n)
    assert_close(out, ref_out, case.dtype, f"{case.id}: out", k=reduction)
    # the training forward's y (the op's contract dtype: x's, fp32 for fp16) and statistics
    y64 = x.double().reshape(m, k) @ w.double().t() + residual.double().reshape(m, n)
    if bias is not None:
        y64 = y64 + bias.double()
    assert y.dtype == gemm_dtype(case.dtype) and y.shape == (m, n)
    assert_close(y, y64, case.dtype, f"{case.id}: y", k=reduction)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (m,)
    var = y64.var(-1, unbiased=False)
    assert_close(mean, y64.mean(-1), case.dtype, f"{case.id}: mean", k=reduction)
    assert_close(rstd, torch.rsqrt(var + EPS), case.dtype, f"{case.id}: rstd", k=reduction)
    names = ("dx", "dweight", "dbias", "dresidual", "dln_weight", "dln_bias")
    likes = (x, w, bias, residual, ln_w, ln_b)
    for name, got, want, like in zip(names, grads, ref_grads, likes, strict=True):
        if like is None:
            assert got.numel() == 0, "no bias: an empty tensor stands for the bias gradient"
            continue
        assert got.dtype == case.dtype and got.shape == like.shape, name
        assert_close(got, want, case.dtype, f"{case.id}: {name}", k=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_one_feature_rows_have_exactly_zero_gradients(dtype):
    """A LayerNorm over one feature is constant (ln_bias): every gradient but dln_bias is exactly
    zero, also from a y rounded to bf16 (the backward centres it on its own mean)."""
    x, w, bias, res = rand(7, 9, dtype=dtype), rand(1, 9, dtype=dtype), rand(1, dtype=dtype), \
        rand(7, 1, dtype=dtype, scale=30.0)
    ln_w, ln_b, grad = rand(1, dtype=dtype), rand(1, dtype=dtype), rand(7, 1, dtype=dtype)
    args = (x, w, bias, res, ln_w, ln_b, EPS)
    with la.forced_tiles(BLOCK, rows=2, programs=2), poison_outputs():
        out, y, mean, rstd = lk.linear_residual_layernorm_train(*args)
        kept = lk.linear_residual_layernorm_backward(grad, *args, y, mean, rstd)
        recomputed = lk.linear_residual_layernorm_backward(grad, *args)
    assert torch.equal(out, ln_b.expand(7, 1))
    for grads in (kept, recomputed):
        for name, g in zip(("dx", "dw", "db", "dres", "dln_w"), grads[:5], strict=True):
            assert torch.equal(g, torch.zeros_like(g)), name
        assert_close(grads[5], grad.double().sum(0), dtype, "dln_b", k=7)


def test_forced_tiles_set_the_grids(monkeypatch):
    """The forced tiles really set the grids: several GEMM blocks in every dimension, several
    rows per LayerNorm program, backward programs looping over several row blocks."""
    grids = {}

    def record(module, name):
        kernel = getattr(module, name)

        class Recorder:
            def __getitem__(self, grid):
                grids.setdefault(name, []).append(grid)
                return kernel[grid]

        monkeypatch.setattr(module, name, Recorder())

    for name in ("linear_residual_kernel", "layernorm_fwd_kernel", "layernorm_bwd_kernel"):
        record(lk, name)
    record(la, "matmul_kernel")
    x, w, bias, res = rand(40, 50), rand(35, 50, scale=0.15), rand(35), rand(40, 35)
    ln_w, ln_b, grad = rand(35), rand(35), rand(40, 35)
    with la.forced_tiles(BLOCK, rows=4, programs=3), poison_outputs():
        _, y, mean, rstd = lk.linear_residual_layernorm_train(x, w, bias, res, ln_w, ln_b, EPS)
        grads = lk.linear_residual_layernorm_backward(grad, x, w, bias, None, ln_w, ln_b, EPS,
                                                      y, mean, rstd)
    # M = 40 -> 3 GEMM row blocks / 10 LayerNorm row blocks, N = 35 -> 3, K = 50 -> 4
    assert grids == {
        "linear_residual_kernel": [(9,)],
        "layernorm_fwd_kernel": [(10,)],
        "layernorm_bwd_kernel": [(3,)],  # 10 row blocks over 3 programs
        "matmul_kernel": [(3 * 4,), (3 * 4,)],  # dx [40, 50], dweight [35, 50]
    }
    ref = reference_backward(grad.double(), x.double(), w.double(), bias.double(), res.double(),
                             ln_w.double(), ln_b.double(), EPS)
    for i, (got, want) in enumerate(zip(grads, ref, strict=True)):
        assert_close(got, want, torch.float32, f"grad {i}")


def test_default_tiles_match_forced_tiles():
    """The launch-table tiles (one block, one row tile here) agree with the forced ones."""
    x, w, bias, res = rand(30, 40), rand(20, 40, scale=0.15), rand(20), rand(30, 20)
    ln_w, ln_b, grad = rand(20), rand(20), rand(30, 20)
    args = (x, w, bias, res, ln_w, ln_b, EPS)
    out, y, mean, rstd = lk.linear_residual_layernorm_train(*args)
    grads = lk.linear_residual_layernorm_backward(grad, *args, y, mean, rstd)
    with la.forced_tiles(BLOCK, rows=2, programs=2):
        small = lk.linear_residual_layernorm_train(*args)
        small_grads = lk.linear_residual_layernorm_backward(grad, *args, *small[1:])
    for got, want in zip((*small, *small_grads), (out, y, mean, rstd, *grads), strict=True):
        assert_close(got, want.double(), torch.float32, "table vs forced tiles")


def test_empty_batch():
    """No rows: empty outputs; zero weight, bias and LayerNorm-parameter gradients."""
    x, w, bias, res = rand(0, 12), rand(9, 12), rand(9), rand(0, 9)
    ln_w, ln_b = rand(9), rand(9)
    with la.forced_tiles(BLOCK), poison_outputs():
        out, y, mean, rstd = lk.linear_residual_layernorm_train(x, w, bias, res, ln_w, ln_b, EPS)
        dx, dw, db, dres, dlw, dlb = lk.linear_residual_layernorm_backward(
            rand(0, 9), x, w, bias, res, ln_w, ln_b, EPS, y, mean, rstd)
    assert out.shape == (0, 9) and y.shape == (0, 9) and mean.shape == rstd.shape == (0,)
    assert dx.shape == (0, 12) and dres.shape == (0, 9)
    for t, shape in ((dw, (9, 12)), (db, (9,)), (dlw, (9,)), (dlb, (9,))):
        assert torch.equal(t, torch.zeros(shape))


def test_bad_inputs_raise():
    x64 = rand(4, 8, dtype=torch.float64)
    v64 = rand(8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        lk.linear_residual_layernorm_forward(x64, rand(8, 8, dtype=torch.float64), None, x64,
                                             v64, v64, EPS)
    n = lk.MAX_ROW + 1
    with pytest.raises(ValueError, match="up to 4096 features"):
        lk.linear_residual_layernorm_forward(rand(2, 4), rand(n, 4), None, rand(2, n), rand(n),
                                             rand(n), EPS)
    with pytest.raises(ValueError, match="needs y, mean and rstd or residual"):
        lk.linear_residual_layernorm_backward(rand(2, 8), rand(2, 4), rand(8, 4), None, None,
                                              rand(8), rand(8), EPS)


# ----------------------------------------------------------------------------------------------
# Through the public op
# ----------------------------------------------------------------------------------------------

needs_triton_entry = pytest.mark.skipif(
    "triton" not in rosita_fast.ops.OPS["linear_residual_layernorm"],
    reason="rosita_fast/ops/linear_residual_layernorm.py has no 'triton' entry in its backend "
    "tables yet: the kernels are tested through their launchers above",
)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_op_autograd_matches_float64(dtype, with_bias):
    """``rosita_fast.ops.linear_residual_layernorm`` on the triton backend: forward and autograd
    backward (training forward + backward op with the kept y / mean / rstd) and the no-grad
    path, against the float64 reference."""
    x = rand(3, 11, 40, dtype=dtype).requires_grad_()
    w = rand(37, 40, dtype=dtype, scale=0.15).requires_grad_()
    bias = rand(37, dtype=dtype).requires_grad_() if with_bias else None
    res = rand(3, 11, 37, dtype=dtype).requires_grad_()
    ln_w = (1 + rand(37, scale=0.2)).to(dtype).requires_grad_()
    ln_b = rand(37, dtype=dtype, scale=0.2).requires_grad_()
    grad = rand(3, 11, 37, dtype=dtype)
    leaves = (x, w, bias, res, ln_w, ln_b)
    args64 = (*(f64(t.detach()) if t is not None else None for t in leaves), EPS)
    ref_out = reference_forward(*args64)
    ref = reference_backward(grad.double(), *args64)
    with rosita_fast.use_backend("triton"), la.forced_tiles(BLOCK, rows=4, programs=3), \
            poison_outputs():
        out = rosita_fast.ops.linear_residual_layernorm(x, w, bias, res, ln_w, ln_b, EPS)
        out.backward(grad)
        with torch.no_grad():
            out_nograd = rosita_fast.ops.linear_residual_layernorm(x, w, bias, res, ln_w, ln_b,
                                                                   EPS)
    assert out.dtype == dtype and out.shape == (3, 11, 37)
    assert torch.equal(out_nograd, out.detach())
    assert_close(out, ref_out, dtype, "out", k=40)
    for name, t, want in zip(("dx", "dw", "db", "dres", "dln_w", "dln_b"), leaves, ref,
                             strict=True):
        if t is None:
            continue
        assert t.grad.dtype == dtype
        assert_close(t.grad, want, dtype, name, k=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kept", [True, False], ids=["kept", "recompute"])
def test_dropout_matches_float64(dtype, kept):
    """Dropout in the GEMM epilogue and the backward row kernel: the same elements as the
    reference's hash (float64 reference with the same seed), several GEMM tiles, LayerNorm
    programs and backward row loops; strided inputs."""
    p, seed = 0.3, int(torch.randint(0, 2**32, ()))
    x = make((45, 40), "strided", dtype)
    w = make((37, 40), "transposed", dtype, scale=40 ** -0.5)
    bias = make((37,), "contig", dtype)
    res = make((45, 37), "strided", dtype)
    ln_w = make((37,), "contig", dtype, scale=0.2, shift=1.0)
    ln_b = make((37,), "contig", dtype, scale=0.2)
    grad = make((45, 37), "contig", dtype)
    args64 = (x.double(), w.double(), bias.double(), res.double(), ln_w.double(), ln_b.double(),
              EPS)
    with rosita_fast.use_backend("reference"):
        ref_out, *_ = torch.ops.rosita_fast.linear_residual_layernorm_train(*args64, p, seed)
    ref_grads = reference_backward(grad.double(), *args64, dropout_p=p, seed=seed)
    args = (x, w, bias, res, ln_w, ln_b, EPS)
    with la.forced_tiles(BLOCK, rows=4, programs=3), poison_outputs():
        out, y, mean, rstd = lk.linear_residual_layernorm_train(*args, p, seed)
        saved = (y, mean, rstd) if kept else (None, None, None)
        grads = lk.linear_residual_layernorm_backward(
            grad, x, w, bias, None if kept else res, ln_w, ln_b, EPS, *saved, p, seed)
    assert_close(out, ref_out, dtype, "out", k=45)
    names = ("dx", "dweight", "dbias", "dresidual", "dln_weight", "dln_bias")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert_close(got, want, dtype, name, k=45)


def test_public_op_ignores_packed_weight_and_raises_for_float64():
    x, w, res, ln_w, ln_b = rand(6, 16), rand(8, 16), rand(6, 8), rand(8), rand(8)
    packed = rosita_fast.ops.pack_linear_weight(w)
    with rosita_fast.use_backend("triton"), poison_outputs():
        out = rosita_fast.ops.linear_residual_layernorm(x, w, None, res, ln_w, ln_b, EPS,
                                                        packed=packed)
        with pytest.raises(TypeError, match="float64"):
            rosita_fast.ops.linear_residual_layernorm(
                *(t.double() for t in (x, w)), None, *(t.double() for t in (res, ln_w, ln_b)),
                EPS)
    ref = reference_forward(x.double(), w.double(), None, res.double(), ln_w.double(),
                            ln_b.double(), EPS)
    assert_close(out, ref, torch.float32, "out")


# ----------------------------------------------------------------------------------------------
# Launch specs = what the launchers launch
# ----------------------------------------------------------------------------------------------


KERNELS = ("linear_residual_kernel", "layernorm_fwd_kernel", "layernorm_bwd_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launch_specs_are_what_the_launchers_launch(monkeypatch, dtype):
    """For contiguous, aligned inputs whose sizes are multiples of 16 (BERT-base / -large and
    small hidden sizes, with or without bias), the JIT specialisation of every launch is one of
    the ``contig`` launch specs (this module's, and linear_act's for the backward products);
    ``generic`` specs specialise nothing."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.kernel, kwargs))

    own = lk.launch_specs()
    specs = own + la.launch_specs()
    for name in KERNELS:
        monkeypatch.setattr(lk, name, Recorder(getattr(lk, name)))
    monkeypatch.setattr(la, "matmul_kernel", Recorder(la.matmul_kernel))
    for x_shape, n in (((2, 48, 96), 768), ((64, 32), 1024), ((32, 64), 48)):
        x, w = rand(*x_shape, dtype=dtype), rand(n, x_shape[-1], dtype=dtype)
        res, grad = rand(*x_shape[:-1], n, dtype=dtype), rand(*x_shape[:-1], n, dtype=dtype)
        ln_w, ln_b = rand(n, dtype=dtype), rand(n, dtype=dtype)
        for bias in (None, rand(n, dtype=dtype)):
            launches.clear()
            # the GPU path (no upcast, table tiles); the recorder launches nothing
            args = (x, w, bias, res, ln_w, ln_b, EPS)
            _, y, mean, rstd = lk.linear_residual_layernorm_train(*args, upcast=False)
            lk.linear_residual_layernorm_backward(grad, *args, torch.empty_like(y),
                                                  torch.empty_like(mean), torch.empty_like(rstd),
                                                  upcast=False)
            assert len(launches) == 5
            for kernel, kwargs in launches:
                candidates = [s for s in specs if s.kernel is kernel
                              and s.name.split("[")[1].startswith(TL[dtype])
                              and "contig" in s.name]
                assert any(spec_matches_launch(s, kernel, kwargs)
                           for s in candidates), kernel.__name__
    generic = [s for s in own if s.name.endswith(",generic]")]
    assert {s.kernel.__name__ for s in generic} == set(KERNELS)
    for spec in generic:
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name
        assert all(attr == [] for attr in spec.attrs.values()), spec.name
    assert len(own) <= 3 * 36, "keep the lowering test's compile time in check"


"""kd_logits_loss: every runnable backend against the float64 reference, forward (per-row losses and
every reduction) and backward, the hard inputs (logits of +-1e4, -inf classes, rows with no
teacher distribution, masked rows, NaN), strided inputs, thread counts, autograd bookkeeping,
opcheck, torch.compile and bad input.

The C++ kernels walk each row in blocks of 512 classes with 16 accumulator lanes: class counts
1, 2, 3, 17, 511, 512, 513 and 1537 put the row end before, on and after those boundaries."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.kd_logits_loss import KINDS, REDUCTIONS, reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

BACKENDS = [p for p in runnable_backends("kd_logits_loss") if p.values[0] != "triton"]
NATIVE = [p for p in BACKENDS if p.values[0] != "reference"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CLASSES = (1, 2, 3, 17, 511, 512, 513, 1537)

pytestmark = pytest.mark.usefixtures("seed")


def _logits(shape, dtype, scale=3.0, layout="contig"):
    if layout == "contig":
        return rand(*shape, dtype=dtype, scale=scale)
    if layout == "strided":  # every other class: a copy in the kernels
        return rand(*shape, dtype=dtype, scale=scale, contiguous=False)
    # rows of a wider tensor: unit class stride, a row stride above C (read in place)
    wide = rand(*shape[:-1], shape[-1] + 5, dtype=dtype, scale=scale)
    return wide[..., : shape[-1]]


def _mask(lead, p_keep=0.7):
    m = torch.rand(lead) < p_keep
    m.view(-1)[0] = True
    return m


def _loss_tol(dtype):
    # The kernels read fp16/bf16 exactly and accumulate in fp32: the losses are fp32 results.
    return 1e-10 if dtype == torch.float64 else 2e-5


def _check_rows_and_grad(backend, s, t, temperature, kind, mask):
    flat = mask.reshape(-1) if mask is not None else None
    with rosita_fast.use_backend(backend), poison_outputs():
        rows = ops.REGISTRY["kd_logits_loss"].run(s, t, temperature, kind, flat)
        rows_t, grad = ops.REGISTRY["kd_logits_loss_train"].run(s, t, temperature, kind, flat)
    s64, t64 = s.double(), t.double()
    ref = reference_forward(s64, t64, temperature, kind, flat)
    ref_g = reference_backward(s64, t64, temperature, kind, flat)
    assert rows.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert grad.dtype == s.dtype and grad.shape == (ref.shape[0], s.shape[-1])
    err = (rows.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    if ref.norm() == 0:  # one class: every loss and gradient is exactly 0
        assert torch.all(rows == 0) and torch.all(grad == 0)
        return
    assert err <= _loss_tol(s.dtype), f"rows: relative error {err:.3e}"
    assert torch.equal(rows, rows_t), "the training forward's losses differ from the plain op's"
    assert_close(grad, ref_g, s.dtype, "grad", k=4)
    if mask is not None:
        dropped = ~flat
        assert torch.all(rows[dropped] == 0) and torch.all(grad[dropped] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", CLASSES)
def test_rows_and_gradient_match_float64(backend, dtype, classes):
    for kind in KINDS:
        for lead, temperature, masked in (((5,), 1.0, False), ((3, 4), 2.5, True),
                                          ((37,), 0.5, True)):
            s = _logits((*lead, classes), dtype)
            t = _logits((*lead, classes), dtype)
            mask = _mask(lead) if masked else None
            _check_rows_and_grad(backend, s, t, temperature, kind, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "row_stride"])
def test_strided_logits(backend, layout):
    for kind in KINDS:
        s = _logits((6, 515), torch.float32, layout=layout)
        t = _logits((6, 515), torch.float32, layout=layout if kind == "kl" else "contig")
        assert not s.is_contiguous()
        _check_rows_and_grad(backend, s, t, 1.5, kind, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_hard_inputs(backend, dtype):
    c = 700
    s = _logits((8, c), torch.float32, scale=1.0)
    t = _logits((8, c), torch.float32, scale=1.0)
    s[0] *= 1e4  # +-1e4 logits: the maxima carry everything
    t[0] *= 1e4
    s[1], t[1] = 1e4 + s[1], -1e4 + t[1]
    t[2, ::3] = float("-inf")  # masked vocabulary: the student's logits there do not count
    s[2, ::6] = float("-inf")
    s[2, 1::6] = 50.0
    t[3] = float("-inf")  # no teacher distribution: contributes nothing, no NaN
    t[4, :600] = float("-inf")  # the only mass after the first block
    s[5, 513:] = float("-inf")  # both rule out the second block's classes
    t[5, 513:] = float("-inf")
    s, t = s.to(dtype), t.to(dtype)
    for kind in KINDS:
        _check_rows_and_grad(backend, s, t, 1.0, kind, None)
        with rosita_fast.use_backend(backend):
            rows, grad = ops.REGISTRY["kd_logits_loss_train"].run(s, t, 1.0, kind, None)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
        assert rows[3] == 0 and torch.all(grad[3] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_and_nan_rows(backend):
    s, t = rand(4, 40), rand(4, 40)
    s[0] = float("-inf")  # the student rules out everything the teacher allows: infinite loss
    s[1, 7] = float("-inf")  # ... or one class the teacher gives mass to
    s[2, 3] = float("nan")  # NaN shows
    t[3, 5] = float("inf")
    with rosita_fast.use_backend(backend):
        rows, grad = ops.REGISTRY["kd_logits_loss_train"].run(s, t, 1.0, "kl", None)
    assert rows[0] == float("inf") and rows[1] == float("inf")
    assert torch.isnan(rows[2]) and torch.isnan(rows[3])
    assert torch.isnan(grad[2]).all() and torch.isfinite(grad[1]).all()
    ref_g = reference_backward(s.double(), t.double(), 1.0, "kl")
    assert_close(grad[1], ref_g[1], torch.float32, "grad of the row with a -inf class")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_public_function_matches_torch(backend, reduction, kind):
    """Against torch's own formulas (kl_div / the explicit soft cross-entropy), every reduction,
    [N, C] and [B, T, C], T^2 scaling, with the gradient through autograd."""
    for shape, masked in (((9, 13), False), ((3, 5, 29), True)):
        temperature = 2.0
        s = rand(*shape, dtype=torch.float64, scale=2.0).requires_grad_()
        t = rand(*shape, dtype=torch.float64, scale=2.0)
        mask = _mask(shape[:-1]) if masked else None
        log_q = F.log_softmax(s / temperature, -1)
        log_p = F.log_softmax(t / temperature, -1)
        if kind == "kl":
            rows = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        else:
            rows = -(log_p.exp() * log_q).sum(-1)
        if mask is not None:
            rows = rows * mask
        want = {"none": rows, "sum": rows.sum(),
                "mean": rows.sum() / (mask.sum() if mask is not None else rows.numel()),
                "batchmean": rows.sum() / shape[0]}[reduction] * temperature**2
        with rosita_fast.use_backend(backend):
            got = ops.kd_logits_loss(s, t, temperature, kind, reduction, mask, scale_by_t2=True)
        assert got.shape == want.shape and got.dtype == torch.float64
        assert_close(got, want, torch.float64, "loss")
        g = torch.randn(want.shape, dtype=torch.float64)
        (want_grad,) = torch.autograd.grad(want, s, g)
        (got_grad,) = torch.autograd.grad(got, s, g)
        assert_close(got_grad, want_grad, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    s = rand(4, 530, dtype=torch.float64).requires_grad_()
    t = rand(4, 530, dtype=torch.float64)
    t[1, ::4] = float("-inf")
    mask = torch.tensor([True, True, False, True])
    with rosita_fast.use_backend(backend):
        for kind in KINDS:
            for reduction in ("none", "mean"):
                assert torch.autograd.gradcheck(
                    lambda x, k=kind, r=reduction: ops.kd_logits_loss(x, t, 1.7, k, r, mask),
                    (s,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_retaining_the_graph_equals_the_in_place_one(backend):
    s = rand(6, 33).requires_grad_()
    t = rand(6, 33)
    with rosita_fast.use_backend(backend):
        loss = 3.0 * ops.kd_logits_loss(s, t, 2.0)
        (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, s)  # frees the graph: scales the saved rows in place
    assert torch.equal(g1, g2)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, s)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision_in_place_backward_in_row_blocks(backend, dtype, monkeypatch):
    # fp16/bf16 rows scaled by fp32 factors go a block of rows at a time (so that the
    # mixed-dtype product's fp32 copies stay small): blocks of 2 rows of 33 logits over 7 rows
    # (a partial last block), in place and out of place (retained graph), must equal the
    # whole-tensor product rounded once from fp32.
    module = importlib.import_module("rosita_fast.ops.kd_logits_loss")  # not the function
    monkeypatch.setattr(module, "_SCALE_BLOCK_ELEMS", 66)
    s = rand(7, 33, dtype=dtype).requires_grad_()
    t = rand(7, 33, dtype=dtype)
    w = rand(7)
    with rosita_fast.use_backend(backend):
        saved = ops.REGISTRY["kd_logits_loss_train"].run(s.detach(), t, 2.0, "kl", None)[1]
        loss = (ops.kd_logits_loss(s, t, 2.0, reduction="none") * w).sum()
        (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, s)
    expected = (saved.float() * w[:, None]).to(dtype)
    assert g2.dtype == dtype and torch.equal(g1, expected) and torch.equal(g2, expected)


def test_teacher_gets_no_gradient():
    s, t = rand(3, 8).requires_grad_(), rand(3, 8).requires_grad_()
    ops.kd_logits_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("backend", NATIVE)
def test_results_do_not_depend_on_the_thread_count(backend):
    s, t = rand(64, 1100), rand(64, 1100)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with rosita_fast.use_backend(backend):
                results.append(ops.REGISTRY["kd_logits_loss_train"].run(s, t, 1.0, "kl", None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_empty_batch():
    for backend in [p.values[0] for p in BACKENDS]:
        s = torch.empty(0, 7, requires_grad=True)
        with rosita_fast.use_backend(backend):
            loss = ops.kd_logits_loss(s, torch.empty(0, 7), reduction="sum")
            loss.backward()
            assert loss.item() == 0 and s.grad.shape == (0, 7)
            assert ops.kd_logits_loss(s, torch.empty(0, 7), reduction="mean").item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    s = rand(5, 19).requires_grad_()
    t = rand(5, 19)
    mask = torch.tensor([True, False, True, True, False])
    with rosita_fast.use_backend(backend):
        for op in ("kd_logits_loss", "kd_logits_loss_train"):
            torch.library.opcheck(getattr(torch.ops.rosita_fast, op).default,
                                  (s, t, 1.5, "kl", mask))
            torch.library.opcheck(getattr(torch.ops.rosita_fast, op).default,
                                  (s, t, 1.0, "soft_ce", None))


def test_compile_fullgraph():
    s = rand(7, 23).requires_grad_()
    t = rand(7, 23)

    def f(a, b):
        return ops.kd_logits_loss(a, b, 2.0, "soft_ce", "mean", scale_by_t2=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(s, t)
    (got_grad,) = torch.autograd.grad(got, s)
    want = f(s, t)
    (want_grad,) = torch.autograd.grad(want, s)
    assert_close(got, want, torch.float32, "loss")
    assert_close(got_grad, want_grad, torch.float32, "grad")


def test_matches_the_distill_losses():
    """The KD module's plain losses and the op agree (one math, two entry points)."""
    from rosita_fast.distill import losses

    s, t = rand(6, 5, scale=2.0), rand(6, 5, scale=2.0)
    assert_close(ops.kd_logits_loss(s, t, 2.0, "kl"), losses.kl_divergence(s, t, 2.0),
                 torch.float32, "kl", k=2)
    assert_close(ops.kd_logits_loss(s, t, 2.0, "soft_ce"), losses.soft_cross_entropy(s, t, 2.0),
                 torch.float32, "soft_ce", k=2)


def test_bad_inputs_raise():
    s, t = rand(3, 5), rand(3, 5)
    with pytest.raises(ValueError, match="shape"):
        ops.kd_logits_loss(s, rand(3, 6))
    with pytest.raises(ValueError, match=r"\[N, C\] or \[B, T, C\]"):
        ops.kd_logits_loss(rand(5), rand(5))
    with pytest.raises(TypeError, match="dtype"):
        ops.kd_logits_loss(s, t.double())
    with pytest.raises(TypeError, match="dtype"):
        ops.kd_logits_loss(s.int(), t.int())
    with pytest.raises(ValueError, match="temperature"):
        ops.kd_logits_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.kd_logits_loss(s, t, temperature=float("inf"))
    with pytest.raises(ValueError, match="kind"):
        ops.kd_logits_loss(s, t, kind="mse")
    with pytest.raises(ValueError, match="reduction"):
        ops.kd_logits_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="mask shape"):
        ops.kd_logits_loss(s, t, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ops.kd_logits_loss(s, t, mask=torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="no classes"):
        ops.kd_logits_loss(rand(3, 0), rand(3, 0))

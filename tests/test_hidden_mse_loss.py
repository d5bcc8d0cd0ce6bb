"""hidden_mse_loss: every runnable backend against the float64 reference and against the KD module's
per-layer loss, forward and backward, masks (a row kept, none kept), mappings, strided states,
thread counts, opcheck, torch.compile and bad input.

The C++ kernels split every pair's rows into blocks of 32 and each row into 16 accumulator
lanes: 2 x 37 rows and hidden sizes 1, 15, 16, 17 and 768 cross both."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.distill import losses
from rosita_fast.ops.hidden_mse_loss import reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

# The Triton backend has its own file (test_hidden_mse_loss_triton.py): no float64 kernels.
BACKENDS = [p for p in runnable_backends("hidden_mse_loss") if p.values[0] != "triton"]
NATIVE = [p for p in BACKENDS if p.values[0] != "reference"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

pytestmark = pytest.mark.usefixtures("seed")


def _states(n, shape, dtype, contiguous=True):
    return [rand(*shape, dtype=dtype, contiguous=contiguous) for _ in range(n)]


def _mask(b, t):
    m = torch.rand(b, t) < 0.7
    m[0, 0] = True
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 15, 16, 17, 768])
def test_terms_and_gradients_match_float64(backend, dtype, hidden):
    b, t = 2, 37
    student = _states(4, (b, t, hidden), dtype)
    teacher = _states(4, (b, t, hidden), dtype)
    for mask in (None, _mask(b, t)):
        with rosita_fast.use_backend(backend), poison_outputs():
            terms = ops.REGISTRY["hidden_mse_loss"].run(student, teacher, mask)
            g = torch.rand(4) + 0.5
            grads = ops.REGISTRY["hidden_mse_loss_backward"].run(g, student, teacher, mask)
        s64, t64 = [s.double() for s in student], [x.double() for x in teacher]
        ref = reference_forward(s64, t64, mask)
        ref_grads = reference_backward(g.double(), s64, t64, mask)
        assert terms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        err = ((terms.double() - ref).norm() / ref.norm()).item()
        assert err <= (1e-12 if dtype == torch.float64 else 2e-6), err
        for got, want, s in zip(grads, ref_grads, student, strict=True):
            assert got.dtype == dtype and got.shape == s.shape
            assert_close(got, want, dtype, "grad")
            if mask is not None:
                assert torch.all(got[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_function_matches_the_per_layer_losses(backend):
    """The sum over the mapped pairs of losses.hidden_mse, gradients through autograd, strided
    states, a mapping that reuses and skips teacher states, mask of 0/1 integers."""
    b, t, h = 3, 11, 40
    student = [s.requires_grad_() for s in _states(3, (b, t, h), torch.float32,
                                                   contiguous=False)]
    teacher = _states(5, (b, t, h), torch.float32)
    mapping = [0, 2, 2]
    mask = _mask(b, t).long()
    with rosita_fast.use_backend(backend):
        got = ops.hidden_mse_loss(student, teacher, mapping, mask)
        per_pair = ops.hidden_mse_loss(student, teacher, mapping, mask, per_pair=True)
    want = sum(losses.hidden_mse(s, teacher[j], mask) for s, j in zip(student, mapping,
                                                                       strict=True))
    assert_close(got, want, torch.float32, "loss")
    assert per_pair.shape == (3,)
    assert_close(per_pair.sum(), want, torch.float32, "per pair")
    got_grads = torch.autograd.grad(got, student)
    want_grads = torch.autograd.grad(want, student)
    for g1, g2 in zip(got_grads, want_grads, strict=True):
        assert_close(g1, g2, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_that_keeps_nothing_gives_zero(backend):
    s = [rand(2, 5, 8).requires_grad_()]
    with rosita_fast.use_backend(backend):
        loss = ops.hidden_mse_loss(s, [rand(2, 5, 8)], mask=torch.zeros(2, 5, dtype=torch.bool))
        (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0 and torch.all(g == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    student = [rand(2, 35, 9, dtype=torch.float64).requires_grad_() for _ in range(2)]
    teacher = _states(2, (2, 35, 9), torch.float64)
    mask = _mask(2, 35)
    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b: ops.hidden_mse_loss([a, b], teacher, mask=mask, per_pair=True),
            tuple(student), fast_mode=True)


@pytest.mark.parametrize("backend", NATIVE)
def test_results_do_not_depend_on_the_thread_count(backend):
    student, teacher = _states(3, (4, 100, 64), torch.float32), _states(3, (4, 100, 64),
                                                                        torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with rosita_fast.use_backend(backend):
                results.append(ops.REGISTRY["hidden_mse_loss"].run(student, teacher, None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    student = [rand(2, 3, 8).requires_grad_() for _ in range(2)]
    teacher = _states(2, (2, 3, 8), torch.float32)
    with rosita_fast.use_backend(backend):
        torch.library.opcheck(torch.ops.rosita_fast.hidden_mse_loss.default,
                              (student, teacher, _mask(2, 3)))
        torch.library.opcheck(torch.ops.rosita_fast.hidden_mse_loss_backward.default,
                              (torch.rand(2), [s.detach() for s in student], teacher, None))


def test_compile_fullgraph():
    student = [rand(2, 7, 16).requires_grad_() for _ in range(3)]
    teacher = _states(4, (2, 7, 16), torch.float32)
    mask = _mask(2, 7)

    def f(a, b, c):
        return ops.hidden_mse_loss([a, b, c], teacher, [1, 2, 3], mask)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*student)
    want = f(*student)
    assert_close(got, want, torch.float32, "loss")
    for g1, g2 in zip(torch.autograd.grad(got, student), torch.autograd.grad(want, student),
                      strict=True):
        assert_close(g1, g2, torch.float32, "grad")


def test_teacher_gets_no_gradient():
    s, t = rand(1, 4, 8).requires_grad_(), rand(1, 4, 8).requires_grad_()
    ops.hidden_mse_loss([s], [t]).backward()
    assert s.grad is not None and t.grad is None


def test_bad_inputs_raise():
    s, t = rand(2, 3, 4), rand(2, 3, 4)
    with pytest.raises(TypeError, match="sequence of tensors"):
        ops.hidden_mse_loss(s, [t])
    with pytest.raises(ValueError, match="no student states"):
        ops.hidden_mse_loss([], [t])
    with pytest.raises(ValueError, match="pass a mapping"):
        ops.hidden_mse_loss([s, s], [t])
    with pytest.raises(ValueError, match="mapping has 1 entries"):
        ops.hidden_mse_loss([s, s], [t], mapping=[0])
    with pytest.raises(ValueError, match="mapping\\[0\\]"):
        ops.hidden_mse_loss([s], [t], mapping=[1])
    with pytest.raises(ValueError, match="shape"):
        ops.hidden_mse_loss([s], [rand(2, 3, 5)])
    with pytest.raises(TypeError, match="dtype"):
        ops.hidden_mse_loss([s], [t.double()])
    with pytest.raises(ValueError, match=r"\[batch, seq, hidden\]"):
        ops.hidden_mse_loss([rand(3, 4)], [rand(3, 4)])
    with pytest.raises(ValueError, match="mask shape"):
        ops.hidden_mse_loss([s], [t], mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ops.hidden_mse_loss([s], [t], mask=torch.full((2, 3), 0.5))

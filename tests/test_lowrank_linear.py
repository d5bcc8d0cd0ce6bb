"""lowrank_linear: every runnable backend against a float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import DTYPES, TOLERANCE, assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.lowrank_linear import reference_forward
from rosita_fast.testing import poison_outputs

BACKENDS = runnable_backends("lowrank_linear")
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
# (leading dims, in, out, rank): odd sizes; ranks covering every Triton rank tile (32..256).
SHAPES = [
    ((3,), 17, 23, 5),
    ((2, 5), 33, 20, 7),
    ((37,), 64, 96, 48),
    ((2, 3), 130, 150, 100),
    ((19,), 300, 260, 200),
]


def _inputs(lead, k, n, r, dtype, bias, contiguous=True, requires_grad=False):
    # Scale the factors so activations see values of order 1 (the GELU/ReLU kinks matter).
    x = rand(*lead, k, dtype=dtype, contiguous=contiguous)
    u = rand(n, r, dtype=dtype, scale=r**-0.5)
    v = rand(r, k, dtype=dtype, contiguous=contiguous, scale=k**-0.5)
    b = rand(n, dtype=dtype) if bias else None
    tensors = [x, u, v] + ([b] if bias else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, u, v, b


def _reference64(x, u, v, b, act):
    args = [
        t.detach().double().requires_grad_(True) if t is not None else None for t in (x, u, v, b)
    ]
    out = reference_forward(*args, act)
    return out, args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward(backend, dtype, shape, act, bias, seed):
    lead, k, n, r = shape
    contiguous = (seed % 2) == 0  # half the runs on strided views
    x, u, v, b = _inputs(lead, k, n, r, dtype, bias, contiguous, requires_grad=True)
    if act == "relu" and b is not None:
        # A pre-activation within rounding of ReLU's kink takes a whole gradient entry to the
        # other side of it in either computation; keep most of them away from 0.
        with torch.no_grad():
            b.add_(torch.sign(b) * 2)
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.lowrank_linear(x, u, v, b, act)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t for t in (x, u, v, b) if t is not None], grad_out)
    ref, args64 = _reference64(x, u, v, b, act)
    assert out.dtype == dtype
    m = out.numel() // n
    assert_close(out, ref, dtype, f"{backend} forward", k=k)
    ref_grads = torch.autograd.grad(ref, [a for a in args64 if a is not None], grad_out.double())
    for name, g, rg in zip("x u v bias".split()[: len(grads)], grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, f"{backend} d{name}", k=max(k, n, m))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(backend, act, seed):
    x, u, v, b = _inputs((2, 3), 9, 7, 4, torch.float64, True, requires_grad=True)
    if act == "relu":
        # Keep pre-activations away from the kink, where finite differences are meaningless.
        with torch.no_grad():
            b.add_(torch.sign(b) * 3)
    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: ops.lowrank_linear(*a, activation=act), (x, u, v, b), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, seed):
    x = rand(0, 12).requires_grad_(True)
    u, v = rand(10, 4).requires_grad_(True), rand(4, 12).requires_grad_(True)
    b = rand(10).requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.lowrank_linear(x, u, v, b, "gelu")
        assert out.shape == (0, 10)
        dx, du, dv, db = torch.autograd.grad(out.sum(), (x, u, v, b))
    assert dx.shape == (0, 12)
    # No rows: every parameter gradient is exactly zero.
    for g in (du, dv, db):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nan_propagates(backend, act, seed):
    x, u, v, b = _inputs((6,), 20, 16, 8, torch.float32, True)
    x[2, 5] = float("nan")
    with rosita_fast.use_backend(backend):
        out = ops.lowrank_linear(x, u, v, b, act)
    assert torch.isnan(out[2]).all(), "a NaN input must poison its whole output row"
    finite = torch.cat([out[:2], out[3:]])
    assert torch.isfinite(finite).all(), "NaN must not leak into other rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_two_linears(backend, seed):
    # Independent of the reference module: two nn.Linear layers are the same computation.
    lin_v = torch.nn.Linear(24, 6, bias=False)
    lin_u = torch.nn.Linear(6, 30)
    x = rand(4, 5, 24)
    with rosita_fast.use_backend(backend):
        out = ops.lowrank_linear(x, lin_u.weight, lin_v.weight, lin_u.bias, "gelu")
    expected = torch.nn.functional.gelu(lin_u(lin_v(x)))
    assert_close(out, expected, torch.float32, backend)


def test_torch_compile_fullgraph(seed):
    model = torch.nn.Sequential(
        rosita_fast.LowRankLinear(32, 48, 8, activation="gelu"),
        rosita_fast.LowRankLinear(48, 16, 8),
    )
    x = rand(5, 32)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert_close(out, expected, torch.float32, "compiled forward")
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        assert_close(g, p.grad, torch.float32, "compiled backward")


def test_opcheck(seed):
    # Schema, fake tensor kernel, autograd registration and dispatcher consistency.
    x, u, v, b = _inputs((3, 4), 10, 9, 5, torch.float32, True, requires_grad=True)
    for act in ACTIVATIONS:
        torch.library.opcheck(torch.ops.rosita_fast.lowrank_linear.default, (x, u, v, b, act))
        torch.library.opcheck(torch.ops.rosita_fast.lowrank_linear.default, (x, u, v, None, act))


class TestBadInput:
    def setup_method(self):
        self.x, self.u, self.v = rand(4, 10), rand(8, 3), rand(3, 10)

    def test_feature_mismatch_names_x(self):
        with pytest.raises(ValueError, match="x has 11 features"):
            ops.lowrank_linear(rand(4, 11), self.u, self.v)

    def test_rank_mismatch_names_u_and_v(self):
        with pytest.raises(ValueError, match="u.shape\\[1\\] must equal v.shape\\[0\\]"):
            ops.lowrank_linear(self.x, rand(8, 4), self.v)

    def test_rank_above_min_dim(self):
        with pytest.raises(ValueError, match="exceeds min"):
            ops.lowrank_linear(rand(2, 4), rand(6, 5), rand(5, 4))

    def test_dtype_mismatch_names_argument(self):
        with pytest.raises(TypeError, match="v has dtype torch.float16"):
            ops.lowrank_linear(self.x, self.u, self.v.half())
        with pytest.raises(TypeError, match="bias has dtype torch.float64"):
            ops.lowrank_linear(self.x, self.u, self.v, rand(8, dtype=torch.float64))

    def test_device_mismatch_names_argument(self):
        with pytest.raises(ValueError, match="u is on meta"):
            ops.lowrank_linear(self.x, self.u.to("meta"), self.v)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
            ops.lowrank_linear(self.x, self.u, self.v, rand(9))

    def test_unknown_activation(self):
        with pytest.raises(ValueError, match="activation must be one of"):
            ops.lowrank_linear(self.x, self.u, self.v, activation="swish")

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            ops.lowrank_linear(self.x.long(), self.u, self.v)

    def test_triton_rejects_float64_and_large_rank(self):
        if "triton" not in rosita_fast.available_backends():
            pytest.skip("triton backend not available")
        with rosita_fast.use_backend("triton"):
            with pytest.raises(TypeError, match="float64"):
                ops.lowrank_linear(self.x.double(), self.u.double(), self.v.double())
            with pytest.raises(ValueError, match="rank <= 256"):
                ops.lowrank_linear(rand(2, 300), rand(300, 260), rand(260, 300))


def test_tolerances_are_meaningful():
    # Guard the harness itself: an fp16 result must not pass at fp32 tolerance by accident.
    ref = torch.randn(64, 64, dtype=torch.float64)
    assert (ref.half().double() - ref).norm() / ref.norm() > TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_autocast_cpu_bf16(backend, act, seed):
    # fp32 parameters, fp32 input, CPU bf16 autocast: the op casts its inputs (as F.linear does)
    # instead of rejecting the mix; gradients reach the fp32 parameters in fp32.
    x, u, v, b = _inputs((3, 5), 40, 36, 12, torch.float32, True, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), rosita_fast.use_backend(backend):
        out = ops.lowrank_linear(x, u, v, b, act)
    assert out.dtype == torch.bfloat16
    ref, _ = _reference64(*(t.detach().to(torch.bfloat16) for t in (x, u, v, b)), act)
    assert_close(out, ref, torch.bfloat16, f"{backend} autocast forward", k=40)
    out.float().sum().backward()
    for t in (x, u, v, b):
        assert t.grad is not None and t.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone(seed):
    x, u, v, b = _inputs((4,), 10, 8, 3, torch.float64, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.lowrank_linear(x, u, v, b, "relu").dtype == torch.float64


@pytest.mark.parametrize("lead", [(7,), (130,), (3, 41)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cpp_without_activation_is_eager(lead, bias, seed):
    # No epilogue to fuse: the C++ forward issues the same two BLAS calls as eager
    # F.linear(F.linear(x, v), u, bias), so the results are identical, not merely close.
    x, u, v, b = _inputs(lead, 64, 300, 16, torch.float32, bias)
    with rosita_fast.use_backend("cpp"):
        out = ops.lowrank_linear(x, u, v, b, "none")
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, v), u, b)
    assert torch.equal(out, expected)


def test_torch_compile_under_autocast(seed):
    model = torch.nn.Sequential(
        rosita_fast.LowRankLinear(32, 48, 8, activation="gelu"),
        rosita_fast.LowRankLinear(48, 16, 8),
    )
    x = rand(5, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = compiled(x), model(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected.float(), torch.bfloat16, "compiled autocast forward", k=48)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_forced_backend_reaches_a_backward_on_another_thread(monkeypatch, seed):
    # CUDA runs backward on autograd device threads, where a use_backend block around the forward
    # is not in effect; the backend forced at forward time must still run the backward.
    import threading

    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["lowrank_linear_backward"].impls
    real, calls = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: calls.append(1) or real(*a))
    x, u, v, b = _inputs((4,), 12, 10, 3, torch.float32, True, requires_grad=True)
    with rosita_fast.use_backend("reference"):
        out = ops.lowrank_linear(x, u, v, b, "gelu")
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert calls == [1] and x.grad is not None


def test_training_forward_keeps_h_for_the_backward(monkeypatch, seed):
    # With autograd recording, the forward returns h = x v^T too and the backward reuses it
    # instead of recomputing the largest-K product.
    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["lowrank_linear_backward"].impls
    real, seen = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: seen.append(a[-1]) or real(*a))
    x, u, v, b = _inputs((2, 3), 20, 16, 5, torch.float32, True, requires_grad=True)
    with rosita_fast.use_backend("reference"):
        ops.lowrank_linear(x, u, v, b, "gelu").sum().backward()
    (h,) = seen
    assert h is not None and h.shape == (6, 5)
    assert_close(h, x.detach().reshape(6, 20).double() @ v.detach().double().t(), torch.float32,
                 "saved h")


# The Triton backward recomputes h on chip and ignores a kept one: nothing to compare there.
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_backward_with_saved_h_matches_recompute(backend, act, seed):
    x, u, v, b = _inputs((130,), 48, 72, 12, torch.float32, True)
    grad = rand(130, 72)
    with rosita_fast.use_backend(backend):
        _, h = torch.ops.rosita_fast.lowrank_linear_train(x, u, v, b, act)
        with_h = torch.ops.rosita_fast.lowrank_linear_backward(grad, x, u, v, b, act, h)
        without = torch.ops.rosita_fast.lowrank_linear_backward(grad, x, u, v, b, act)
    for name, a, c in zip(("dx", "du", "dv", "dbias"), with_h, without, strict=True):
        assert_close(a, c, torch.float32, f"{backend} {name}")


def test_opcheck_training_ops(seed):
    x, u, v, b = _inputs((3, 4), 10, 9, 5, torch.float32, True, requires_grad=True)
    train = torch.ops.rosita_fast.lowrank_linear_train.default
    backward = torch.ops.rosita_fast.lowrank_linear_backward.default
    for act in ("none", "gelu"):
        torch.library.opcheck(train, (x, u, v, b, act))
        torch.library.opcheck(train, (x, u, v, None, act))
        grad = rand(3, 4, 9)
        h = torch.ops.rosita_fast.lowrank_linear_train(x, u, v, b, act)[1].detach()
        args = (grad, x.detach(), u.detach(), v.detach(), b.detach(), act)
        torch.library.opcheck(backward, (*args, h))
        torch.library.opcheck(backward, args)

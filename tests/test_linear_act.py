"""linear_act: every runnable backend against a float64 reference, forward and backward, packed and
unpacked weights, the C++ kernel's paths (the GEMM route's library and the small-product ATen
route, row chunks over threads), autograd bookkeeping, opcheck, torch.compile and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import DTYPES, rand, runnable_backends, tolerance
from kernel_harness import assert_close as _assert_close

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.linear_act import reference_forward
from rosita_fast.testing import poison_outputs

# The Triton backend has its own file (test_linear_act_triton.py): it runs under the
# interpreter, which is slow, and has no float64 kernels.
BACKENDS = [p for p in runnable_backends("linear_act") if p.values[0] != "triton"]
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
# (leading dims, in, out): widths 1, 8, 40, 384, 768, 1792 and odd ones; rows 1, 5, 21, 37, 38,
# 67. Products below 2^20 multiply-adds take the C++ backend's ATen route (2^18 with a packed
# weight), larger ones the library of the GEMM route (oneDNN or ATen, whichever the calibration
# picked on this CPU; tests/test_gemm_route.py and the fuzz tests force each): both are here.
SHAPES = [
    ((1,), 1, 1),
    ((5,), 8, 1),
    ((3, 7), 40, 8),
    ((37,), 384, 40),
    ((2, 19), 768, 384),
]
# The widest layers, with fewer combinations (the float64 reference dominates their time).
WIDE = [((3,), 1792, 768), ((67,), 129, 1792)]


def assert_close(out, ref, dtype, what, k=1, magnitude=None):
    """kernel_harness.assert_close, except where the result is far smaller than its terms (an
    output element of a tiny shape that GELU/ReLU takes to ~0: a relative error of such a lone
    element is meaningless). ``magnitude``: the reference on the inputs' absolute values; the
    bound is then relative to max(||ref||, ||magnitude|| / sqrt(k)), as in tests/test_fuzz.py."""
    if magnitude is None:
        return _assert_close(out, ref, dtype, what, k=k)
    assert out.shape == ref.shape and torch.isfinite(out).all(), what
    err = (out.detach().double() - ref.detach().double()).norm().item()
    scale = max(ref.detach().double().norm().item(), magnitude.double().norm().item() / k**0.5)
    assert err <= tolerance(dtype, k) * scale, f"{what}: error {err:.3e} vs scale {scale:.3e}"


CPP = pytest.mark.skipif("cpp" not in rosita_fast.available_backends(),
                         reason="the C++ extension is not available")


def _inputs(lead, k, n, dtype, bias, contiguous=True, requires_grad=False):
    # Scale the weight so pre-activations are of order 1 (the GELU/ReLU kinks matter).
    x = rand(*lead, k, dtype=dtype, contiguous=contiguous)
    w = rand(n, k, dtype=dtype, contiguous=contiguous, scale=k**-0.5)
    b = rand(n, dtype=dtype, contiguous=contiguous) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def _keep_off_relu_kink(b, act):
    # A pre-activation within rounding of ReLU's kink takes a whole gradient entry to the other side
    # of it in either computation; keep most of them away from 0 (every other one positive, so
    # even one output column is not all zero).
    if act == "relu" and b is not None:
        with torch.no_grad():
            sign = 1 - 2 * (torch.arange(b.shape[0]) % 2)
            b.copy_(sign * (b.abs() + 2))


def _reference64(x, w, b, act, grad=None):
    args = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = reference_forward(*args, act)
    if grad is None:
        return out, None
    grads = torch.autograd.grad(out, [a for a in args if a is not None], grad.double())
    return out, grads


def _magnitude(x, w, b, act):
    # The reference on |inputs|: the size of the terms each output element sums.
    with torch.no_grad():
        return reference_forward(*(t.detach().double().abs() if t is not None else None
                                   for t in (x, w, b)), act)


def _grad_magnitudes(x, w, b, grad):
    # The size of the terms each gradient element sums: the gradients without the activation on
    # |inputs| and |grad| (|act'| <= 1.13 for every activation here).
    args = [t.detach().double().abs().requires_grad_(True) if t is not None else None
            for t in (x, w, b)]
    out = reference_forward(*args, "none")
    return torch.autograd.grad(out, [a for a in args if a is not None], grad.double().abs())


CASES = [pytest.param(shape, act, bias, id=f"{shape}-{act}-{'bias' if bias else 'nobias'}")
         for shape in SHAPES for act in ACTIVATIONS for bias in (True, False)]
CASES += [pytest.param(shape, act, True, id=f"{shape}-{act}-bias")
          for shape in WIDE for act in ("relu", "gelu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, act, bias", CASES)
def test_forward_backward(backend, dtype, shape, act, bias, seed):
    lead, k, n = shape
    contiguous = (seed % 2) == 0  # half the runs on strided views (x, weight, bias)
    x, w, b = _inputs(lead, k, n, dtype, bias, contiguous, requires_grad=True)
    _keep_off_relu_kink(b, act)
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.linear_act(x, w, b, act)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad_out)
    ref, ref_grads = _reference64(x, w, b, act, grad_out)
    assert out.dtype == dtype and out.shape == (*lead, n)
    m = out.numel() // n
    assert_close(out, ref, dtype, f"{backend} forward", k=k, magnitude=_magnitude(x, w, b, act))
    mags = _grad_magnitudes(x, w, b, grad_out)
    for name, g, rg, mg in zip(("x", "weight", "bias"), grads, ref_grads, mags, strict=False):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, f"{backend} d{name}", k=max(k, n, m), magnitude=1.13 * mg)


@CPP
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((1,), 768, 768), ((2, 3), 40, 8), ((4, 16), 768, 384),
                                   ((300,), 129, 1792)], ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_packed_weight(dtype, shape, act, seed):
    # Inference with the weight prepacked for oneDNN: the same function, any number of rows
    # (the pack's batch hint is a hint), strided x.
    lead, k, n = shape
    x, w, b = _inputs(lead, k, n, dtype, True, contiguous=(seed % 2) == 0)
    packed = ops.pack_linear_weight(w, batch_hint=64)
    if not ops.packing_supported(dtype):
        assert packed is None
        pytest.skip(f"oneDNN on this CPU does not serve {dtype} GEMMs: nothing to pack")
    assert packed is not None and packed.is_mkldnn and packed.shape == w.shape
    with torch.no_grad(), rosita_fast.use_backend("cpp"), poison_outputs():
        out = ops.linear_act(x, w, b, act, packed)
    ref, _ = _reference64(x, w, b, act)
    assert_close(out, ref, dtype, "packed forward", k=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_weight_is_ignored_where_it_cannot_be_used(backend, seed):
    # The reference backend and calls that record autograd take the plain weight.
    x, w, b = _inputs((6, 5), 40, 24, torch.float32, True, requires_grad=True)
    packed = ops.pack_linear_weight(w)
    with rosita_fast.use_backend(backend):
        out = ops.linear_act(x, w, b, "gelu", packed)
        with torch.no_grad():
            out_nograd = ops.linear_act(x, w, b, "gelu", packed)
    dx, dw, db = torch.autograd.grad(out.sum(), (x, w, b))
    ref, ref_grads = _reference64(x, w, b, "gelu", torch.ones_like(out))
    assert_close(out, ref, torch.float32, "forward")
    assert_close(out_nograd, ref, torch.float32, "no-grad forward")
    for g, rg in zip((dx, dw, db), ref_grads, strict=True):
        assert_close(g, rg, torch.float32, "grad")


def test_pack_linear_weight():
    w = rand(24, 40)
    packed = ops.pack_linear_weight(w, batch_hint=7)
    if "cpp" not in rosita_fast.available_backends() or not torch.backends.mkldnn.is_available():
        assert packed is None
        return
    assert packed.is_mkldnn and packed.dtype == torch.float32 and packed.shape == (24, 40)
    # fp16 products run in fp32: the packed form of an fp16 weight is fp32.
    assert ops.pack_linear_weight(w.half()).dtype == torch.float32
    assert ops.pack_linear_weight(w.double()) is None  # no fp64 oneDNN GEMM
    assert ops.pack_linear_weight(w.requires_grad_(True)) is not None
    with pytest.raises(ValueError, match="2-D"):
        ops.pack_linear_weight(rand(8))
    with pytest.raises(ValueError, match="batch_hint"):
        ops.pack_linear_weight(w, batch_hint=0)


@CPP
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_cpp_row_chunks(threads, dtype, act, seed):
    # The backward's dz pass splits rows in one chunk per thread (at least 2^14 elements each),
    # each summing its own bias-gradient row: 1100 rows of 40 columns make 1, 2 and 3 chunks.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b = _inputs((1100,), 24, 40, dtype, True, requires_grad=True)
        _keep_off_relu_kink(b, act)
        with rosita_fast.use_backend("cpp"), poison_outputs():
            out = ops.linear_act(x, w, b, act)
            grad_out = torch.randn_like(out)
            grads = torch.autograd.grad(out, (x, w, b), grad_out)
    finally:
        torch.set_num_threads(previous)
    ref, ref_grads = _reference64(x, w, b, act, grad_out)
    assert_close(out, ref, dtype, "forward", k=24)
    for name, g, rg in zip(("x", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, rg, dtype, f"d{name}", k=1100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(backend, act, seed):
    x, w, b = _inputs((2, 3), 9, 7, torch.float64, True, requires_grad=True)
    if act == "relu":
        # Keep pre-activations away from the kink, where finite differences are meaningless.
        with torch.no_grad():
            b.add_(torch.sign(b) * 3)
    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: ops.linear_act(*a, activation=act), (x, w, b), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, seed):
    x = rand(0, 12).requires_grad_(True)
    w, b = rand(10, 12).requires_grad_(True), rand(10).requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.linear_act(x, w, b, "gelu")
        assert out.shape == (0, 10)
        dx, dw, db = torch.autograd.grad(out.sum(), (x, w, b))
    assert dx.shape == (0, 12)
    for g in (dw, db):  # no rows: the parameter gradients are exactly zero
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nan_propagates(backend, act, seed):
    for rows, k in ((6, 20), (40, 768)):  # MKL route and oneDNN
        x, w, b = _inputs((rows,), k, 48, torch.float32, True)
        x[2, 5] = float("nan")
        with rosita_fast.use_backend(backend):
            out = ops.linear_act(x, w, b, act)
        assert torch.isnan(out[2]).all(), "a NaN input must poison its whole output row"
        assert torch.isfinite(torch.cat([out[:2], out[3:]])).all(), "NaN leaked into other rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
def test_matches_eager(backend, act, seed):
    # Independent of the reference module: nn.Linear and the activation.
    lin = torch.nn.Linear(384, 96)
    x = rand(4, 9, 384)
    fn = {"none": lambda z: z, "relu": torch.relu, "gelu": F.gelu,
          "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[act]
    with rosita_fast.use_backend(backend), torch.no_grad():
        out = ops.linear_act(x, lin.weight, lin.bias, act)
        expected = fn(lin(x))
    assert_close(out, expected, torch.float32, backend)


def test_torch_compile_fullgraph(seed):
    lin1, lin2 = torch.nn.Linear(32, 48), torch.nn.Linear(48, 16)

    def f(x, w1, b1, w2, b2):
        return ops.linear_act(ops.linear_act(x, w1, b1, "gelu"), w2, b2, "relu")

    params = [lin1.weight, lin1.bias, lin2.weight, lin2.bias]
    x = rand(3, 5, 32)
    expected = f(x, *params)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, *params)
    assert_close(out, expected, torch.float32, "compiled forward")
    grads = torch.autograd.grad(out.sum(), params)
    ref_grads = torch.autograd.grad(expected.sum(), params)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, "compiled backward")
    with torch.no_grad():
        assert_close(compiled(x, *params), expected, torch.float32, "compiled no-grad forward")


@CPP
def test_torch_compile_drops_packed_weight(seed):
    lin = torch.nn.Linear(32, 48)
    packed = ops.pack_linear_weight(lin.weight)
    x = rand(5, 32)

    def f(x, w, b):
        return ops.linear_act(x, w, b, "gelu", packed)

    with torch.no_grad():
        expected = F.gelu(lin(x))
        out = torch.compile(f, fullgraph=True)(x, lin.weight, lin.bias)
    assert_close(out, expected, torch.float32, "compiled forward with a packed weight")


def test_opcheck(seed):
    # Schema, fake tensor kernel, autograd registration and dispatcher consistency.
    x, w, b = _inputs((3, 4), 10, 9, torch.float32, True, requires_grad=True)
    op = torch.ops.rosita_fast.linear_act.default
    for act in ACTIVATIONS:
        torch.library.opcheck(op, (x, w, b, act))
        torch.library.opcheck(op, (x, w, None, act))


def test_opcheck_training_ops(seed):
    x, w, b = _inputs((3, 4), 10, 9, torch.float32, True, requires_grad=True)
    train = torch.ops.rosita_fast.linear_act_train.default
    backward = torch.ops.rosita_fast.linear_act_backward.default
    for act in ("gelu", "relu", "none"):
        torch.library.opcheck(train, (x, w, b, act))
        torch.library.opcheck(train, (x, w, None, act))
        grad = rand(3, 4, 9)
        z = torch.ops.rosita_fast.linear_act_train(x, w, b, act)[1].detach()
        args = (grad, x.detach(), w.detach(), b.detach(), act)
        torch.library.opcheck(backward, (*args, z))
        torch.library.opcheck(backward, args)


@pytest.mark.parametrize("act, kept", [("gelu", "z"), ("gelu_tanh", "z"), ("relu", "output"),
                                       ("none", None)])
def test_training_forward_keeps_what_the_backward_needs(monkeypatch, act, kept, seed):
    # GELU keeps z (x's dtype, [rows, out]); ReLU gives its output (z's sign); none keeps nothing.
    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["linear_act_backward"].impls
    real, seen = impls["reference"], []
    # (grad, x, weight, bias, activation[, z]): a z of None may be left out of the call
    monkeypatch.setitem(impls, "reference",
                        lambda *a: seen.append(a[5] if len(a) > 5 else None) or real(*a))
    x, w, b = _inputs((2, 3), 20, 16, torch.float32, True, requires_grad=True)
    with rosita_fast.use_backend("reference"):
        out = ops.linear_act(x, w, b, act)
        out.sum().backward()
    (z,) = seen
    expected = (x.detach().reshape(6, 20).double() @ w.detach().double().t() + b.detach().double())
    if kept is None:
        assert z is None
    elif kept == "output":
        assert z is not None and torch.equal(z.detach(), out.detach())
    else:
        assert z.shape == (6, 16) and z.dtype == torch.float32
        assert_close(z, expected, torch.float32, "saved z")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_with_saved_z_matches_recompute(backend, act, dtype, seed):
    x, w, b = _inputs((130,), 48, 72, dtype, True)
    _keep_off_relu_kink(b, act)
    grad = rand(130, 72, dtype=dtype)
    with rosita_fast.use_backend(backend):
        out, z = torch.ops.rosita_fast.linear_act_train(x, w, b, act)
        # z as the product left it: x's dtype, fp32 for fp16 (products run in fp32 there)
        assert z.dtype == torch.float32 and z.shape == (130, 72)
        with_z = torch.ops.rosita_fast.linear_act_backward(grad, x, w, b, act, z)
        without = torch.ops.rosita_fast.linear_act_backward(grad, x, w, b, act)
        if act == "relu":  # the output stands in for z
            with_out = torch.ops.rosita_fast.linear_act_backward(grad, x, w, b, act, out)
            for a, c in zip(with_out, without, strict=True):
                assert torch.equal(a, c)
    for name, a, c in zip(("dx", "dweight", "dbias"), with_z, without, strict=True):
        assert_close(a, c, dtype, f"{backend} {name}", k=130)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_autocast_cpu_bf16(backend, act, seed):
    # fp32 parameters, fp32 input, CPU bf16 autocast: the op casts its inputs (as F.linear does)
    # instead of rejecting the mix, and drops an fp32 packed weight; gradients reach the fp32
    # parameters in fp32.
    x, w, b = _inputs((3, 5), 40, 36, torch.float32, True, requires_grad=True)
    packed = ops.pack_linear_weight(w)
    with torch.autocast("cpu", dtype=torch.bfloat16), rosita_fast.use_backend(backend):
        out = ops.linear_act(x, w, b, act)
        with torch.no_grad():
            out_packed = ops.linear_act(x, w, b, act, packed)
    assert out.dtype == torch.bfloat16 and out_packed.dtype == torch.bfloat16
    ref, _ = _reference64(*(t.detach().to(torch.bfloat16) for t in (x, w, b)), act)
    assert_close(out, ref, torch.bfloat16, f"{backend} autocast forward", k=40)
    assert_close(out_packed, ref, torch.bfloat16, f"{backend} autocast packed forward", k=40)
    out.float().sum().backward()
    for t in (x, w, b):
        assert t.grad is not None and t.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone(seed):
    x, w, b = _inputs((4,), 10, 8, torch.float64, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear_act(x, w, b, "relu").dtype == torch.float64


def test_forced_backend_reaches_a_backward_on_another_thread(monkeypatch, seed):
    import threading

    from rosita_fast.ops import REGISTRY

    impls = REGISTRY["linear_act_backward"].impls
    real, calls = impls["reference"], []
    monkeypatch.setitem(impls, "reference", lambda *a: calls.append(1) or real(*a))
    x, w, b = _inputs((4,), 12, 10, torch.float32, True, requires_grad=True)
    with rosita_fast.use_backend("reference"):
        out = ops.linear_act(x, w, b, "gelu")
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert calls == [1] and x.grad is not None


class TestBadInput:
    def setup_method(self):
        self.x, self.w, self.b = rand(4, 10), rand(8, 10), rand(8)

    def test_feature_mismatch_names_x(self):
        with pytest.raises(ValueError, match="x has 11 features"):
            ops.linear_act(rand(4, 11), self.w, self.b)

    def test_weight_must_be_2d(self):
        with pytest.raises(ValueError, match="weight must be 2-D"):
            ops.linear_act(self.x, rand(8, 10, 1), self.b)

    def test_scalar_x(self):
        with pytest.raises(ValueError, match="at least one dimension"):
            ops.linear_act(torch.tensor(1.0), self.w)

    def test_dtype_mismatch_names_argument(self):
        with pytest.raises(TypeError, match="weight has dtype torch.float16"):
            ops.linear_act(self.x, self.w.half(), self.b)
        with pytest.raises(TypeError, match="bias has dtype torch.float64"):
            ops.linear_act(self.x, self.w, self.b.double())

    def test_device_mismatch_names_argument(self):
        with pytest.raises(ValueError, match="weight is on meta"):
            ops.linear_act(self.x, self.w.to("meta"), self.b)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
            ops.linear_act(self.x, self.w, rand(9))

    def test_unknown_activation(self):
        with pytest.raises(ValueError, match="activation must be one of"):
            ops.linear_act(self.x, self.w, self.b, activation="swish")

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x has dtype torch.int64"):
            ops.linear_act(self.x.long(), self.w, self.b)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
            ops.linear_act(self.x, [[1.0] * 10] * 8)

    @CPP
    def test_packed_weight_must_match(self):
        with pytest.raises(TypeError, match="packed must be None or a weight packed"):
            ops.linear_act(self.x, self.w, self.b, "none", self.w)
        with pytest.raises(ValueError, match="not the packed form"):
            ops.linear_act(self.x, self.w, self.b, "none", ops.pack_linear_weight(rand(8, 9)))
        with pytest.raises(ValueError, match="not the packed form"):
            ops.linear_act(self.x.bfloat16(), self.w.bfloat16(), self.b.bfloat16(), "none",
                           ops.pack_linear_weight(self.w))

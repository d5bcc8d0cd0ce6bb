"""The Triton linear_act kernels (``rosita_fast.kernels.linear_act``) in the CPU interpreter,
against the float64 reference of ``rosita_fast.ops.linear_act`` (``reference_forward``,
``reference_backward``).

Every case forces 16-wide tiles (``forced_tiles``), so M / N / K of a few dozen, none a multiple
of 16, cross several blocks in every dimension with a partial last block. Covered: each
activation, with and without bias (contiguous and strided), fp32 / fp16 / bf16 (and the native
fp16 path), strided / transposed x, weight and upstream gradient, batched x, the backward with
the training forward's z, with the output as ReLU's z and with z recomputed, empty batches,
NaN-poisoned outputs. Then the public op under ``use_backend("triton")`` (switched on once the
op's tables have a triton entry) and the launch specs the lowering tests compile.
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

import rosita_fast
from rosita_fast.ops.linear_act import gemm_dtype, reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

pytestmark = [
    pytest.mark.usefixtures("seed"),
    # tanh is computed through the sigmoid: numpy's exp overflows to inf for large |z| in the
    # interpreter, and the result is still the exact limit.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

BLOCK = 16  # forced tile of every launch in this file
TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    id: str
    dtype: torch.dtype
    x_shape: tuple[int, ...]  # [..., K]
    n: int
    activation: str
    bias: str | None  # layout of the bias, None: no bias
    x: str = "contig"
    w: str = "contig"
    grad: str = "contig"
    z: str = "kept"  # the backward's z: "kept" (training forward), "output", "none"
    upcast: bool | None = None  # None: the default (upcast under the interpreter)


CASES = [
    Case("fp32-gelu-bias", torch.float32, (70, 45), 50, "gelu", "contig",
         x="strided", w="transposed", grad="strided"),
    Case("bf16-gelu_tanh-strided_bias-recompute", torch.bfloat16, (3, 13, 40), 37, "gelu_tanh",
         "strided", grad="transposed", z="none"),
    Case("fp16-relu-nobias-output_z", torch.float16, (50, 33), 70, "relu", None,
         x="transposed", z="output"),
    Case("fp32-none-bias-batched", torch.float32, (2, 20, 35), 47, "none", "contig",
         w="strided", z="none"),
    Case("bf16-relu-bias", torch.bfloat16, (45, 60), 33, "relu", "contig", x="strided",
         z="output"),
    Case("fp16-gelu-recompute", torch.float16, (37, 18), 52, "gelu", "contig",
         w="transposed", grad="strided", z="none"),
    Case("fp32-gelu_tanh-nobias-expanded_grad", torch.float32, (33, 49), 20, "gelu_tanh",
         None, grad="expanded"),
    Case("bf16-none-nobias", torch.bfloat16, (4, 9, 24), 41, "none", None, x="strided"),
    # the native fp16 path (operands to tl.dot in fp16, dz rounded to fp16): the interpreter
    # multiplies fp16 correctly (numpy matmul, fp32 result), bf16 only upcast. Smooth
    # activations only: relu's mask flips where rounding moves z across 0.
    Case("fp16-native-gelu", torch.float16, (40, 48), 36, "gelu", "contig", grad="strided",
         upcast=False),
    Case("fp16-native-none", torch.float16, (2, 17, 32), 50, "none", "strided",
         x="strided", upcast=False),
]


def _inputs(case: Case):
    k = case.x_shape[-1]
    x = make(case.x_shape, case.x, case.dtype)
    w = make((case.n, k), case.w, case.dtype, scale=k ** -0.5)
    bias = make((case.n,), case.bias, case.dtype) if case.bias is not None else None
    grad = make((*case.x_shape[:-1], case.n), case.grad, case.dtype)
    return x, w, bias, grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_match_float64(case: Case):
    x, w, bias, grad = _inputs(case)
    for name, t in (("x", x), ("w", w), ("grad", grad)):
        assert t.is_contiguous() == (getattr(case, name) == "contig"), name
    m, k, n = x[..., 0].numel(), x.shape[-1], case.n
    ref_out = reference_forward(x.double(), w.double(), f64(bias), case.activation)
    ref_grads = reference_backward(grad.double(), x.double(), w.double(), f64(bias),
                                   case.activation)
    with la.forced_tiles(BLOCK), poison_outputs():
        out = la.linear_act_forward(x, w, bias, case.activation, upcast=case.upcast)
        out_t, z = la.linear_act_train(x, w, bias, case.activation, upcast=case.upcast)
        z_arg = {"kept": z, "output": out, "none": None}[case.z]
        grads = la.linear_act_backward(grad, x, w, bias, case.activation, z_arg,
                                       upcast=case.upcast)
    assert out.dtype == case.dtype and out.shape == (*x.shape[:-1], n) and out.is_contiguous()
    assert torch.equal(out, out_t), "forward and training forward run the same kernel"
    # z in the op's contract dtype (its fake): x's, fp32 for fp16
    assert z.dtype == gemm_dtype(case.dtype) and z.shape == (m, n)
    reduction = max(m, k, n)
    assert_close(out, ref_out, case.dtype, f"{case.id}: out", k=reduction)
    z_ref = x.double().reshape(m, k) @ w.double().t()
    if bias is not None:
        z_ref = z_ref + bias.double()
    assert_close(z, z_ref, case.dtype, f"{case.id}: z", k=reduction)
    dx, dw, db = grads
    assert dx.shape == x.shape and dx.dtype == case.dtype
    assert dw.shape == w.shape and dw.dtype == case.dtype
    assert_close(dx, ref_grads[0], case.dtype, f"{case.id}: dx", k=reduction)
    assert_close(dw, ref_grads[1], case.dtype, f"{case.id}: dweight", k=reduction)
    if bias is None:
        assert db.numel() == 0, "no bias: an empty tensor stands for the bias gradient"
    else:
        assert db.dtype == case.dtype and db.shape == bias.shape
        assert_close(db, ref_grads[2], case.dtype, f"{case.id}: dbias", k=reduction)


def test_forced_tiles_cross_blocks(monkeypatch):
    """The forced tile really sets the grids: several blocks of 16 in every dimension."""
    grids = {}

    def record(kernel):
        class Recorder:
            def __getitem__(self, grid):
                grids.setdefault(kernel.__name__, []).append(grid)
                return kernel[grid]

        return Recorder()

    for name in ("linear_act_fwd_kernel", "linear_act_dz_kernel", "matmul_kernel"):
        monkeypatch.setattr(la, name, record(getattr(la, name)))
    x, w, bias, grad = rand(40, 50), rand(35, 50), rand(35), rand(40, 35)
    with la.forced_tiles(BLOCK), poison_outputs():
        out, z = la.linear_act_train(x, w, bias, "gelu")
        dx, dw, db = la.linear_act_backward(grad, x, w, bias, "gelu", z)
    # M = 40 -> 3 row blocks, N = 35 -> 3, K = 50 -> 4
    assert grids == {
        "linear_act_fwd_kernel": [(9,)],
        "linear_act_dz_kernel": [(3, 3)],
        "matmul_kernel": [(3 * 4,), (3 * 4,)],  # dx [40, 50], dweight [35, 50]
    }
    ref = reference_backward(grad.double(), x.double(), w.double(), bias.double(), "gelu")
    for name, got, want in zip(("dx", "dw", "db"), (dx, dw, db), ref, strict=True):
        assert_close(got, want, torch.float32, name)


def test_default_tiles_match_forced_tiles():
    """The launch-table tiles (one block here) agree with the forced small tiles."""
    x, w, bias, grad = rand(30, 40), rand(20, 40), rand(20), rand(30, 20)
    out, z = la.linear_act_train(x, w, bias, "gelu_tanh")
    grads = la.linear_act_backward(grad, x, w, bias, "gelu_tanh", z)
    with la.forced_tiles(BLOCK):
        small, small_z = la.linear_act_train(x, w, bias, "gelu_tanh")
        small_grads = la.linear_act_backward(grad, x, w, bias, "gelu_tanh", small_z)
    assert_close(small, out.double(), torch.float32, "out")
    for got, want in zip(small_grads, grads, strict=True):
        assert_close(got, want.double(), torch.float32, "grads")


def test_empty_batches():
    """No rows: an empty output, zero weight and bias gradients (sums over no rows); no output
    features: an empty output and a zero input gradient."""
    x, w, bias = rand(0, 12), rand(9, 12), rand(9)
    with la.forced_tiles(BLOCK), poison_outputs():
        out, z = la.linear_act_train(x, w, bias, "gelu")
        dx, dw, db = la.linear_act_backward(rand(0, 9), x, w, bias, "gelu", z)
    assert out.shape == (0, 9) and z.shape == (0, 9) and dx.shape == (0, 12)
    assert torch.equal(dw, torch.zeros(9, 12)) and torch.equal(db, torch.zeros(9))
    x, w = rand(5, 12), rand(0, 12)
    with la.forced_tiles(BLOCK), poison_outputs():
        out = la.linear_act_forward(x, w, None, "relu")
        dx, dw, db = la.linear_act_backward(rand(5, 0), x, w, None, "relu", out)
    assert out.shape == (5, 0) and dw.shape == (0, 12) and db.numel() == 0
    assert torch.equal(dx, torch.zeros(5, 12))
    # no input features: act(bias) on every row (the reference's reshape(-1, 0) cannot say)
    x, w, bias = rand(5, 0), rand(9, 0), rand(9)
    with la.forced_tiles(BLOCK), poison_outputs():
        out = la.linear_act_forward(x, w, bias, "gelu")
    want = torch.nn.functional.gelu(bias.double()).expand(5, 9)
    assert_close(out, want, torch.float32, "out without input features")


def test_bad_inputs_raise():
    x64 = rand(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        la.linear_act_forward(x64, x64, None, "relu")
    with pytest.raises(ValueError, match="power of two"):
        with la.forced_tiles(24):
            pass
    with pytest.raises(ValueError, match="at least 16"):
        with la.forced_tiles(8):
            pass


# ----------------------------------------------------------------------------------------------
# Through the public op
# ----------------------------------------------------------------------------------------------



@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_op_autograd_matches_float64(activation, dtype):
    """``rosita_fast.ops.linear_act`` on the triton backend: forward and autograd backward (the
    training forward for the GELU forms, the plain forward with the output kept for ReLU) and
    the no-grad path, against the float64 reference."""
    x = rand(3, 11, 40, dtype=dtype).requires_grad_()
    w = (rand(37, 40, dtype=dtype) / 6).requires_grad_()
    bias = rand(37, dtype=dtype).requires_grad_()
    grad = rand(3, 11, 37, dtype=dtype)
    ref_out = reference_forward(x.double(), w.double(), bias.double(), activation)
    ref = reference_backward(grad.double(), x.double(), w.double(), bias.double(), activation)
    with rosita_fast.use_backend("triton"), la.forced_tiles(BLOCK), poison_outputs():
        out = rosita_fast.ops.linear_act(x, w, bias, activation)
        out.backward(grad)
        with torch.no_grad():
            out_nograd = rosita_fast.ops.linear_act(x, w, bias, activation)
    assert out.dtype == dtype and out.shape == (3, 11, 37)
    assert torch.equal(out_nograd, out.detach())
    assert_close(out, ref_out, dtype, "out", k=40)
    for name, t, want in (("dx", x, ref[0]), ("dw", w, ref[1]), ("db", bias, ref[2])):
        assert t.grad.dtype == dtype
        assert_close(t.grad, want, dtype, name, k=40)


def test_public_op_ignores_packed_weight_and_raises_for_float64():
    """The packed-weight hint is accepted and ignored; fp64 raises instead of falling back."""
    x, w = rand(6, 16), rand(8, 16)
    packed = rosita_fast.ops.pack_linear_weight(w)
    with rosita_fast.use_backend("triton"), poison_outputs():
        out = rosita_fast.ops.linear_act(x, w, None, "relu", packed=packed)
        with pytest.raises(TypeError, match="float64"):
            rosita_fast.ops.linear_act(x.double(), w.double(), None, "relu")
    assert_close(out, reference_forward(x.double(), w.double(), None, "relu"), torch.float32,
                 "out")


# ----------------------------------------------------------------------------------------------
# Launch specs = what the launchers launch
# ----------------------------------------------------------------------------------------------


KERNELS = ("linear_act_fwd_kernel", "linear_act_dz_kernel", "matmul_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launch_specs_are_what_the_launchers_launch(monkeypatch, dtype):
    """For contiguous, aligned inputs whose sizes are multiples of 16 (any batch shape, with or
    without bias, any activation), the JIT specialisation of every launch is one of the
    kernel's ``contig`` launch specs; ``generic`` specs specialise nothing."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.kernel, kwargs))

    specs = la.launch_specs()
    for name in KERNELS:
        monkeypatch.setattr(la, name, Recorder(getattr(la, name)))
    for x_shape, n in (((2, 48, 96), 80), ((64, 32), 128)):
        x, w = rand(*x_shape, dtype=dtype), rand(n, x_shape[-1], dtype=dtype)
        grad = rand(*x_shape[:-1], n, dtype=dtype)
        for bias, activation in ((None, "gelu"), (rand(n, dtype=dtype), "relu"),
                                 (rand(n, dtype=dtype), "none")):
            launches.clear()
            # the GPU path (no upcast, table tiles); the recorder launches nothing
            _, z = la.linear_act_train(x, w, bias, activation, upcast=False)
            la.linear_act_backward(grad, x, w, bias, activation, torch.empty_like(z),
                                   upcast=False)
            assert len(launches) == (4 if activation != "none" else 3)
            for kernel, kwargs in launches:
                candidates = [s for s in specs if s.kernel is kernel
                              and s.name.split("[")[1].startswith(TL[dtype])
                              and "contig" in s.name]
                assert any(spec_matches_launch(s, kernel, kwargs)
                           for s in candidates), kernel.__name__
    generic = [s for s in specs if s.name.endswith(",generic]")]
    assert {s.kernel.__name__ for s in generic} == set(KERNELS)
    for spec in generic:
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name
        assert all(attr == [] for attr in spec.attrs.values()), spec.name
    assert len(specs) <= 3 * 36, "keep the lowering test's compile time in check"


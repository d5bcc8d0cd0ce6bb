"""The Triton lowrank_linear kernels through their launchers (``rosita_fast.kernels.
lowrank_linear``), in the CPU interpreter, against a float64 reference: shapes spanning several
blocks in every dimension, ranks at the rank-tile boundaries, forced column / K splits, strided
and transposed inputs, fp32/fp16/bf16 (and the native fp16 path), forward and backward; plus the
64-bit tile offset arithmetic the kernels use and the launch specs the lowering tests compile.

The op layer (``rosita_fast.ops``) is tested in test_lowrank_linear.py; this file calls the
launchers directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl
from kernel_harness import assert_close, declared_constexprs, jit_view, make, rand
from rosita_fast.kernels import lowrank_linear as lk
from rosita_fast.kernels.lowrank_linear import (
    lowrank_linear_backward,
    lowrank_linear_forward,
    offsets_2d,
)

from rosita_fast.activations import apply_activation
from rosita_fast.testing import poison_outputs

pytestmark = [
    pytest.mark.usefixtures("seed"),
    # tanh is computed through the sigmoid: numpy's exp overflows to inf for large |z| in the
    # interpreter, and the result is still the exact limit.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ----------------------------------------------------------------------------------------------


def _reference(grad, x, u, v, bias, activation):
    """float64 forward output and (dx, du, dv, dbias) by autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (x, u, v)]
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    x64, u64, v64 = leaves
    z = x64 @ v64.T @ u64.T
    if b64 is not None:
        z = z + b64
    y = apply_activation(z, activation)
    y.backward(grad.double())
    grads = (x64.grad, u64.grad, v64.grad, b64.grad if b64 is not None else None)
    return y.detach(), grads


@dataclass(frozen=True)
class Case:
    id: str
    dtype: torch.dtype
    x_shape: tuple[int, ...]  # [..., K]
    n: int
    rank: int
    activation: str
    bias: str | None  # layout of the bias, None: no bias
    x: str = "contig"
    u: str = "contig"
    v: str = "contig"
    grad: str = "contig"
    column_split: int | None = None
    k_split: int | None = None
    upcast: bool | None = None  # None: the default (upcast under the interpreter)


# Tiles (rank tile -> fwd / dz-kernel / dx-kernel BLOCK_M, BLOCK_N, BLOCK_K):
#   32: 64/64/64, 64/64/64, 64/-/64;   64: 64/64/32, 64/64/32, 64/-/64;
#   128: 64/64/32, 32/64/32, 64/-/32;  256: 32/64/32, 32/32/32, 32/-/32.
# Every case has rows above BLOCK_M, several N blocks and K above BLOCK_K.
CASES = [
    # rank 32 fills its tile exactly; x transposed, v strided, upstream grad strided.
    Case("fp16-r32-relu", torch.float16, (130, 150), 200, 32, "relu", "contig",
         x="transposed", v="strided", grad="strided"),
    # rank 33: first rank of the 64 tile; column splits forced in the forward and the backward
    # (several column blocks per program, a short last program) and the K split of dx.
    Case("fp32-r33-gelu-split", torch.float32, (130, 150), 300, 33, "gelu", "strided",
         u="transposed", grad="transposed", column_split=2, k_split=3),
    Case("bf16-r33-gelu_tanh-split", torch.bfloat16, (130, 70), 200, 33, "gelu_tanh",
         "strided", x="strided", u="strided", v="transposed", column_split=3, k_split=2),
    # the native fp16 path (operands to tl.dot in fp16, h / dz / g rounded to fp16): the
    # interpreter computes fp16 products correctly (numpy matmul with an fp32 result), unlike
    # bf16 ones, which only run upcast here. Native cases use smooth activations: relu's mask
    # flips wherever rounding h to fp16 moves z across 0, and there dz is off by the whole
    # grad, against the float64 reference (eager fp16 does the same).
    Case("fp16-native-r33-gelu-split", torch.float16, (3, 40, 96), 200, 33, "gelu",
         "contig", u="transposed", grad="strided", column_split=2, k_split=2, upcast=False),
    Case("fp16-native-r32-none", torch.float16, (130, 150), 200, 32, "none", None,
         x="transposed", v="strided", upcast=False),
    # the other tile boundaries: 64 fills its tile, 65 and 129 start the 128 and 256 tiles.
    Case("fp32-r64-gelu_tanh", torch.float32, (150, 100), 140, 64, "gelu_tanh", "contig",
         v="transposed", grad="strided"),
    Case("bf16-r65-gelu-split", torch.bfloat16, (100, 90), 260, 65, "gelu", "strided",
         x="transposed", u="strided", column_split=4, k_split=3),
    Case("fp16-native-r128-gelu_tanh", torch.float16, (80, 70), 150, 128, "gelu_tanh",
         "strided", u="transposed", v="strided", upcast=False),
    Case("fp32-r129-none-split", torch.float32, (70, 80), 140, 129, "none", "contig",
         x="transposed", grad="transposed", column_split=2),
    # rank 256, the largest tile; no activation (dz is the incoming gradient), no bias; batched x.
    Case("fp32-r256-none", torch.float32, (2, 35, 80), 150, 256, "none", None,
         x="strided", u="transposed", grad="strided", column_split=2, k_split=2),
    Case("bf16-r256-relu", torch.bfloat16, (70, 80), 150, 256, "relu", "contig",
         v="strided"),
]


def _inputs(case: Case):
    k = case.x_shape[-1]
    x = make(case.x_shape, case.x, case.dtype)
    u = make((case.n, case.rank), case.u, case.dtype)
    v = make((case.rank, k), case.v, case.dtype)
    bias = make((case.n,), case.bias, case.dtype) if case.bias is not None else None
    grad = make((*case.x_shape[:-1], case.n), case.grad, case.dtype)
    return x, u, v, bias, grad


def _check_layouts(case: Case, x, u, v, bias, grad):
    """The case really hands the launchers the layouts it names."""
    for name, t in (("x", x), ("u", u), ("v", v), ("bias", bias), ("grad", grad)):
        layout = getattr(case, name)
        if t is not None:
            assert t.is_contiguous() == (layout == "contig"), (name, layout, t.stride())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_match_float64(case: Case):
    x, u, v, bias, grad = _inputs(case)
    _check_layouts(case, x, u, v, bias, grad)
    m, k = x[..., 0].numel(), x.shape[-1]
    reduction = max(m, k, case.n, case.rank)  # the longest reduction in the forward/backward chain
    ref_out, ref_grads = _reference(grad, x, u, v, bias, case.activation)
    with poison_outputs():
        out = lowrank_linear_forward(
            x, u, v, bias, case.activation, column_split=case.column_split, upcast=case.upcast
        )
        grads = lowrank_linear_backward(
            grad, x, u, v, bias, case.activation, column_split=case.column_split,
            k_split=case.k_split, upcast=case.upcast,
        )
    assert out.dtype == case.dtype
    assert_close(out, ref_out, case.dtype, f"{case.id}: out", k=reduction)
    for name, got, ref, like in zip(("dx", "du", "dv", "dbias"), grads, ref_grads,
                                    (x, u, v, bias), strict=True):
        if ref is None:
            assert got is None, f"{case.id}: {name} should be None without a bias"
            continue
        assert got.dtype == like.dtype, f"{case.id}: {name} dtype {got.dtype}"
        assert_close(got, ref, case.dtype, f"{case.id}: {name}", k=reduction)


def test_column_splits_are_forced_and_cover_every_column(monkeypatch):
    """The split keywords really change the launch grids (the split path runs under the
    interpreter, where the default never splits)."""
    grids = {}

    def record(kernel):
        class Recorder:
            def __getitem__(self, grid):
                grids.setdefault(kernel.__name__, []).append(grid)
                return kernel[grid]

        return Recorder()

    for name in ("lowrank_fwd_kernel", "lowrank_bwd_dz_kernel", "lowrank_bwd_dx_kernel"):
        monkeypatch.setattr(lk, name, record(getattr(lk, name)))
    x, u, v = rand(70, 200), rand(300, 33), rand(33, 200)
    grad = rand(70, 300)
    ref_out, ref_grads = _reference(grad, x, u, v, None, "relu")
    with poison_outputs():
        out = lowrank_linear_forward(x, u, v, None, "relu", column_split=2)
        grads = lowrank_linear_backward(grad, x, u, v, None, "relu", column_split=3, k_split=2)
    # rank 33 -> tile 64: BLOCK_M 64 (2 row blocks), BLOCK_N 64 (5 column blocks), dx BLOCK_K 64.
    assert grids["lowrank_fwd_kernel"] == [(2, 2)]  # 3 + 2 column blocks
    assert grids["lowrank_bwd_dz_kernel"] == [(2, 3)]  # 2 + 2 + 1 column blocks
    assert grids["lowrank_bwd_dx_kernel"] == [(2, 2)]  # 2 + 2 K blocks
    assert_close(out, ref_out, torch.float32, "out")
    assert grads[3] is None
    for name, got, ref in zip(("dx", "du", "dv"), grads[:3], ref_grads[:3], strict=True):
        assert_close(got, ref, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_bias(dtype):
    """A bias that is a strided view (every other element) is read through its stride."""
    x, u, v = rand(20, 40, dtype=dtype), rand(70, 8, dtype=dtype), rand(8, 40, dtype=dtype)
    big = rand(140, dtype=dtype, scale=3.0)
    bias = big[::2]
    grad = rand(20, 70, dtype=dtype)
    ref_out, ref_grads = _reference(grad, x, u, v, bias, "gelu")
    with poison_outputs():
        out = lowrank_linear_forward(x, u, v, bias, "gelu")
        dx, du, dv, dbias = lowrank_linear_backward(grad, x, u, v, bias, "gelu")
    assert_close(out, ref_out, dtype, "out", k=70)
    assert_close(dx, ref_grads[0], dtype, "dx (depends on the bias through act')", k=70)
    assert_close(du, ref_grads[1], dtype, "du", k=70)
    assert_close(dbias, ref_grads[3], dtype, "dbias", k=70)


# ----------------------------------------------------------------------------------------------
# 64-bit offsets
# ----------------------------------------------------------------------------------------------


@triton.jit
def _offsets_probe_kernel(out_ptr, row0, col0, stride_r, stride_c, BR: tl.constexpr,
                          BC: tl.constexpr, WIDE: tl.constexpr):
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    if WIDE:
        off = offsets_2d(rows, cols, stride_r, stride_c)
    else:  # the int32 arithmetic the kernels used before (shows the probe detects overflow)
        off = (rows[:, None] * stride_r + cols[None, :] * stride_c).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :], off)


@pytest.mark.parametrize(
    "row0, col0, stride_r, stride_c",
    [
        (2**20, 0, 4099, 1),  # row * stride past 2^32 (an [M, N] buffer with M*N > 2^31)
        (3, 2**19, 1, 2**13 + 5),  # transposed view: column * stride past 2^31
        (2**16 - 8, 2**15, 2**15 + 1, 2**15 - 1),  # both terms near 2^31, sum past it
    ],
)
def test_tile_offsets_are_64_bit(row0, col0, stride_r, stride_c):
    """offsets_2d (every tile pointer of the lowrank kernels goes through it) computes
    row * stride_r + col * stride_c exactly when the products pass 2^31, from int32 indices and
    int32 strides; no large allocation needed."""
    br, bc = 4, 8
    expected = torch.tensor(
        [[(row0 + i) * stride_r + (col0 + j) * stride_c for j in range(bc)] for i in range(br)],
        dtype=torch.int64,
    )
    assert expected.max() >= 2**31
    assert max(row0 + br, col0 + bc, stride_r, stride_c) < 2**31  # all int32 kernel arguments
    wide = torch.empty(br, bc, dtype=torch.int64)
    _offsets_probe_kernel[(1,)](wide, row0, col0, stride_r, stride_c, BR=br, BC=bc, WIDE=True)
    assert torch.equal(wide, expected)
    narrow = torch.empty(br, bc, dtype=torch.int64)
    _offsets_probe_kernel[(1,)](narrow, row0, col0, stride_r, stride_c, BR=br, BC=bc, WIDE=False)
    assert not torch.equal(narrow, expected), "int32 arithmetic did not wrap: the probe is blind"


# ----------------------------------------------------------------------------------------------
# Launch specs = what the launchers launch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launch_specs_are_what_the_launchers_launch(monkeypatch, dtype):
    """For contiguous, aligned inputs with sizes divisible by 16 (any batch shape, any rank that
    is a multiple of 16), the JIT specialisation of every launch is a ``contig`` launch spec
    (unit strides folded to 1, divisibility attributes); ``generic`` specs specialise nothing."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.kernel, kwargs))

    specs = {s.name: s for s in lk.launch_specs()}
    for name in ("lowrank_fwd_kernel", "lowrank_bwd_dz_kernel", "lowrank_bwd_dx_kernel"):
        monkeypatch.setattr(lk, name, Recorder(getattr(lk, name)))
    tl_dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    for rank, tile in ((32, 32), (48, 64), (128, 128), (256, 256)):
        x, grad = rand(2, 48, 96, dtype=dtype), rand(2, 48, 80, dtype=dtype)
        u, v = rand(80, rank, dtype=dtype), rand(rank, 96, dtype=dtype)
        for bias in (None, rand(80, dtype=dtype)):
            launches.clear()
            # The GPU path (no upcast); the recorder launches nothing.
            lowrank_linear_forward(x, u, v, bias, "gelu", upcast=False)
            lowrank_linear_backward(grad, x, u, v, bias, "none", upcast=False)
            assert len(launches) == 3
            for kernel, kwargs in launches:
                spec = specs[f"{kernel.__name__}[{tl_dtype},R{tile},contig]"]
                signature, constexprs, attrs = jit_view(kernel, kwargs)
                assert spec.signature == signature, spec.name
                assert spec.constexprs == constexprs, spec.name
                assert spec.attrs == attrs, spec.name
                assert (spec.num_warps, spec.num_stages) == (
                    kwargs["num_warps"], kwargs["num_stages"]), spec.name
                assert spec.dot_dtype == tl_dtype
    generic = [s for s in specs.values() if s.name.endswith(",generic]")]
    assert len(generic) == len(specs) // 2
    for spec in generic:
        # Only the kernel's own constexpr parameters are constants; no divisibility assumed.
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name
        assert all(attr == [] for attr in spec.attrs.values()), spec.name


"""The Triton attention kernels (``rosita_fast.kernels.attention``) in the CPU interpreter, against
the float64 reference of ``rosita_fast.ops.attention`` (``reference_forward``, the training
forward's reference for ``lse``, and ``reference_backward``).

Every case forces 16-wide query and key tiles, so the short sequences used here (20-70) cross
several blocks in every dimension, with a partial last block; head dims 8 / 40 / 128 exercise the
padded head tile. Covered: head counts 1, 2, 3, 5 and 12, key padding masks with a fully padded
batch row, full and broadcast biases (q's dtype and float32) with their gradient, fp32 / fp16 /
bf16 (and the native fp16 path), q / k / v read as strided views of a fused ``[B, L, 3, H, D]``
projection, arbitrary upstream-gradient strides, cross attention (``Lq != Lk``), and NaN-poisoned
outputs. Dropout (p = 0.1 and 0.5) over a selection of those cases, compared with the float64
reference run with the same seed (the same elements dropped), and the dropped elements checked
against the hash directly. Then the public op under ``use_backend("triton")`` (forward, autograd
backward, no-grad path, with and without dropout), and the launch specs the lowering tests
compile (``tests/test_lowering.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from kernel_harness import assert_close, declared_constexprs, jit_view, rand
from rosita_fast.kernels import attention as ak

import rosita_fast
from rosita_fast.ops._dropout import draw_seed, dropout_scale, keep_mask
from rosita_fast.ops._registry import REGISTRY
from rosita_fast.ops.attention import reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

pytestmark = pytest.mark.usefixtures("seed")

BLOCK = 16  # forced BLOCK_M = BLOCK_N of every launch in this file


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ----------------------------------------------------------------------------------------------


def _qkv(b, h, lq, lk, d, layout: str, dtype):
    """q [B, H, Lq, D], k / v [B, H, Lk, D] stored as:

    - ``fused``: transposed views of one ``[B, L, 3, H, D]`` tensor (``Lq == Lk``), as the model
      passes them; ``fused_kv``: q from ``[B, Lq, H, D]``, k / v from ``[B, Lk, 2, H, D]``;
    - ``contig``: three contiguous ``[B, H, L, D]`` tensors;
    - ``strided``: every other element of the last dim (the launchers take any strides; the op
      requires a unit inner stride).
    """
    if layout == "fused":
        assert lq == lk
        qkv = rand(b, lq, 3, h, d, dtype=dtype)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    if layout == "fused_kv":
        q = rand(b, lq, h, d, dtype=dtype).transpose(1, 2)
        kv = rand(b, lk, 2, h, d, dtype=dtype)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    contiguous = layout == "contig"
    assert contiguous or layout == "strided"
    return (
        rand(b, h, lq, d, dtype=dtype, contiguous=contiguous),
        rand(b, h, lk, d, dtype=dtype, contiguous=contiguous),
        rand(b, h, lk, d, dtype=dtype, contiguous=contiguous),
    )


def _grad(shape, layout: str, dtype):
    """The upstream gradient: ``contig``, ``seq_major`` (out's own layout), ``transposed`` (a
    [B, H, D, L] tensor's transpose: inner stride L) or ``expanded`` (stride 0 over B, H, L)."""
    b, h, length, d = shape
    if layout == "contig":
        return rand(*shape, dtype=dtype)
    if layout == "seq_major":
        return rand(b, length, h, d, dtype=dtype).transpose(1, 2)
    if layout == "transposed":
        return rand(b, h, d, length, dtype=dtype).transpose(2, 3)
    assert layout == "expanded"
    return rand(d, dtype=dtype).expand(shape)


def _mask(b: int, lk: int, padded_row: bool) -> torch.Tensor:
    """A random key padding mask (about 30% of keys padded), batch row 1 fully padded if asked,
    every other row keeping at least one key."""
    mask = torch.rand(b, lk) > 0.3
    mask[:, 0] = True
    if padded_row:
        mask[1] = False
    return mask


def _reference(grad, q, k, v, mask, bias, scale, bias_grad: bool, dropout_p=0.0, drop_seed=0):
    """float64 (out, lse, dq, dk, dv, dbias_full) from the op's reference implementations."""
    q64, k64, v64, g64 = (t.double() for t in (q, k, v, grad))
    b64 = bias.double() if bias is not None else None
    drop = (dropout_p, drop_seed)
    out, lse = REGISTRY["attention_train"].reference(q64, k64, v64, mask, b64, scale, *drop)
    torch.testing.assert_close(out, reference_forward(q64, k64, v64, mask, b64, scale, *drop))
    grads = reference_backward(g64, q64, k64, v64, out, lse, mask, b64, scale, bias_grad, *drop)
    return (out, lse, *grads)


def _check_lse(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Rows without keys are ``-inf`` in both; the others match in fp32 (lse is fp32 whatever
    the input dtype: it is computed from the same rounded inputs as the reference)."""
    assert got.dtype == torch.float32 and got.shape == ref.shape, what
    empty_rows = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), empty_rows), f"{what}: -inf rows differ"
    assert_close(got[~empty_rows], ref[~empty_rows], torch.float32, what)


@dataclass(frozen=True)
class Case:
    id: str
    dtype: torch.dtype
    b: int
    h: int
    lq: int
    lk: int
    d: int
    layout: str = "fused"
    mask: str | None = None  # None, "random" or "padded_row" (batch row 1 fully padded)
    bias_shape: str | None = None  # which of (B, H, Lq, Lk) are full, e.g. "bhqk", "hqk", "bk"
    bias_dtype: torch.dtype | None = None  # None: q's dtype
    bias_grad: bool = True
    grad: str = "contig"
    upcast: bool | None = None  # None: the default (upcast under the interpreter)

    def bias_dims(self) -> tuple[int, ...]:
        full = (self.b, self.h, self.lq, self.lk)
        return tuple(n if axis in self.bias_shape else 1 for axis, n in zip("bhqk", full,
                                                                             strict=True))


CASES = [
    Case("h1-d32-fp32-plain", torch.float32, 2, 1, 37, 37, 32, layout="contig"),
    Case("h2-d64-fp16-mask", torch.float16, 3, 2, 50, 50, 64, mask="padded_row",
         grad="seq_major"),
    Case("h3-d64-bf16-bias_full", torch.bfloat16, 2, 3, 45, 45, 64, mask="padded_row",
         bias_shape="bhqk", grad="transposed"),
    # cross attention, bias broadcast over batch and queries, float32 bias with fp16 q
    Case("h5-d32-fp16-bias_hk_fp32-cross", torch.float16, 2, 5, 33, 70, 32, layout="fused_kv",
         mask="random", bias_shape="hk", bias_dtype=torch.float32),
    Case("h3-d32-fp32-bias_bk-strided", torch.float32, 2, 3, 40, 29, 32, layout="strided",
         mask="padded_row", bias_shape="bk", grad="expanded"),
    Case("h2-d32-bf16-bias_hqk-nograd", torch.bfloat16, 2, 2, 24, 24, 32, bias_shape="hqk",
         bias_grad=False),
    Case("h12-d64-fp32-mask", torch.float32, 1, 12, 20, 20, 64, mask="random"),
    # the padded head tile: 8 -> 32, 40 -> 64; 128 fills the largest tile
    Case("h2-d8-fp32-bias_bhqk", torch.float32, 2, 2, 27, 27, 8, bias_shape="bhqk"),
    Case("h3-d40-bf16-mask", torch.bfloat16, 2, 3, 35, 35, 40, mask="padded_row",
         grad="seq_major"),
    Case("h1-d128-fp16-bias_qk", torch.float16, 2, 1, 33, 33, 128, mask="padded_row",
         bias_shape="qk"),
    # the native fp16 path (P and dS rounded to fp16 before their products, as on the GPU): the
    # interpreter multiplies fp16 correctly (bf16 only runs upcast here)
    Case("h2-d64-fp16-native", torch.float16, 2, 2, 40, 40, 64, mask="padded_row",
         bias_shape="bhqk", upcast=False),
]


def _inputs(case: Case):
    q, k, v = _qkv(case.b, case.h, case.lq, case.lk, case.d, case.layout, case.dtype)
    mask = _mask(case.b, case.lk, case.mask == "padded_row") if case.mask else None
    bias = None
    if case.bias_shape is not None:
        bias = rand(*case.bias_dims(), dtype=case.bias_dtype or case.dtype)
    grad = _grad(q.shape, case.grad, case.dtype)
    return q, k, v, mask, bias, grad


def _check_case(case: Case, dropout_p: float = 0.0, drop_seed: int = 0) -> None:
    """The launchers on ``case`` (with dropout ``dropout_p``, ``drop_seed``) against the float64
    reference: outputs, lse, gradients, layouts, the fully padded row and the masked keys."""
    q, k, v, mask, bias, grad = _inputs(case)
    if case.layout == "fused":
        assert q.stride(2) == 3 * case.h * case.d and q.stride(3) == 1  # really the fused view
    scale = case.d ** -0.5
    drop = (dropout_p, drop_seed)
    ref = _reference(grad, q, k, v, mask, bias, scale, case.bias_grad, *drop)
    with poison_outputs():
        out, lse = ak.attention_train(q, k, v, mask, bias, scale, *drop, block=BLOCK,
                                      upcast=case.upcast)
        out_only = None
        if dropout_p == 0:
            out_only = ak.attention_forward(q, k, v, mask, bias, scale, block=BLOCK,
                                            upcast=case.upcast)
        grads = ak.attention_backward(grad, q, k, v, out, lse, mask, bias, scale, case.bias_grad,
                                      *drop, block=BLOCK, upcast=case.upcast)
    # out, dq, dk, dv: [B, H, L, D] in q's dtype, memory laid out [B, L, H, D]
    for name, got, like in (("out", out, q), ("dq", grads[0], q), ("dk", grads[1], k),
                            ("dv", grads[2], v)):
        assert got.dtype == case.dtype and got.shape == like.shape, name
        assert got.transpose(1, 2).is_contiguous(), f"{name}: layout {got.stride()}"
    if out_only is not None:
        assert torch.equal(out_only, out)
    reduction = max(case.lq, case.lk, case.d)
    assert_close(out, ref[0], case.dtype, f"{case.id}: out", k=reduction)
    _check_lse(lse, ref[1], f"{case.id}: lse")
    for name, got, want in zip(("dq", "dk", "dv"), grads[:3], ref[2:5], strict=True):
        assert_close(got, want, case.dtype, f"{case.id}: {name}", k=reduction)
    if bias is not None and case.bias_grad:
        dbias = grads[3]
        assert dbias.dtype == torch.float32
        assert dbias.shape == (case.b, case.h, case.lq, case.lk)
        assert_close(dbias, ref[5], case.dtype, f"{case.id}: dbias", k=reduction)
    else:
        assert grads[3] is None
    if case.mask == "padded_row":
        # the fully padded batch row: zero output, lse -inf, zero gradients (exactly)
        assert torch.isneginf(lse[1]).all()
        for name, t in (("out", out), ("dq", grads[0])):
            assert (t[1] == 0).all(), f"{name} of the fully padded row"
        if grads[3] is not None:
            assert (grads[3][1] == 0).all(), "dbias of the fully padded row"
    if mask is not None:
        # masked keys receive no gradient
        padded = ~mask[:, None, :, None].expand_as(grads[1])
        assert (grads[1][padded] == 0).all() and (grads[2][padded] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_match_float64(case: Case):
    _check_case(case)


# Every dtype and path (fp32, fp16 upcast and native, bf16), padded head tiles (d8, d40), cross
# attention, strided inputs, full / broadcast biases in q's dtype and fp32, fully padded rows.
DROPOUT_CASES = [c for c in CASES if c.id in (
    "h1-d32-fp32-plain", "h3-d64-bf16-bias_full", "h5-d32-fp16-bias_hk_fp32-cross",
    "h3-d32-fp32-bias_bk-strided", "h2-d8-fp32-bias_bhqk", "h3-d40-bf16-mask",
    "h2-d64-fp16-native",
)]


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_dropout_matches_float64_with_the_same_seed(case: Case, p: float):
    # Seeds with the top bit set and clear: the launchers pass them as int32.
    drop_seed = draw_seed() | (1 << 31) if p == 0.5 else draw_seed() & 0x7FFFFFFF
    _check_case(case, p, drop_seed)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_the_hashed_elements(p: float):
    """With v = I the output is the dropped probability matrix ``P * keep * scale``: its zeros
    are exactly the hash's dropped elements at the documented coordinates (row
    ``(b * H + h) * Lq + i``, column ``j``), its kept values ``P * scale``; and the kept fraction
    is about 1 - p. (Lq = 37, Lk = D = 40: three and a partial query and key block.)"""
    b, h, lq, lk = 2, 3, 37, 40
    q, k, _ = _qkv(b, h, lq, lk, lk, "contig", torch.float32)
    v = torch.eye(lk).expand(b, h, lk, lk)
    drop_seed = draw_seed()
    with poison_outputs():
        out, lse = ak.attention_train(q, k, v, None, None, 0.3, p, drop_seed, block=BLOCK)
        probs, lse0 = ak.attention_train(q, k, v, None, None, 0.3, block=BLOCK)
    keep = keep_mask(drop_seed, torch.arange(b * h * lq).view(b, h, lq, 1), torch.arange(lk), p)
    assert torch.equal(out != 0, keep), "dropped elements differ from the hash's"
    assert_close(out, probs * keep * dropout_scale(p), torch.float32, "kept values")
    assert torch.equal(lse, lse0), "lse is the undropped softmax's"
    sd = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(keep.double().mean().item() - (1 - p)) < 6 * sd


def test_default_tiles_and_sentinel_conventions():
    """The launch-table tiles (no forced block; one block here) agree with the forced small
    tiles, and the backward reads a fully padded row's lse as -inf or +inf alike."""
    q, k, v = _qkv(2, 2, 30, 30, 32, "fused", torch.float32)
    mask = _mask(2, 30, padded_row=True)
    bias = rand(2, 1, 30, 30)
    grad = rand(2, 2, 30, 32)
    with poison_outputs():
        out, lse = ak.attention_train(q, k, v, mask, bias, 0.2)
        small, small_lse = ak.attention_train(q, k, v, mask, bias, 0.2, block=BLOCK)
        grads = ak.attention_backward(grad, q, k, v, out, lse, mask, bias, 0.2, True)
        flipped = torch.where(torch.isneginf(lse), torch.inf, lse)
        grads_inf = ak.attention_backward(grad, q, k, v, out, flipped, mask, bias, 0.2, True)
    assert_close(small, out, torch.float32, "out: table vs 16-wide tiles")
    _check_lse(small_lse, lse.double(), "lse: table vs 16-wide tiles")
    for got, want in zip(grads, grads_inf, strict=True):
        assert torch.equal(got, want)
    ref = _reference(grad, q, k, v, mask, bias, 0.2, True)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref[2:], strict=True):
        assert_close(got, want, torch.float32, name)


def test_forced_block_crosses_blocks(monkeypatch):
    """The forced block really sets the grids (several query / key blocks per head), through the
    keyword and through ``forced_block`` (what the op-level tests below rely on)."""
    grids = {}

    def record(kernel):
        class Recorder:
            def __getitem__(self, grid):
                grids.setdefault(kernel.__name__, []).append(grid)
                return kernel[grid]

        return Recorder()

    for name in ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel"):
        monkeypatch.setattr(ak, name, record(getattr(ak, name)))
    q, k, v = _qkv(1, 2, 20, 50, 16, "fused_kv", torch.float32)
    with ak.forced_block(BLOCK):
        out, lse = ak.attention_train(q, k, v, None, None, 0.25)
        ak.attention_backward(torch.ones_like(out), q, k, v, out, lse, None, None, 0.25, False)
    # 2 heads x 2 query blocks (fwd, dq), 2 heads x 4 key blocks (dk/dv)
    assert grids == {
        "attention_fwd_kernel": [(4,)],
        "attention_bwd_dq_kernel": [(4,)],
        "attention_bwd_dkdv_kernel": [(8,)],
    }
    with pytest.raises(ValueError, match="power of two"):
        with ak.forced_block(24):
            pass


def test_bad_inputs_raise():
    q = rand(1, 1, 4, 16)
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            ak.attention_train(q, q, q, None, None, 1.0, bad, 3)
    q = rand(1, 1, 4, 136)
    with pytest.raises(ValueError, match="head dim <= 128"):
        ak.attention_forward(q, q, q, None, None, 1.0)
    q64 = rand(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ak.attention_forward(q64, q64, q64, None, None, 1.0)
    q = rand(1, 1, 4, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="bias dtype"):
        ak.attention_forward(q, q, q, None, rand(1, 1, 4, 4, dtype=torch.bfloat16), 1.0)


# ----------------------------------------------------------------------------------------------
# Through the public op
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, bias_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
     (torch.float16, torch.float16)],
    ids=["fp32", "bf16-bias_fp32", "fp16"],
)
def test_public_op_autograd_matches_float64(dtype, bias_dtype):
    """``rosita_fast.ops.attention`` on the triton backend: a fused QKV leaf and a broadcast
    bias leaf, masked, forward and autograd backward (training forward + backward op), and the
    no-grad path, against the float64 reference."""
    b, h, length, d = 2, 3, 37, 32
    qkv = rand(b, length, 3, h, d, dtype=dtype).requires_grad_()
    bias = rand(1, h, length, length, dtype=bias_dtype).requires_grad_()
    mask = _mask(b, length, padded_row=True)
    grad = rand(b, h, length, d, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    scale = d ** -0.5
    ref = _reference(grad, q.detach(), k.detach(), v.detach(), mask, bias.detach(), scale, True)
    with rosita_fast.use_backend("triton"), ak.forced_block(BLOCK), poison_outputs():
        out = rosita_fast.ops.attention(q, k, v, mask, bias)
        out.backward(grad)
        with torch.no_grad():
            out_nograd = rosita_fast.ops.attention(q, k, v, mask, bias)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert torch.equal(out_nograd, out.detach())
    assert_close(out, ref[0], dtype, "out", k=length)
    dqkv = torch.stack(ref[2:5], dim=2).transpose(1, 3)  # [B, L, 3, H, D]
    assert qkv.grad.dtype == dtype
    assert_close(qkv.grad, dqkv, dtype, "dqkv", k=length)
    assert bias.grad.dtype == bias_dtype
    assert_close(bias.grad, ref[5].sum(0, keepdim=True), dtype, "dbias", k=length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_op_dropout_matches_float64(dtype):
    """``rosita_fast.ops.attention(..., dropout_p, dropout_seed)`` on the triton backend: the
    training op with its dropout arguments carried to the backward op, against the float64
    reference with the same seed; under no_grad the same (training) kernels drop the same
    elements."""
    b, h, length, d = 2, 2, 37, 32
    qkv = rand(b, length, 3, h, d, dtype=dtype).requires_grad_()
    bias = rand(1, h, length, length).requires_grad_()
    mask = _mask(b, length, padded_row=True)
    grad = rand(b, h, length, d, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    scale, p, drop_seed = d ** -0.5, 0.3, draw_seed()
    ref = _reference(grad, q.detach(), k.detach(), v.detach(), mask, bias.detach(), scale, True,
                     p, drop_seed)
    with rosita_fast.use_backend("triton"), ak.forced_block(BLOCK), poison_outputs():
        out = rosita_fast.ops.attention(q, k, v, mask, bias, dropout_p=p, dropout_seed=drop_seed)
        out.backward(grad)
        with torch.no_grad():
            out_nograd = rosita_fast.ops.attention(q, k, v, mask, bias, dropout_p=p,
                                                   dropout_seed=drop_seed)
    assert torch.equal(out_nograd, out.detach())
    assert_close(out, ref[0], dtype, "out", k=length)
    dqkv = torch.stack(ref[2:5], dim=2).transpose(1, 3)  # [B, L, 3, H, D]
    assert_close(qkv.grad, dqkv, dtype, "dqkv", k=length)
    assert_close(bias.grad, ref[5].sum(0, keepdim=True), dtype, "dbias", k=length)


# ----------------------------------------------------------------------------------------------
# Launch specs = what the launchers launch
# ----------------------------------------------------------------------------------------------


KERNELS = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launch_specs_are_what_the_launchers_launch(monkeypatch, dtype):
    """For q / k / v views of an aligned fused QKV tensor (or separate contiguous tensors) whose
    sizes are multiples of 16, with or without mask and bias (q's dtype or float32, full or
    broadcast), with or without dropout (any seed and probability), at any head count, the JIT
    specialisation of every launch is a ``contig`` launch spec; ``generic`` specs specialise
    nothing."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.kernel, kwargs))

    specs = {s.name: s for s in ak.launch_specs()}
    for name in KERNELS:
        monkeypatch.setattr(ak, name, Recorder(getattr(ak, name)))
    tl_dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    for d, tile, h, layout in ((16, 32, 1, "fused"), (32, 32, 12, "contig"),
                               (64, 64, 16, "fused"), (128, 128, 3, "fused")):
        b, length = 2, 64
        q, k, v = _qkv(b, h, length, length, d, layout, dtype)
        grad = rand(b, h, length, d, dtype=dtype)
        options = [(None, None, False), (_mask(b, length, True), None, False)]
        for bias_dtype in {dtype, torch.float32}:
            options += [
                (_mask(b, length, False), rand(b, h, length, length, dtype=bias_dtype), True),
                (None, rand(1, 1, 1, length, dtype=bias_dtype), False),
            ]
        # without dropout, and with seeds whose int32 is negative, positive, 1 and 16 (which the
        # JIT would specialise, were the seed not do_not_specialize)
        drops = [(0.0, 0), (0.1, 0xDEADBEEF), (0.5, 1), (0.9, 16)]
        for (mask, bias, bias_grad), (p, drop_seed) in itertools.product(options, drops):
            launches.clear()
            # the GPU path (no upcast, table tiles); the recorder launches nothing
            out, lse = ak.attention_train(q, k, v, mask, bias, 0.125, p, drop_seed, upcast=False)
            ak.attention_backward(grad, q, k, v, out, lse, mask, bias, 0.125, bias_grad, p,
                                  drop_seed, upcast=False)
            assert len(launches) == 3
            bias_label = ""
            if bias is not None and bias.dtype != dtype:
                bias_label = ",bias_fp32"
            if p > 0:
                bias_label += ",dropout"
            for kernel, kwargs in launches:
                spec = specs[f"{kernel.__name__}[{tl_dtype}{bias_label},D{tile},contig]"]
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
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name
        assert all(attr == [] for attr in spec.attrs.values()), spec.name
    # every kernel, q dtype / bias dtype pair (5), head tile (3) and dropout or not, contig and
    # generic
    assert len(specs) == len(KERNELS) * 5 * len(ak.HEAD_TILES) * 2 * 2


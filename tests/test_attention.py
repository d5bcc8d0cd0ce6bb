"""attention: the reference and C++ backends against a float64 reference, forward and backward.

The Triton backend has its own file (``test_attention_triton.py``). The C++ kernels work on blocks
of 64 query rows and 64 keys (online softmax over the key blocks, the backward's second pass over
key blocks), so the sequence lengths here are 1, 7, 64, 65, 130 and 200: inside one block, exactly
one, one past it and several with a partial last one. q, k and v are usually views of one fused
``[B, L, 3, H, D]`` projection, as the model layers pass them.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.attention import reference_forward
from rosita_fast.testing import poison_outputs

BACKENDS = [p for p in runnable_backends("attention") if p.values[0] != "triton"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, heads, seq_q, seq_k, head_dim)
SHAPES = [
    (2, 1, 7, 7, 32),
    (1, 2, 65, 65, 64),
    (2, 3, 130, 130, 32),
    (1, 5, 64, 200, 64),
    (2, 12, 65, 7, 64),
    (1, 2, 200, 130, 128),
    (3, 2, 1, 65, 8),
]


def _qkv(b, h, lq, lk, d, dtype, layout="fused"):
    """q [b, h, lq, d], k and v [b, h, lk, d] in one of the layouts callers use:

    - ``fused``: transposed views of one [b, L, 3, h, d] projection (needs lq == lk);
    - ``seq``: each its own [b, L, h, d] tensor, transposed;
    - ``contiguous``: plain [b, h, L, d] tensors.
    """
    if layout == "fused" and lq == lk:
        qkv = rand(b, lq, 3, h, d, dtype=dtype)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    if layout in ("fused", "seq"):
        return (rand(b, lq, h, d, dtype=dtype).transpose(1, 2),
                rand(b, lk, h, d, dtype=dtype).transpose(1, 2),
                rand(b, lk, h, d, dtype=dtype).transpose(1, 2))
    return rand(b, h, lq, d, dtype=dtype), rand(b, h, lk, d, dtype=dtype), rand(b, h, lk, d,
                                                                              dtype=dtype)


def _padding_mask(b, lk, fully_padded_row=False):
    """Key padding mask [b, lk] (True = attend): each row keeps a random prefix of >= 2 keys (with
    one, the gradients of q and k are exactly 0: nothing to compare); with ``fully_padded_row``
    the last batch row keeps none (its output and gradients are 0)."""
    lengths = torch.randint(min(2, lk), lk + 1, (b,))
    mask = torch.arange(lk)[None, :] < lengths[:, None]
    if fully_padded_row:
        mask[-1] = False
    return mask


def _bias(kind, b, h, lq, lk, dtype):
    if kind == "none":
        return None
    if kind == "full":
        return rand(b, h, lq, lk, dtype=dtype)
    # Broadcast over the batch, MPNet-style, in fp32 (fp64 stays fp64: its gradient is compared
    # at fp64 tolerance).
    return rand(1, h, lq, lk, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _reference64(q, k, v, mask, bias, scale, grad):
    """Output and (q, k, v, bias) gradients of the reference, run in float64 with autograd."""
    args = [t.detach().double().requires_grad_(True) if t is not None else None
            for t in (q, k, v, bias)]
    out = reference_forward(args[0], args[1], args[2], mask, args[3], scale)
    grads = torch.autograd.grad(out, [a for a in args if a is not None], grad.double())
    return out, grads


def _run(backend, q, k, v, mask, bias, grad, scale=None):
    tensors = [t for t in (q, k, v, bias) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.attention(q, k, v, mask, bias, scale)
        grads = torch.autograd.grad(out, tensors, grad)
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "mask+bias", "pad-row+bcast-bias"])
def test_forward_backward(backend, dtype, shape, variant, seed):
    b, h, lq, lk, d = shape
    layout = ("fused", "seq", "contiguous")[seed % 3]
    q, k, v = _qkv(b, h, lq, lk, d, dtype, layout)
    mask = bias = None
    if variant == "mask+bias":
        mask, bias = _padding_mask(b, lk), _bias("full", b, h, lq, lk, dtype)
    elif variant == "pad-row+bcast-bias":
        mask, bias = _padding_mask(b, lk, fully_padded_row=b > 1), _bias("bcast", b, h, lq, lk,
                                                                         dtype)
    grad = rand(b, h, lq, d, dtype=dtype)
    out, grads = _run(backend, q, k, v, mask, bias, grad)
    assert out.dtype == dtype and out.shape == (b, h, lq, d)
    assert out.transpose(1, 2).is_contiguous(), "the output's memory must be [B, Lq, H, D]"
    ref, ref_grads = _reference64(q, k, v, mask, bias, d**-0.5, grad)
    assert_close(out, ref, dtype, f"{backend} forward", k=max(lk, d))
    kk = max(lq, lk, d)
    for name, g, rg in zip(("q", "k", "v", "bias"), grads, ref_grads, strict=False):
        assert g.shape == rg.shape
        assert_close(g, rg, dtype, f"{backend} d{name}", k=kk, factor=2)
    if mask is not None and not mask[-1].any():
        assert torch.equal(out[-1], torch.zeros_like(out[-1])), "fully padded row must give 0"
        for g in grads[:3]:
            assert not g[-1].any(), "a fully padded batch row has zero gradients"


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpp_isa_variants(isa, dtype, monkeypatch, seed):
    # The C++ kernels are compiled for three ISAs and pick the best the CPU has; the variable
    # caps the choice, so one machine checks every variant it can run.
    if "cpp" not in rosita_fast.available_backends():
        pytest.skip("cpp backend not available")
    monkeypatch.setenv("ROSITA_FAST_ATTENTION_ISA", isa)
    b, h, lq, lk, d = 2, 3, 70, 130, 40
    q, k, v = _qkv(b, h, lq, lk, d, dtype, "seq")
    mask, bias = _padding_mask(b, lk), _bias("bcast", b, h, lq, lk, dtype)
    grad = rand(b, h, lq, d, dtype=dtype)
    out, grads = _run("cpp", q, k, v, mask, bias, grad)
    ref, ref_grads = _reference64(q, k, v, mask, bias, d**-0.5, grad)
    assert_close(out, ref, dtype, f"{isa} forward", k=lk)
    for name, g, rg in zip(("q", "k", "v", "bias"), grads, ref_grads, strict=True):
        assert_close(g, rg, dtype, f"{isa} d{name}", k=lk, factor=2)


def test_cpp_rejects_unknown_isa(monkeypatch):
    if "cpp" not in rosita_fast.available_backends():
        pytest.skip("cpp backend not available")
    monkeypatch.setenv("ROSITA_FAST_ATTENTION_ISA", "sse9")
    q, k, v = _qkv(1, 1, 3, 3, 8, torch.float32)
    with rosita_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="baseline, avx2"):
        ops.attention(q, k, v)


# lk = 70 crosses the C++ kernels' 64-key blocks (the reference has none).
@pytest.mark.parametrize(("backend", "lk"), [(p.values[0], lk) for p in BACKENDS for lk in (7, 70)
                                            if lk == 7 or p.values[0] == "cpp"])
def test_gradcheck_float64(backend, lk, seed):
    b, h, lq, d = 2, 2, 5, 8
    q, k, v = _qkv(b, h, lq, lk, d, torch.float64, "seq")
    mask = _padding_mask(b, lk)
    mask[0, 0] = True
    bias = rand(1, h, lq, lk, dtype=torch.float64)
    if lk > 7:  # fewer elements where the key blocks cross (finite differences per element)
        q, k, v, bias = q[:1, :1], k[:1, :1], v[:1, :1], bias[:, :1]
        mask = mask[:1]
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v, bias))
    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda q_, k_, v_, b_: ops.attention(q_, k_, v_, mask, b_, 0.7), inputs,
            eps=1e-6, atol=1e-7,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_fully_masked_rows(backend, seed):
    b, h, lq, lk, d = 3, 2, 9, 70, 16
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32, "seq")
    mask = _padding_mask(b, lk, fully_padded_row=True)
    bias = rand(b, h, lq, lk)
    with rosita_fast.use_backend(backend), poison_outputs():
        out, lse = torch.ops.rosita_fast.attention_train(q, k, v, mask, bias, 0.3)
    assert lse.shape == (b, h, lq) and lse.dtype == torch.float32
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.3 + bias.double()
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = torch.logsumexp(scores, -1)
    assert torch.isneginf(lse[-1]).all(), "a row with no key left has lse = -inf"
    assert_close(lse[:-1], expected[:-1], torch.float32, f"{backend} lse")
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_outputs(backend, seed):
    # The backward op's layouts (the fakes promise them) and its full-shape bias gradient.
    b, h, lq, lk, d = 2, 3, 66, 9, 24
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32, "contiguous")
    bias = rand(1, h, 1, lk)
    grad = rand(b, h, lq, d)
    with rosita_fast.use_backend(backend), poison_outputs():
        out, lse = torch.ops.rosita_fast.attention_train(q, k, v, None, bias, 0.25)
        dq, dk, dv, dbias = torch.ops.rosita_fast.attention_backward(
            grad, q, k, v, out, lse, None, bias, 0.25, True)
        no_bias_grad = torch.ops.rosita_fast.attention_backward(
            grad, q, k, v, out, lse, None, bias, 0.25, False)[3]
    for t, seq in ((dq, lq), (dk, lk), (dv, lk)):
        assert t.shape == (b, h, seq, d) and t.transpose(1, 2).is_contiguous()
    assert dbias.shape == (b, h, lq, lk) and dbias.dtype == torch.float32
    assert no_bias_grad.numel() == 0
    args = [t.double().requires_grad_(True) for t in (q, k, v)]
    scores = (args[0] @ args[1].transpose(-1, -2)) * 0.25 + bias.double()
    scores.retain_grad()
    (torch.softmax(scores, -1) @ args[2]).backward(grad.double())
    assert_close(dbias, scores.grad, torch.float32, f"{backend} dbias_full")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_sdpa(backend, seed):
    # Independent of the reference module: torch's own attention with a boolean key mask.
    q, k, v = _qkv(2, 4, 33, 33, 64, torch.float32)
    mask = _padding_mask(2, 33)
    with rosita_fast.use_backend(backend):
        out = ops.attention(q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :])
    assert_close(out, expected, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.uint8], ids=str)
def test_mask_dtypes(backend, mask_dtype, seed):
    q, k, v = _qkv(2, 2, 10, 10, 16, torch.float32)
    mask = _padding_mask(2, 10)
    with rosita_fast.use_backend(backend):
        expected = ops.attention(q, k, v, mask)
        out = ops.attention(q, k, v, mask.to(mask_dtype) * 3)  # nonzero = attend
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_broadcast_shapes_and_dtypes(backend, seed):
    b, h, lq, lk, d = 2, 3, 5, 6, 8
    q, k, v = _qkv(b, h, lq, lk, d, torch.bfloat16, "seq")
    grad = rand(b, h, lq, d, dtype=torch.bfloat16)
    for shape in [(1, h, lq, lk), (b, 1, 1, lk), (lq, lk), (1, 1, 1, 1)]:
        bias = rand(*shape)  # fp32 bias with bf16 q, k, v
        out, grads = _run(backend, q, k, v, None, bias, grad)
        ref, ref_grads = _reference64(q, k, v, None, bias, d**-0.5, grad)
        assert_close(out, ref, torch.bfloat16, f"{backend} forward, bias {shape}", k=lk)
        assert grads[3].shape == shape and grads[3].dtype == torch.float32
        if shape != (1, 1, 1, 1):  # a constant shift: its exact gradient is 0
            assert_close(grads[3], ref_grads[3], torch.bfloat16, f"dbias {shape}", k=lq * lk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, seed):
    q, k, v = _qkv(1, 2, 70, 70, 16, torch.float32, "seq")
    q[0, 1, 5, 3] = float("nan")
    with rosita_fast.use_backend(backend):
        out = ops.attention(q, k, v)
    assert torch.isnan(out[0, 1, 5]).all(), "a NaN query must poison its output row"
    out[0, 1, 5] = 0
    assert torch.isfinite(out).all(), "NaN must not leak into other rows"


def test_torch_compile_fullgraph(seed):
    b, seq, h, d = 2, 70, 4, 32
    proj = torch.nn.Linear(h * d, 3 * h * d)
    x = rand(b, seq, h * d)
    mask = _padding_mask(b, seq)

    def layer(x, mask):
        q, k, v = proj(x).view(b, seq, 3, h, d).unbind(2)
        out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return out.transpose(1, 2).reshape(b, seq, h * d)

    expected = layer(x, mask)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, mask)
    assert_close(out, expected, torch.float32, "compiled forward")
    out.sum().backward()
    grads = [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    expected.sum().backward()
    for g, p in zip(grads, proj.parameters(), strict=True):
        assert_close(g, p.grad, torch.float32, "compiled backward")


def test_opcheck(seed):
    # Schema, fake tensor kernels (incl. the output strides), autograd registration, dispatcher.
    b, h, lq, lk, d = 2, 2, 5, 7, 8
    q, k, v = (t.requires_grad_(True) for t in _qkv(b, h, lq, lk, d, torch.float32, "seq"))
    mask = _padding_mask(b, lk)
    bias = rand(1, h, lq, lk).requires_grad_(True)
    fwd = torch.ops.rosita_fast.attention.default
    train = torch.ops.rosita_fast.attention_train.default
    for op in (fwd, train):
        torch.library.opcheck(op, (q, k, v, mask, bias, 0.5))
        torch.library.opcheck(op, (q, k, v, None, None, 0.5))
    out, lse = (t.detach() for t in torch.ops.rosita_fast.attention_train(q, k, v, mask, bias,
                                                                          0.5))
    grad = rand(b, h, lq, d)
    args = (grad, q.detach(), k.detach(), v.detach(), out, lse, mask, bias.detach(), 0.5)
    backward = torch.ops.rosita_fast.attention_backward.default
    torch.library.opcheck(backward, (*args, True))
    torch.library.opcheck(backward, (*args, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_bf16(backend, seed):
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 9, 9, 16, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16), rosita_fast.use_backend(backend):
        out = ops.attention(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


def test_plain_op_under_autograd_recomputes_lse(seed):
    # Calling the plain custom op while autograd records (no lse kept) still differentiates.
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 20, 20, 8, torch.float64))
    grads = torch.autograd.grad(torch.ops.rosita_fast.attention(q, k, v, None, None, 0.4).sum(),
                                (q, k, v))
    expected = torch.autograd.grad(reference_forward(q, k, v, None, None, 0.4).sum(), (q, k, v))
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, torch.float64, "plain op backward")


class TestBadInput:
    def setup_method(self):
        self.q, self.k, self.v = _qkv(2, 3, 5, 6, 16, torch.float32, "seq")

    def test_rank(self):
        with pytest.raises(ValueError, match="q must be 4-D"):
            ops.attention(self.q[0], self.k, self.v)

    def test_head_size(self):
        q, k, v = _qkv(1, 1, 4, 4, 12, torch.float32)
        with pytest.raises(ValueError, match="head size 12 is not supported"):
            ops.attention(q, k, v)
        q, k, v = _qkv(1, 1, 4, 4, 136, torch.float32)
        with pytest.raises(ValueError, match="head size 136"):
            ops.attention(q, k, v)

    def test_mismatched_dims(self):
        with pytest.raises(ValueError, match="differ in the number of heads"):
            ops.attention(self.q[:, :2], self.k, self.v)
        with pytest.raises(ValueError, match="differ in the batch size"):
            ops.attention(self.q[:1], self.k, self.v)
        with pytest.raises(ValueError, match="must have the same shape"):
            ops.attention(self.q, self.k, self.v[:, :, :4])

    def test_last_dim_stride(self):
        with pytest.raises(ValueError, match="last dimension must be contiguous"):
            ops.attention(self.q, self.k, rand(2, 3, 16, 6).transpose(2, 3))

    def test_mask_shape(self):
        with pytest.raises(ValueError, match="mask must be a key padding mask of shape"):
            ops.attention(self.q, self.k, self.v, torch.ones(2, 5, dtype=torch.bool))

    def test_bias_shape_and_dtype(self):
        with pytest.raises(ValueError, match="does not broadcast"):
            ops.attention(self.q, self.k, self.v, bias=rand(2, 3, 5, 5))
        with pytest.raises(TypeError, match="bias has dtype torch.float16"):
            ops.attention(self.q, self.k, self.v, bias=rand(1, 3, 5, 6, dtype=torch.float16))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="v has dtype torch.float64 but q has torch.float32"):
            ops.attention(self.q, self.k, self.v.double())
        with pytest.raises(TypeError, match="q has dtype torch.int64"):
            ops.attention(self.q.long(), self.k, self.v)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="k is on meta"):
            ops.attention(self.q, self.k.to("meta"), self.v.to("meta"))

    def test_empty(self):
        with pytest.raises(ValueError, match="empty input"):
            ops.attention(self.q[:, :, :0], self.k, self.v)

    def test_scale_type(self):
        with pytest.raises(TypeError, match="scale must be a float"):
            ops.attention(self.q, self.k, self.v, scale="0.5")

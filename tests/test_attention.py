"""attention: the reference and C++ backends against a float64 reference, forward and backward.

The Triton backend has its own file (``test_attention_triton.py``). The C++ kernels work on blocks
of 64 query rows and 64 keys (online softmax over the key blocks, the backward's second pass over
key blocks), so the sequence lengths here are 1, 7, 64, 65, 130 and 200: inside one block, exactly
one, one past it and several with a partial last one. q, k and v are usually views of one fused
``[B, L, 3, H, D]`` projection, as the model layers pass them.

Dropout (``dropout_p > 0``): the backends must drop exactly the reference's elements for the same
seed, so they are compared with the float64 reference run with that seed; the reference itself
is checked against the definition (``keep_mask`` on the ``[B, H, Lq, Lk]`` grid).
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops._dropout import draw_seed, dropout_scale, keep_mask
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


def _reference64(q, k, v, mask, bias, scale, grad, dropout_p=0.0, dropout_seed=0):
    """Output and (q, k, v, bias) gradients of the reference, run in float64 with autograd."""
    args = [t.detach().double().requires_grad_(True) if t is not None else None
            for t in (q, k, v, bias)]
    out = reference_forward(args[0], args[1], args[2], mask, args[3], scale, dropout_p,
                            dropout_seed)
    grads = torch.autograd.grad(out, [a for a in args if a is not None], grad.double())
    return out, grads


def _run(backend, q, k, v, mask, bias, grad, scale=None, dropout_p=0.0, dropout_seed=None):
    tensors = [t for t in (q, k, v, bias) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.attention(q, k, v, mask, bias, scale, dropout_p, dropout_seed)
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
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpp_isa_variants(isa, dtype, p, monkeypatch, seed):
    # The C++ kernels are compiled for three ISAs and pick the best the CPU has; the variable
    # caps the choice, so one machine checks every variant it can run (with dropout too: its hash
    # is vectorized per variant).
    if "cpp" not in rosita_fast.available_backends():
        pytest.skip("cpp backend not available")
    monkeypatch.setenv("ROSITA_FAST_ATTENTION_ISA", isa)
    b, h, lq, lk, d = 2, 3, 70, 130, 40
    q, k, v = _qkv(b, h, lq, lk, d, dtype, "seq")
    mask, bias = _padding_mask(b, lk), _bias("bcast", b, h, lq, lk, dtype)
    grad = rand(b, h, lq, d, dtype=dtype)
    drop_seed = draw_seed()
    out, grads = _run("cpp", q, k, v, mask, bias, grad, dropout_p=p, dropout_seed=drop_seed)
    ref, ref_grads = _reference64(q, k, v, mask, bias, d**-0.5, grad, p, drop_seed)
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


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodropout", "dropout"])
def test_torch_compile_fullgraph(dropout_p, seed):
    # With dropout the seed is an explicit argument: draw_seed() reads a tensor's value, which a
    # fullgraph trace cannot.
    b, seq, h, d = 2, 70, 4, 32
    proj = torch.nn.Linear(h * d, 3 * h * d)
    x = rand(b, seq, h * d)
    mask = _padding_mask(b, seq)

    def layer(x, mask, drop_seed):
        q, k, v = proj(x).view(b, seq, 3, h, d).unbind(2)
        out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                            dropout_p=dropout_p, dropout_seed=drop_seed)
        return out.transpose(1, 2).reshape(b, seq, h * d)

    drop_seed = draw_seed()
    expected = layer(x, mask, drop_seed)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, mask, drop_seed)
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


# ---- dropout ------------------------------------------------------------------------------------


def _dropout_rows_cols(b, h, lq, lk):
    """The dropout hash's coordinates of the [B, H, Lq, Lk] probabilities: row (b H + h) Lq + i,
    column j (the op's documented element coordinates)."""
    return torch.arange(b * h * lq).view(b, h, lq, 1), torch.arange(lk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_forward_backward(backend, dtype, shape, p, seed):
    # Against the float64 reference with the same seed: the same elements dropped, forward and
    # backward (the backward regenerates the mask). A key padding mask with a fully padded batch
    # row, and a bias with its gradient: full for p = 0.1, broadcast fp32 for p = 0.5.
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype, ("fused", "seq", "contiguous")[seed % 3])
    mask = _padding_mask(b, lk, fully_padded_row=b > 1)
    bias = _bias("full" if p == 0.1 else "bcast", b, h, lq, lk, dtype)
    grad = rand(b, h, lq, d, dtype=dtype)
    drop_seed = draw_seed()
    out, grads = _run(backend, q, k, v, mask, bias, grad, dropout_p=p, dropout_seed=drop_seed)
    assert out.dtype == dtype and out.shape == (b, h, lq, d)
    assert out.transpose(1, 2).is_contiguous(), "the output's memory must be [B, Lq, H, D]"
    ref, ref_grads = _reference64(q, k, v, mask, bias, d**-0.5, grad, p, drop_seed)
    assert_close(out, ref, dtype, f"{backend} forward", k=max(lk, d))
    kk = max(lq, lk, d)
    for name, g, rg in zip(("q", "k", "v", "bias"), grads, ref_grads, strict=True):
        assert g.shape == rg.shape
        assert_close(g, rg, dtype, f"{backend} d{name}", k=kk, factor=2)
    if not mask[-1].any():
        assert torch.equal(out[-1], torch.zeros_like(out[-1])), "fully padded row must give 0"
        for g in grads[:3]:
            assert not g[-1].any(), "a fully padded batch row has zero gradients"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_reference_dropout_is_the_definition(p, seed):
    # The ground truth the backends are held to, against the definition written out here:
    # out = (softmax(S) * keep * scale) v, keep from keep_mask at the documented coordinates.
    b, h, lq, lk, d = 2, 3, 9, 11, 8
    q, k, v = (t.double() for t in _qkv(b, h, lq, lk, d, torch.float64, "seq"))
    mask = _padding_mask(b, lk, fully_padded_row=True)
    drop_seed = draw_seed()
    out = reference_forward(q, k, v, mask, None, 0.3, p, drop_seed)
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(s, -1))  # the fully padded row: 0
    rows, cols = _dropout_rows_cols(b, h, lq, lk)
    keep = keep_mask(drop_seed, rows, cols, p)
    assert 0 < keep.sum() < keep.numel()
    expected = (probs * keep * dropout_scale(p)) @ v
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_the_hashed_elements_at_rate_p(backend, p, seed):
    # With v = I (Lk = D = 72: a key block and a partial one; Lq = 130: three query blocks) the
    # output is the dropped probability matrix itself, P * keep * scale: its zeros are exactly the
    # hash's dropped elements, its kept values P * scale, and the kept fraction about 1 - p.
    b, h, lq, lk = 2, 3, 130, 72
    q, k = _qkv(b, h, lq, lk, lk, torch.float32, "seq")[:2]
    v = torch.eye(lk).expand(b, h, lk, lk)
    drop_seed = draw_seed()
    with rosita_fast.use_backend(backend), poison_outputs():
        out = ops.attention(q, k, v, dropout_p=p, dropout_seed=drop_seed)
        probs = ops.attention(q, k, v)
    keep = keep_mask(drop_seed, *_dropout_rows_cols(b, h, lq, lk), p)
    assert torch.equal(out != 0, keep), "dropped elements differ from the hash's"
    assert_close(out, probs * keep * dropout_scale(p), torch.float32, f"{backend} kept values")
    n = keep.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(keep.double().mean().item() - (1 - p)) < 6 * sd


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seeds(backend, seed):
    q, k, v = _qkv(2, 2, 70, 70, 16, torch.float32)
    mask = _padding_mask(2, 70)
    s1 = draw_seed()
    s2 = s1 ^ 1
    with rosita_fast.use_backend(backend):
        a = ops.attention(q, k, v, mask, dropout_p=0.2, dropout_seed=s1)
        assert torch.equal(a, ops.attention(q, k, v, mask, dropout_p=0.2, dropout_seed=s1))
        assert not torch.equal(a, ops.attention(q, k, v, mask, dropout_p=0.2, dropout_seed=s2))
        # Seeds are taken modulo 2^32.
        assert torch.equal(a, ops.attention(q, k, v, mask, dropout_p=0.2,
                                            dropout_seed=s1 + (5 << 32)))
        assert not torch.equal(a, ops.attention(q, k, v, mask))
        # No seed: one drawn from torch's generator, so torch.manual_seed reproduces the mask,
        # and successive calls draw new ones.
        torch.manual_seed(seed)
        c = ops.attention(q, k, v, mask, dropout_p=0.2)
        d = ops.attention(q, k, v, mask, dropout_p=0.2)
        torch.manual_seed(seed)
        assert torch.equal(c, ops.attention(q, k, v, mask, dropout_p=0.2))
        assert not torch.equal(c, d)
        # dropout_p = 0 with a seed is no dropout.
        assert torch.equal(ops.attention(q, k, v, mask, dropout_p=0.0, dropout_seed=s1),
                           ops.attention(q, k, v, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_without_grad_runs_the_training_op(backend, seed):
    # Under no_grad a call with dropout still drops (the training op; the inference op has no
    # dropout), with the same result as with autograd recording.
    q, k, v = _qkv(1, 2, 65, 65, 32, torch.float32)
    bias = rand(1, 2, 65, 65)
    drop_seed = draw_seed()
    with rosita_fast.use_backend(backend):
        with torch.no_grad():
            out = ops.attention(q, k, v, None, bias, dropout_p=0.3, dropout_seed=drop_seed)
        out_grad = ops.attention(q.requires_grad_(True), k, v, None, bias, dropout_p=0.3,
                                 dropout_seed=drop_seed)
    assert out_grad.requires_grad
    assert torch.equal(out, out_grad.detach())
    ref = reference_forward(q.detach().double(), k.double(), v.double(), None, bias.double(),
                            32**-0.5, 0.3, drop_seed)
    assert_close(out, ref, torch.float32, f"{backend} no-grad dropout")


# lk = 70 crosses the C++ kernels' 64-key blocks (the reference has none).
@pytest.mark.parametrize(("backend", "lk"), [(p.values[0], lk) for p in BACKENDS for lk in (7, 70)
                                            if lk == 7 or p.values[0] == "cpp"])
def test_dropout_gradcheck_float64(backend, lk, seed):
    b, h, lq, d = 2, 2, 5, 8
    q, k, v = _qkv(b, h, lq, lk, d, torch.float64, "seq")
    mask = _padding_mask(b, lk)
    mask[0, 0] = True
    bias = rand(1, h, lq, lk, dtype=torch.float64)
    if lk > 7:  # fewer elements where the key blocks cross (finite differences per element)
        q, k, v, bias = q[:1, :1], k[:1, :1], v[:1, :1], bias[:, :1]
        mask = mask[:1]
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v, bias))
    drop_seed = 0x9E3779B9  # fixed: the function gradcheck differentiates
    with rosita_fast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda q_, k_, v_, b_: ops.attention(q_, k_, v_, mask, b_, 0.7, dropout_p=0.4,
                                                 dropout_seed=drop_seed),
            inputs, eps=1e-6, atol=1e-7,
        )


def test_dropout_opcheck(seed):
    # The training and backward ops' dropout arguments: schema, fakes, autograd, dispatcher.
    b, h, lq, lk, d = 2, 2, 5, 7, 8
    q, k, v = (t.requires_grad_(True) for t in _qkv(b, h, lq, lk, d, torch.float32, "seq"))
    mask = _padding_mask(b, lk)
    bias = rand(1, h, lq, lk).requires_grad_(True)
    drop_seed = draw_seed()
    train = torch.ops.rosita_fast.attention_train.default
    torch.library.opcheck(train, (q, k, v, mask, bias, 0.5, 0.3, drop_seed))
    torch.library.opcheck(train, (q, k, v, None, None, 0.5, 0.3, drop_seed))
    out, lse = (t.detach() for t in train(q, k, v, mask, bias, 0.5, 0.3, drop_seed))
    grad = rand(b, h, lq, d)
    args = (grad, q.detach(), k.detach(), v.detach(), out, lse, mask, bias.detach(), 0.5)
    backward = torch.ops.rosita_fast.attention_backward.default
    torch.library.opcheck(backward, (*args, True, 0.3, drop_seed))
    torch.library.opcheck(backward, (*args, False, 0.3, drop_seed))


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

    def test_dropout_p(self):
        for bad in (1.0, 1.5, -0.1, float("nan")):
            with pytest.raises(ValueError, match="attention: dropout_p must be in"):
                ops.attention(self.q, self.k, self.v, dropout_p=bad)
        for bad in ("0.1", None, True):
            with pytest.raises(TypeError, match="attention: dropout_p must be a float"):
                ops.attention(self.q, self.k, self.v, dropout_p=bad)

    def test_dropout_seed(self):
        for bad in (1.5, "3", True, torch.tensor(3)):
            with pytest.raises(TypeError, match="attention: dropout_seed must be None or an int"):
                ops.attention(self.q, self.k, self.v, dropout_p=0.1, dropout_seed=bad)

    def test_cpp_kernels_check_dropout_p(self):
        if "cpp" not in rosita_fast.available_backends():
            pytest.skip("cpp backend not available")
        with pytest.raises(RuntimeError, match="dropout_p must be in"):
            torch.ops.rosita_fast.attention_train_cpp(self.q, self.k, self.v, None, None, 0.25,
                                                      1.0, 3)

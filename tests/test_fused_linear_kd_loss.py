"""fused_linear_kd_loss: every runnable backend against the un-chunked float64 composition (both
linear layers, then kd_logits_loss), forward and backward, every reduction, biases, masks, the
chunk loop (chunks forced small so 37 tokens take 10 chunks, the last one partial), retained
graphs, memory bounded by the chunk, opcheck, torch.compile and bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_harness import assert_close, rand, runnable_backends

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.kd_logits_loss import KINDS, REDUCTIONS

FLK = sys.modules["rosita_fast.ops.fused_linear_kd_loss"]
BACKENDS = [p for p in runnable_backends("fused_linear_kd_loss") if p.values[0] != "triton"]

pytestmark = pytest.mark.usefixtures("seed")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(FLK, "CHUNK_ELEMENTS", 4 * 53)  # 4 tokens of a 53-word vocabulary


def _inputs(n=37, hs=24, ht=40, v=53, dtype=torch.float32, bias=True):
    return dict(
        student_hidden=rand(n, hs, dtype=dtype),
        student_weight=rand(v, hs, dtype=dtype, scale=hs**-0.5 * 3),
        teacher_hidden=rand(n, ht, dtype=dtype),
        teacher_weight=rand(v, ht, dtype=dtype, scale=ht**-0.5 * 3),
        student_bias=rand(v, dtype=dtype) if bias else None,
        teacher_bias=rand(v, dtype=dtype) if bias else None,
    )


def _want(inp, temperature, kind, reduction, mask, t2):
    """kd_logits_loss on the whole logits, float64, through autograd."""
    leaves = {k: v.detach().double().requires_grad_(k.startswith("student"))
              if v is not None else None for k, v in inp.items()}
    s = leaves["student_hidden"] @ leaves["student_weight"].t()
    t = leaves["teacher_hidden"] @ leaves["teacher_weight"].t()
    if leaves["student_bias"] is not None:
        s, t = s + leaves["student_bias"], t + leaves["teacher_bias"]
    with rosita_fast.use_backend("reference"):
        loss = ops.kd_logits_loss(s, t, temperature, kind, reduction, mask, scale_by_t2=t2)
    return loss, [leaves[k] for k in ("student_hidden", "student_weight", "student_bias")
                  if leaves[k] is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_the_whole_logits(backend, reduction, dtype, small_chunks):
    for kind, bias, masked in (("kl", True, False), ("soft_ce", False, True)):
        inp = _inputs(dtype=dtype, bias=bias)
        mask = (torch.rand(37) < 0.7) if masked else None
        for k in ("student_hidden", "student_weight", "student_bias"):
            if inp[k] is not None:
                inp[k].requires_grad_()
        with rosita_fast.use_backend(backend):
            got = ops.fused_linear_kd_loss(**inp, temperature=1.5, kind=kind,
                                           reduction=reduction, mask=mask, scale_by_t2=True)
        want, leaves = _want(inp, 1.5, kind, reduction, mask, True)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert got.dtype == acc and got.shape == want.shape
        # bf16: the logits are rounded to bf16 by the GEMMs (as eager's F.linear would)
        k = 1 if dtype != torch.bfloat16 else 200
        assert_close(got, want, acc if dtype != torch.bfloat16 else dtype, "loss", k=k)
        g_out = torch.randn(want.shape, dtype=torch.float64)
        targets = [inp[k] for k in ("student_hidden", "student_weight", "student_bias")
                   if inp[k] is not None]
        got_grads = torch.autograd.grad(got, targets, g_out.to(got.dtype))
        want_grads = torch.autograd.grad(want, leaves, g_out)
        for name, g, w in zip(("d_hidden", "d_weight", "d_bias"), got_grads, want_grads,
                              strict=False):
            assert g.dtype == dtype
            assert_close(g, w, dtype, name, k=4 if dtype != torch.bfloat16 else 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_and_teacher_without_gradient(backend, small_chunks):
    inp = _inputs()
    inp["student_hidden"].requires_grad_()
    inp["teacher_hidden"].requires_grad_()
    with rosita_fast.use_backend(backend):
        loss = 2.0 * ops.fused_linear_kd_loss(**inp)
        (g1,) = torch.autograd.grad(loss, inp["student_hidden"], retain_graph=True)
        (g2,) = torch.autograd.grad(loss, inp["student_hidden"], retain_graph=True)
        loss.backward()
    assert torch.equal(g1, g2) and torch.equal(g1, inp["student_hidden"].grad)
    assert inp["teacher_hidden"].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, small_chunks):
    inp = _inputs(n=9, hs=5, ht=6, v=53, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    for reduction in ("none", "mean"):
        def f(h, w, b, reduction=reduction):
            return ops.fused_linear_kd_loss(h, w, inp["teacher_hidden"], inp["teacher_weight"],
                                            b, inp["teacher_bias"], 2.0, "kl", reduction, mask)

        leaves = tuple(inp[k].requires_grad_() for k in
                       ("student_hidden", "student_weight", "student_bias"))
        with rosita_fast.use_backend(backend):
            assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_memory_is_bounded_by_the_chunk(monkeypatch):
    """4096 tokens x a 4096-word vocabulary: the logits would be 64 MiB each; with 1 MiB chunks
    the call allocates about the gradients (4 MiB for hidden and weight) and a few chunks."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(FLK, "CHUNK_ELEMENTS", 1 << 18)
    inp = _inputs(n=4096, hs=128, ht=128, v=4096)
    inp["student_hidden"].requires_grad_()
    inp["student_weight"].requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = ops.fused_linear_kd_loss(**inp)
        loss.backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    whole_logits = 4096 * 4096 * 4
    assert peak < whole_logits / 4, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, small_chunks):
    inp = _inputs(n=9, hs=5, ht=6, v=11)
    args = tuple(inp[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                  "teacher_weight", "student_bias", "teacher_bias"))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    with rosita_fast.use_backend(backend):
        torch.library.opcheck(torch.ops.rosita_fast.fused_linear_kd_loss.default,
                              (*args, 2.0, "kl", mask))
        torch.library.opcheck(torch.ops.rosita_fast.fused_linear_kd_loss_grads.default,
                              (*args, 2.0, "soft_ce", None, torch.rand(9)))


def test_compile_fullgraph(small_chunks):
    inp = _inputs(n=9, hs=5, ht=6, v=11)
    h = inp["student_hidden"].requires_grad_()

    def f(x):
        return ops.fused_linear_kd_loss(x, inp["student_weight"], inp["teacher_hidden"],
                                        inp["teacher_weight"], reduction="mean")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(h)
    want = f(h)
    assert_close(got, want, torch.float32, "loss")
    (g1,) = torch.autograd.grad(got, h)
    (g2,) = torch.autograd.grad(want, h)
    assert_close(g1, g2, torch.float32, "grad")


def test_bad_inputs_raise():
    inp = _inputs(n=4, v=7)
    with pytest.raises(ValueError, match="features"):
        ops.fused_linear_kd_loss(inp["student_hidden"], inp["teacher_weight"],
                                 inp["teacher_hidden"], inp["teacher_weight"])
    with pytest.raises(ValueError, match="tokens"):
        ops.fused_linear_kd_loss(inp["student_hidden"], inp["student_weight"],
                                 inp["teacher_hidden"][:3], inp["teacher_weight"])
    with pytest.raises(ValueError, match="vocabulary"):
        ops.fused_linear_kd_loss(inp["student_hidden"], inp["student_weight"],
                                 inp["teacher_hidden"], inp["teacher_weight"][:5])
    with pytest.raises(TypeError, match="dtype"):
        ops.fused_linear_kd_loss(inp["student_hidden"].double(), inp["student_weight"],
                                 inp["teacher_hidden"], inp["teacher_weight"])
    with pytest.raises(ValueError, match="bias"):
        ops.fused_linear_kd_loss(inp["student_hidden"], inp["student_weight"],
                                 inp["teacher_hidden"], inp["teacher_weight"],
                                 student_bias=rand(3))
    with pytest.raises(ValueError, match="mask"):
        ops.fused_linear_kd_loss(**inp, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        ops.fused_linear_kd_loss(**inp, temperature=-1.0)
    for kind in KINDS:
        ops.fused_linear_kd_loss(**inp, kind=kind)
    with pytest.raises(ValueError, match="kind"):
        ops.fused_linear_kd_loss(**inp, kind="mse")

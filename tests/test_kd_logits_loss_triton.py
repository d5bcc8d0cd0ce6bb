"""The Triton kd_logits_loss kernel (``rosita_fast.kernels.kd_logits_loss``) in the CPU interpreter,
through the public op under ``use_backend("triton")``, against the float64 reference.

Chunks are 16, 128, 1024 or 2048 classes wide (the smallest that holds the row): class counts 1,
3, 17, 100 (one chunk, masked tail), 2049 and 4100 (two and three 2048-wide chunks, partial last)
walk the online loop across chunks, where the lane maxima move. Covered: both kinds, every
reduction, masks (a dropped row is not read: its logits are NaN here), the hard inputs of the C++
tests (logits of +-1e4, -inf classes, no teacher distribution, NaN and +inf), strided rows,
fp32 / fp16 / bf16 logits, NaN-poisoned outputs, fp64 refused; then the launch specs the lowering
tests compile against what the launcher launches.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_close, declared_constexprs, make, spec_matches_launch
from rosita_fast.kernels import kd_logits_loss as kk

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.kd_logits_loss import KINDS, reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

pytestmark = pytest.mark.usefixtures("seed")


def _run(s, t, temperature, kind, mask):
    flat = mask.reshape(-1) if mask is not None else None
    with rosita_fast.use_backend("triton"), poison_outputs():
        rows = ops.REGISTRY["kd_logits_loss"].run(s, t, temperature, kind, flat)
        rows_t, grad = ops.REGISTRY["kd_logits_loss_train"].run(s, t, temperature, kind, flat)
    return rows, rows_t, grad, flat


def _check(s, t, temperature, kind, mask=None):
    rows, rows_t, grad, flat = _run(s, t, temperature, kind, mask)
    ref = reference_forward(s.double(), t.double(), temperature, kind, flat)
    ref_g = reference_backward(s.double(), t.double(), temperature, kind, flat)
    assert rows.dtype == torch.float32 and grad.dtype == s.dtype
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(rows), finite)
    if ref.norm() == 0:
        assert torch.all(rows == 0) and torch.all(grad == 0)
        return
    err = (rows.double() - ref)[finite].norm() / ref[finite].norm().clamp_min(1e-30)
    assert err <= 2e-5, f"rows: relative error {err:.3e}"
    torch.testing.assert_close(rows, rows_t, rtol=0, atol=0, equal_nan=True)
    ok = torch.isfinite(ref_g).all(-1)  # NaN rows: NaN in both
    assert torch.isnan(grad[~ok]).all()
    assert_close(grad[ok], ref_g[ok], s.dtype, "grad", k=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [1, 3, 17, 100, 2049, 4100])
def test_rows_and_gradient_match_float64(dtype, classes):
    for kind in KINDS:
        s = make((5, classes), "contig", dtype, scale=3.0)
        t = make((5, classes), "contig", dtype, scale=3.0)
        mask = torch.tensor([True, False, True, True, False])
        s[1] = float("nan")  # a dropped row is never read
        _check(s, t, 2.5, kind, mask)
        _check(make((2, 3, classes), "strided", dtype, scale=3.0),
               make((2, 3, classes), "contig", dtype, scale=3.0), 0.7, kind)


def test_hard_inputs():
    c = 2100
    s, t = make((8, c), "contig", torch.float32), make((8, c), "contig", torch.float32)
    s[0] *= 1e4
    t[0] *= 1e4
    s[1], t[1] = 1e4 + s[1], -1e4 + t[1]
    t[2, ::3] = float("-inf")
    s[2, ::6] = float("-inf")
    t[3] = float("-inf")  # no teacher distribution
    t[4, :2050] = float("-inf")  # mass only in the last chunk
    s[5, :2048] = -1e4  # the student's maximum appears only in the second chunk
    s[6] = float("-inf")  # infinite loss
    s[7, 3] = float("nan")
    for kind in KINDS:
        _check(s, t, 1.0, kind)
        rows, _, grad, _ = _run(s, t, 1.0, kind, None)
        assert rows[3] == 0 and torch.all(grad[3] == 0)
        assert rows[6] == float("inf") and torch.isnan(rows[7])
        assert torch.isfinite(grad[:7]).all() and torch.isnan(grad[7]).all()


def test_public_op_autograd_and_fp64_refused():
    s = make((3, 4, 33), "contig", torch.float32).requires_grad_()
    t = make((3, 4, 33), "contig", torch.float32)
    mask = torch.rand(3, 4) < 0.6
    mask[0, 0] = True
    with rosita_fast.use_backend("triton"):
        loss = ops.kd_logits_loss(s, t, 2.0, "soft_ce", "mean", mask)
        (g,) = torch.autograd.grad(loss, s)
        with pytest.raises(TypeError, match="float64"):
            ops.kd_logits_loss(s.double(), t.double())
    s64 = s.detach().double().requires_grad_()
    with rosita_fast.use_backend("reference"):
        want = ops.kd_logits_loss(s64, t.double(), 2.0, "soft_ce", "mean", mask)
        (want_g,) = torch.autograd.grad(want, s64)
    assert_close(loss, want, torch.float32, "loss")
    assert_close(g, want_g, torch.float32, "grad")


def test_launch_specs_are_what_the_launcher_launches(monkeypatch):
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda **kwargs: launches.append(kwargs)

    specs = kk.launch_specs()
    kernel = kk.kd_logits_kernel
    monkeypatch.setattr(kk, "kd_logits_kernel", Recorder())
    for classes, dtype in ((32, torch.float32), (30528, torch.bfloat16), (96, torch.float16)):
        s = torch.randn(64, classes).to(dtype)
        t = torch.randn(64, classes).to(dtype)
        for mask in (None, torch.ones(64, dtype=torch.bool)):
            launches.clear()
            kk.kd_logits_loss_train(s, t, 2.0, "kl", mask)
            kk.kd_logits_loss_forward(s, t, 2.0, "soft_ce", mask)
            assert len(launches) == 2
            for kwargs in launches:
                assert any(spec_matches_launch(sp, kernel, kwargs)
                           for sp in specs if "contig" in sp.name)
    generic = [sp for sp in specs if sp.name.endswith(",generic]")]
    assert len(generic) == len(specs) // 2
    for spec in generic:
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name
        assert all(attr == [] for attr in spec.attrs.values()), spec.name

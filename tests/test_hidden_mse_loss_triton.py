"""The Triton hidden_mse_loss kernels (``rosita_fast.kernels.hidden_mse_loss``) in the CPU
interpreter, through the public op under ``use_backend("triton")``, against the float64
reference: 16-row blocks and 128-wide hidden pieces crossed (37 rows, hidden 1, 17 and 300),
strided states, masks, fp32 / fp16 / bf16, NaN-poisoned outputs, fp64 refused; then the launch
specs against what the launchers launch."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_close, declared_constexprs, make, spec_matches_launch
from rosita_fast.kernels import hidden_mse_loss as hk

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.hidden_mse_loss import reference_backward, reference_forward
from rosita_fast.testing import poison_outputs

pytestmark = pytest.mark.usefixtures("seed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [1, 17, 300])
def test_terms_and_gradients_match_float64(dtype, hidden):
    b, t = 1, 37
    student = [make((b, t, hidden), layout, dtype) for layout in ("contig", "strided", "contig")]
    teacher = [make((b, t, hidden), "contig", dtype) for _ in range(3)]
    mask = torch.rand(b, t) < 0.7
    mask[0, 0] = True
    g = torch.rand(3) + 0.5
    with rosita_fast.use_backend("triton"), poison_outputs():
        terms = ops.REGISTRY["hidden_mse_loss"].run(student, teacher, mask)
        grads = ops.REGISTRY["hidden_mse_loss_backward"].run(g, student, teacher, mask)
    s64, t64 = [s.double() for s in student], [x.double() for x in teacher]
    ref = reference_forward(s64, t64, mask)
    assert_close(terms, ref, torch.float32, "terms", k=4)
    for got, want in zip(grads, reference_backward(g.double(), s64, t64, mask), strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, "grad")
        assert torch.all(got[~mask] == 0)


def test_public_op_autograd_and_fp64_refused():
    student = [make((2, 5, 24), "contig", torch.float32).requires_grad_() for _ in range(2)]
    teacher = [make((2, 5, 24), "contig", torch.float32) for _ in range(3)]
    with rosita_fast.use_backend("triton"):
        loss = ops.hidden_mse_loss(student, teacher, [2, 0])
        grads = torch.autograd.grad(loss, student)
        with pytest.raises(TypeError, match="float64"):
            ops.hidden_mse_loss([s.double() for s in student], [x.double() for x in teacher],
                                [2, 0])
    with rosita_fast.use_backend("reference"):
        want = ops.hidden_mse_loss(student, teacher, [2, 0])
        want_grads = torch.autograd.grad(want, student)
    assert_close(loss, want, torch.float32, "loss")
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, torch.float32, "grad")


def test_launch_specs_are_what_the_launchers_launch(monkeypatch):
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.kernel, kwargs))

    specs = hk.launch_specs()
    kernels = {name: getattr(hk, name) for name in ("hidden_mse_fwd_kernel",
                                                    "hidden_mse_bwd_kernel")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(hk, name, Recorder(kernel))
    for dtype in (torch.float32, torch.bfloat16):
        student = [torch.randn(4, 32, 384).to(dtype) for _ in range(5)]
        teacher = [torch.randn(4, 32, 384).to(dtype) for _ in range(5)]
        launches.clear()
        hk.hidden_mse_loss_forward(student, teacher, torch.ones(4, 32, dtype=torch.bool))
        hk.hidden_mse_loss_backward(torch.rand(5), student, teacher, None)
        assert len(launches) == 2
        for kernel, kwargs in launches:
            assert any(spec_matches_launch(sp, kernel, kwargs)
                       for sp in specs if "contig" in sp.name and sp.kernel is kernel)
    generic = [sp for sp in specs if sp.name.endswith(",generic]")]
    assert len(generic) == len(specs) // 2
    for spec in generic:
        assert set(spec.constexprs) == declared_constexprs(spec.kernel), spec.name

"""lowrank_linear's C++ CPU kernels on shapes that reach every path they have.

The forward with an activation tiles (row block x column group) tasks over the threads and sweeps
each task's columns in output chunks of <= 256 KB; the backward uses row blocks sized by the
output width. Which path a shape takes depends on the thread count (``at::get_num_threads``), so
the cases set it. Every input, the upstream gradient included, is sometimes strided or transposed.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import assert_close

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.lowrank_linear import reference_forward
from rosita_fast.testing import poison_outputs

# (threads, rows, in, out, rank, what it reaches); kMaxBlockRows = 64, chunk = 256 KB / (rows of a
# block * 4 B) columns, column groups = threads / row blocks when there are fewer row blocks.
CASES = [
    (2, 200, 40, 1100, 8, "4 row blocks of 64 (last partial), 2 output chunks of 1024 columns"),
    (4, 1, 24, 300, 6, "one row, 4 column groups of 75 columns"),
    (2, 3, 30, 130, 9, "2 row blocks of 2 rows (last partial), 1 column group"),
    (3, 2, 17, 200, 5, "2 row blocks of one row, 1 column group (3 // 2); 200 columns"),
    (1, 70, 33, 90, 12, "one thread: 2 row blocks, no split"),
    (2, 150, 64, 2100, 16, "backward row blocks capped by the 512 KB output budget (62 rows)"),
]


def _layout(t: torch.Tensor, kind: int) -> torch.Tensor:
    """The same values as ``t`` in another memory layout: 0 contiguous, 1 strided, 2 transposed."""
    if kind == 1:
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == 2 and t.dim() == 2:
        return t.t().contiguous().t()
    return t.clone()


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "threads, m, k, n, r",
    [pytest.param(c[0], *c[1:5], id=c[5]) for c in CASES],
    indirect=["threads"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_cpp_paths(threads, m, k, n, r, dtype, act, seed):
    gen = torch.Generator().manual_seed(seed)
    layouts = torch.randint(0, 3, (5,), generator=gen).tolist()
    x = _layout(torch.randn(m, k, generator=gen).to(dtype), layouts[0]).requires_grad_(True)
    u = _layout((torch.randn(n, r, generator=gen) * r**-0.5).to(dtype), layouts[1])
    v = _layout((torch.randn(r, k, generator=gen) * k**-0.5).to(dtype), layouts[2])
    b = _layout(torch.randn(n, generator=gen).to(dtype), layouts[3])
    grad = _layout(torch.randn(m, n, generator=gen).to(dtype), layouts[4])
    if act == "relu":
        # A pre-activation within rounding of ReLU's kink sends a whole gradient entry to the other
        # side of it in one computation only (seen: one of 220,000 at 6e-8 gave dx a 2e-3 error);
        # keep them away from 0, every other column positive so no output column is all zero.
        sign = 1 - 2 * (torch.arange(n) % 2)
        b.copy_((sign * (b.float().abs() + 2)).to(dtype))
    for t in (u, v, b):
        t.requires_grad_(True)
    with rosita_fast.use_backend("cpp"), poison_outputs():
        out = ops.lowrank_linear(x, u, v, b, act)
        grads = torch.autograd.grad(out, (x, u, v, b), grad)
    args = [t.detach().double().requires_grad_(True) for t in (x, u, v, b)]
    ref = reference_forward(*args, act)
    ref_grads = torch.autograd.grad(ref, args, grad.double())
    what = f"layouts {layouts}"
    assert_close(out, ref, dtype, f"forward, {what}", k=k)
    for name, g, rg in zip(("x", "u", "v", "bias"), grads, ref_grads, strict=True):
        assert_close(g, rg, dtype, f"d{name}, {what}", k=max(m, n))

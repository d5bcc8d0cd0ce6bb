"""Property-based fuzzing of every public op's entry point against its float64 reference.

``FUZZ`` maps each op in ``rosita_fast.ops.OPS`` to a hypothesis strategy of call cases and a
checker; ``test_op_inventory`` fails if an op has no entry here. Shapes include 0 and 1, every
dtype the op takes, strided and transposed inputs, every backend this install can run (Triton
through the interpreter). Examples are bounded so the suite stays fast; hypothesis draws new ones
on every run (and replays a failure it has seen before).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_harness import tolerance

import rosita_fast
from rosita_fast import ops
from rosita_fast.ops.lowrank_linear import reference_forward as lowrank_reference

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _backends(op: str, dtype: torch.dtype) -> list[str]:
    names = [b for b in ops.OPS[op] if b in rosita_fast.available_backends() and b != "cuda"]
    if dtype == torch.float64:
        names = [b for b in names if b != "triton"]  # documented: Triton takes no fp64
    return names


def _tensor(draw, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0):
    """A random tensor of ``shape``, drawn contiguous, strided (every other element of a wider
    buffer) or transposed (the memory of the reversed shape, viewed back)."""
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"])) if shape else "c"
    if layout == "strided":
        t = (torch.randn(*shape[:-1], 2 * shape[-1]) * scale).to(dtype)[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        t = (torch.randn(*reversed(shape)) * scale).to(dtype).permute(
            *reversed(range(len(shape)))
        )
    else:
        t = (torch.randn(*shape) * scale).to(dtype)
    assert t.shape == shape
    return t


def _compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    out64, ref64 = out.detach().double(), ref.detach().double()
    tol = tolerance(dtype, k)
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    # An all-zero reference (e.g. relu of negatives) must be matched absolutely.
    assert err <= tol * max(denom, 1e-30) or (denom == 0 and err <= tol), (
        f"{what}: relative error {err / max(denom, 1e-30):.3e} > {tol:.2e}"
    )


# ---- lowrank_linear --------------------------------------------------------------------------


@st.composite
def _lowrank_cases(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    backend = draw(st.sampled_from(_backends("lowrank_linear", dtype)))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    k = draw(st.integers(1, 70))
    n = draw(st.integers(1, 70))
    r = draw(st.integers(1, min(k, n)))
    x = _tensor(draw, (*lead, k), dtype)
    u = _tensor(draw, (n, r), dtype, scale=r**-0.5)
    v = _tensor(draw, (r, k), dtype, scale=k**-0.5)
    bias = _tensor(draw, (n,), dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from(["none", "relu", "gelu", "gelu_tanh"]))
    grad_out = _tensor(draw, (*lead, n), dtype)
    return backend, dtype, (x, u, v, bias, activation), grad_out


def _check_lowrank(case) -> None:
    backend, dtype, (x, u, v, bias, activation), grad_out = case
    tensors = [t for t in (x, u, v, bias) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    with rosita_fast.use_backend(backend):
        out = ops.lowrank_linear(x, u, v, bias, activation)
        grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    args64 = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in (x, u, v, bias)]
    ref = lowrank_reference(*args64, activation)
    ref_grads = torch.autograd.grad(
        ref, [a for a in args64 if a is not None], grad_out.double(), allow_unused=True
    )
    m = out.numel() // max(out.shape[-1], 1)
    k = max(x.shape[-1], u.shape[0], m, 1)
    _compare(out, ref, dtype, k, f"{backend} forward")
    for name, g, rg in zip(("x", "u", "v", "bias"), grads, ref_grads, strict=False):
        rg = torch.zeros_like(args64[0 if name == "x" else 1]) if rg is None else rg
        _compare(g, rg, dtype, k, f"{backend} d{name}")


@dataclass(frozen=True)
class FuzzEntry:
    cases: Callable[[], st.SearchStrategy]
    check: Callable[[object], None]
    max_examples: int


#: One entry per public op (test_op_inventory checks that none is missing).
FUZZ: dict[str, FuzzEntry] = {
    "lowrank_linear": FuzzEntry(_lowrank_cases, _check_lowrank, max_examples=60),
}


@pytest.mark.parametrize("op", sorted(FUZZ))
def test_fuzz_against_float64_reference(op):
    entry = FUZZ[op]

    @settings(max_examples=entry.max_examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(entry.cases())
    def run(case):
        entry.check(case)

    run()

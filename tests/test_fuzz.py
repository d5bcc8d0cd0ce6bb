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


def _compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    k: int,
    what: str,
    magnitude: torch.Tensor | None = None,
) -> None:
    """``out`` against the float64 ``ref``: relative Frobenius error within ``tolerance(dtype, k)``.

    ``magnitude`` is the same reference evaluated on the inputs' absolute values (the size of the
    terms being summed). Where a result cancels (tiny shapes: a one-element sum of products of
    opposite signs), rounding an intermediate to fp16/bf16 errs relative to the terms, not to their
    small sum; the bound then scales with ``||magnitude|| / sqrt(k)``, which equals ``||ref||``
    for sums of random signs, so it loosens nothing where nothing cancels.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    out64, ref64 = out.detach().double(), ref.detach().double()
    tol = tolerance(dtype, k)
    scale = ref64.norm().item()
    if magnitude is not None:
        scale = max(scale, magnitude.detach().double().norm().item() / k**0.5)
    err = (out64 - ref64).norm().item()
    # An all-zero reference (e.g. relu of negatives) must be matched absolutely.
    assert err <= tol * max(scale, 1e-30) or (scale == 0 and err <= tol), (
        f"{what}: error {err:.3e} > {tol:.2e} x scale {scale:.3e}"
    )


def _reference_with_grads(reference, args, activation, grad_out, absolute: bool):
    """The float64 reference output and input gradients (on |inputs| and |grad_out| if asked)."""
    args64 = [
        (t.detach().double().abs() if absolute else t.detach().double()).requires_grad_(True)
        if t is not None else None
        for t in args
    ]
    out = reference(*args64, activation)
    g = grad_out.double().abs() if absolute else grad_out.double()
    grads = torch.autograd.grad(out, [a for a in args64 if a is not None], g, allow_unused=True)
    return out, grads, args64


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
    ref, ref_grads, args64 = _reference_with_grads(
        lowrank_reference, (x, u, v, bias), activation, grad_out, absolute=False
    )
    mag, mag_grads, _ = _reference_with_grads(
        lowrank_reference, (x, u, v, bias), activation, grad_out, absolute=True
    )
    m = out.numel() // max(out.shape[-1], 1)
    k = max(x.shape[-1], u.shape[0], m, 1)
    _compare(out, ref, dtype, k, f"{backend} forward", mag)
    for i, (name, g, rg, mg) in enumerate(
        zip(("x", "u", "v", "bias"), grads, ref_grads, mag_grads, strict=False)
    ):
        if rg is None:
            rg = mg = torch.zeros_like(args64[i])
        _compare(g, rg, dtype, k, f"{backend} d{name}", mg)


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

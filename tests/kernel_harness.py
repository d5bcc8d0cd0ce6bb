"""The verification harness every kernel test reuses.

- compare with a float64 reference by relative error ``||out - ref|| / ||ref||``;
- inputs are fresh random tensors (never zeros), optionally non-contiguous, with leading batch dims;
- kernel-allocated outputs are poisoned with NaN (``rosita_fast.testing.poison_outputs``);
- backends are parametrized over what this install can run (Triton through the interpreter).
"""

from __future__ import annotations

import pytest
import torch

import rosita_fast

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    # fp16/bf16 results accumulate in fp32: their error is the rounding of inputs, intermediates
    # and output to the dtype, a couple of units of its epsilon; see tolerance() for the K term.
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref``, computed in float64."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    assert denom > 0, "reference is all zeros: the comparison would be meaningless"
    return (out64 - ref64).norm().item() / denom


def tolerance(dtype: torch.dtype, k: int = 1) -> float:
    """Relative-error bound for a result of ``dtype`` reduced over ``k`` terms.

    fp16/bf16: a few units of the dtype's epsilon, growing like sqrt(k) past k = 64 (the rounding
    of low-precision operands inside a product); fp32 1e-5 (TF32x3 / IEEE); fp64 1e-10.
    """
    base = TOLERANCE[dtype]
    if dtype in (torch.float16, torch.bfloat16):
        return base * max(1.0, (k / 64) ** 0.5)
    return base


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    k: int = 1,
    factor: float = 1.0,
) -> None:
    """``out`` matches the float64 ``ref`` within ``factor`` x :func:`tolerance` (``k``: the
    reduction length)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten/poisoned elements?)"
    tol = factor * tolerance(dtype, k)
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.2e}"


def rand(
    *shape: int, dtype: torch.dtype = torch.float32, contiguous: bool = True, scale: float = 1.0
) -> torch.Tensor:
    """Standard-normal tensor (in fp32, then cast). Non-contiguous variants are a strided view
    into a larger buffer (every other column), so kernels must honour strides."""
    if contiguous or len(shape) == 0:
        return (torch.randn(*shape) * scale).to(dtype)
    big = torch.randn(*shape[:-1], 2 * shape[-1]) * scale
    t = big.to(dtype)[..., ::2]
    assert not t.is_contiguous()
    return t


def runnable_backends(op: str) -> list:
    """pytest params for every backend of ``op`` this install can run on CPU tensors."""
    from rosita_fast.ops import OPS

    params = []
    for name in OPS[op]:
        if name == "cuda":
            continue  # compiled and checked by test_cuda_compile; needs a GPU to run
        marks = []
        if name not in rosita_fast.available_backends():
            marks.append(pytest.mark.skip(reason=f"backend {name} not available in this install"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params

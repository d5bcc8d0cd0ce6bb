"""The verification harness every kernel test reuses.

- compare with a float64 reference by relative error ``||out - ref|| / ||ref||``;
- inputs are fresh random tensors (never zeros), optionally non-contiguous, with leading batch dims;
- kernel-allocated outputs are poisoned with NaN (``rosita_fast.testing.poison_outputs``);
- backends are parametrized over what this install can run (Triton through the interpreter).
"""

from __future__ import annotations

import math

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
    *shape: int, dtype: torch.dtype = torch.float32, contiguous: bool = True, scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """``shift + scale * N(0, 1)`` (drawn in fp32, then cast). Non-contiguous variants are a strided
    view into a larger buffer (every other column), so kernels must honour strides; a tensor of at
    most one element has no such view and is drawn contiguous."""
    if contiguous or len(shape) == 0 or math.prod(shape) <= 1:
        return (torch.randn(*shape) * scale + shift).to(dtype)
    big = torch.randn(*shape[:-1], 2 * shape[-1]) * scale + shift
    t = big.to(dtype)[..., ::2]
    assert not t.is_contiguous()
    return t


LAYOUTS = ("contig", "strided", "transposed", "expanded")


def make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, scale: float = 1.0,
         shift: float = 0.0) -> torch.Tensor:
    """A :func:`rand` tensor of ``shape`` stored ``contig``, ``strided`` (every other element of
    the last dim), ``transposed`` (the last two dims of a contiguous tensor swapped) or
    ``expanded`` (one row, stride 0 elsewhere)."""
    if layout == "expanded":
        return rand(shape[-1], dtype=dtype, scale=scale, shift=shift).expand(shape)
    if layout in ("contig", "strided"):
        return rand(*shape, dtype=dtype, contiguous=layout == "contig", scale=scale, shift=shift)
    assert layout == "transposed" and len(shape) >= 2, layout
    t = rand(*shape[:-2], shape[-1], shape[-2], dtype=dtype, scale=scale, shift=shift)
    t = t.transpose(-1, -2)
    assert t.shape == shape and (not t.is_contiguous() or math.prod(shape) <= 1)
    return t


def f64(t):
    """``t`` in float64 if it is a floating-point tensor, else unchanged (None, ids, ints)."""
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


# ---- Triton launch specs: what the lowering tests compile must be what the launchers launch ----


def jit_view(kernel, kwargs: dict) -> tuple:
    """(signature, constexprs by name, attrs) that Triton's JIT derives for a launch of
    ``kernel`` with ``kwargs``, through Triton's own binder and ``JITFunction._pack_args`` with
    the CUDA backend (sm_90), so it can be compared with a ``LaunchSpec``."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if isinstance(kernel, JITFunction):
        jit_fn = kernel
    else:  # the interpreter's InterpretedFunction keeps the decorator's arguments in kwargs
        jit_fn = JITFunction(kernel.fn, **kernel.kwargs)
    args = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, CUDABackend)
    bound, specialization, _ = binder(**args)
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    _, signature, constexprs, attrs = jit_fn._pack_args(
        backend, kwargs, bound, specialization, {}
    )
    names = jit_fn.arg_names
    return signature, {names[path[0]]: value for path, value in constexprs.items()}, attrs


def spec_matches_launch(spec, kernel, kwargs: dict) -> bool:
    """Whether launch spec ``spec`` compiles exactly what this launch of ``kernel`` runs."""
    signature, constexprs, attrs = jit_view(kernel, kwargs)
    return (spec.signature == signature and spec.constexprs == constexprs
            and spec.attrs == attrs
            and (spec.num_warps, spec.num_stages) == (kwargs["num_warps"],
                                                      kwargs["num_stages"]))


def declared_constexprs(kernel) -> set[str]:
    """The names of ``kernel``'s own ``tl.constexpr`` parameters."""
    from triton.runtime.jit import JITFunction

    return {p.name for p in JITFunction(kernel.fn).params if p.is_constexpr}


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

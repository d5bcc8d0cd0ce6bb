"""What every Triton kernel of rosita_fast shares: activation codes and math, dot precision, the
launch-spec type the lowering tests compile, and the (poisonable) buffer allocator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rosita_fast._poison import empty  # noqa: F401  (re-exported for the launchers)
from rosita_fast.activations import ACTIVATIONS as ACTIVATION_CODES  # noqa: F401

#: Input dtypes the Triton kernels take (fp64 goes to the C++/CUDA backends).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def tanh(x):
    # tanh through the sigmoid keeps to ops that every Triton backend and the interpreter have.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_forward(z, ACTIVATION):
    """act(z) for an activation code of rosita_fast.activations.ACTIVATIONS (fp32 in, fp32 out)."""
    y = z
    if ACTIVATION == 1:
        # tl.where(z < 0, ...) keeps NaN (NaN < 0 is false), like torch.relu.
        y = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        y = 0.5 * z * (1.0 + tanh(inner))
    return y


@triton.jit
def act_grad(z, ACTIVATION):
    """d act(z) / dz for an activation code (fp32)."""
    d = tl.full(z.shape, 1.0, tl.float32)
    if ACTIVATION == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        d = cdf + z * pdf
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = tanh(inner)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    return d


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``.

    fp32 operands use ``tf32x3`` (three TF32 tensor-core products: fp32-level accuracy on tensor
    cores). fp16/bf16 operands are exact in TF32, so ``tf32`` loses nothing when they are upcast
    (the interpreter path); natively they go to the fp16/bf16 tensor cores, where the value is
    ignored.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration (no autotuning: the tables are every config a launcher can pick)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchSpec:
    """One compilable specialisation of a kernel: what ``triton.compile`` needs.

    ``attrs`` maps argument indices to Triton attributes (``[["tt.divisibility", 16]]``), the same
    specialisation the JIT derives from aligned pointers and integers divisible by 16.
    """

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    attrs: dict | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.kernel.__name__}[{self.label}]"

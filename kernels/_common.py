"""What every Triton kernel of rosita_fast shares: activation codes and math, 64-bit tile offsets,
masked tile loads, dot precision, the launch-spec type the lowering tests compile (and the JIT's
specialisation rules that build it), the recorded launch (:class:`Launch`), the SM count and the
(poisonable) buffer allocator. The dense-GEMM building blocks live in ``linear_act``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rosita_fast._poison import empty  # noqa: F401  (re-exported for the launchers)
from rosita_fast.activations import ACTIVATIONS as ACTIVATION_CODES  # noqa: F401
from rosita_fast.backends import triton_interpreting  # noqa: F401  (re-exported for the launchers)

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


@triton.jit
def offsets_2d(rows, cols, stride_r, stride_c):
    """Element offsets ``rows[:, None] * stride_r + cols[None, :] * stride_c`` of a tile, in int64.

    Row/column indices and strides are int32 kernel arguments, but their products pass 2^31 on
    large tensors (``M * N`` scratch buffers, transposed or strided views): every pointer offset of
    a 2-D tile goes through here so the arithmetic is 64-bit (the lowering test counts 2-D int32
    offsets in every kernel's TTIR and requires none).
    """
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def dropout_keep(seed, rows, cols, threshold):
    """Keep decisions (bool) of the elements at ``rows[:, None]`` x ``cols[None, :]``: the
    counter-based dropout hash of ``rosita_fast/ops/_dropout.py`` (the ground truth), bit for bit.
    ``seed`` and ``threshold`` are int32/uint32 kernel arguments (mark ``seed`` do_not_specialize:
    every launch has a new one)."""
    key = _dropout_mix(rows.to(tl.uint32) * 0x61C88647 + seed.to(tl.uint32))
    h = _dropout_mix(key[:, None] ^ (cols.to(tl.uint32) * 0x27D4EB2F)[None, :])
    return (h >> 8) >= threshold.to(tl.uint32)


def seed_int32(seed: int) -> int:
    """A dropout seed as the kernels take it: its 32 bits (modulo 2^32) as a signed int32, so every
    seed has the JIT's int32 type and shares one compiled kernel (``dropout_keep`` reads the bits
    back as uint32)."""
    seed = int(seed) & 0xFFFFFFFF
    return seed - (1 << 32) if seed >= 1 << 31 else seed


@triton.jit
def _dropout_mix(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


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

    ``attrs`` maps argument paths (``(index,)``) to Triton attributes
    (``[["tt.divisibility", 16]]``), the same specialisation the JIT derives from aligned pointers
    and integers divisible by 16; build specs with :func:`launch_spec` from a launch's arguments.
    """

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    attrs: dict | None = None
    label: str = ""
    #: Element type of the kernel's ``tl.dot`` operands on this spec ("fp32", "fp16", "bf16"): the
    #: lowering test checks the tensor-core instructions it compiles to (tf32 for fp32, which the
    #: kernels run as tf32x3; native f16/bf16 MMAs otherwise). None: the kernel has no products.
    dot_dtype: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kernel.__name__}[{self.label}]"


@functools.cache
def _jit_function(kernel):
    """The kernel as a ``JITFunction`` (under TRITON_INTERPRET ``triton.jit`` returns an
    ``InterpretedFunction``, which keeps the decorator's arguments in ``kwargs``)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **getattr(kernel, "kwargs", {}))


def jit_specialization(
    kernel, args: Mapping[str, object], *, specialize: bool = True
) -> tuple[dict[str, str], dict[str, object], dict[tuple[int, ...], list]]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``: what Triton's JIT compiles when
    ``kernel`` is launched with ``args`` (every parameter by name; tensors, ints, constexprs).

    ``specialize=True`` runs the JIT's own binder (``create_function_from_signature``) with the
    CUDA backend's rules: integers equal to 1 become constants, integers divisible by 16 and
    16-byte aligned pointers get ``tt.divisibility = 16``, ``do_not_specialize`` parameters keep
    their plain type; attributes are parsed as ``JITFunction._pack_args`` does. ``specialize=False``
    gives the unspecialised variant: only the types, no constants folded, no attributes.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(kernel)
    missing = set(fn.arg_names) - set(args)
    unknown = set(args) - set(fn.arg_names)
    if missing or unknown:
        raise TypeError(f"{fn.__name__}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if specialize:
        binder = create_function_from_signature(fn.signature, fn.params, CUDABackend)
        _, specialization, _ = binder(**args)
    else:
        specialization = [
            ("constexpr", args[p.name])
            if p.is_constexpr
            else (native_specialize_impl(CUDABackend, args[p.name], p.is_const, False, False)[0],
                  None)
            for p in fn.params
        ]
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (ty, value)) in enumerate(zip(fn.params, specialization, strict=True)):
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
            value = ""  # as in _pack_args: constants carry an empty attribute list
        if isinstance(value, str):
            attrs[(i,)] = CUDABackend.parse_attr(value)
    return signature, constexprs, attrs


def launch_spec(
    kernel,
    args: Mapping[str, object],
    *,
    num_warps: int,
    num_stages: int,
    label: str,
    dot_dtype: str | None = None,
    specialize: bool = True,
) -> LaunchSpec:
    """The :class:`LaunchSpec` of one launch of ``kernel`` with ``args`` (see
    :func:`jit_specialization`); launchers build their specs from the same argument dicts they
    launch with, so the lowering tests compile what the JIT would."""
    signature, constexprs, attrs = jit_specialization(kernel, args, specialize=specialize)
    return LaunchSpec(
        kernel, signature, constexprs, num_warps, num_stages, attrs, label, dot_dtype
    )


# ---- shared by the launchers ----------------------------------------------------------------


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, row_mask, col_mask, UPCAST: tl.constexpr):
    """A [len(rows), len(cols)] tile (zero outside the masks), upcast to fp32 under UPCAST."""
    t = tl.load(
        ptr + offsets_2d(rows, cols, stride_r, stride_c),
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        t = t.to(tl.float32)
    return t


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the arguments by name, exactly as the JIT receives them."""

    kernel: object
    grid: tuple[int, ...]
    args: dict
    cfg: TileConfig

    def __call__(self) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](
                **self.args, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages
            )

    def spec(self, label: str, dot_dtype: str | None, specialize: bool) -> LaunchSpec:
        return launch_spec(
            self.kernel, self.args, num_warps=self.cfg.num_warps,
            num_stages=self.cfg.num_stages, label=label, dot_dtype=dot_dtype,
            specialize=specialize,
        )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None for other devices)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())

"""Triton kernels for the fused low-rank linear layer ``y = act(x @ v^T @ u^T + bias)``.

Forward (fused): each program owns ``BLOCK_M`` rows. It computes the rank-r intermediate
``h = x_blk @ v^T`` into a ``[BLOCK_M, BLOCK_R]`` fp32 accumulator that never leaves the chip, then
sweeps its share of the output columns, computing ``h @ u^T`` block by block with bias and
activation in the epilogue. Column sweeps are split over ``n_split`` programs per row block when
there are too few row blocks to fill the GPU (each of those recomputes ``h``; the split is chosen so
the recompute stays small next to the second product).

Backward: the row-local chain is fused in one kernel per row block: recompute ``h``, then for each
output-column block ``z = h @ u^T + b``, ``dz = grad * act'(z)``, ``g += dz @ u``; finally
``dx = g @ v``. The reductions over rows (``du = dz^T h``, ``dv = g^T x``, ``dbias = sum dz``) are
composed from torch matmuls on the ``h``, ``g`` and ``dz`` buffers the kernel writes: a fused
version would need a cross-program reduction (atomics or a second pass) and gains little over one
large GEMM each.

Loads are upcast to fp32 right after loading (the Triton CPU interpreter computes bf16 arithmetic
wrongly, and fp32 math is what the GPU tensor cores accumulate in anyway); products use TF32 tensor
cores for fp16/bf16 inputs (exact for their mantissas) and for fp32 inputs only when
``torch.backends.cuda.matmul.allow_tf32`` is set, IEEE fp32 otherwise.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rosita_fast._poison import empty

# Keep in sync with csrc/include/rosita_fast/epilogue.h (enum Activation).
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
MAX_RANK = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tanh(x):
    # tanh through the sigmoid keeps to ops that every Triton backend and the interpreter have.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act_forward(z, ACTIVATION):
    y = z
    if ACTIVATION == 1:
        # tl.where(z < 0, ...) keeps NaN (NaN < 0 is false), like torch.relu.
        y = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        y = 0.5 * z * (1.0 + _tanh(inner))
    return y


@triton.jit
def _act_grad(z, ACTIVATION):
    d = tl.full(z.shape, 1.0, tl.float32)
    if ACTIVATION == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        d = cdf + z * pdf
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(inner)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    return d


@triton.jit
def _row_block_times_vt(
    x_ptr, v_ptr, offs_m, m_mask, offs_r, r_mask, K, stride_xm, stride_xk, stride_vr, stride_vk,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h = x[rows] @ v^T as a [BLOCK_M, BLOCK_R] fp32 block (padded ranks are exactly zero)."""
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xb = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        vtb = tl.load(
            v_ptr + offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        h = tl.dot(xb, vtb, h, input_precision=PRECISION)
    return h


@triton.jit(do_not_specialize=["HAS_BIAS", "ACTIVATION"])
def lowrank_fwd_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, out_ptr,
    M, K, N, R, N_PER_PROG,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, stride_om, stride_on,
    HAS_BIAS, ACTIVATION, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    h = _row_block_times_vt(
        x_ptr, v_ptr, offs_m, m_mask, offs_r, r_mask, K, stride_xm, stride_xk, stride_vr,
        stride_vk, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R,
    )
    n_begin = pid_n * N_PER_PROG
    n_end = tl.minimum(n_begin + N_PER_PROG, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        utb = tl.load(
            u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(h, utb, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = _act_forward(acc, ACTIVATION)
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )


@triton.jit(do_not_specialize=["HAS_BIAS", "ACTIVATION"])
def lowrank_bwd_rows_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, go_ptr, dx_ptr, h_ptr, g_ptr, dz_ptr,
    M, K, N, R,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, stride_gom, stride_gon,
    stride_dxm, stride_dxk,
    HAS_BIAS, ACTIVATION, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    mr_mask = m_mask[:, None] & r_mask[None, :]
    h = _row_block_times_vt(
        x_ptr, v_ptr, offs_m, m_mask, offs_r, r_mask, K, stride_xm, stride_xk, stride_vr,
        stride_vk, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R,
    )
    # h, g: [M, R] fp32 and dz: [M, N] fp32 are contiguous scratch buffers owned by the launcher.
    tl.store(h_ptr + offs_m[:, None] * R + offs_r[None, :], h, mask=mr_mask)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        mn_mask = m_mask[:, None] & n_mask[None, :]
        dz = tl.load(
            go_ptr + offs_m[:, None] * stride_gom + offs_n[None, :] * stride_gon,
            mask=mn_mask,
            other=0.0,
        ).to(tl.float32)
        ub = tl.load(
            u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if ACTIVATION != 0:
            z = tl.dot(h, tl.trans(ub), input_precision=PRECISION)
            if HAS_BIAS:
                z += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            dz = dz * _act_grad(z, ACTIVATION)
            tl.store(dz_ptr + offs_m[:, None] * N + offs_n[None, :], dz, mask=mn_mask)
        g = tl.dot(dz, ub, g, input_precision=PRECISION)
    tl.store(g_ptr + offs_m[:, None] * R + offs_r[None, :], g, mask=mr_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        vb = tl.load(
            v_ptr + offs_r[:, None] * stride_vr + offs_k[None, :] * stride_vk,
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        dx = tl.dot(g, vb, input_precision=PRECISION)
        tl.store(
            dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
            dx.to(dx_ptr.dtype.element_ty),
            mask=m_mask[:, None] & k_mask[None, :],
        )


# ----------------------------------------------------------------------------------------------
# Launch configurations. These tables are the complete set of tile shapes the launchers below can
# pick (no autotuning), so the lowering tests can compile every one of them ahead of time.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


RANK_TILES = (32, 64, 128, 256)  # BLOCK_R values: the rank padded up to one of these.

FWD_CONFIGS: dict[int, TileConfig] = {
    32: TileConfig(64, 64, 64, 4, 3),
    64: TileConfig(64, 64, 32, 4, 3),
    128: TileConfig(64, 64, 32, 8, 2),
    256: TileConfig(32, 64, 32, 8, 2),
}
# The backward keeps two [BLOCK_M, BLOCK_R] accumulators (h and g) live: large ranks use fewer rows.
BWD_CONFIGS: dict[int, TileConfig] = {
    32: TileConfig(64, 64, 64, 4, 2),
    64: TileConfig(64, 64, 32, 4, 2),
    128: TileConfig(32, 64, 32, 8, 2),
    256: TileConfig(32, 32, 32, 8, 1),
}


def rank_tile(rank: int) -> int:
    """The BLOCK_R a rank is padded to; raises for ranks the kernels do not tile."""
    for tile in RANK_TILES:
        if rank <= tile:
            return tile
    raise ValueError(
        f"the Triton lowrank_linear kernels keep the rank on chip and support rank <= {MAX_RANK}, "
        f"got rank {rank}; use the 'cuda', 'cpp' or 'reference' backend for larger ranks"
    )


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core precision of the products for inputs of ``dtype``.

    fp16/bf16 values are exact in TF32, so one TF32 product is exact per term; fp32 inputs use
    three TF32 products (``tf32x3``), which keeps fp32-level accuracy on tensor cores.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class LaunchSpec:
    """One compilable specialisation of a kernel: what ``triton.compile`` needs, nothing more."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        c = self.constexprs
        return f"{self.kernel.__name__}[{self.signature['x_ptr'][1:]},R{c['BLOCK_R']}]"


def _signature(names: list[str], ptr_dtype: str) -> dict[str, str]:
    sig = {}
    for n in names:
        if n.endswith("_ptr"):
            # Scratch buffers written by the backward kernel are always fp32.
            sig[n] = "*fp32" if n in ("h_ptr", "g_ptr", "dz_ptr") else f"*{ptr_dtype}"
        else:
            sig[n] = "i32"
    return sig


_FWD_ARGS = [
    "x_ptr", "v_ptr", "u_ptr", "b_ptr", "out_ptr", "M", "K", "N", "R", "N_PER_PROG",
    "stride_xm", "stride_xk", "stride_vr", "stride_vk", "stride_un", "stride_ur",
    "stride_om", "stride_on",
]
_BWD_ARGS = [
    "x_ptr", "v_ptr", "u_ptr", "b_ptr", "go_ptr", "dx_ptr", "h_ptr", "g_ptr", "dz_ptr",
    "M", "K", "N", "R",
    "stride_xm", "stride_xk", "stride_vr", "stride_vk", "stride_un", "stride_ur",
    "stride_gom", "stride_gon", "stride_dxm", "stride_dxk",
]


def launch_specs() -> list[LaunchSpec]:
    """Every (kernel, dtype, constexpr, warps, stages) combination the launchers can use.

    Bias and activation are runtime arguments (uniform branches in the epilogue), so they do not
    multiply the number of compiled variants.
    """
    specs = []
    for kernel, args, table in (
        (lowrank_fwd_kernel, _FWD_ARGS, FWD_CONFIGS),
        (lowrank_bwd_rows_kernel, _BWD_ARGS, BWD_CONFIGS),
    ):
        for dtype, block_r in itertools.product(DTYPES, RANK_TILES):
            cfg = table[block_r]
            constexprs = {
                "PRECISION": dot_precision(dtype),
                "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                "BLOCK_R": block_r,
            }
            sig = _signature(args + ["HAS_BIAS", "ACTIVATION"], _TL_DTYPES[dtype])
            sig.update({k: "constexpr" for k in constexprs})
            specs.append(LaunchSpec(kernel, sig, constexprs, cfg.num_warps, cfg.num_stages))
    return specs


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions; autograd lives in rosita_fast.ops).
# ----------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _column_split(m_blocks: int, n: int, block_n: int, device: torch.device) -> int:
    """How many programs share one row block's output columns."""
    n_blocks = triton.cdiv(n, block_n)
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splitting only adds work
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # Aim for about two waves; never split below 4 column blocks per program so the recomputed
    # h = x v^T stays a small fraction of the work.
    want = triton.cdiv(2 * sms, max(m_blocks, 1))
    return max(1, min(want, n_blocks // 4 if n_blocks >= 4 else 1))


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(
            f"the Triton lowrank_linear kernels support {', '.join(map(str, DTYPES))}; got "
            f"{x.dtype} (use the 'cpp' or 'reference' backend for float64)"
        )


def lowrank_linear_forward(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """``act(x @ v^T @ u^T + bias)`` with the fused Triton kernel. ``x`` is ``[..., in]``."""
    _check_dtype(x)
    block_r = rank_tile(u.shape[1])
    cfg = FWD_CONFIGS[block_r]
    x2d = x.reshape(-1, x.shape[-1])
    m, k = x2d.shape
    n, r = u.shape
    out = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    m_blocks = triton.cdiv(m, cfg.block_m)
    split = _column_split(m_blocks, n, cfg.block_n, x.device)
    n_per_prog = triton.cdiv(triton.cdiv(n, split), cfg.block_n) * cfg.block_n
    grid = (m_blocks, triton.cdiv(n, n_per_prog))
    lowrank_fwd_kernel[grid](
        x2d, v, u, bias if bias is not None else x2d, out,
        m, k, n, r, n_per_prog,
        x2d.stride(0), x2d.stride(1), v.stride(0), v.stride(1), u.stride(0), u.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=int(bias is not None), ACTIVATION=ACTIVATION_CODES[activation],
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.view(*x.shape[:-1], n)


def lowrank_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, du, dv, dbias)``: fused row-local kernel plus torch reductions over rows."""
    _check_dtype(x)
    block_r = rank_tile(u.shape[1])
    cfg = BWD_CONFIGS[block_r]
    x2d = x.reshape(-1, x.shape[-1])
    n, r = u.shape
    g2d = grad.reshape(-1, n)
    m, k = x2d.shape
    act = ACTIVATION_CODES[activation]
    f32 = torch.float32
    dx = empty((m, k), x.dtype, x.device)
    h = empty((m, r), f32, x.device)
    g = empty((m, r), f32, x.device)
    # Without an activation dz is the incoming gradient and the kernel writes no dz buffer.
    dz = empty((m, n), f32, x.device) if act != 0 else None
    if m > 0:
        lowrank_bwd_rows_kernel[(triton.cdiv(m, cfg.block_m),)](
            x2d, v, u, bias if bias is not None else x2d, g2d, dx, h, g,
            dz if dz is not None else h,
            m, k, n, r,
            x2d.stride(0), x2d.stride(1), v.stride(0), v.stride(1), u.stride(0), u.stride(1),
            g2d.stride(0), g2d.stride(1), dx.stride(0), dx.stride(1),
            HAS_BIAS=int(bias is not None), ACTIVATION=act, PRECISION=dot_precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    dz32 = dz if dz is not None else g2d.float()
    du = (dz32.t() @ h).to(u.dtype)
    dv = (g.t() @ x2d.float()).to(v.dtype)
    dbias = dz32.sum(0).to(bias.dtype) if bias is not None else None
    return dx.view(x.shape), du, dv, dbias

"""Triton kernels for the fused low-rank linear layer ``y = act(x @ v^T @ u^T + bias)``.

Forward (fused, :func:`lowrank_fwd_kernel`): each program owns ``BLOCK_M`` rows. It computes the
rank-r intermediate ``h = x_blk @ v^T`` into a ``[BLOCK_M, BLOCK_R]`` fp32 accumulator that never
leaves the chip, then sweeps its share of the output columns, computing ``h @ u^T`` block by block
with bias and activation in the epilogue. Column sweeps are split over programs when there are too
few row blocks to fill the GPU (each of those recomputes ``h``; the split is chosen so the
recompute stays small next to the second product).

Backward, two kernels and three torch GEMMs:

- :func:`lowrank_bwd_dz_kernel`, grid (row block x column split): recompute ``h``; for each output
  column block of its split ``z = h @ u^T + b``, ``dz = grad * act'(z)`` (written out), and
  ``g += dz @ u``; the split's partial ``g`` goes to an fp32 ``[splits, M, R]`` buffer;
- :func:`lowrank_bwd_dx_kernel`, grid (row block x K split): sum the partial ``g`` and compute
  ``dx = g @ v`` for its share of the input columns;
- the reductions over rows, ``du = dz^T h``, ``dv = g^T x`` and ``dbias = sum dz``, are torch
  matmuls on the ``h``, ``g`` and ``dz`` buffers (in the input dtype on the native path, where
  cuBLAS accumulates in fp32): a fused version would need a cross-program reduction and gains
  little over one large GEMM each. Without an activation ``dz`` is the incoming gradient and no
  ``dz`` buffer is written.

Precision. fp32 inputs: every product runs with ``input_precision="tf32x3"`` (three TF32
tensor-core products per product, fp32-level accuracy), whatever
``torch.backends.cuda.matmul.allow_tf32`` says. fp16/bf16 inputs (on the GPU): the operands go to
``tl.dot`` in their own dtype, i.e. the fp16/bf16 tensor cores with fp32 accumulation; operands the
kernels compute (``h`` before ``h @ u^T``, ``dz`` before ``dz @ u``, ``g`` before ``g @ v``) are
rounded to the input dtype first, as flash-attention does with P, and so are the ``h``, ``g``,
``dz`` scratch buffers. Under the Triton CPU interpreter (``UPCAST``, the default there) fp16/bf16
operands are upcast to fp32 after loading and everything stays fp32, because the interpreter
computes bf16 products wrongly (it multiplies their bit patterns as integers); the lowering specs
compile the native path. All pointer offsets of 2-D tiles are 64-bit (:func:`offsets_2d`).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    ACTIVATION_CODES,
    DTYPES,
    TL_DTYPES,
    Launch,
    LaunchSpec,
    TileConfig,
    act_forward,
    act_grad,
    dot_precision,
    empty,
    load_tile,
    offsets_2d,
    sm_count,
    triton_interpreting,
)

MAX_RANK = 256


@triton.jit
def _row_block_times_vt(
    x_ptr, v_ptr, offs_m, m_mask, offs_r, r_mask, K, stride_xm, stride_xk, stride_vr, stride_vk,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h = x[rows] @ v^T as a [BLOCK_M, BLOCK_R] fp32 block (padded ranks are exactly zero)."""
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xb = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_mask, k_mask, UPCAST)
        vtb = load_tile(v_ptr, offs_k, offs_r, stride_vk, stride_vr, k_mask, r_mask, UPCAST)
        h = tl.dot(xb, vtb, h, input_precision=PRECISION)
    return h


@triton.jit
def _load_bias(b_ptr, offs_n, n_mask, stride_b):
    return tl.load(b_ptr + offs_n.to(tl.int64) * stride_b, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["HAS_BIAS", "ACTIVATION"])
def lowrank_fwd_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, out_ptr,
    M, K, N, R, N_PER_PROG,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, stride_b,
    stride_om, stride_on,
    HAS_BIAS, ACTIVATION,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
        stride_vk, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R,
    )
    if not UPCAST:
        h = h.to(x_ptr.dtype.element_ty)  # the second product's operand, in the input dtype
    n_begin = pid_n * N_PER_PROG
    n_end = tl.minimum(n_begin + N_PER_PROG, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        utb = load_tile(u_ptr, offs_r, offs_n, stride_ur, stride_un, r_mask, n_mask, UPCAST)
        acc = tl.dot(h, utb, input_precision=PRECISION)
        if HAS_BIAS:
            acc += _load_bias(b_ptr, offs_n, n_mask, stride_b)[None, :]
        acc = act_forward(acc, ACTIVATION)
        tl.store(
            out_ptr + offsets_2d(offs_m, offs_n, stride_om, stride_on),
            acc.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )


@triton.jit(do_not_specialize=["HAS_BIAS", "ACTIVATION"])
def lowrank_bwd_dz_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, go_ptr, h_ptr, dz_ptr, gp_ptr,
    M, K, N, R, N_PER_PROG,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, stride_b,
    stride_gom, stride_gon,
    HAS_BIAS, ACTIVATION,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (row block, column split): h, then dz and a partial g = dz @ u over its columns.

    ``h: [M, R]`` and ``dz: [M, N]`` (compute dtype) and ``gp: [splits, M, R]`` (fp32) are
    contiguous scratch buffers owned by the launcher.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    mr_mask = m_mask[:, None] & r_mask[None, :]
    h = _row_block_times_vt(
        x_ptr, v_ptr, offs_m, m_mask, offs_r, r_mask, K, stride_xm, stride_xk, stride_vr,
        stride_vk, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R,
    )
    if not UPCAST:
        h = h.to(x_ptr.dtype.element_ty)
    if pid_n == 0:
        tl.store(
            h_ptr + offsets_2d(offs_m, offs_r, R, 1), h.to(h_ptr.dtype.element_ty), mask=mr_mask
        )
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_begin = pid_n * N_PER_PROG
    n_end = tl.minimum(n_begin + N_PER_PROG, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        mn_mask = m_mask[:, None] & n_mask[None, :]
        ub = load_tile(u_ptr, offs_n, offs_r, stride_un, stride_ur, n_mask, r_mask, UPCAST)
        go = tl.load(
            go_ptr + offsets_2d(offs_m, offs_n, stride_gom, stride_gon), mask=mn_mask, other=0.0
        )
        if ACTIVATION != 0:
            z = tl.dot(h, tl.trans(ub), input_precision=PRECISION)
            if HAS_BIAS:
                z += _load_bias(b_ptr, offs_n, n_mask, stride_b)[None, :]
            dz = (go.to(tl.float32) * act_grad(z, ACTIVATION)).to(ub.dtype)
            tl.store(
                dz_ptr + offsets_2d(offs_m, offs_n, N, 1),
                dz.to(dz_ptr.dtype.element_ty),
                mask=mn_mask,
            )
        else:
            dz = go.to(ub.dtype)
        g = tl.dot(dz, ub, g, input_precision=PRECISION)
    gp = gp_ptr + pid_n.to(tl.int64) * M * R
    tl.store(gp + offsets_2d(offs_m, offs_r, R, 1), g, mask=mr_mask)


@triton.jit
def lowrank_bwd_dx_kernel(
    v_ptr, gp_ptr, g_ptr, dx_ptr,
    M, K, R, SPLITS, K_PER_PROG,
    stride_vr, stride_vk, stride_dxm, stride_dxk,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (row block, K split): g = sum of the SPLITS partials, then dx = g @ v over its
    input columns; the K split 0 program also writes g (compute dtype) for dv = g^T x."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    mr_mask = m_mask[:, None] & r_mask[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    gp = gp_ptr + offsets_2d(offs_m, offs_r, R, 1)
    slab = tl.cast(M, tl.int64) * R
    for _ in range(0, SPLITS):
        g += tl.load(gp, mask=mr_mask, other=0.0)
        gp += slab
    if not UPCAST:
        g = g.to(dx_ptr.dtype.element_ty)
    if pid_k == 0:
        tl.store(
            g_ptr + offsets_2d(offs_m, offs_r, R, 1), g.to(g_ptr.dtype.element_ty), mask=mr_mask
        )
    k_begin = pid_k * K_PER_PROG
    k_end = tl.minimum(k_begin + K_PER_PROG, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        vb = load_tile(v_ptr, offs_r, offs_k, stride_vr, stride_vk, r_mask, k_mask, UPCAST)
        dx = tl.dot(g, vb, input_precision=PRECISION)
        tl.store(
            dx_ptr + offsets_2d(offs_m, offs_k, stride_dxm, stride_dxk),
            dx.to(dx_ptr.dtype.element_ty),
            mask=m_mask[:, None] & k_mask[None, :],
        )


# ----------------------------------------------------------------------------------------------
# Launch configurations. These tables are the complete set of tile shapes the launchers below can
# pick (no autotuning), so the lowering tests can compile every one of them ahead of time.
# ----------------------------------------------------------------------------------------------

RANK_TILES = (32, 64, 128, 256)  # BLOCK_R values: the rank padded up to one of these.

FWD_CONFIGS: dict[int, TileConfig] = {
    32: TileConfig(64, 64, 64, 4, 3),
    64: TileConfig(64, 64, 32, 4, 3),
    128: TileConfig(64, 64, 32, 8, 2),
    256: TileConfig(32, 64, 32, 8, 2),
}
# lowrank_bwd_dz_kernel keeps two [BLOCK_M, BLOCK_R] blocks live (h and the g accumulator): large
# ranks use fewer rows.
BWD_CONFIGS: dict[int, TileConfig] = {
    32: TileConfig(64, 64, 64, 4, 2),
    64: TileConfig(64, 64, 32, 4, 2),
    128: TileConfig(32, 64, 32, 8, 2),
    256: TileConfig(32, 32, 32, 8, 1),
}
# lowrank_bwd_dx_kernel (block_n unused): g stays in registers while v streams through.
DX_CONFIGS: dict[int, TileConfig] = {
    32: TileConfig(64, 0, 64, 4, 3),
    64: TileConfig(64, 0, 64, 4, 3),
    128: TileConfig(64, 0, 32, 8, 2),
    256: TileConfig(32, 0, 32, 8, 2),
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


def _split(
    row_blocks: int, blocks: int, device: torch.device, override: int | None, min_blocks: int
) -> int:
    """How many programs share one row block's ``blocks`` column blocks.

    ``override`` forces the split (the tests use it on CPU); otherwise only CUDA splits, aiming
    for about two waves while giving each program at least ``min_blocks`` column blocks.
    """
    if override is not None:
        if override < 1:
            raise ValueError(f"a split must be >= 1, got {override}")
        return max(1, min(override, blocks))
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splitting only adds work
    sms = sm_count(device)
    want = triton.cdiv(2 * sms, max(row_blocks, 1))
    return max(1, min(want, blocks // min_blocks))


def _per_prog(size: int, split: int, block: int) -> tuple[int, int]:
    """(elements per program, programs) when ``size`` columns are split ``split`` ways."""
    per_prog = max(block, triton.cdiv(triton.cdiv(size, split), block) * block)
    return per_prog, max(1, triton.cdiv(size, per_prog))


def _upcast(dtype: torch.dtype, upcast: bool | None) -> bool:
    """Whether fp16/bf16 operands are upcast to fp32 in the kernels (see the module docstring)."""
    if dtype == torch.float32:
        return False
    return triton_interpreting() if upcast is None else bool(upcast)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(
            f"the Triton lowrank_linear kernels support {', '.join(map(str, DTYPES))}; got "
            f"{x.dtype} (use the 'cpp' or 'reference' backend for float64)"
        )


def _forward_launch(x2d, u, v, bias, out, act: int, column_split, upcast: bool) -> Launch:
    m, k = x2d.shape
    n, r = u.shape
    block_r = rank_tile(r)
    cfg = FWD_CONFIGS[block_r]
    m_blocks = triton.cdiv(m, cfg.block_m)
    split = _split(m_blocks, triton.cdiv(n, cfg.block_n), x2d.device, column_split, 4)
    n_per_prog, n_progs = _per_prog(n, split, cfg.block_n)
    args = dict(
        x_ptr=x2d, v_ptr=v, u_ptr=u, b_ptr=bias if bias is not None else x2d, out_ptr=out,
        M=m, K=k, N=n, R=r, N_PER_PROG=n_per_prog,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_vr=v.stride(0), stride_vk=v.stride(1),
        stride_un=u.stride(0), stride_ur=u.stride(1),
        stride_b=bias.stride(0) if bias is not None else 1,
        stride_om=out.stride(0), stride_on=out.stride(1),
        HAS_BIAS=int(bias is not None), ACTIVATION=act,
        UPCAST=upcast, PRECISION=dot_precision(x2d.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
    )
    return Launch(lowrank_fwd_kernel, (m_blocks, n_progs), args, cfg)


def _backward_launches(
    g2d, x2d, u, v, bias, act: int, column_split, k_split, upcast: bool
) -> tuple[Launch, Launch, dict[str, torch.Tensor | None]]:
    """The two backward launches and the buffers they write (dx, h, g, dz; dz None without an
    activation)."""
    m, k = x2d.shape
    n, r = u.shape
    device = x2d.device
    block_r = rank_tile(r)
    compute = torch.float32 if upcast else x2d.dtype
    bufs = {
        "dx": empty((m, k), x2d.dtype, device),
        "h": empty((m, r), compute, device),
        "g": empty((m, r), compute, device),
        "dz": empty((m, n), compute, device) if act != 0 else None,
    }
    cfg = BWD_CONFIGS[block_r]
    m_blocks = triton.cdiv(m, cfg.block_m)
    split = _split(m_blocks, triton.cdiv(n, cfg.block_n), device, column_split, 4)
    n_per_prog, n_progs = _per_prog(n, split, cfg.block_n)
    # Every element of the partials is written (each program stores its whole [rows, R] block).
    g_part = empty((n_progs, m, r), torch.float32, device)
    precision = dot_precision(x2d.dtype)
    dz_args = dict(
        x_ptr=x2d, v_ptr=v, u_ptr=u, b_ptr=bias if bias is not None else x2d, go_ptr=g2d,
        h_ptr=bufs["h"], dz_ptr=bufs["dz"] if bufs["dz"] is not None else bufs["h"],
        gp_ptr=g_part,
        M=m, K=k, N=n, R=r, N_PER_PROG=n_per_prog,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_vr=v.stride(0), stride_vk=v.stride(1),
        stride_un=u.stride(0), stride_ur=u.stride(1),
        stride_b=bias.stride(0) if bias is not None else 1,
        stride_gom=g2d.stride(0), stride_gon=g2d.stride(1),
        HAS_BIAS=int(bias is not None), ACTIVATION=act, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
    )
    dz_launch = Launch(lowrank_bwd_dz_kernel, (m_blocks, n_progs), dz_args, cfg)

    dcfg = DX_CONFIGS[block_r]
    dm_blocks = triton.cdiv(m, dcfg.block_m)
    ksplit = _split(dm_blocks, triton.cdiv(k, dcfg.block_k), device, k_split, 2)
    k_per_prog, k_progs = _per_prog(k, ksplit, dcfg.block_k)
    dx = bufs["dx"]
    dx_args = dict(
        v_ptr=v, gp_ptr=g_part, g_ptr=bufs["g"], dx_ptr=dx,
        M=m, K=k, R=r, SPLITS=n_progs, K_PER_PROG=k_per_prog,
        stride_vr=v.stride(0), stride_vk=v.stride(1),
        stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
        UPCAST=upcast, PRECISION=precision,
        BLOCK_M=dcfg.block_m, BLOCK_K=dcfg.block_k, BLOCK_R=block_r,
    )
    dx_launch = Launch(lowrank_bwd_dx_kernel, (dm_blocks, k_progs), dx_args, dcfg)
    return dz_launch, dx_launch, bufs


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions; autograd lives in rosita_fast.ops).
# ----------------------------------------------------------------------------------------------


def lowrank_linear_forward(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    *,
    column_split: int | None = None,
    upcast: bool | None = None,
) -> torch.Tensor:
    """``act(x @ v^T @ u^T + bias)`` with the fused Triton kernel. ``x`` is ``[..., in]``.

    ``column_split`` forces how many programs share a row block's output columns (default: split
    only on CUDA, to fill the GPU); ``upcast`` forces the fp32-operand path for fp16/bf16 (default:
    exactly under the interpreter). Both exist for tests; the op layer uses the defaults.
    """
    _check_dtype(x)
    rank_tile(u.shape[1])
    x2d = x.reshape(-1, x.shape[-1])
    m = x2d.shape[0]
    n = u.shape[0]
    out = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    act = ACTIVATION_CODES[activation]
    _forward_launch(x2d, u, v, bias, out, act, column_split, _upcast(x.dtype, upcast))()
    return out.view(*x.shape[:-1], n)


def lowrank_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    *,
    column_split: int | None = None,
    k_split: int | None = None,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dx, du, dv, dbias)``: the two backward kernels plus torch reductions over rows.

    ``column_split`` / ``k_split`` force the splits of the dz and dx kernels, ``upcast`` the
    fp32-operand path (see :func:`lowrank_linear_forward`).
    """
    _check_dtype(x)
    rank_tile(u.shape[1])
    x2d = x.reshape(-1, x.shape[-1])
    n = u.shape[0]
    g2d = grad.reshape(-1, n)
    m = x2d.shape[0]
    act = ACTIVATION_CODES[activation]
    up = _upcast(x.dtype, upcast)
    dz_launch, dx_launch, bufs = _backward_launches(
        g2d, x2d, u, v, bias, act, column_split, k_split, up
    )
    if m > 0:
        dz_launch()
        dx_launch()
    h, g = bufs["h"], bufs["g"]
    dz = bufs["dz"] if bufs["dz"] is not None else g2d.to(h.dtype)
    du = (dz.t() @ h).to(u.dtype)
    dv = (g.t() @ x2d.to(g.dtype)).to(v.dtype)
    dbias = dz.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None
    return bufs["dx"].view(x.shape), du, dv, dbias


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------

_EXAMPLE_SIZE = 64  # M = K = N of the example launches: a multiple of 16, like BERT's sizes


def _example_launches(dtype: torch.dtype, block_r: int) -> list[Launch]:
    """The launches the launchers make on the GPU (native path, no forced split) for contiguous,
    16-byte aligned inputs whose sizes are multiples of 16, at rank ``block_r``."""
    s = _EXAMPLE_SIZE
    x = torch.zeros(s, s, dtype=dtype)
    u = torch.zeros(s, block_r, dtype=dtype)
    v = torch.zeros(block_r, s, dtype=dtype)
    bias = torch.zeros(s, dtype=dtype)
    out = torch.zeros(s, s, dtype=dtype)
    fwd = _forward_launch(x, u, v, bias, out, 1, None, False)
    dz, dx, _ = _backward_launches(out, x, u, v, bias, 1, None, None, False)
    return [fwd, dz, dx]


def launch_specs() -> list[LaunchSpec]:
    """Every (kernel, dtype, rank tile) the launchers can use, twice: ``contig`` is the JIT's
    specialisation for contiguous aligned inputs with sizes divisible by 16 (unit inner strides
    folded to constants, sizes, leading strides and pointers marked divisible by 16), ``generic``
    the unspecialised variant (nothing folded or assumed), the bound of every other launch.

    Bias and activation are runtime arguments (uniform branches in the epilogue), so they do not
    multiply the number of compiled variants. The interpreter-only ``UPCAST`` path is not lowered.
    """
    specs = []
    for dtype, block_r in itertools.product(DTYPES, RANK_TILES):
        for launch in _example_launches(dtype, block_r):
            for variant, specialize in (("contig", True), ("generic", False)):
                label = f"{TL_DTYPES[dtype]},R{block_r},{variant}"
                specs.append(launch.spec(label, TL_DTYPES[dtype], specialize))
    return specs

"""Triton kernels for ``linear_residual_layernorm``: ``LayerNorm(x @ weight^T + bias + residual)``.

Forward, two kernels:

- :func:`linear_residual_kernel`: the GEMM (tiles, order and K loop of
  :mod:`rosita_fast.kernels.linear_act`) with bias and residual added in its epilogue, writing the
  pre-LayerNorm rows ``y`` to an fp32 ``[rows, N]`` buffer;
- :func:`layernorm_fwd_kernel`: one program per block of ``BLOCK_M`` rows, each whole row in
  registers (``BLOCK_N`` = the row length padded to a power of two, at most 4096): mean,
  variance, ``1/std`` (fp32), the affine LayerNorm into the output, and each row's mean and rstd.
  The training forward's ``y`` is the op's ``gemm_dtype``: for fp32 and fp16 the GEMM's fp32
  buffer itself, for bf16 a copy the LayerNorm kernel stores.

Backward:

- :func:`layernorm_bwd_kernel`, a fixed number of programs each looping over row blocks
  (``programs`` row blocks apart): per row ``xhat = (y - mean) * rstd``, ``g' = grad * ln_weight``,
  ``dy = rstd * (g' - mean(g') - xhat * mean(g' * xhat))`` (the kept mean / rstd, or, for a bf16
  ``y``, the statistics of the rounded rows), stored as the GEMM operand (and as
  ``dresidual`` in x's dtype); each program sums ``grad * xhat``, ``grad`` and ``dy`` over its rows
  into its row of an fp32 ``[programs, 3, N]`` buffer, whose sum over programs (torch) gives
  ``dln_weight``, ``dln_bias`` and ``dbias``;
- :func:`rosita_fast.kernels.linear_act.matmul_kernel` twice: ``dx = dy @ weight`` and
  ``dweight = dy^T @ x``.

Without the training forward's ``y``, ``mean`` and ``rstd`` the backward runs the training
forward again (from ``residual``) to get them.

Dropout (training): the GEMM epilogue applies the counter-based mask of
``rosita_fast.ops._dropout`` (a hash of seed, row and column; nothing stored) before the residual
add, and the backward row kernel regenerates it to turn ``dy`` (stored as ``dresidual``) into the
products' operand ``dy * mask * scale``. Dropout, its seed and threshold are runtime arguments:
one compiled kernel serves every probability and seed.

Precision: LayerNorm statistics and every sum are fp32; products as in
:mod:`rosita_fast.kernels.linear_act` (tf32x3 for fp32, fp16/bf16 tensor cores natively with
``dy`` rounded to the input dtype, everything fp32 under the interpreter's ``UPCAST``). Tile
pointer offsets are 64-bit. ``packed`` (the C++ backend's prepacked weight) is a CPU-only hint
that the Triton launchers accept and ignore.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from rosita_fast.ops._dropout import dropout_scale, dropout_threshold

from ._common import (
    DTYPES,
    TL_DTYPES,
    Launch,
    LaunchSpec,
    TileConfig,
    dot_precision,
    dropout_keep,
    empty,
    offsets_2d,
    seed_int32,
    sm_count,
)
from .linear_act import (
    GEMM_TILES,
    GROUP_M,
    check_dtype,
    forced,
    gemm_tile,
    linear_grads,
    load_vector,
    matmul_tile,
    tile_coords,
    upcast_operands,
)

#: Longest row the LayerNorm kernels keep in registers.
MAX_ROW = 4096
#: Row kernels: BLOCK_N (the row padded to a power of two) -> (rows per program, warps), about
#: 16 elements of each row array per thread.
ROW_TILES: dict[int, tuple[int, int]] = {
    256: (8, 4),
    512: (4, 4),
    1024: (4, 8),
    2048: (2, 8),
    4096: (1, 8),
}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["HAS_BIAS", "DROPOUT", "seed", "drop_threshold"])
def linear_residual_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_rm, stride_rn,
    stride_ym, stride_yn,
    HAS_BIAS, DROPOUT, seed, drop_threshold, drop_scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One tile of ``y = dropout(x @ w^T + b) + residual`` (fp32 accumulation, y in its own
    dtype); the dropout (DROPOUT, a runtime flag) is the shared counter-based mask over
    (row, column) of the ``[M, N]`` product."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = matmul_tile(
        x_ptr, offs_m, stride_xm, stride_xk, w_ptr, offs_n, stride_wk, stride_wn, m_mask, n_mask,
        K, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_BIAS:
        acc += load_vector(b_ptr, offs_n, n_mask, stride_b)[None, :]
    if DROPOUT:
        keep = dropout_keep(seed, offs_m, offs_n, drop_threshold)
        acc = tl.where(keep, acc * drop_scale, 0.0)
    mask = m_mask[:, None] & n_mask[None, :]
    res = tl.load(r_ptr + offsets_2d(offs_m, offs_n, stride_rm, stride_rn), mask=mask, other=0.0)
    acc += res.to(tl.float32)
    tl.store(
        y_ptr + offsets_2d(offs_m, offs_n, stride_ym, stride_yn),
        acc.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit(do_not_specialize=["STORE_Y"])
def layernorm_fwd_kernel(
    y_ptr, w_ptr, b_ptr, out_ptr, ylow_ptr, mean_ptr, rstd_ptr,
    M, N, eps,
    stride_ym, stride_yn, stride_w, stride_b, stride_om, stride_on, stride_lm, stride_ln,
    STORE_Y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows ``[pid * BLOCK_M, +BLOCK_M)``: ``out = (y - mean) * rstd * w + b``, mean and rstd
    (fp32, contiguous ``[M]``); with STORE_Y also ``y`` in ylow's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    r_mask = rows < M
    c_mask = cols < N
    mask = r_mask[:, None] & c_mask[None, :]
    y = tl.load(y_ptr + offsets_2d(rows, cols, stride_ym, stride_yn), mask=mask, other=0.0)
    y = y.to(tl.float32)
    mean = tl.sum(y, 1) / N
    yc = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, 1) / N + eps)
    w = load_vector(w_ptr, cols, c_mask, stride_w)
    b = load_vector(b_ptr, cols, c_mask, stride_b)
    out = yc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(
        out_ptr + offsets_2d(rows, cols, stride_om, stride_on),
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
    if STORE_Y:
        tl.store(
            ylow_ptr + offsets_2d(rows, cols, stride_lm, stride_ln),
            y.to(ylow_ptr.dtype.element_ty),
            mask=mask,
        )
    tl.store(mean_ptr + rows, mean, mask=r_mask)
    tl.store(rstd_ptr + rows, rstd, mask=r_mask)


@triton.jit(do_not_specialize=["HAS_STATS", "STORE_DRES", "DROPOUT", "seed", "drop_threshold"])
def layernorm_bwd_kernel(
    g_ptr, y_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dres_ptr, part_ptr,
    M, N, eps,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_w, stride_dym, stride_dyn,
    stride_drm, stride_drn,
    HAS_STATS, STORE_DRES, DROPOUT, seed, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``pid`` of ``P``: row blocks ``pid, pid + P, ...``; per row the LayerNorm input
    gradient ``dy`` (and, with STORE_DRES, a copy in dres's dtype), with the given mean and
    rstd (HAS_STATS) or ones computed from ``y``; the program's sums over its rows of
    ``grad * xhat``, ``grad`` and ``dy`` into ``part[pid]`` (contiguous fp32 ``[P, 3, N]``).
    With DROPOUT (which needs STORE_DRES: dres gets ``dy``) the GEMM operand stored in ``dy_ptr``
    and the third sum are the dense output's gradient ``dy * mask * scale`` instead."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    c_mask = cols < N
    w = load_vector(w_ptr, cols, c_mask, stride_w)
    sum_gx = tl.zeros((BLOCK_N,), tl.float32)
    sum_g = tl.zeros((BLOCK_N,), tl.float32)
    sum_dy = tl.zeros((BLOCK_N,), tl.float32)
    for blk in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = rows < M
        mask = r_mask[:, None] & c_mask[None, :]
        y = tl.load(y_ptr + offsets_2d(rows, cols, stride_ym, stride_yn), mask=mask, other=0.0)
        y = y.to(tl.float32)
        g = tl.load(g_ptr + offsets_2d(rows, cols, stride_gm, stride_gn), mask=mask, other=0.0)
        g = g.to(tl.float32)
        if HAS_STATS:
            mean = tl.load(mean_ptr + rows, mask=r_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)
        else:
            mean = tl.sum(y, 1) / N
            yc = tl.where(mask, y - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, 1) / N + eps)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        gw = g * w[None, :]
        a = tl.sum(gw, 1) / N
        b = tl.sum(gw * xhat, 1) / N
        dy = tl.where(mask, rstd[:, None] * (gw - a[:, None] - xhat * b[:, None]), 0.0)
        if STORE_DRES:
            tl.store(
                dres_ptr + offsets_2d(rows, cols, stride_drm, stride_drn),
                dy.to(dres_ptr.dtype.element_ty),
                mask=mask,
            )
        if DROPOUT:
            keep = dropout_keep(seed, rows, cols, drop_threshold)
            dy = tl.where(keep, dy * drop_scale, 0.0)
        tl.store(
            dy_ptr + offsets_2d(rows, cols, stride_dym, stride_dyn),
            dy.to(dy_ptr.dtype.element_ty),
            mask=mask,
        )
        sum_gx += tl.sum(g * xhat, 0)
        sum_g += tl.sum(g, 0)
        sum_dy += tl.sum(dy, 0)
    part = part_ptr + pid.to(tl.int64) * 3 * N + cols
    tl.store(part, sum_gx, mask=c_mask)
    tl.store(part + N, sum_g, mask=c_mask)
    tl.store(part + 2 * N, sum_dy, mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Tiles (shared with the embedding_layernorm kernels)
# ----------------------------------------------------------------------------------------------


def row_tile(n: int, op: str) -> tuple[int, TileConfig]:
    """(BLOCK_N, config with block_m = rows per program) of the LayerNorm row kernels for rows of
    ``n`` elements; forced rows per program under :func:`forced_tiles`. Raises past
    :data:`MAX_ROW`."""
    if n > MAX_ROW:
        raise ValueError(
            f"the Triton {op} kernels keep a LayerNorm row in registers and support up to "
            f"{MAX_ROW} features, got {n}; use the 'cpp' or 'reference' backend"
        )
    block_n = max(min(ROW_TILES), triton.next_power_of_2(max(n, 1)))
    rows, warps = ROW_TILES[block_n]
    f = forced()
    if f is not None:
        rows = f.rows
    return block_n, TileConfig(rows, block_n, 0, warps, 1)


def row_programs(row_blocks: int, device: torch.device) -> int:
    """Programs of a backward row kernel (each loops over row blocks and writes one row of
    column partial sums): the forced number, else on a GPU about four per SM, else one per row
    block (the interpreter runs programs one after another)."""
    f = forced()
    if f is not None and f.programs is not None:
        cap = f.programs
    else:
        sms = sm_count(device)
        cap = 4 * sms if sms is not None else row_blocks
    return max(0, min(row_blocks, cap))


# ----------------------------------------------------------------------------------------------
# Argument dicts
# ----------------------------------------------------------------------------------------------


def _drop_args(dropout_p: float, seed: int) -> dict:
    # Runtime dropout arguments (one compiled kernel for every p and seed): the seed as int32.
    return dict(DROPOUT=int(dropout_p > 0), seed=seed_int32(seed),
                drop_threshold=dropout_threshold(dropout_p),
                drop_scale=float(dropout_scale(dropout_p)))


def _gemm_launch(x2d, weight, bias, r2d, y, upcast: bool, cfg: TileConfig | None = None,
                 dropout_p: float = 0.0, seed: int = 0):
    m, k = x2d.shape
    n = weight.shape[0]
    cfg = cfg or gemm_tile(x2d.dtype, m, n, x2d.device)
    args = dict(
        x_ptr=x2d, w_ptr=weight, b_ptr=bias if bias is not None else weight, r_ptr=r2d, y_ptr=y,
        M=m, N=n, K=k,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_b=bias.stride(0) if bias is not None else 1,
        stride_rm=r2d.stride(0), stride_rn=r2d.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=int(bias is not None), **_drop_args(dropout_p, seed),
        UPCAST=upcast, PRECISION=dot_precision(x2d.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M,
    )
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    return Launch(linear_residual_kernel, grid, args, cfg)


def _ln_fwd_launch(y, ln_weight, ln_bias, out, ylow, mean, rstd, eps: float,
                   cfg: TileConfig) -> Launch:
    m, n = y.shape
    yl = ylow if ylow is not None else out  # never written without STORE_Y
    args = dict(
        y_ptr=y, w_ptr=ln_weight, b_ptr=ln_bias, out_ptr=out, ylow_ptr=yl, mean_ptr=mean,
        rstd_ptr=rstd, M=m, N=n, eps=float(eps),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_w=ln_weight.stride(0), stride_b=ln_bias.stride(0),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_lm=yl.stride(0), stride_ln=yl.stride(1),
        STORE_Y=int(ylow is not None), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    return Launch(layernorm_fwd_kernel, (triton.cdiv(m, cfg.block_m),), args, cfg)


def _ln_bwd_launch(g2d, y2d, ln_weight, mean, rstd, eps: float, dy, dres, part,
                   cfg: TileConfig, dropout_p: float = 0.0, seed: int = 0) -> Launch:
    m, n = g2d.shape
    dr = dres if dres is not None else dy  # never written without STORE_DRES
    args = dict(
        g_ptr=g2d, y_ptr=y2d, w_ptr=ln_weight, mean_ptr=mean if mean is not None else part,
        rstd_ptr=rstd if rstd is not None else part, dy_ptr=dy, dres_ptr=dr, part_ptr=part,
        M=m, N=n, eps=float(eps),
        stride_gm=g2d.stride(0), stride_gn=g2d.stride(1),
        stride_ym=y2d.stride(0), stride_yn=y2d.stride(1), stride_w=ln_weight.stride(0),
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
        stride_drm=dr.stride(0), stride_drn=dr.stride(1),
        HAS_STATS=int(mean is not None), STORE_DRES=int(dres is not None),
        **_drop_args(dropout_p, seed), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    return Launch(layernorm_bwd_kernel, (part.shape[0],), args, cfg)


# ----------------------------------------------------------------------------------------------
# Launchers: the op's backend entries (same arguments and results as its "cpp" entries)
# ----------------------------------------------------------------------------------------------

_OP = "linear_residual_layernorm"


def y_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the training forward's y for inputs of ``dtype``: the op's contract
    (``rosita_fast.ops.linear_act.gemm_dtype``, its fake): fp32 for fp16, else the input's."""
    return torch.float32 if dtype == torch.float16 else dtype


def _forward(x, weight, bias, residual, ln_weight, ln_bias, eps, keep: bool, upcast,
             dropout_p=0.0, seed=0):
    check_dtype(x, _OP)
    n, k = weight.shape
    _, cfg = row_tile(n, _OP)
    m = math.prod(x.shape[:-1])
    x2d = x.reshape(m, k)
    r2d = residual.reshape(m, n)
    device = x.device
    y = empty((m, n), torch.float32, device)
    out = empty((m, n), x.dtype, device)
    mean = empty((m,), torch.float32, device)
    rstd = empty((m,), torch.float32, device)
    # The training forward's y (y_dtype): the GEMM's own fp32 buffer for fp32 and fp16, a bf16
    # copy written by the LayerNorm kernel for bf16.
    ylow = empty((m, n), x.dtype, device) if keep and y_dtype(x.dtype) != torch.float32 else None
    _gemm_launch(x2d, weight, bias, r2d, y, upcast_operands(x.dtype, upcast), None, dropout_p,
                 seed)()
    _ln_fwd_launch(y, ln_weight, ln_bias, out, ylow, mean, rstd, eps, cfg)()
    return out.view(residual.shape), (ylow if ylow is not None else y), mean, rstd


def linear_residual_layernorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    packed: torch.Tensor | None = None,
    *,
    upcast: bool | None = None,
) -> torch.Tensor:
    """``LayerNorm(x @ weight^T + bias + residual)`` in x's dtype, shaped like ``residual``
    (contiguous). ``packed`` (the C++ backend's prepacked weight, a CPU-only hint) is ignored.
    ``upcast`` forces the fp32-operand path for fp16/bf16 (default: exactly under the
    interpreter); tests only, like :func:`rosita_fast.kernels.linear_act.forced_tiles`."""
    return _forward(x, weight, bias, residual, ln_weight, ln_bias, eps, False, upcast)[0]


def linear_residual_layernorm_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, y, mean, rstd)``: the output, ``y = dropout(x @ weight^T + bias) + residual`` as
    ``[rows, out_features]`` (:func:`y_dtype`: x's dtype, fp32 for fp16, as the op's contract
    says) and each row's mean and 1/std (fp32 ``[rows]``, of the fp32 y the output is normalized
    from)."""
    return _forward(x, weight, bias, residual, ln_weight, ln_bias, eps, True, upcast, dropout_p,
                    seed)


def linear_residual_layernorm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    y: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias, dresidual, dln_weight, dln_bias)``; ``dbias`` is an empty tensor
    without a bias (as the C++ backend returns). ``y``, ``mean``, ``rstd``: the training
    forward's; if any is None they are recomputed with the training forward (from ``residual``,
    which is then required). A ``y`` rounded below fp32 (bf16) gets its row statistics
    recomputed from the rounded values: ``xhat`` must be centred on the ``y`` it is computed
    from (with the fp32 mean, a row of one feature, whose gradients are exactly zero, would get
    ``rstd * rounding error`` instead). ``dropout_p``, ``seed``: the training forward's; the
    products and dbias then take ``dy * mask * scale`` and dresidual ``dy``."""
    check_dtype(x, _OP)
    n, k = weight.shape
    _, cfg = row_tile(n, _OP)
    if y is None or mean is None or rstd is None:
        if residual is None:
            raise ValueError(f"{_OP} backward: needs y, mean and rstd or residual")
        _, y, mean, rstd = _forward(x, weight, bias, residual, ln_weight, ln_bias, eps, True,
                                    upcast, dropout_p, seed)
    up = upcast_operands(x.dtype, upcast)
    device = x.device
    m = math.prod(x.shape[:-1])
    x2d = x.reshape(m, k)
    g2d = grad.reshape(m, n)
    y2d = y.reshape(m, n)
    if y2d.dtype != torch.float32:
        y2d = y2d.to(y_dtype(x.dtype))  # keep the compiled variants to the lowered ones
        mean = rstd = None  # statistics of the rounded y (see the docstring)
    else:
        mean = mean.reshape(m).to(torch.float32).contiguous()
        rstd = rstd.reshape(m).to(torch.float32).contiguous()
    compute = torch.float32 if up else x.dtype
    dy = empty((m, n), compute, device)
    # dresidual is dy itself where the GEMM operand is in x's dtype and there is no dropout (the
    # GEMM operand is then dy * mask * scale).
    dres = None if compute == x.dtype and dropout_p == 0 else empty((m, n), x.dtype, device)
    part = empty((row_programs(triton.cdiv(m, cfg.block_m), device), 3, n), torch.float32,
                 device)
    _ln_bwd_launch(g2d, y2d, ln_weight, mean, rstd, eps, dy, dres, part, cfg, dropout_p, seed)()
    sums = part.sum(0)  # [3, n]: dln_weight, dln_bias, dbias
    dx, dw = linear_grads(dy, x2d, weight, up)
    db = sums[2].to(bias.dtype, copy=True) if bias is not None else x.new_empty(0)
    dresidual = (dres if dres is not None else dy).view(*x.shape[:-1], n)
    return (dx.view(x.shape), dw, db, dresidual, sums[0].to(ln_weight.dtype, copy=True),
            sums[1].to(ln_bias.dtype, copy=True))


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------

_EXAMPLE_ROWS = 256


def launch_specs() -> list[LaunchSpec]:
    """Every (kernel, dtype, tile) the launchers can use, twice: ``contig`` is the JIT's
    specialisation for contiguous aligned inputs whose sizes are multiples of 16, ``generic`` the
    unspecialised variant (the bound of every other launch). The GEMM kernel at each GEMM tile of
    :data:`rosita_fast.kernels.linear_act.GEMM_TILES` (its y buffer is fp32); the row kernels at
    each row tile, with the row as long as the tile (``y`` read in fp32 by the forward, in
    :func:`y_dtype` by the backward; ``dy`` in x's dtype). Bias, the y store, the kept
    statistics and the dresidual store are runtime flags. The backward's two products are
    :func:`rosita_fast.kernels.linear_act.matmul_kernel`, lowered with that module. torch.empty
    only: the lowering worker forks after calling this."""
    specs = []
    s = _EXAMPLE_ROWS
    variants = (("contig", True), ("generic", False))
    for dtype, ((fp32, size), cfg) in itertools.product(DTYPES, GEMM_TILES.items()):
        if fp32 != (dtype == torch.float32):
            continue
        x, w, r = (torch.empty(s, s, dtype=dtype) for _ in range(3))
        launch = _gemm_launch(x, w, torch.empty(s, dtype=dtype), r,
                              torch.empty(s, s), False, cfg)
        for variant, specialize in variants:
            specs.append(launch.spec(f"{TL_DTYPES[dtype]},{size},{variant}", TL_DTYPES[dtype],
                                     specialize))
    for dtype, block_n in itertools.product(DTYPES, ROW_TILES):
        rows, warps = ROW_TILES[block_n]
        cfg = TileConfig(rows, block_n, 0, warps, 1)
        low = torch.empty(s, block_n, dtype=dtype)
        vec = torch.empty(block_n, dtype=dtype)
        stats = torch.empty(s)
        fwd = _ln_fwd_launch(torch.empty(s, block_n), vec, vec, low, low, stats, stats, 1e-12,
                             cfg)
        part = torch.empty(64, 3, block_n)
        y = torch.empty(s, block_n, dtype=y_dtype(dtype))
        bwd = _ln_bwd_launch(low, y, vec, stats, stats, 1e-12, low, low, part, cfg)
        for launch, (variant, specialize) in itertools.product((fwd, bwd), variants):
            specs.append(launch.spec(f"{TL_DTYPES[dtype]},N{block_n},{variant}", None,
                                     specialize))
    return specs

"""Triton kernels for ``embedding_layernorm``: the fused BERT embedding
``LayerNorm((word + token_type) + position)`` with a dense (``[V, hidden]``) or factorized
(``[V, E]`` rows projected by ``word_proj [hidden, E]``) word table.

The ids are flattened to contiguous int32 ``[B * L]`` vectors first (``[1, L]`` position / token
type ids broadcast over the batch), after the range check the op promises (ids outside their table
raise ``IndexError``; on a GPU that check reads two scalars back).

Forward:

- factorized only, :func:`embedding_matmul_kernel` with ``A_GATHER``: the projected word rows
  ``word_weight[ids] @ word_proj^T``, the gather fused into the GEMM's A loads, into an fp32
  ``[B * L, hidden]`` buffer (which the training forward returns as ``word``);
- :func:`embedding_ln_fwd_kernel`, one program per block of ``BLOCK_M`` tokens, each whole row in
  registers (``BLOCK_N`` = hidden padded to a power of two, at most 4096): gather the word row (or
  read the projected one), add the token type and position rows in HF's order, in fp32, and
  LayerNorm; it stores the output and each row's mean and rstd (fp32, the training forward's).

Backward:

- :func:`embedding_ln_bwd_kernel`, a fixed number of programs each looping over token blocks:
  recompute the row sum (the projected rows are the training forward's ``word`` or recomputed by
  the GEMM), ``xhat`` (with the kept mean/rstd or recomputed ones), the LayerNorm input gradient
  ``dx``; then ``dx`` is added into fp32 gradient tables with ``tl.atomic_add`` at the rows of the
  position ids and (dense table) of the input ids, skipping ``position_padding_idx`` /
  ``padding_idx`` rows, which get no gradient; token types: with at most two rows (BERT, RoBERTa)
  each program sums its tokens' ``dx`` per type in registers (no atomics), else atomics as well.
  Each program's sums of ``grad * xhat`` and ``grad`` (and the per-type sums) go to its row of an
  fp32 ``[programs, 4, hidden]`` buffer, summed by torch. Factorized tables instead store ``dx``
  (GEMM operand dtype) for
- :func:`embedding_matmul_kernel` twice: with ``C_SCATTER``, ``dx @ word_proj`` added atomically
  into the fp32 ``[V, E]`` word-table gradient at the input ids' rows (skipping ``padding_idx``),
  and with ``B_GATHER``, ``d_word_proj = dx^T @ word_weight[ids]`` (the gather in the B loads).

Atomic additions make the word, position (and with more than two token types, token type)
gradients order-nondeterministic in their last bits (fp32 sums in whatever order the programs
run); everything else is deterministic. fp16/bf16 gradient tables are accumulated in fp32 and
rounded once. Products as in :mod:`rosita_fast.kernels.linear_act` (tf32x3 for fp32, the
fp16/bf16 tensor cores natively, fp32 under the interpreter's ``UPCAST``). Tile pointer offsets
are 64-bit.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    DTYPES,
    TL_DTYPES,
    Launch,
    LaunchSpec,
    TileConfig,
    dot_precision,
    empty,
    load_tile,
    offsets_2d,
)
from .linear_act import (
    GEMM_TILES,
    GROUP_M,
    check_dtype,
    gemm_tile,
    load_vector,
    tile_coords,
    upcast_operands,
)
from .linear_residual_layernorm import ROW_TILES, row_programs, row_tile

_OP = "embedding_layernorm"
#: Token-type tables with at most this many rows have their gradient summed in registers.
MAX_TT_IN_REGS = 2

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _embed_rows(
    rows, cols, r_mask, mask, ids_ptr, pos_ids_ptr, tt_ids_ptr, word_ptr, wrows_ptr, pos_ptr,
    tt_ptr, stride_wv, stride_wh, stride_rm, stride_rh, stride_pv, stride_ph, stride_tv,
    stride_th, HAS_TT, WORD_GATHER,
):
    """(x, ids, position ids, token type ids) of a block of tokens: ``x = (word + token_type)
    + position`` in fp32, the word row gathered from the table (WORD_GATHER) or read from the
    projected rows; zero outside ``mask``."""
    ids = tl.load(ids_ptr + rows, mask=r_mask, other=0)
    pids = tl.load(pos_ids_ptr + rows, mask=r_mask, other=0)
    if WORD_GATHER:
        x = tl.load(word_ptr + offsets_2d(ids, cols, stride_wv, stride_wh), mask=mask, other=0.0)
        x = x.to(tl.float32)
    else:
        x = tl.load(wrows_ptr + offsets_2d(rows, cols, stride_rm, stride_rh), mask=mask,
                    other=0.0)
        x = x.to(tl.float32)
    tids = tl.zeros_like(ids)
    if HAS_TT:
        tids = tl.load(tt_ids_ptr + rows, mask=r_mask, other=0)
        t = tl.load(tt_ptr + offsets_2d(tids, cols, stride_tv, stride_th), mask=mask, other=0.0)
        x += t.to(tl.float32)
    p = tl.load(pos_ptr + offsets_2d(pids, cols, stride_pv, stride_ph), mask=mask, other=0.0)
    x += p.to(tl.float32)
    return x, ids, pids, tids


@triton.jit(do_not_specialize=["HAS_TT", "WORD_GATHER"])
def embedding_ln_fwd_kernel(
    ids_ptr, pos_ids_ptr, tt_ids_ptr, word_ptr, wrows_ptr, pos_ptr, tt_ptr, gamma_ptr, beta_ptr,
    out_ptr, mean_ptr, rstd_ptr,
    M, H, eps,
    stride_wv, stride_wh, stride_rm, stride_rh, stride_pv, stride_ph, stride_tv, stride_th,
    stride_gamma, stride_beta, stride_om, stride_oh,
    HAS_TT, WORD_GATHER,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tokens ``[pid * BLOCK_M, +BLOCK_M)``: the embedding sum, its LayerNorm into ``out``, and
    each token's mean and rstd (fp32, contiguous ``[M]``)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    r_mask = rows < M
    c_mask = cols < H
    mask = r_mask[:, None] & c_mask[None, :]
    x, ids, pids, tids = _embed_rows(
        rows, cols, r_mask, mask, ids_ptr, pos_ids_ptr, tt_ids_ptr, word_ptr, wrows_ptr,
        pos_ptr, tt_ptr, stride_wv, stride_wh, stride_rm, stride_rh, stride_pv, stride_ph,
        stride_tv, stride_th, HAS_TT, WORD_GATHER,
    )
    mean = tl.sum(x, 1) / H
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / H + eps)
    gamma = load_vector(gamma_ptr, cols, c_mask, stride_gamma)
    beta = load_vector(beta_ptr, cols, c_mask, stride_beta)
    out = xc * rstd[:, None] * gamma[None, :] + beta[None, :]
    tl.store(
        out_ptr + offsets_2d(rows, cols, stride_om, stride_oh),
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(mean_ptr + rows, mean, mask=r_mask)
    tl.store(rstd_ptr + rows, rstd, mask=r_mask)


@triton.jit(do_not_specialize=[
    "PAD_WORD", "PAD_POS", "HAS_TT", "WORD_GATHER", "HAS_STATS", "TT_IN_REGS",
])
def embedding_ln_bwd_kernel(
    g_ptr, ids_ptr, pos_ids_ptr, tt_ids_ptr, word_ptr, wrows_ptr, pos_ptr, tt_ptr, gamma_ptr,
    mean_ptr, rstd_ptr, dword_ptr, dpos_ptr, dtt_ptr, dx_ptr, part_ptr,
    M, H, eps, PAD_WORD, PAD_POS,
    stride_gm, stride_gh,
    stride_wv, stride_wh, stride_rm, stride_rh, stride_pv, stride_ph, stride_tv, stride_th,
    stride_gamma, stride_dxm, stride_dxh,
    HAS_TT, WORD_GATHER, HAS_STATS, TT_IN_REGS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``pid`` of ``P``: token blocks ``pid, pid + P, ...``. Per token the LayerNorm
    input gradient ``dx``, added atomically into the contiguous fp32 ``dpos [P_rows, H]`` and
    (WORD_GATHER: a dense table) ``dword [V, H]`` at the token's ids (not at PAD_POS / PAD_WORD,
    -1 for none), into ``dtt [T, H]`` unless TT_IN_REGS (then summed per type 0 / 1 here), or
    (factorized) stored to ``dx`` in its dtype. ``part[pid]`` (contiguous fp32 ``[P, 4, H]``)
    gets the program's sums of ``grad * xhat``, ``grad`` and the per-type sums of ``dx``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    c_mask = cols < H
    gamma = load_vector(gamma_ptr, cols, c_mask, stride_gamma)
    sum_gx = tl.zeros((BLOCK_N,), tl.float32)
    sum_g = tl.zeros((BLOCK_N,), tl.float32)
    sum_t0 = tl.zeros((BLOCK_N,), tl.float32)
    sum_t1 = tl.zeros((BLOCK_N,), tl.float32)
    for blk in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = rows < M
        mask = r_mask[:, None] & c_mask[None, :]
        x, ids, pids, tids = _embed_rows(
            rows, cols, r_mask, mask, ids_ptr, pos_ids_ptr, tt_ids_ptr, word_ptr, wrows_ptr,
            pos_ptr, tt_ptr, stride_wv, stride_wh, stride_rm, stride_rh, stride_pv, stride_ph,
            stride_tv, stride_th, HAS_TT, WORD_GATHER,
        )
        if HAS_STATS:
            mean = tl.load(mean_ptr + rows, mask=r_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)
        else:
            mean = tl.sum(x, 1) / H
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / H + eps)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = tl.load(g_ptr + offsets_2d(rows, cols, stride_gm, stride_gh), mask=mask, other=0.0)
        g = g.to(tl.float32)
        gw = g * gamma[None, :]
        a = tl.sum(gw, 1) / H
        b = tl.sum(gw * xhat, 1) / H
        dx = tl.where(mask, rstd[:, None] * (gw - a[:, None] - xhat * b[:, None]), 0.0)
        sum_gx += tl.sum(g * xhat, 0)
        sum_g += tl.sum(g, 0)
        tl.atomic_add(
            dpos_ptr + offsets_2d(pids, cols, H, 1), dx,
            mask=mask & (pids != PAD_POS)[:, None], sem="relaxed",
        )
        if HAS_TT:
            if TT_IN_REGS:
                sum_t0 += tl.sum(tl.where((tids == 0)[:, None], dx, 0.0), 0)
                sum_t1 += tl.sum(tl.where((tids == 1)[:, None], dx, 0.0), 0)
            else:
                tl.atomic_add(dtt_ptr + offsets_2d(tids, cols, H, 1), dx, mask=mask,
                              sem="relaxed")
        if WORD_GATHER:
            tl.atomic_add(
                dword_ptr + offsets_2d(ids, cols, H, 1), dx,
                mask=mask & (ids != PAD_WORD)[:, None], sem="relaxed",
            )
        else:
            tl.store(
                dx_ptr + offsets_2d(rows, cols, stride_dxm, stride_dxh),
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask,
            )
    part = part_ptr + pid.to(tl.int64) * 4 * H + cols
    tl.store(part, sum_gx, mask=c_mask)
    tl.store(part + H, sum_g, mask=c_mask)
    tl.store(part + 2 * H, sum_t0, mask=c_mask)
    tl.store(part + 3 * H, sum_t1, mask=c_mask)


@triton.jit(do_not_specialize=["SKIP_ROW", "A_GATHER", "B_GATHER", "C_SCATTER"])
def embedding_matmul_kernel(
    a_ptr, b_ptr, c_ptr, idx_ptr,
    M, N, K, SKIP_ROW,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    A_GATHER, B_GATHER, C_SCATTER,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C = A @ B`` (fp32 accumulation) with the token ids ``idx`` (contiguous int32):
    A_GATHER reads A's row ``m`` at ``idx[m]``, B_GATHER B's row ``k`` at ``idx[k]``, C_SCATTER
    adds the tile atomically into C's rows ``idx[m]`` (except SKIP_ROW; C fp32) instead of
    storing it at rows ``m``."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    ids_m = offs_m
    if A_GATHER:
        ids_m = tl.load(idx_ptr + offs_m, mask=m_mask, other=0)
    if C_SCATTER:
        ids_m = tl.load(idx_ptr + offs_m, mask=m_mask, other=0)
    a_rows = offs_m
    if A_GATHER:
        a_rows = ids_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        b_rows = offs_k
        if B_GATHER:
            b_rows = tl.load(idx_ptr + offs_k, mask=k_mask, other=0)
        a = load_tile(a_ptr, a_rows, offs_k, stride_am, stride_ak, m_mask, k_mask, UPCAST)
        b = load_tile(b_ptr, b_rows, offs_n, stride_bk, stride_bn, k_mask, n_mask, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    mask = m_mask[:, None] & n_mask[None, :]
    if C_SCATTER:
        tl.atomic_add(
            c_ptr + offsets_2d(ids_m, offs_n, stride_cm, stride_cn), acc,
            mask=mask & (ids_m != SKIP_ROW)[:, None], sem="relaxed",
        )
    else:
        tl.store(
            c_ptr + offsets_2d(offs_m, offs_n, stride_cm, stride_cn),
            acc.to(c_ptr.dtype.element_ty),
            mask=mask,
        )


# ----------------------------------------------------------------------------------------------
# Argument dicts
# ----------------------------------------------------------------------------------------------


def _matmul_launch(a, b, c, idx, *, a_gather=False, b_gather=False, c_scatter=False,
                   skip_row: int = -1, upcast: bool, cfg: TileConfig | None = None) -> Launch:
    """``c (+)= a @ b`` with the gathers / scatter of :func:`embedding_matmul_kernel`; the
    logical shapes are ``[M, K] @ [K, N]`` (``a`` / ``b`` are the tables when gathered: M / K
    come from ``idx``)."""
    m = idx.shape[0] if a_gather else a.shape[0]
    k = idx.shape[0] if b_gather else a.shape[1]
    n = b.shape[1]
    cfg = cfg or gemm_tile(b.dtype, m, n, b.device)
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=c, idx_ptr=idx, M=m, N=n, K=k, SKIP_ROW=skip_row,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_cm=c.stride(0), stride_cn=c.stride(1),
        A_GATHER=int(a_gather), B_GATHER=int(b_gather), C_SCATTER=int(c_scatter),
        UPCAST=upcast, PRECISION=dot_precision(b.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M,
    )
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    return Launch(embedding_matmul_kernel, grid, args, cfg)


def _table_args(word_weight, wrows, position_weight, token_type_weight) -> dict:
    tt = token_type_weight if token_type_weight is not None else position_weight
    return dict(
        word_ptr=word_weight, wrows_ptr=wrows, pos_ptr=position_weight, tt_ptr=tt,
        stride_wv=word_weight.stride(0), stride_wh=word_weight.stride(1),
        stride_rm=wrows.stride(0), stride_rh=wrows.stride(1),
        stride_pv=position_weight.stride(0), stride_ph=position_weight.stride(1),
        stride_tv=tt.stride(0), stride_th=tt.stride(1),
        HAS_TT=int(token_type_weight is not None),
    )


def _fwd_launch(ids, pos, tt, word_weight, wrows, word_gather: bool, position_weight,
                token_type_weight, ln_weight, ln_bias, out, mean, rstd, eps: float,
                cfg: TileConfig) -> Launch:
    m, h = out.shape
    args = dict(
        ids_ptr=ids, pos_ids_ptr=pos, tt_ids_ptr=tt if tt is not None else pos,
        gamma_ptr=ln_weight, beta_ptr=ln_bias, out_ptr=out, mean_ptr=mean, rstd_ptr=rstd,
        M=m, H=h, eps=float(eps),
        **_table_args(word_weight, wrows, position_weight, token_type_weight),
        stride_gamma=ln_weight.stride(0), stride_beta=ln_bias.stride(0),
        stride_om=out.stride(0), stride_oh=out.stride(1),
        WORD_GATHER=int(word_gather), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    return Launch(embedding_ln_fwd_kernel, (triton.cdiv(m, cfg.block_m),), args, cfg)


def _bwd_launch(g2d, ids, pos, tt, word_weight, wrows, word_gather: bool, position_weight,
                token_type_weight, ln_weight, mean, rstd, eps: float, pad_word: int,
                pad_pos: int, dword, dpos, dtt, tt_in_regs: bool, dx, part,
                cfg: TileConfig) -> Launch:
    m, h = g2d.shape
    args = dict(
        g_ptr=g2d, ids_ptr=ids, pos_ids_ptr=pos, tt_ids_ptr=tt if tt is not None else pos,
        gamma_ptr=ln_weight, mean_ptr=mean if mean is not None else part,
        rstd_ptr=rstd if rstd is not None else part,
        dword_ptr=dword if dword is not None else dpos, dpos_ptr=dpos,
        dtt_ptr=dtt if dtt is not None else dpos, dx_ptr=dx, part_ptr=part,
        M=m, H=h, eps=float(eps), PAD_WORD=pad_word, PAD_POS=pad_pos,
        stride_gm=g2d.stride(0), stride_gh=g2d.stride(1),
        **_table_args(word_weight, wrows, position_weight, token_type_weight),
        stride_gamma=ln_weight.stride(0), stride_dxm=dx.stride(0), stride_dxh=dx.stride(1),
        WORD_GATHER=int(word_gather), HAS_STATS=int(mean is not None),
        TT_IN_REGS=int(tt_in_regs), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    return Launch(embedding_ln_bwd_kernel, (part.shape[0],), args, cfg)


# ----------------------------------------------------------------------------------------------
# Launchers: the op's backend entries (same arguments and results as its "cpp" entries)
# ----------------------------------------------------------------------------------------------


def _no_rows(device: torch.device) -> torch.Tensor:
    """The projected-rows argument of a dense table (never read): fp32 like real rows, with a
    row stride of 16 elements, so dense and factorized launches share one compiled variant."""
    return torch.empty((1, 16), dtype=torch.float32, device=device)


def _flat_ids(ids: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """``[B, L]`` or ``[1, L]`` ids as a contiguous int32 ``[B * L]`` vector."""
    return ids.expand(b, length).reshape(-1).to(torch.int32).contiguous()


def _prepare(input_ids, word_weight, position_ids, position_weight, token_type_ids,
             token_type_weight, ln_weight):
    from rosita_fast.ops.embedding_layernorm import _check_id_ranges

    check_dtype(word_weight, _OP)
    _check_id_ranges(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                     token_type_weight)
    _, cfg = row_tile(ln_weight.shape[0], _OP)
    b, length = input_ids.shape
    ids = _flat_ids(input_ids, b, length)
    pos = _flat_ids(position_ids, b, length)
    tt = _flat_ids(token_type_ids, b, length) if token_type_weight is not None else None
    return cfg, ids, pos, tt


def _project(word_weight, word_proj, ids, upcast: bool) -> torch.Tensor:
    """``word_weight[ids] @ word_proj^T`` as an fp32 ``[len(ids), hidden]`` buffer."""
    rows = empty((ids.shape[0], word_proj.shape[0]), torch.float32, word_weight.device)
    _matmul_launch(word_weight, word_proj.t(), rows, ids, a_gather=True, upcast=upcast)()
    return rows


def _forward(input_ids, word_weight, position_ids, position_weight, token_type_ids,
             token_type_weight, ln_weight, ln_bias, eps, word_proj, upcast):
    cfg, ids, pos, tt = _prepare(input_ids, word_weight, position_ids, position_weight,
                                 token_type_ids, token_type_weight, ln_weight)
    b, length = input_ids.shape
    m, h = ids.shape[0], ln_weight.shape[0]
    device = word_weight.device
    up = upcast_operands(word_weight.dtype, upcast)
    if word_proj is not None:
        wrows = _project(word_weight, word_proj, ids, up)
    out = empty((m, h), word_weight.dtype, device)
    mean = empty((m,), torch.float32, device)
    rstd = empty((m,), torch.float32, device)
    _fwd_launch(ids, pos, tt, word_weight, wrows if word_proj is not None else _no_rows(device),
                word_proj is None, position_weight, token_type_weight, ln_weight, ln_bias, out,
                mean, rstd, eps, cfg)()
    if word_proj is not None:
        word = wrows.view(b, length, h)
    else:
        word = empty((0,), torch.float32, device)
    return out.view(b, length, h), mean.view(b, length), rstd.view(b, length), word


def embedding_layernorm_forward(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_ids: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    token_type_weight: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    word_proj: torch.Tensor | None = None,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
    *,
    upcast: bool | None = None,
) -> torch.Tensor:
    """``LayerNorm((word + token_type) + position)`` as ``[B, L, hidden]`` in the weights' dtype
    (contiguous). The padding indices only matter to the backward. ``upcast`` forces the
    fp32-operand path of the factorized projection for fp16/bf16 (default: exactly under the
    interpreter); tests only, like :func:`rosita_fast.kernels.linear_act.forced_tiles`."""
    return _forward(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                    token_type_weight, ln_weight, ln_bias, eps, word_proj, upcast)[0]


def embedding_layernorm_train(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_ids: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    token_type_weight: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    word_proj: torch.Tensor | None = None,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
    *,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd, word)``: the output, each token's LayerNorm mean and rstd (fp32
    ``[B, L]``) and, for a factorized table, the projected word rows (fp32 ``[B, L, hidden]``;
    an empty fp32 tensor for a dense one)."""
    return _forward(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                    token_type_weight, ln_weight, ln_bias, eps, word_proj, upcast)


def embedding_layernorm_backward(
    grad: torch.Tensor,
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_ids: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    token_type_weight: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    word_proj: torch.Tensor | None = None,
    padding_idx: int | None = None,
    position_padding_idx: int | None = None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    word: torch.Tensor | None = None,
    *,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_word_weight, d_word_proj, d_position_weight, d_token_type_weight, d_ln_weight,
    d_ln_bias)``, empty tensors for an absent ``word_proj`` / token type table (as the C++
    backend returns). The ``padding_idx`` row of the word table and the
    ``position_padding_idx`` row of the position table get zero gradient. ``mean``/``rstd``
    (``[B, L]``) and ``word`` (the projected rows) are the training forward's; None (or an empty
    ``word``) recomputes them. The atomically summed tables are nondeterministic in their last
    bits (see the module docstring)."""
    cfg, ids, pos, tt = _prepare(input_ids, word_weight, position_ids, position_weight,
                                 token_type_ids, token_type_weight, ln_weight)
    dtype = word_weight.dtype
    device = word_weight.device
    m, h = ids.shape[0], ln_weight.shape[0]
    up = upcast_operands(dtype, upcast)
    factorized = word_proj is not None
    if factorized:
        if word is not None and word.numel() > 0:
            wrows = word.reshape(m, h).to(torch.float32)
        else:
            wrows = _project(word_weight, word_proj, ids, up)
    if mean is not None and rstd is not None:
        mean = mean.reshape(m).to(torch.float32).contiguous()
        rstd = rstd.reshape(m).to(torch.float32).contiguous()
    else:
        mean = rstd = None
    n_tt = token_type_weight.shape[0] if token_type_weight is not None else 0
    tt_in_regs = 0 < n_tt <= MAX_TT_IN_REGS
    dpos = torch.zeros(position_weight.shape, dtype=torch.float32, device=device)
    dtt = (torch.zeros((n_tt, h), dtype=torch.float32, device=device)
           if n_tt and not tt_in_regs else None)
    dword = None if factorized else torch.zeros((word_weight.shape[0], h), dtype=torch.float32,
                                                device=device)
    g2d = grad.reshape(m, h)
    dx = empty((m, h), torch.float32 if up else dtype, device) if factorized else g2d
    part = empty((row_programs(triton.cdiv(m, cfg.block_m), device), 4, h), torch.float32,
                 device)
    pad_word = padding_idx % word_weight.shape[0] if padding_idx is not None else -1
    pad_pos = (position_padding_idx % position_weight.shape[0]
               if position_padding_idx is not None else -1)
    _bwd_launch(g2d, ids, pos, tt, word_weight, wrows if factorized else _no_rows(device),
                not factorized, position_weight, token_type_weight, ln_weight, mean, rstd, eps,
                pad_word, pad_pos, dword, dpos, dtt, tt_in_regs, dx, part, cfg)()
    sums = part.sum(0)  # [4, h]: d_ln_weight, d_ln_bias, token types 0 and 1
    if factorized:
        dword = torch.zeros((word_weight.shape[0], word_weight.shape[1]), dtype=torch.float32,
                            device=device)
        _matmul_launch(dx, word_proj, dword, ids, c_scatter=True, skip_row=pad_word,
                       upcast=up)()
        dproj = empty(word_proj.shape, torch.float32, device)
        _matmul_launch(dx.t(), word_weight, dproj, ids, b_gather=True, upcast=up)()
        d_proj = dproj.to(word_proj.dtype)
    else:
        d_proj = word_weight.new_empty(0)
    if n_tt == 0:
        d_tt = word_weight.new_empty(0)
    elif tt_in_regs:
        d_tt = sums[2:2 + n_tt].to(token_type_weight.dtype, copy=True)
    else:
        d_tt = dtt.to(token_type_weight.dtype)
    return (dword.to(dtype), d_proj, dpos.to(position_weight.dtype), d_tt,
            sums[0].to(ln_weight.dtype, copy=True), sums[1].to(ln_bias.dtype, copy=True))


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------

_EXAMPLE_TOKENS, _EXAMPLE_VOCAB, _EXAMPLE_RANK = 256, 512, 128


def _example_matmuls(dtype: torch.dtype, cfg: TileConfig) -> list[tuple[str, Launch]]:
    """The three products of a factorized table (contiguous aligned tables, sizes multiples of
    16): the forward projection (A gathered), the word-table gradient (C scattered) and the
    projection gradient (B gathered, A transposed)."""
    m, v, e, h = _EXAMPLE_TOKENS, _EXAMPLE_VOCAB, _EXAMPLE_RANK, 256
    table = torch.empty(v, e, dtype=dtype)
    proj = torch.empty(h, e, dtype=dtype)
    ids = torch.empty(m, dtype=torch.int32)
    dx = torch.empty(m, h, dtype=dtype)
    rows, dword, dproj = torch.empty(m, h), torch.empty(v, e), torch.empty(h, e)
    return [
        ("proj", _matmul_launch(table, proj.t(), rows, ids, a_gather=True, upcast=False,
                                cfg=cfg)),
        ("dword", _matmul_launch(dx, proj, dword, ids, c_scatter=True, upcast=False, cfg=cfg)),
        ("dproj", _matmul_launch(dx.t(), table, dproj, ids, b_gather=True, upcast=False,
                                 cfg=cfg)),
    ]


def _example_rows(dtype: torch.dtype, block_n: int) -> list[Launch]:
    """The row kernels for contiguous aligned tables with hidden = ``block_n``: token types with
    more rows than fit in registers (their atomics compiled), kept statistics, a dense table.
    (Table kind, token types, statistics and padding are runtime flags: one variant each.)"""
    m, h = _EXAMPLE_TOKENS, block_n
    rows, warps = ROW_TILES[block_n]
    cfg = TileConfig(rows, block_n, 0, warps, 1)
    ids = torch.empty(m, dtype=torch.int32)
    table = torch.empty(_EXAMPLE_VOCAB, h, dtype=dtype)
    vec = torch.empty(h, dtype=dtype)
    out = torch.empty(m, h, dtype=dtype)
    wrows, stats = torch.empty(m, h), torch.empty(m)
    acc = torch.empty(_EXAMPLE_VOCAB, h)
    part = torch.empty(64, 4, h)
    fwd = _fwd_launch(ids, ids, ids, table, wrows, True, table, table, vec, vec, out, stats,
                      stats, 1e-12, cfg)
    bwd = _bwd_launch(out, ids, ids, ids, table, wrows, True, table, table, vec, stats, stats,
                      1e-12, 0, -1, acc, acc, acc, False, out, part, cfg)
    return [fwd, bwd]


def launch_specs() -> list[LaunchSpec]:
    """Every (kernel, dtype, tile) the launchers can use: ``contig`` specs are the JIT's
    specialisation for contiguous aligned tables and ids whose sizes are multiples of 16 (for
    the products, one per use: their unit strides sit on different operands), ``generic`` the
    unspecialised variant (the bound of every other launch). Gathers, scatter, token types,
    statistics and padding indices are runtime flags. torch.empty only: the lowering worker forks
    after calling this."""
    specs = []
    variants = (("contig", True), ("generic", False))
    for dtype, ((fp32, size), cfg) in itertools.product(DTYPES, GEMM_TILES.items()):
        if fp32 != (dtype == torch.float32):
            continue
        launches = _example_matmuls(dtype, cfg)
        label = f"{TL_DTYPES[dtype]},{size}"
        for use, launch in launches:
            specs.append(launch.spec(f"{label},{use},contig", TL_DTYPES[dtype], True))
        specs.append(launches[0][1].spec(f"{label},generic", TL_DTYPES[dtype], False))
    for dtype, block_n in itertools.product(DTYPES, ROW_TILES):
        for launch, (variant, specialize) in itertools.product(_example_rows(dtype, block_n),
                                                               variants):
            specs.append(launch.spec(f"{TL_DTYPES[dtype]},N{block_n},{variant}", None,
                                     specialize))
    return specs

"""Triton kernels for ``attention``: flash-attention forward and backward.

``scores = scale * q k^T + bias`` (keys with ``mask == False`` excluded), ``P = softmax(scores)``
over the keys, ``out = P v``, per (batch, head). ``q: [B, H, Lq, D]``, ``k, v: [B, H, Lk, D]`` are
read through their strides (the op passes transposed views of a fused ``[B, L, 3, H, D]`` QKV
tensor; nothing is copied); ``mask`` is a bool ``[B, Lk]`` key padding mask (True = attend) and
``bias`` an additive score bias broadcastable to ``[B, H, Lq, Lk]`` (read through the strides of
its ``expand``, 0 on broadcast dims), in q's dtype or float32.

Forward (:func:`attention_fwd_kernel`): one program per (query block, batch x head). It keeps its
``[BLOCK_M, BLOCK_D]`` q tile and fp32 output accumulator on chip and streams the key/value blocks
through an online softmax (running row max ``m`` and row sum ``l``, in base 2: the scores are
scaled by ``log2(e)`` so the exponentials are ``exp2``); the ``[Lq, Lk]`` score matrix is never
written. It stores ``out`` (``[B, H, Lq, D]`` with the memory layout ``[B, Lq, H, D]``, the layout
the output projection reads) and ``lse``, the natural log-sum-exp of each query row's scores
(float32 ``[B, H, Lq]``), which the backward uses to recompute ``P`` exactly.

Fully masked query rows (every key masked, or every score ``-inf``): ``out`` is 0 and ``lse`` is
``-inf`` (the log of an empty sum, as in ``rosita_fast.ops.attention.reference_forward``). The
backward kernels read such an ``lse`` (and ``+inf``, flash-attention's sentinel) as ``+inf``, which
makes ``P = exp(scores - lse)`` exactly 0 for every key of the row (``exp(-inf)``, never
``-inf - (-inf)``): its ``dq``, its share of ``dk``/``dv`` and its row of ``dbias`` are zeros
without a special case.

Backward, the standard two kernels (plus nothing else: the ``delta`` preprocess is fused):

- :func:`attention_bwd_dq_kernel`, one program per (query block, batch x head), launched first:
  ``delta = rowsum(dO * O)`` for its rows (stored, fp32 ``[B, H, Lq]``), then over the key
  blocks ``P = exp(S - lse)``, ``dS = P * (dO v^T - delta)``, ``dq += dS k``; ``dq *= scale``;
- :func:`attention_bwd_dkdv_kernel`, one program per (key block, batch x head): over the query
  blocks ``dv += P^T dO``, ``dk += dS^T q`` (``dk *= scale``) and, when the bias needs a gradient,
  stores ``dS`` as ``dbias_full`` (fp32 ``[B, H, Lq, Lk]``; the op reduces it over the bias's
  broadcast dims): every ``(query, key)`` tile is visited exactly once by this kernel.

``dq``, ``dk`` and ``dv`` are returned as ``[B, H, L, D]`` views of ``[B, L, H, D]`` buffers, like
``out``.

Dropout (training, ``dropout_p > 0``): the counter-based dropout of ``rosita_fast.ops._dropout``
(:func:`~rosita_fast.kernels._common.dropout_keep`, bit for bit the reference's) on the
probabilities, element (b, h, query i, key j) at row ``(b * H + h) * Lq + i``, column ``j``;
``Z = keep * scale``. The forward multiplies ``P Z`` into ``v`` while ``l`` (hence ``lse``) sums
the undropped ``P``; the backward regenerates ``Z`` per tile: ``dV += (P Z)^T dO``,
``dP = (dO v^T) Z``, ``dS = P (dP - delta)`` (``delta = rowsum(dO * O)`` of the dropped output is
still ``rowsum(P dP)``). ``DROPOUT`` is a constexpr, so dropout-free launches compile exactly the
code they did without it; the seed (int32: the 32-bit seed's bits) and the threshold are
``do_not_specialize`` runtime arguments, so every seed and probability shares one compiled
variant.

Mask, bias and bias-gradient are runtime flags (uniform branches; the key mask is a
``BLOCK_N``-element load per block), so they do not multiply the compiled variants; the bias's
pointer type does (q's dtype or float32).

Precision, as in :mod:`rosita_fast.kernels.lowrank_linear`: fp32 inputs run every product with
``input_precision="tf32x3"``; fp16/bf16 inputs go to ``tl.dot`` in their own dtype (tensor cores,
fp32 accumulation), with ``P`` and ``dS`` rounded to the input dtype before their products, as
flash-attention does; scores, softmax statistics and accumulators are fp32. Under the CPU
interpreter (``UPCAST``) fp16/bf16 operands are upcast to fp32 after loading (the interpreter
multiplies bf16 wrongly). Tile pointer offsets are 64-bit (:func:`offsets_2d`); the per-(batch,
head) base offsets are int64 scalars.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

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
    load_tile,
    offsets_2d,
    seed_int32,
    triton_interpreting,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Largest head dim the kernels tile (the q tile and accumulators stay on chip).
MAX_HEAD_DIM = 128
#: BLOCK_D values: the head dim padded to the next power of two (masked loads), at least 32 (head
#: dims 8 and 16 are rare enough not to be worth their own compiled variants).
HEAD_TILES = (32, 64, 128)


# ----------------------------------------------------------------------------------------------
# Shared device code
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scores(
    q, k, bias_base, mask_base, offs_m, offs_n, m_valid, n_valid, qk_scale,
    stride_biasm, stride_biasn, stride_maskn,
    HAS_MASK, HAS_BIAS, PRECISION: tl.constexpr,
):
    """The [BLOCK_M, BLOCK_N] fp32 scores of a (query, key) tile in base 2,
    ``log2(e) * (scale * q k^T + bias)``, ``-inf`` on masked and out-of-range keys."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        b = tl.load(
            bias_base + offsets_2d(offs_m, offs_n, stride_biasm, stride_biasn),
            mask=m_valid[:, None] & n_valid[None, :],
            other=0.0,
        )
        s += b.to(tl.float32) * 1.4426950408889634
    attend = n_valid
    if HAS_MASK:
        keep = tl.load(mask_base + offs_n.to(tl.int64) * stride_maskn, mask=n_valid, other=0)
        attend = attend & (keep != 0)
    return tl.where(attend[None, :], s, float("-inf"))


@triton.jit
def _lse_base2(ptrs, valid):
    """The rows' lse in base 2 (``lse * log2(e)``) for ``p = exp2(s - lse2)``. A row without keys
    (lse ``-inf``, or ``+inf`` from another convention) and a padding row get ``+inf``: its
    scores are all ``-inf`` (or it is not stored), and ``exp2(s - inf)`` is 0 for every score,
    where ``-inf - (-inf)`` would be NaN."""
    lse = tl.load(ptrs, mask=valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit(do_not_specialize=["H", "M_BLOCKS", "HAS_MASK", "HAS_BIAS", "seed", "drop_threshold"])
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, out_ptr, lse_ptr,
    H, LQ, LK, HEAD_DIM, M_BLOCKS, scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_ob, stride_oh, stride_om, stride_od,
    HAS_MASK, HAS_BIAS, seed, drop_threshold, drop_scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``pid = bh * M_BLOCKS + query block`` (a 1-D grid: no 65535 limit on B x H;
    neighbouring programs share a head's keys and values). DROPOUT: ``P Z`` goes into the
    product with v, the undropped ``P`` into ``l``."""
    pid = tl.program_id(0)
    pid_m = pid % M_BLOCKS
    pid_bh = pid // M_BLOCKS
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < LQ
    d_valid = offs_d < HEAD_DIM
    q = load_tile(
        q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd,
        m_valid, d_valid, UPCAST,
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_biasb + h * stride_biash
    mask_base = mask_ptr + b * stride_maskb
    qk_scale = scale * 1.4426950408889634
    drop_rows = pid_bh.to(tl.int64) * LQ + offs_m  # the dropout hash's row coordinates

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, LK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < LK
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_valid, d_valid, UPCAST)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_valid, d_valid, UPCAST)
        s = _scores(
            q, k, bias_base, mask_base, offs_m, offs_n, m_valid, n_valid, qk_scale,
            stride_biasm, stride_biasn, stride_maskn, HAS_MASK, HAS_BIAS, PRECISION,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no attended key so far has m_new = -inf: shift by 0 instead (its p and
        # alpha are exp2(-inf) = 0, never exp2(-inf - -inf) = NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = dropout_keep(seed, drop_rows, offs_n, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]  # a row without keys has acc = 0: out = 0
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offsets_2d(offs_m, offs_d, stride_om, stride_od),
        out.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=m_valid)


@triton.jit(do_not_specialize=["H", "M_BLOCKS", "HAS_MASK", "HAS_BIAS", "seed", "drop_threshold"])
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, LQ, LK, HEAD_DIM, M_BLOCKS, scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    HAS_MASK, HAS_BIAS, seed, drop_threshold, drop_scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``bh * M_BLOCKS + query block``: delta = rowsum(dO * O) (stored for the dK/dV
    kernel, launched after this one), then dq over every key block (DROPOUT: with
    ``dP = (dO v^T) Z``)."""
    pid = tl.program_id(0)
    pid_m = pid % M_BLOCKS
    pid_bh = pid // M_BLOCKS
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < LQ
    d_valid = offs_d < HEAD_DIM
    q = load_tile(
        q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd,
        m_valid, d_valid, UPCAST,
    )
    do = load_tile(
        do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod,
        m_valid, d_valid, UPCAST,
    )
    o = load_tile(
        out_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od,
        m_valid, d_valid, UPCAST,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * LQ + offs_m
    tl.store(delta_ptr + row, delta, mask=m_valid)
    lse2 = _lse_base2(lse_ptr + row, m_valid)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_biasb + h * stride_biash
    mask_base = mask_ptr + b * stride_maskb
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, LK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < LK
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_valid, d_valid, UPCAST)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_valid, d_valid, UPCAST)
        s = _scores(
            q, k, bias_base, mask_base, offs_m, offs_n, m_valid, n_valid, qk_scale,
            stride_biasm, stride_biasn, stride_maskn, HAS_MASK, HAS_BIAS, PRECISION,
        )
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, row, offs_n, drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq = dq * scale
    tl.store(
        dq_ptr + b * stride_dqb + h * stride_dqh
        + offsets_2d(offs_m, offs_d, stride_dqm, stride_dqd),
        dq.to(dq_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


@triton.jit(do_not_specialize=["H", "N_BLOCKS", "HAS_MASK", "HAS_BIAS", "BIAS_GRAD", "seed",
                               "drop_threshold"])
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dbias_ptr,
    H, LQ, LK, HEAD_DIM, N_BLOCKS, scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HAS_MASK, HAS_BIAS, BIAS_GRAD, seed, drop_threshold, drop_scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``bh * N_BLOCKS + key block``: dk and dv of its keys over every query block, and
    (BIAS_GRAD) ``dS`` of each tile into the contiguous fp32 ``dbias [B, H, LQ, LK]``. DROPOUT:
    dv takes ``P Z``, ``dP = (dO v^T) Z``."""
    pid = tl.program_id(0)
    pid_n = pid % N_BLOCKS
    pid_bh = pid // N_BLOCKS
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < LK
    d_valid = offs_d < HEAD_DIM
    k = load_tile(
        k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd,
        n_valid, d_valid, UPCAST,
    )
    v = load_tile(
        v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd,
        n_valid, d_valid, UPCAST,
    )
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    bias_base = bias_ptr + b * stride_biasb + h * stride_biash
    mask_base = mask_ptr + b * stride_maskb
    row_base = pid_bh.to(tl.int64) * LQ
    dbias_base = dbias_ptr + row_base * LK
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, LQ, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < LQ
        q = load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, m_valid, d_valid, UPCAST)
        do = load_tile(
            do_base, offs_m, offs_d, stride_dom, stride_dod, m_valid, d_valid, UPCAST
        )
        lse2 = _lse_base2(lse_ptr + row_base + offs_m, m_valid)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
        s = _scores(
            q, k, bias_base, mask_base, offs_m, offs_n, m_valid, n_valid, qk_scale,
            stride_biasm, stride_biasn, stride_maskn, HAS_MASK, HAS_BIAS, PRECISION,
        )
        p = tl.math.exp2(s - lse2[:, None])
        if DROPOUT:
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            keep = dropout_keep(seed, row_base + offs_m, offs_n, drop_threshold)
            ds = p * (tl.where(keep, dp * drop_scale, 0.0) - delta[:, None])
            pz = tl.where(keep, p * drop_scale, 0.0)
            dv = tl.dot(tl.trans(pz.to(do.dtype)), do, dv, input_precision=PRECISION)
        else:
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(
                dbias_base + offsets_2d(offs_m, offs_n, LK, 1),
                ds,
                mask=m_valid[:, None] & n_valid[None, :],
            )
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    dk = dk * scale
    nd_mask = n_valid[:, None] & d_valid[None, :]
    tl.store(
        dk_ptr + b * stride_dkb + h * stride_dkh
        + offsets_2d(offs_n, offs_d, stride_dkn, stride_dkd),
        dk.to(dk_ptr.dtype.element_ty),
        mask=nd_mask,
    )
    tl.store(
        dv_ptr + b * stride_dvb + h * stride_dvh
        + offsets_2d(offs_n, offs_d, stride_dvn, stride_dvd),
        dv.to(dv_ptr.dtype.element_ty),
        mask=nd_mask,
    )


# ----------------------------------------------------------------------------------------------
# Launch configurations: every tile shape the launchers can pick on the GPU (no autotuning), so
# the lowering tests compile each ahead of time. Keyed by (fp32 operands, head tile); chosen (by
# the resource usage of the compiled cubins, without a GPU to time them) for no register spills in
# the contig variants on sm_80 and sm_90, except on sm_80 for fp16/bf16 at D64: dk/dv (32-40 bytes
# of stack) and dq with a float32 bias (112 bytes). The dropout variants (the same tiles: the hash
# is integer work on the score tile) spill there a little more: dk/dv 104 bytes, dq 32 (128 with a
# float32 bias); none elsewhere (cuobjdump resource usage). The generic variants (nothing folded:
# every element address computed apart) spill more; real launches always fold q/k/v's unit inner
# stride. fp32 operands take three TF32 products each (tf32x3: operands split in high and low
# parts) and twice the shared memory per tile: much smaller tiles. block_k is the head tile.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionTiles:
    fwd: TileConfig  # block_m: queries per program, block_n: keys per step
    dq: TileConfig  # block_m: queries per program, block_n: keys per step
    dkdv: TileConfig  # block_n: keys per program, block_m: queries per step


def _t(bm: int, bn: int, bd: int, warps: int, stages: int) -> TileConfig:
    return TileConfig(bm, bn, bd, warps, stages)


TILES: dict[tuple[bool, int], AttentionTiles] = {
    # fp16 / bf16 operands
    (False, 32): AttentionTiles(_t(128, 64, 32, 8, 3), _t(64, 64, 32, 4, 2), _t(32, 64, 32, 4, 2)),
    (False, 64): AttentionTiles(_t(128, 64, 64, 8, 3), _t(64, 64, 64, 4, 2), _t(32, 64, 64, 4, 2)),
    (False, 128): AttentionTiles(
        _t(128, 32, 128, 8, 3), _t(64, 64, 128, 8, 2), _t(32, 64, 128, 8, 2)
    ),
    # fp32 operands
    (True, 32): AttentionTiles(_t(64, 32, 32, 4, 2), _t(32, 32, 32, 4, 2), _t(16, 32, 32, 4, 2)),
    (True, 64): AttentionTiles(_t(32, 32, 64, 4, 2), _t(32, 32, 64, 4, 2), _t(16, 32, 64, 4, 2)),
    (True, 128): AttentionTiles(
        _t(64, 16, 128, 8, 2), _t(16, 32, 128, 8, 2), _t(16, 32, 128, 8, 2)
    ),
}

_forced_block: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "rosita_fast_attention_block", default=None
)


@contextlib.contextmanager
def forced_block(block: int) -> Iterator[None]:
    """Inside the block every launch uses ``BLOCK_M = BLOCK_N = block`` (tests: small tiles make
    short sequences cross several blocks under the interpreter, also through the public op). On
    the GPU such tiles are outside the launch table (not lowering-checked): tests only."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"a forced block must be a power of two, got {block}")
    token = _forced_block.set(block)
    try:
        yield
    finally:
        _forced_block.reset(token)


def head_tile(head_dim: int) -> int:
    """The BLOCK_D a head dim is padded to; raises for head dims the kernels do not tile."""
    for tile in HEAD_TILES:
        if head_dim <= tile:
            return tile
    raise ValueError(
        f"the Triton attention kernels keep a head on chip and support head dim <= "
        f"{MAX_HEAD_DIM}, got {head_dim}"
    )


def _tiles(dtype: torch.dtype, block_d: int, block: int | None) -> AttentionTiles:
    tiles = TILES[(dtype == torch.float32, block_d)]
    block = _forced_block.get() if block is None else block
    if block is None:
        return tiles

    def force(cfg: TileConfig) -> TileConfig:
        return TileConfig(block, block, cfg.block_k, cfg.num_warps, cfg.num_stages)

    return AttentionTiles(force(tiles.fwd), force(tiles.dq), force(tiles.dkdv))


# ----------------------------------------------------------------------------------------------
# Argument dicts
# ----------------------------------------------------------------------------------------------


@functools.cache
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element buffer passed for an absent mask / bias / dbias (never read or written): the
    same pointer type, and 16-byte aligned like a real one, so absent and present arguments share
    one compiled variant."""
    return torch.zeros(1, dtype=dtype, device=device)


def _upcast(dtype: torch.dtype, upcast: bool | None) -> bool:
    """Whether fp16/bf16 operands are upcast to fp32 in the kernels (see the module docstring)."""
    if dtype == torch.float32:
        return False
    return triton_interpreting() if upcast is None else bool(upcast)


def _strides(prefix: str, t: torch.Tensor) -> dict[str, int]:
    """``stride_<prefix>{b,h,m,d}`` of a ``[B, H, L, D]`` tensor."""
    return {f"stride_{prefix}{axis}": s for axis, s in zip("bhmd", t.stride(), strict=True)}


def _kv_strides(prefix: str, t: torch.Tensor) -> dict[str, int]:
    return {f"stride_{prefix}{axis}": s for axis, s in zip("bhnd", t.stride(), strict=True)}


def _mask_bias_args(q, k, mask, bias) -> dict:
    """Pointers, strides and flags of the optional mask and bias. Absent: a placeholder of the
    same pointer type, batch strides 0 and unit inner strides (the values a contiguous mask /
    bias specialise to, so absent and present share one compiled variant)."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    device = q.device
    if mask is not None:
        mask_args = dict(
            mask_ptr=mask, stride_maskb=mask.stride(0), stride_maskn=mask.stride(1), HAS_MASK=1
        )
    else:
        mask_args = dict(
            mask_ptr=_placeholder(device, torch.bool), stride_maskb=0, stride_maskn=1, HAS_MASK=0
        )
    if bias is not None:
        full = bias.expand(b, h, lq, lk)  # stride 0 on broadcast dims, no copy
        bias_args = dict(
            bias_ptr=bias,
            stride_biasb=full.stride(0), stride_biash=full.stride(1),
            stride_biasm=full.stride(2), stride_biasn=full.stride(3), HAS_BIAS=1,
        )
    else:
        bias_args = dict(
            bias_ptr=_placeholder(device, q.dtype),
            stride_biasb=0, stride_biash=0, stride_biasm=0, stride_biasn=1, HAS_BIAS=0,
        )
    return {**mask_args, **bias_args}


def _dropout_args(dropout_p: float, seed: int) -> dict:
    """The dropout arguments: the DROPOUT constexpr and the runtime seed (the 32-bit seed's bits
    as an int32, the type the JIT gives every seed), threshold and scale (without dropout: values
    that are never read, of the same types)."""
    if dropout_p == 0:
        return dict(seed=0, drop_threshold=0, drop_scale=1.0, DROPOUT=False)
    return dict(
        seed=seed_int32(seed),
        drop_threshold=dropout_threshold(dropout_p), drop_scale=float(dropout_scale(dropout_p)),
        DROPOUT=True,
    )


def _common_args(q, k, v, mask, bias, scale, upcast: bool, block_d: int, dropout_p: float,
                 seed: int) -> dict:
    b, h, lq, d = q.shape
    return dict(
        H=h, LQ=lq, LK=k.shape[2], HEAD_DIM=d, scale=float(scale),
        **_strides("q", q), **_kv_strides("k", k), **_kv_strides("v", v),
        **_mask_bias_args(q, k, mask, bias), **_dropout_args(dropout_p, seed),
        UPCAST=upcast, PRECISION=dot_precision(q.dtype), BLOCK_D=block_d,
    )


def _check(q, k, v, mask, bias, dropout_p: float = 0.0) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if q.dtype not in DTYPES:
        raise TypeError(
            f"the Triton attention kernels support {', '.join(map(str, DTYPES))}; got {q.dtype} "
            "(use the 'cpp' or 'reference' backend for float64)"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be [B, H, L, D]")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    head_tile(d)
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (b, k.shape[2])):
        raise ValueError(f"attention: mask must be bool [B, Lk], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if bias is not None and bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"attention: bias dtype {bias.dtype} is neither q's nor float32")


def _bhld_empty(b: int, h: int, length: int, d: int, dtype, device) -> torch.Tensor:
    """A [B, H, L, D] tensor with the memory layout [B, L, H, D] (poisonable)."""
    return empty((b, length, h, d), dtype, device).transpose(1, 2)


def _forward_launch(q, k, v, mask, bias, scale, out, lse, upcast: bool, block,
                    dropout_p: float = 0.0, seed: int = 0) -> Launch:
    b, h, lq, d = q.shape
    block_d = head_tile(d)
    cfg = _tiles(q.dtype, block_d, block).fwd
    m_blocks = triton.cdiv(lq, cfg.block_m)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, lse_ptr=lse, M_BLOCKS=m_blocks,
        **_common_args(q, k, v, mask, bias, scale, upcast, block_d, dropout_p, seed),
        **_strides("o", out), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    return Launch(attention_fwd_kernel, (m_blocks * b * h,), args, cfg)


def _backward_launches(
    grad, q, k, v, out, lse, mask, bias, scale, bias_needs_grad: bool, upcast: bool, block,
    dropout_p: float = 0.0, seed: int = 0,
) -> tuple[Launch, Launch, dict[str, torch.Tensor | None]]:
    """The dq launch (first: it writes delta) and the dk/dv launch, and the buffers they write."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    device = q.device
    block_d = head_tile(d)
    tiles = _tiles(q.dtype, block_d, block)
    bufs = {
        "dq": _bhld_empty(b, h, lq, d, q.dtype, device),
        "dk": _bhld_empty(b, h, lk, d, q.dtype, device),
        "dv": _bhld_empty(b, h, lk, d, q.dtype, device),
        "delta": empty((b, h, lq), torch.float32, device),
        "dbias": empty((b, h, lq, lk), torch.float32, device) if bias_needs_grad else None,
    }
    common = _common_args(q, k, v, mask, bias, scale, upcast, block_d, dropout_p, seed)
    cfg = tiles.dq
    m_blocks = triton.cdiv(lq, cfg.block_m)
    dq_args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, do_ptr=grad, lse_ptr=lse,
        delta_ptr=bufs["delta"], dq_ptr=bufs["dq"], M_BLOCKS=m_blocks, **common,
        **_strides("o", out), **_strides("do", grad), **_strides("dq", bufs["dq"]),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    dq_launch = Launch(attention_bwd_dq_kernel, (m_blocks * b * h,), dq_args, cfg)

    cfg = tiles.dkdv
    n_blocks = triton.cdiv(lk, cfg.block_n)
    dbias = bufs["dbias"] if bias_needs_grad else _placeholder(device, torch.float32)
    dkdv_args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=grad, lse_ptr=lse, delta_ptr=bufs["delta"],
        dk_ptr=bufs["dk"], dv_ptr=bufs["dv"], dbias_ptr=dbias, N_BLOCKS=n_blocks, **common,
        **_strides("do", grad), **_kv_strides("dk", bufs["dk"]), **_kv_strides("dv", bufs["dv"]),
        BIAS_GRAD=int(bias_needs_grad), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
    dkdv_launch = Launch(attention_bwd_dkdv_kernel, (n_blocks * b * h,), dkdv_args, cfg)
    return dq_launch, dkdv_launch, bufs


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions; checks of the public op and autograd live in rosita_fast.ops)
# ----------------------------------------------------------------------------------------------


def attention_train(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    block: int | None = None,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: the attention output (``[B, H, Lq, D]``, memory layout ``[B, Lq, H, D]``,
    q's dtype) and the float32 ``[B, H, Lq]`` natural log-sum-exp of each query row's scores,
    ``-inf`` for a row whose keys are all masked (its output is 0; see the module docstring).
    ``dropout_p`` (in ``[0, 1)``) and ``seed`` (taken modulo 2^32): the probabilities' dropout
    (see the module docstring); ``lse`` is the undropped softmax's.

    ``block`` forces ``BLOCK_M = BLOCK_N`` (default: the launch table, or :func:`forced_block`);
    ``upcast`` forces the fp32-operand path for fp16/bf16 (default: exactly under the
    interpreter). Both exist for tests; the op layer uses the defaults.
    """
    _check(q, k, v, mask, bias, dropout_p)
    b, h, lq, d = q.shape
    out = _bhld_empty(b, h, lq, d, q.dtype, q.device)
    lse = empty((b, h, lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    _forward_launch(q, k, v, mask, bias, scale, out, lse, _upcast(q.dtype, upcast), block,
                    dropout_p, seed)()
    return out, lse


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    *,
    block: int | None = None,
    upcast: bool | None = None,
) -> torch.Tensor:
    """The attention output alone, without dropout (see :func:`attention_train`; the same
    kernel, its ``lse``, a ``[B, H, Lq]`` float32 vector, is dropped)."""
    return attention_train(q, k, v, mask, bias, scale, block=block, upcast=upcast)[0]


def attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    bias_needs_grad: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    *,
    block: int | None = None,
    upcast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dbias_full)`` from the upstream gradient ``grad`` of ``out``, with the
    forward's ``out`` and ``lse`` (:func:`attention_train`). ``dq``/``dk``/``dv`` are in q's dtype
    with the memory layout ``[B, L, H, D]``; ``dbias_full`` is the float32 ``[B, H, Lq, Lk]``
    score gradient when there is a bias and ``bias_needs_grad`` (the caller sums it over the
    bias's broadcast dims), else None. Rows whose keys are all masked (``lse = -inf``, or
    ``+inf``) get zero gradients. ``dropout_p``, ``seed``: the forward's (the mask is regenerated
    from them). ``block`` / ``upcast``: see :func:`attention_train`.
    """
    _check(q, k, v, mask, bias, dropout_p)
    if grad.shape != q.shape or out.shape != q.shape or grad.dtype != q.dtype \
            or out.dtype != q.dtype:
        raise ValueError(
            f"attention backward: grad {grad.dtype} {tuple(grad.shape)} and out {out.dtype} "
            f"{tuple(out.shape)} must match q {q.dtype} {tuple(q.shape)}"
        )
    if lse.dtype != torch.float32 or lse.shape != q.shape[:3]:
        raise ValueError(f"attention backward: lse must be float32 {tuple(q.shape[:3])}")
    lse = lse.contiguous()  # [B, H, Lq] floats: the kernels index it as a flat row array
    dq_launch, dkdv_launch, bufs = _backward_launches(
        grad, q, k, v, out, lse, mask, bias, scale, bias is not None and bool(bias_needs_grad),
        _upcast(q.dtype, upcast), block, dropout_p, seed,
    )
    # dq first: it writes delta. An empty side (Lq or Lk = 0) leaves the other side's gradients
    # zero (its loop is empty), and dbias empty.
    for launch in (dq_launch, dkdv_launch):
        if launch.grid[0] > 0:
            launch()
    return bufs["dq"], bufs["dk"], bufs["dv"], bufs["dbias"]


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------

_EXAMPLE_B, _EXAMPLE_H, _EXAMPLE_L = 2, 3, 128


def _example_launches(dtype: torch.dtype, bias_dtype: torch.dtype, block_d: int,
                      dropout: bool) -> list[Launch]:
    """The launches the launchers make on the GPU (native path, table tiles) for q/k/v taken from
    a fused ``[B, L, 3, H, D]`` QKV tensor with 16-byte aligned rows and lengths that are multiples
    of 16, a key padding mask and a full bias of ``bias_dtype`` with its gradient, with or without
    dropout. (Mask and bias are runtime flags: without them the launches specialise the same way;
    so are the dropout's seed and probability.)"""
    b, h, length, d = _EXAMPLE_B, _EXAMPLE_H, _EXAMPLE_L, block_d
    # torch.empty only: the lowering worker forks after calling this, and a parallel fill would
    # start OpenMP threads in the parent (forked children then deadlock). Values are never read.
    qkv = torch.empty(b, length, 3, h, d, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    mask = torch.empty(b, length, dtype=torch.bool)
    bias = torch.empty(b, h, length, length, dtype=bias_dtype)
    out = torch.empty(b, length, h, d, dtype=dtype).transpose(1, 2)
    lse = torch.empty(b, h, length)
    drop = (0.1, 0xDEADBEEF) if dropout else (0.0, 0)
    fwd = _forward_launch(q, k, v, mask, bias, 0.125, out, lse, False, None, *drop)
    dq, dkdv, _ = _backward_launches(out, q, k, v, out, lse, mask, bias, 0.125, True, False, None,
                                     *drop)
    return [fwd, dq, dkdv]


def _dtype_pairs() -> list[tuple[torch.dtype, torch.dtype]]:
    """(q dtype, bias dtype) pairs: the bias is q's dtype or float32."""
    pairs = []
    for dtype in DTYPES:
        pairs.append((dtype, dtype))
        if dtype != torch.float32:
            pairs.append((dtype, torch.float32))
    return pairs


def launch_specs() -> list[LaunchSpec]:
    """Every (kernel, q dtype, bias dtype, head tile, dropout or not) the launchers can use,
    twice: ``contig`` is
    the JIT's specialisation for aligned q/k/v views of a fused QKV tensor whose sizes and strides
    are multiples of 16 (unit inner strides folded to constants, sizes, strides and pointers
    marked divisible by 16), ``generic`` the unspecialised variant (nothing folded or assumed),
    the bound of every other launch. Mask, bias and bias gradient are runtime flags, so they do
    not multiply the variants; the bias's dtype does (it is the bias pointer's type), and so does
    dropout (the DROPOUT constexpr; labelled ``dropout``). The interpreter-only ``UPCAST`` path
    is not lowered."""
    specs = []
    for (dtype, bias_dtype), block_d, dropout in itertools.product(
        _dtype_pairs(), HEAD_TILES, (False, True)
    ):
        bias_label = "" if bias_dtype == dtype else f",bias_{TL_DTYPES[bias_dtype]}"
        drop_label = ",dropout" if dropout else ""
        for launch in _example_launches(dtype, bias_dtype, block_d, dropout):
            for variant, specialize in (("contig", True), ("generic", False)):
                label = f"{TL_DTYPES[dtype]}{bias_label}{drop_label},D{block_d},{variant}"
                specs.append(launch.spec(label, TL_DTYPES[dtype], specialize))
    return specs

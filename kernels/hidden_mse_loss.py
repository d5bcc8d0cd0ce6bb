"""Triton kernels of ``rosita_fast.ops.hidden_mse_loss``: every layer pair in one launch.

The states of all pairs reach the kernels as tables of base addresses (one int64 per pair, cast
to a pointer of the states' element type in the kernel, which takes that type from a witness
argument: the first student state) and row strides, so one grid covers (pair, block of rows) for
the forward and the same for the gradient. The forward writes each program's sum of squared
differences over its kept rows (fp32) into a ``[pairs, row blocks]`` buffer that the launcher
sums in block order (deterministic); the backward writes ``2 (s - t) g_i / (kept rows * H)``
(0 on dropped rows) into each student state's gradient. Rows are walked in ``BLOCK_H`` pieces, so
any hidden size works. fp16/bf16 are read as such and computed in fp32; fp64 is not served
(TypeError: use the C++ backend). Row offsets are 64-bit.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import DTYPES, TL_DTYPES, Launch, LaunchSpec, TileConfig, empty, offsets_2d

BLOCK_M = 16
BLOCK_H = 128
WARPS = 4


@triton.jit(do_not_specialize=["P"])
def hidden_mse_fwd_kernel(
    s_ptrs, t_ptrs, s_lds, t_lds, witness_ptr, mask_ptr, part_ptr,
    P, M, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    s_base = tl.load(s_ptrs + pair).to(witness_ptr.dtype)
    t_base = tl.load(t_ptrs + pair).to(witness_ptr.dtype)
    s_ld = tl.load(s_lds + pair)
    t_ld = tl.load(t_lds + pair)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    keep = (rows < M) & (tl.load(mask_ptr + rows, mask=rows < M, other=0) != 0)
    acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = keep[:, None] & (cols < H)[None, :]
        s = tl.load(s_base + offsets_2d(rows, cols, s_ld, 1), mask=m, other=0.0)
        t = tl.load(t_base + offsets_2d(rows, cols, t_ld, 1), mask=m, other=0.0)
        d = s.to(tl.float32) - t.to(tl.float32)
        acc += d * d
    tl.store(part_ptr + pair * tl.num_programs(1) + blk, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit(do_not_specialize=["P"])
def hidden_mse_bwd_kernel(
    s_ptrs, t_ptrs, g_ptrs, s_lds, t_lds, witness_ptr, mask_ptr, coef_ptr,
    P, M, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    s_base = tl.load(s_ptrs + pair).to(witness_ptr.dtype)
    t_base = tl.load(t_ptrs + pair).to(witness_ptr.dtype)
    g_base = tl.load(g_ptrs + pair).to(witness_ptr.dtype)
    s_ld = tl.load(s_lds + pair)
    t_ld = tl.load(t_lds + pair)
    coef = tl.load(coef_ptr + pair)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < M
    keep = in_rows & (tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = keep[:, None] & (cols < H)[None, :]
        s = tl.load(s_base + offsets_2d(rows, cols, s_ld, 1), mask=m, other=0.0)
        t = tl.load(t_base + offsets_2d(rows, cols, t_ld, 1), mask=m, other=0.0)
        g = (s.to(tl.float32) - t.to(tl.float32)) * coef
        out = in_rows[:, None] & (cols < H)[None, :]
        tl.store(g_base + offsets_2d(rows, cols, H, 1),
                 g.to(witness_ptr.dtype.element_ty), mask=out)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check(student: list[torch.Tensor]) -> None:
    if student[0].dtype not in DTYPES:
        raise TypeError(
            f"the Triton hidden_mse_loss kernels support {', '.join(map(str, DTYPES))}; got "
            f"{student[0].dtype} (use the 'cpp' or 'reference' backend for float64)"
        )


def _rows(x: torch.Tensor, h: int) -> torch.Tensor:
    x2 = x.reshape(-1, h)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _tables(student, teacher, mask):
    h = student[0].shape[-1]
    s2 = [_rows(s, h) for s in student]
    t2 = [_rows(t, h) for t in teacher]
    device = student[0].device
    m = s2[0].shape[0]

    def table(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    if mask is None:
        mask = torch.ones(m, dtype=torch.bool, device=device)
    mask = mask.reshape(m).contiguous()
    return (s2, t2, table([x.data_ptr() for x in s2]), table([x.data_ptr() for x in t2]),
            table([x.stride(0) for x in s2]), table([x.stride(0) for x in t2]), mask, m, h)


def _count(mask: torch.Tensor, m: int, h: int) -> torch.Tensor:
    return mask.sum().clamp_min(1).to(torch.float32) * h


def _fwd_launch(s_ptrs, t_ptrs, s_lds, t_lds, witness, mask, part, p, m, h) -> Launch:
    args = dict(s_ptrs=s_ptrs, t_ptrs=t_ptrs, s_lds=s_lds, t_lds=t_lds, witness_ptr=witness,
                mask_ptr=mask, part_ptr=part, P=p, M=m, H=h, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H)
    return Launch(hidden_mse_fwd_kernel, (p, triton.cdiv(m, BLOCK_M)), args,
                  TileConfig(BLOCK_M, BLOCK_H, 1, WARPS, 1))


def _bwd_launch(s_ptrs, t_ptrs, g_ptrs, s_lds, t_lds, witness, mask, coef, p, m, h) -> Launch:
    args = dict(s_ptrs=s_ptrs, t_ptrs=t_ptrs, g_ptrs=g_ptrs, s_lds=s_lds, t_lds=t_lds,
                witness_ptr=witness, mask_ptr=mask, coef_ptr=coef, P=p, M=m, H=h,
                BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H)
    return Launch(hidden_mse_bwd_kernel, (p, triton.cdiv(m, BLOCK_M)), args,
                  TileConfig(BLOCK_M, BLOCK_H, 1, WARPS, 1))


def hidden_mse_loss_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every pair's term (``[pairs]``, fp32)."""
    _check(student)
    s2, t2, sp, tp, sl, tl_, mask, m, h = _tables(student, teacher, mask)
    p = len(s2)
    blocks = max(1, triton.cdiv(m, BLOCK_M))
    part = empty((p, blocks), torch.float32, student[0].device)
    if m == 0 or h == 0:
        part.zero_()
    else:
        _fwd_launch(sp, tp, sl, tl_, s2[0], mask, part, p, m, h)()
    return part.sum(1) / _count(mask, m, h)


def hidden_mse_loss_backward(grad: torch.Tensor, student: list[torch.Tensor],
                             teacher: list[torch.Tensor],
                             mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The gradients of ``sum_i grad[i] * term_i`` for every student state."""
    _check(student)
    s2, t2, sp, tp, sl, tl_, mask, m, h = _tables(student, teacher, mask)
    p = len(s2)
    outs = [empty(tuple(s.shape), s.dtype, s.device) for s in student]
    coef = (2 * grad.to(torch.float32) / _count(mask, m, h)).contiguous()
    if m and h:
        gp = torch.tensor([o.data_ptr() for o in outs], dtype=torch.int64, device=grad.device)
        _bwd_launch(sp, tp, gp, sl, tl_, s2[0], mask, coef, p, m, h)()
    return outs


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------


def launch_specs() -> list[LaunchSpec]:
    """Both kernels for every dtype, twice: ``contig`` (the JIT's specialisation for a hidden
    size and row count divisible by 16) and ``generic`` (nothing assumed). The pair count is not
    specialised (``do_not_specialize``)."""
    specs = []
    for dtype, kernel in itertools.product(DTYPES, ("fwd", "bwd")):
        p, m, h = 3, 64, 256
        x = torch.empty(m, h, dtype=dtype)
        table = torch.empty(p, dtype=torch.int64)
        mask = torch.empty(m, dtype=torch.bool)
        if kernel == "fwd":
            launch = _fwd_launch(table, table, table, table, x, mask, torch.empty(p, 4), p, m, h)
        else:
            launch = _bwd_launch(table, table, table, table, table, x, mask, torch.empty(p), p,
                                 m, h)
        for variant, specialize in (("contig", True), ("generic", False)):
            specs.append(launch.spec(f"{TL_DTYPES[dtype]},{variant}", None, specialize))
    return specs

"""Triton kernels of ``rosita_fast.ops.kd_logits_loss``: logit distillation, one program per row.

A program walks its row in ``BLOCK_C``-wide chunks, keeping per-lane running maxima of
``a = s / T`` and ``b = t / T`` and, relative to them, the sums ``Z_a = sum exp(a - m_a)``,
``Z_b = sum w`` (``w = exp(b - m_b)``) and the p-weighted term ``D`` (kl:
``sum w ((b - m_b) - (a - m_a))``; soft_ce: ``sum w (a - m_a)``), rescaled exactly when a lane's
maxima move. The lanes are then merged to the row's maxima and
``l = D / Z_b - log Z_b + log Z_a`` (kl) or ``-D / Z_b + log Z_a`` (soft_ce); terms stay relative
to the maxima, so logits of +-1e4 cost nothing in accuracy. With ``WRITE_GRAD`` a second sweep
over the row (the first one's chunks, from L2) writes the student gradient ``(q - p) / T`` in the
logits' dtype: nothing of size rows x classes is kept but that gradient.

Rules, as the C++ kernels: classes with ``p = 0`` (teacher logit -inf) add nothing; a row the
mask drops is not read (its loads are masked to -inf: no teacher distribution) and, like a row
whose teacher logits are all -inf, gets loss 0 and a zero gradient; a student row of all -inf
under a teacher with mass has loss +inf; NaN or +inf logits make the row's loss and gradient NaN.
fp16/bf16 are read as such and computed in fp32; fp64 is not served (TypeError: use the C++ or
CUDA backend). Row offsets are 64-bit.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._common import DTYPES, TL_DTYPES, Launch, LaunchSpec, TileConfig, empty

#: Chunk width (the smallest that holds the row, else the largest) -> warps.
WARPS = {16: 1, 128: 2, 1024: 4, 2048: 8}


@triton.jit
def _ref(m):
    # A running maximum as the exponentials' reference point: 0 while it is -inf.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _moved(za, zb, d, ma, mb, ma2, mb2, KL):
    """The sums of lanes whose maxima were ``ma``/``mb``, at maxima ``ma2``/``mb2`` (>=): exact
    for D, whose terms' offsets shift with the reference points. Lanes that have seen only -inf
    have zero sums and stay zero (no exp(+large) * 0)."""
    ra, rb, ra2, rb2 = _ref(ma), _ref(mb), _ref(ma2), _ref(mb2)
    fa = tl.where(ma == float("-inf"), 0.0, tl.exp(ra - ra2))
    fb = tl.where(mb == float("-inf"), 0.0, tl.exp(rb - rb2))
    shift = tl.where(KL != 0, (rb - rb2) - (ra - ra2), ra - ra2)
    d = tl.where(mb == float("-inf"), 0.0, fb * (d + zb * shift))
    return za * fa, zb * fb, d


@triton.jit(do_not_specialize=["HAS_MASK", "KL", "WRITE_GRAD"])
def kd_logits_kernel(
    s_ptr, t_ptr, mask_ptr, loss_ptr, grad_ptr,
    C, stride_s, stride_t, stride_g, inv_t,
    HAS_MASK, KL, WRITE_GRAD,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Without a mask, mask_ptr is a one-element True: every row reads it.
    keep = tl.load(mask_ptr + row * HAS_MASK) != 0
    limit = tl.where(keep, C, 0)  # a dropped row loads nothing: no teacher distribution
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_C)
    neg_inf = float("-inf")
    ma = tl.full((BLOCK_C,), neg_inf, tl.float32)
    mb = tl.full((BLOCK_C,), neg_inf, tl.float32)
    za = tl.zeros((BLOCK_C,), tl.float32)
    zb = tl.zeros((BLOCK_C,), tl.float32)
    d = tl.zeros((BLOCK_C,), tl.float32)
    bad = tl.zeros((BLOCK_C,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        ld = cols < limit
        a = tl.load(s_row + cols, mask=ld, other=neg_inf).to(tl.float32) * inv_t
        b = tl.load(t_row + cols, mask=ld, other=neg_inf).to(tl.float32) * inv_t
        # NaN or +inf: the row's softmax is undefined
        bad = bad | ((~(a < float("inf")) & (a != neg_inf)).to(tl.int32))
        bad = bad | ((~(b < float("inf")) & (b != neg_inf)).to(tl.int32))
        ma2 = tl.maximum(ma, tl.where(a == a, a, neg_inf))
        mb2 = tl.maximum(mb, tl.where(b == b, b, neg_inf))
        za, zb, d = _moved(za, zb, d, ma, mb, ma2, mb2, KL)
        x = a - _ref(ma2)
        y = b - _ref(mb2)
        w = tl.exp(y)
        term = tl.where(KL != 0, y - x, x)
        za += tl.exp(x)
        zb += w
        d += tl.where(w > 0, w * term, 0.0)
        ma, mb = ma2, mb2
    # Merge the lanes at the row's maxima.
    row_ma = tl.max(ma, axis=0)
    row_mb = tl.max(mb, axis=0)
    za, zb, d = _moved(za, zb, d, ma, mb, row_ma, row_mb, KL)
    za_row = tl.sum(za, axis=0)
    zb_row = tl.sum(zb, axis=0)
    d_row = tl.sum(d, axis=0)
    is_bad = tl.max(bad, axis=0) > 0
    log_za = tl.log(za_row)
    loss = tl.where(KL != 0, d_row / zb_row - tl.log(zb_row) + log_za, -d_row / zb_row + log_za)
    loss = tl.where(za_row > 0, loss, float("inf"))
    loss = tl.where(zb_row > 0, loss, 0.0)  # no teacher distribution (or a dropped row)
    loss = tl.where(is_bad, float("nan"), loss)
    tl.store(loss_ptr + row, loss)
    if WRITE_GRAD != 0:
        ra_row, rb_row = _ref(row_ma), _ref(row_mb)
        cq = tl.where((za_row > 0) & (zb_row > 0), inv_t / za_row, 0.0)
        cp = tl.where(zb_row > 0, inv_t / zb_row, 0.0)
        cq = tl.where(is_bad, float("nan"), cq)
        cp = tl.where(is_bad, float("nan"), cp)
        g_row = grad_ptr + row * stride_g
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            ld = cols < limit
            a = tl.load(s_row + cols, mask=ld, other=neg_inf).to(tl.float32) * inv_t
            b = tl.load(t_row + cols, mask=ld, other=neg_inf).to(tl.float32) * inv_t
            g = tl.exp(a - ra_row) * cq - tl.exp(b - rb_row) * cp
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < C)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def block_for(classes: int) -> int:
    """The chunk width for rows of ``classes``: the smallest that holds the row, else the
    largest (a few widths keep the compiled variants few; a wider chunk only masks more)."""
    for block in WARPS:
        if classes <= block:
            return block
    return max(WARPS)


def _rows_2d(x: torch.Tensor, c: int) -> torch.Tensor:
    x2 = x.reshape(-1, c)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _check(student: torch.Tensor) -> None:
    if student.dtype not in DTYPES:
        raise TypeError(
            f"the Triton kd_logits_loss kernels support {', '.join(map(str, DTYPES))}; got "
            f"{student.dtype} (use the 'cpp' or 'cuda' backend for float64)"
        )


@functools.cache
def _all_rows(device: torch.device) -> torch.Tensor:
    """The mask argument of a call without a mask: one True, read by every row (HAS_MASK = 0)."""
    return torch.ones(1, dtype=torch.bool, device=device)


def _launch(s2, t2, mask, loss, grad, temperature: float, kind: str) -> Launch:
    n, c = s2.shape
    block = block_for(c)
    has_mask = mask is not None
    args = dict(
        s_ptr=s2, t_ptr=t2, mask_ptr=mask if has_mask else _all_rows(s2.device), loss_ptr=loss,
        grad_ptr=grad if grad is not None else s2,
        C=c, stride_s=s2.stride(0), stride_t=t2.stride(0),
        stride_g=grad.stride(0) if grad is not None else 0, inv_t=1.0 / temperature,
        HAS_MASK=int(has_mask), KL=int(kind == "kl"), WRITE_GRAD=int(grad is not None),
        BLOCK_C=block,
    )
    return Launch(kd_logits_kernel, (n,), args, TileConfig(1, block, 1, WARPS[block], 1))


def _run(student, teacher, temperature, kind, mask, write_grad):
    _check(student)
    c = student.shape[-1]
    s2, t2 = _rows_2d(student, c), _rows_2d(teacher, c)
    n = s2.shape[0]
    acc = torch.float32
    loss = empty((n,), acc, student.device)
    grad = empty((n, c), student.dtype, student.device) if write_grad else None
    if mask is not None:
        mask = mask.reshape(n).contiguous()
    _launch(s2, t2, mask, loss, grad, temperature, kind)()
    return loss, grad


def kd_logits_loss_forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                           kind: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row losses (``[rows]``, fp32)."""
    return _run(student, teacher, temperature, kind, mask, False)[0]


def kd_logits_loss_train(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                         kind: str, mask: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-row losses, d loss_i / d student as [rows, classes] in the student's dtype)``."""
    return _run(student, teacher, temperature, kind, mask, True)


# ----------------------------------------------------------------------------------------------
# Launch specs: what the lowering tests compile.
# ----------------------------------------------------------------------------------------------


def launch_specs() -> list[LaunchSpec]:
    """Every (dtype, chunk width) the launchers can use, twice: ``contig`` is the JIT's
    specialisation for 16-aligned pointers and row strides and class counts divisible by 16,
    ``generic`` the unspecialised variant. The mask, the kind and the gradient store are runtime
    flags (uniform branches: one variant for all)."""
    specs = []
    for dtype, block in itertools.product(DTYPES, WARPS):
        rows, classes = 64, block
        s = torch.empty(rows, classes, dtype=dtype)
        t = torch.empty(rows, classes, dtype=dtype)
        mask = torch.empty(rows, dtype=torch.bool)
        loss = torch.empty(rows)
        g = torch.empty(rows, classes, dtype=dtype)
        launch = _launch(s, t, mask, loss, g, 2.0, "kl")
        assert launch.args["BLOCK_C"] == block
        for variant, specialize in (("contig", True), ("generic", False)):
            label = f"{TL_DTYPES[dtype]},C{block},{variant}"
            specs.append(launch.spec(label, None, specialize))
    return specs

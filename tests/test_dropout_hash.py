"""The counter-based dropout hash the fused ops share (rosita_fast/ops/_dropout.py): its Triton
form matches the ground truth bit for bit, and its decisions behave like independent coin flips
(keep rate, independence across seeds, rows and columns). The C++ form is checked through the ops
that use it (their backends must drop the same elements as the reference)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from rosita_fast.kernels._common import dropout_keep, seed_int32

from rosita_fast.ops._dropout import (
    check_dropout,
    draw_seed,
    dropout_scale,
    dropout_threshold,
    keep_mask,
)


@triton.jit(do_not_specialize=["seed"])
def _keep_kernel(out_ptr, seed, threshold, row0, R, C, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = dropout_keep(seed, rows + row0, cols, threshold)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], keep.to(tl.int8), mask=mask)


def _triton_keep(seed, row0, rows, cols, p):
    out = torch.full((rows, cols), 7, dtype=torch.int8)  # poison: 7 is neither 0 nor 1
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 32))
    _keep_kernel[grid](out, seed_int32(seed), dropout_threshold(p), row0, rows, cols, BLOCK_R=16,
                       BLOCK_C=32)
    return out


def _ref_keep(seed, row0, rows, cols, p):
    return keep_mask(seed, torch.arange(row0, row0 + rows)[:, None], torch.arange(cols)[None, :], p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_triton_matches_reference(p):
    # Several row and column blocks, ragged edges, seeds with the top bit set and clear, rows
    # offset into the millions (attention's rows are (batch * heads + head) * queries + query).
    for seed in (draw_seed(), draw_seed() | (1 << 31), draw_seed() & 0x7FFFFFFF):
        for row0 in (0, 3_000_017):
            out = _triton_keep(seed, row0, 37, 70, p)
            assert out.ne(7).all(), "unwritten elements"
            ref = _ref_keep(seed, row0, 37, 70, p)
            assert torch.equal(out.bool(), ref), f"seed {seed} row0 {row0}"


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_keep_rate_and_independence(p):
    seed = draw_seed()
    keep = _ref_keep(seed, 0, 512, 512, p).double()
    n = keep.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 6 * sd
    # Neighbours (next column, next row) and another seed agree as often as independent coins.
    agree = p * p + (1 - p) ** 2
    sd_a = (agree * (1 - agree) / n) ** 0.5
    for a, b in ((keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]),
                 (keep, _ref_keep(seed ^ 1, 0, 512, 512, p).double()),
                 (keep, _ref_keep(seed + 1, 0, 512, 512, p).double()),
                 (keep[1:], _ref_keep(seed ^ 1, 0, 512, 512, p).double()[:-1])):
        assert abs((a == b).double().mean().item() - agree) < 8 * sd_a


def test_scale_is_the_exact_inverse_keep_probability():
    for p in (0.0, 0.1, 1 / 3, 0.999):
        t = dropout_threshold(p)
        assert dropout_scale(p) * (1 - t / 2**24) == pytest.approx(1.0, abs=1e-15)
    assert dropout_threshold(0.0) == 0


def test_check_dropout():
    assert check_dropout(0.1, None, "op") == (0.1, None)
    assert check_dropout(0, 2**40 + 5, "op") == (0.0, 5)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            check_dropout(bad, None, "op")
    with pytest.raises(TypeError, match="dropout_p"):
        check_dropout("0.1", None, "op")
    with pytest.raises(TypeError, match="dropout_seed"):
        check_dropout(0.1, 1.5, "op")


def test_seeds_follow_torch_manual_seed():
    torch.manual_seed(3)
    a = [draw_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert a == [draw_seed() for _ in range(3)]
    assert len(set(a)) == 3

"""attention: rosita_fast's fused op vs eager SDPA vs per-shape torch.compile, BERT shapes.

``fused`` is ``rosita_fast.ops.attention(q, k, v, mask)`` (C++ backend on CPU, Triton on CUDA);
``eager`` is ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])``, what
Hugging Face's BERT runs by default (its ``sdpa`` attention), and ``compile`` is that through
``torch.compile``. q, k and v are transposed views of one fused ``[B, L, 3, H, D]`` projection, as
the model layers pass them, and every batch row is padded (a key padding mask keeping 50-100% of
the keys; batch 1 keeps all). Head size 64; 12 heads (BERT-base) and 2 (a pruned student);
sequence lengths 64 and 128; batches 1, 8 and 32. Modes, dtypes, the compile rows and the
peak-memory method: ``_harness.py``. Results: ``results/attention.md`` and ``.json``.

Run: ``python -m pytest benchmarks/bench_attention.py`` (``-k`` picks a subset, e.g.
``-k "b32 and bf16"``; a subset is written to ``results/attention.partial.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import Case, OpSpec, measure, parametrize

from rosita_fast import ops

HEAD_DIM = 64
# (batch, heads, seq)
SHAPES = ((1, 2, 64), (8, 2, 128), (32, 2, 128), (1, 12, 128), (8, 12, 128), (32, 12, 128))

CASES = [
    Case(f"b{b}-h{h}-l{seq}-d{HEAD_DIM}",
         {"batch": b, "heads": h, "seq": seq, "head_dim": HEAD_DIM})
    for b, h, seq in SHAPES
]


def _eager(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def _inputs(case: Case, device: str, dtype: torch.dtype):
    b, h, seq, d = (case.params[p] for p in ("batch", "heads", "seq", "head_dim"))
    qkv = torch.randn(b, seq, 3, h, d, device=device).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    # Row i keeps seq - (7 i mod seq / 2) keys: between half and all of them, all at batch 1.
    lengths = seq - (torch.arange(b, device=device) * 7) % (seq // 2)
    mask = torch.arange(seq, device=device)[None, :] < lengths[:, None]
    return q, k, v, mask


SPEC = OpSpec(
    name="attention",
    fused=ops.attention,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.attention(q, k, v, mask)` (softmax(q k^T / sqrt(D), "
    "padded keys excluded) v, online softmax, no [B, H, L, L] scores); eager: "
    "`F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])` (HF BERT's "
    "default sdpa attention). Case `b{batch}-h{heads}-l{seq}-d{head_dim}`: q, k, v [B, H, L, D] "
    "transposed views of one fused [B, L, 3, H, D] projection, bool key padding mask [B, L] "
    "keeping 50-100% of each row's keys. CPU peak memory of fused does not include the C++ "
    "kernels' per-thread block scratch (malloc'd, not torch's allocator: ~0.08 MiB forward, "
    "~0.17 MiB backward per thread at D = 64)",
)


@parametrize(CASES)
def test_attention(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

"""embedding_layernorm: rosita_fast's fused op vs PyTorch eager vs per-shape torch.compile, BERT
embedding shapes.

``fused`` is ``rosita_fast.ops.embedding_layernorm(...)`` (C++ backend on CPU); ``eager`` is the
composition HF's ``BertEmbeddings`` runs (dropout aside): ``F.embedding`` of the word ids (then,
for the factorized table, ``F.linear`` with the ``[hidden, rank]`` projection), plus the token-type
and position embeddings, then ``F.layer_norm``. Hidden 768, vocabulary 30522, 512 positions, 2
token types, ``padding_idx`` 0; the word table dense (``[30522, 768]``) or factorized with rank 128
(``[30522, 128]`` and ``[768, 128]``). Batch x length: 1x64, 8x128 and 32x128. Modes, dtypes, the
compile rows and the peak-memory method: ``_harness.py``. Results:
``results/embedding_layernorm.md`` and ``.json``.

In bf16 training, eager runs the adds and the LayerNorm in fp32 (bf16 gathers and projection, the
result rounded to bf16), as the fused op does: in plain bf16, the gradients of the token-type
table and of the LayerNorm weight (sums over up to 4096 tokens) err by 4-7% of their largest entry
on the CPU and fail the harness's check against float64. Inference (``fwd``) rows run plain bf16.

The dense rows' backward is dominated, for every implementation, by the dense ``[30522, 768]``
gradient of the word table (94 MB in fp32, freshly allocated and zeroed on every call).

Run: ``python -m pytest benchmarks/bench_embedding_layernorm.py`` (``-k`` picks a subset, e.g.
``-k "b8 and fp32"``; a subset is written to ``results/embedding_layernorm.partial.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import Case, OpSpec, measure, parametrize

from rosita_fast import ops

HIDDEN, VOCAB, POSITIONS, TYPES, PAD = 768, 30522, 512, 2, 0
SHAPES = ((1, 64), (8, 128), (32, 128))  # (batch, length)
RANKS = (None, 128)  # dense, factorized

CASES = [
    Case(f"b{b}-l{length}-{'dense' if r is None else f'r{r}'}",
         {"batch": b, "length": length, "rank": r, "hidden": HIDDEN, "vocab": VOCAB})
    for r in RANKS
    for b, length in SHAPES
]


def _eager(input_ids, word_weight, position_ids, position_weight, token_type_ids,
           token_type_weight, ln_weight, ln_bias, eps, word_proj, padding_idx):
    # bf16 training runs the adds and the LayerNorm in fp32 (see the module docstring).
    wide = word_weight.dtype == torch.bfloat16 and word_weight.requires_grad

    def acc(t):
        return t.float() if wide else t

    word = F.embedding(input_ids, word_weight, padding_idx=padding_idx)
    if word_proj is not None:
        word = F.linear(word, word_proj)
    x = acc(word) + F.embedding(token_type_ids, acc(token_type_weight))
    x = x + F.embedding(position_ids, acc(position_weight))
    out = F.layer_norm(x, (ln_weight.shape[0],), acc(ln_weight), acc(ln_bias), eps)
    return out.to(word_weight.dtype)


def _inputs(case: Case, device: str, dtype: torch.dtype):
    b, length, r = (case.params[p] for p in ("batch", "length", "rank"))

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    ids = torch.randint(0, VOCAB, (b, length), device=device)
    positions = torch.arange(length, device=device)[None]  # BERT: [1, L]
    types = torch.randint(0, TYPES, (b, length), device=device)
    word = randn(VOCAB, r or HIDDEN)
    proj = randn(HIDDEN, r, scale=r**-0.5) if r else None
    return (ids, word, positions, randn(POSITIONS, HIDDEN), types, randn(TYPES, HIDDEN),
            randn(HIDDEN, scale=0.1, shift=1.0), randn(HIDDEN, scale=0.1), 1e-12, proj, PAD)


SPEC = OpSpec(
    name="embedding_layernorm",
    fused=ops.embedding_layernorm,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.embedding_layernorm(input_ids, word_weight, position_ids, "
    "position_weight, token_type_ids, token_type_weight, ln_weight, ln_bias, eps, word_proj, "
    "padding_idx)` (`LayerNorm(word + token_type + position)`); eager: `F.embedding` (+ "
    "`F.linear` for a factorized table), two more `F.embedding`, the adds, `F.layer_norm`. Case "
    "`b{batch}-l{length}-{dense|r128}`: hidden 768, vocabulary 30522, 512 positions ([1, L]), 2 "
    "token types, padding_idx 0; word table dense [30522, 768] or factorized [30522, 128] with "
    "projection [768, 128]. Backward rows include the dense gradient of the word table "
    "(94 MB fp32 dense, 15.6 MB factorized), allocated and zeroed on every call by every "
    "implementation. CPU peak memory of fused does not include the C++ kernel's per-thread "
    "row buffers (a few KiB) nor oneDNN's GEMM scratch",
)


@parametrize(CASES)
def test_embedding_layernorm(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

"""lowrank_linear: rosita_fast's fused op vs PyTorch eager vs per-shape torch.compile, BERT shapes.

``fused`` is ``rosita_fast.ops.lowrank_linear(x, u, v, bias, activation)`` (C++ backend on CPU,
Triton on CUDA); ``eager`` is ``F.linear(F.linear(x, v), u, bias)`` followed by GELU where the
layer has one. The activation follows BERT: GELU on the 768->3072 FFN input projection, none on the
attention (768->768) and FFN output (3072->768) projections; all layers have a bias. Tokens: 32 (a
short sequence) and 2048 (a batch of them); ranks 64 and 256. Modes, dtypes, the compile rows and
the peak-memory method: ``_harness.py``. Results: ``results/lowrank_linear.md`` and ``.json``.

Run: ``python -m pytest benchmarks/bench_lowrank_linear.py`` (``-k`` picks a subset, e.g.
``-k "t32 and bf16"``; a subset is written to ``results/lowrank_linear.partial.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import Case, OpSpec, measure, parametrize

from rosita_fast import ops

TOKENS = (32, 2048)
LAYERS = ((768, 768), (768, 3072), (3072, 768))  # (in, out)
RANKS = (64, 256)

CASES = [
    Case(
        f"t{t}-{k}x{n}-r{r}-{act}",
        {"tokens": t, "in_features": k, "out_features": n, "rank": r, "activation": act},
    )
    for t in TOKENS
    for k, n in LAYERS
    for r in RANKS
    for act in ["gelu" if n > k else "none"]
]


def _eager(x, u, v, bias, activation):
    z = F.linear(F.linear(x, v), u, bias)
    return F.gelu(z) if activation == "gelu" else z


def _inputs(case: Case, device: str, dtype: torch.dtype):
    t, k, n, r = (case.params[p] for p in ("tokens", "in_features", "out_features", "rank"))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    x, u, v, bias = randn(t, k), randn(n, r, scale=r**-0.5), randn(r, k, scale=k**-0.5), randn(n)
    return x, u, v, bias, case.params["activation"]


SPEC = OpSpec(
    name="lowrank_linear",
    fused=ops.lowrank_linear,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.lowrank_linear(x, u, v, bias, activation)` "
    "(`act(x @ v.T @ u.T + bias)`); eager: `F.linear(F.linear(x, v), u, bias)` (+ `F.gelu`). "
    "Case `t{tokens}-{in}x{out}-r{rank}-{activation}`: x [tokens, in], u [out, rank], "
    "v [rank, in], bias [out]; BERT layers (768x768 attention, 768x3072 FFN-in with GELU, "
    "3072x768 FFN-out). CPU peak memory of fused does not include the C++ kernel's 64-row block "
    "buffers on OpenMP worker threads (at most ~2.3 MiB per extra thread at these shapes)",
)


@parametrize(CASES)
def test_lowrank_linear(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

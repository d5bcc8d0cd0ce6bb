"""linear_act: rosita_fast's fused op vs PyTorch eager vs per-shape torch.compile.

``fused`` is ``rosita_fast.ops.linear_act(x, weight, bias, "gelu")`` (C++ backend on CPU: one
oneDNN GEMM with bias and GELU in its epilogue); the ``-packed`` cases pass the weight prepacked
by ``rosita_fast.ops.pack_linear_weight`` (inference only, so forward rows only; the packing
happens once, in the untimed warm-up). ``eager`` is ``F.gelu(F.linear(x, weight, bias))``.
Shapes: the dense layers of a BERT-like student ((in, out) = (768, 512), (512, 768), (768, 384),
(128, 768)) at 64 tokens (one sequence), 1024 and 4096 tokens (batches).
Modes, dtypes, the compile rows and the peak-memory method: ``_harness.py``. Results:
``results/linear_act.md`` and ``.json``.

Run: ``python -m pytest benchmarks/bench_linear_act.py`` (``-k`` picks a subset, e.g.
``-k "t64 and bf16"``; a subset is written to ``results/linear_act.partial.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import (
    Case,
    OpSpec,
    measure,
    parametrize,
)

from rosita_fast import ops

LAYERS = ((768, 512), (512, 768), (768, 384), (128, 768))  # (in, out)
TOKENS = (64, 1024, 4096)

CASES = [
    Case(f"t{t}-{k}x{n}-gelu{'-packed' if packed else ''}",
         {"tokens": t, "in_features": k, "out_features": n, "packed": packed})
    for t in TOKENS
    for k, n in LAYERS
    for packed in (False, True)
]

# The packed weight of the latest row: made in the first (untimed, checked) call of a row.
_PACKED: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}


def _packed(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    cached = _PACKED.get("latest")
    if cached is None or cached[0] is not weight:
        _PACKED["latest"] = cached = (weight, ops.pack_linear_weight(weight, batch_hint=rows))
    return cached[1]


def _fused(x, weight, bias, packed):
    if packed:
        return ops.linear_act(x, weight, bias, "gelu", _packed(weight, x.shape[0]))
    return ops.linear_act(x, weight, bias, "gelu")


def _eager(x, weight, bias, packed):
    return F.gelu(F.linear(x, weight, bias))


def _inputs(case: Case, device: str, dtype: torch.dtype):
    t, k, n = (case.params[p] for p in ("tokens", "in_features", "out_features"))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return randn(t, k), randn(n, k, scale=k**-0.5), randn(n), case.params["packed"]


SPEC = OpSpec(
    name="linear_act",
    fused=_fused,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.linear_act(x, weight, bias, 'gelu'[, packed])` "
    "(`gelu(x @ weight.T + bias)`); eager: `F.gelu(F.linear(x, weight, bias))`. Case "
    "`t{tokens}-{in}x{out}-gelu[-packed]`: x [tokens, in], weight [out, in], bias [out]; "
    "`-packed`: the weight prepacked for oneDNN by `pack_linear_weight` (forward rows only: a call "
    "that records autograd ignores it; its eager and compile columns repeat the plain case's "
    "computation)",
)


def _keep(dtype: str, case: Case, mode: str) -> bool:
    # Packed weights are for inference: their cases have no training modes.
    return mode == "fwd" or not case.params["packed"]


@parametrize(CASES, keep=_keep)
def test_linear_act(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

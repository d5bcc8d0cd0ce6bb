"""linear_residual_layernorm: rosita_fast's fused op vs PyTorch eager vs per-shape torch.compile.

``fused`` is ``rosita_fast.ops.linear_residual_layernorm(x, weight, bias, residual, ln_weight,
ln_bias, 1e-12)`` (C++ backend on CPU: one oneDNN GEMM with bias and residual add in its epilogue,
then a LayerNorm pass per row); the ``-packed`` cases pass the weight prepacked by
``rosita_fast.ops.pack_linear_weight`` (inference only, so forward rows only; the packing happens
once, in the untimed warm-up). ``eager`` is ``F.layer_norm(F.linear(x, weight, bias) + residual,
...)``: BERT's SelfOutput/Output with dropout inactive. Shapes: the dense layers of a BERT-like
student ((in, out) = (768, 512), (512, 768), (768, 384), (128, 768)) at 64 tokens (one sequence),
1024 and 4096 tokens (batches). Modes, dtypes, the compile rows and the
peak-memory method: ``_harness.py``. Results: ``results/linear_residual_layernorm.md`` and
``.json``. For bf16, eager runs the LayerNorm in fp32, as ``torch.autocast`` does: in bf16 its
backward sums the LayerNorm parameters' gradients in bf16, off by more than the harness allows.

Run: ``python -m pytest benchmarks/bench_linear_residual_layernorm.py`` (``-k`` picks a subset,
e.g. ``-k "t64 and bf16"``; a subset is written to ``results/linear_residual_layernorm.partial.*``).
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

EPS = 1e-12  # BERT's
LAYERS = ((768, 512), (512, 768), (768, 384), (128, 768))  # (in, out)
TOKENS = (64, 1024, 4096)

CASES = [
    Case(f"t{t}-{k}x{n}{'-packed' if packed else ''}",
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


def _fused(x, weight, bias, residual, ln_weight, ln_bias, packed):
    p = _packed(weight, x.shape[0]) if packed else None
    return ops.linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, EPS, p)


def _eager(x, weight, bias, residual, ln_weight, ln_bias, packed):
    # The LayerNorm in fp32, as torch.autocast runs it (a no-op for fp32): a bf16 F.layer_norm's
    # backward sums ln_weight/ln_bias gradients in bf16 and misses the harness's accuracy check
    # (2% of the largest value) from 64 tokens on.
    y = (F.linear(x, weight, bias) + residual).float()
    out = F.layer_norm(y, (weight.shape[0],), ln_weight.float(), ln_bias.float(), EPS)
    return out.to(x.dtype)


def _inputs(case: Case, device: str, dtype: torch.dtype):
    t, k, n = (case.params[p] for p in ("tokens", "in_features", "out_features"))

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    return (randn(t, k), randn(n, k, scale=k**-0.5), randn(n), randn(t, n),
            randn(n, scale=0.1, shift=1.0), randn(n, scale=0.1), case.params["packed"])


SPEC = OpSpec(
    name="linear_residual_layernorm",
    fused=_fused,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.linear_residual_layernorm(x, weight, bias, residual, "
    "ln_weight, ln_bias, 1e-12[, packed])`; eager: `F.layer_norm(F.linear(x, weight, bias) + "
    "residual, (out,), ln_weight, ln_bias, 1e-12)` with the LayerNorm in fp32 as torch.autocast "
    "runs it (for bf16: inputs and output cast around it; a bf16 layer_norm's backward sums the "
    "ln_weight/ln_bias gradients in bf16 and fails the harness's accuracy check from 64 tokens "
    "on). Case `t{tokens}-{in}x{out}[-packed]`: "
    "x [tokens, in], weight [out, in], residual [tokens, out]; `-packed`: the weight prepacked "
    "for oneDNN by `pack_linear_weight` (forward rows only: a call that records autograd ignores "
    "it; its eager and compile columns repeat the plain case's computation). While autograd "
    "records, the fused op keeps y = x W^T + b + residual and fp32 mean/rstd per row for its "
    "backward (eager's layer_norm keeps its input and mean/rstd too)",
)


def _keep(dtype: str, case: Case, mode: str) -> bool:
    # Packed weights are for inference: their cases have no training modes.
    return mode == "fwd" or not case.params["packed"]


@parametrize(CASES, keep=_keep)
def test_linear_residual_layernorm(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

"""kd_logits_loss: rosita_fast's fused logit-distillation loss vs PyTorch eager vs per-shape
torch.compile.

``fused`` is ``rosita_fast.ops.kd_logits_loss(s, t, T, "kl", "batchmean")`` (C++ backend on CPU:
one pass over each row with online maxima and sums; while autograd records it writes the student
gradient in the same pass and the backward only scales it). ``eager`` is
``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
log_target=True)``. Only the student logits get a gradient. Shapes: a sentence-level task (32 x 2
classes, 4096 x 3) and masked-LM distillation over BERT's vocabulary (4096 and 16384 tokens x
30522). The 16384-token case (2 GiB a logits tensor) is measured forward + backward in fp32 only,
checked against fp32 eager (float64 copies would not fit in this machine's memory). ``bwd`` rows
time only the backward: for the fused op that is the scaling of the gradient its forward wrote,
so compare ``fwdbwd``.
Modes, dtypes, the compile rows and the peak-memory method: ``_harness.py``. Results:
``results/kd_logits_loss.md`` and ``.json``.

Run: ``python -m pytest benchmarks/bench_kd_logits_loss.py`` (``-k`` picks a subset; a subset is
written to ``results/kd_logits_loss.partial.*``).
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

TEMPERATURE = 2.0
SHAPES = ((32, 2), (4096, 3), (4096, 30522), (16384, 30522))
BIG = 16384 * 30522

CASES = [
    Case(f"n{n}-c{c}", {"rows": n, "classes": c,
                        **({"reference_dtype": "fp32"} if n * c >= BIG else {})})
    for n, c in SHAPES
]


def _fused(s, t):
    return ops.kd_logits_loss(s, t, TEMPERATURE, "kl", "batchmean")


def _eager(s, t):
    return F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                    reduction="batchmean", log_target=True)


def _inputs(case: Case, device: str, dtype: torch.dtype):
    n, c = case.params["rows"], case.params["classes"]
    return ((torch.randn(n, c, device=device) * 4).to(dtype),
            (torch.randn(n, c, device=device) * 4).to(dtype))


SPEC = OpSpec(
    name="kd_logits_loss",
    fused=_fused,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.kd_logits_loss(s, t, 2.0, 'kl', 'batchmean')`; eager: "
    "`F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction='batchmean', "
    "log_target=True)`. Case `n{rows}-c{classes}`: s, t [rows, classes], logits ~ 4 N(0, 1); "
    "only s gets a gradient. bwd rows time the fused op's scaling of the gradient its forward "
    "wrote: compare fwdbwd",
    grad_inputs=(0,),
)


def _keep(dtype: str, case: Case, mode: str) -> bool:
    # The fp32-reference cases are too large for float64 checks of every mode and dtype.
    return "reference_dtype" not in case.params or (mode == "fwdbwd" and dtype == "fp32")


@parametrize(CASES, keep=_keep)
def test_kd_logits_loss(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

"""fused_linear_kd_loss: masked-LM logit distillation through the two output layers, chunked, vs
PyTorch eager (both linear layers, then ``log_softmax`` + ``kl_div`` on the whole logits) vs
per-shape torch.compile of that.

``fused`` is ``rosita_fast.ops.fused_linear_kd_loss(sh, sw, th, tw, sb, tb, 2.0, "kl",
"batchmean")`` (C++ backend on CPU: per chunk of tokens two oneDNN/MKL GEMMs, the kd_logits_loss
training kernel, and the products of the chunk's gradient). Shape: 4096 tokens, hidden 768,
BERT's vocabulary of 30,522 (each logits tensor 477 MiB in fp32); only the student's hidden
states, weight and bias get gradients. Checked against fp32 eager (float64 copies of the logits
would take minutes per row here). ``bwd`` rows time only the backward: for the fused op that is
the scaling of the gradients its forward computed, so compare ``fwdbwd``.
Modes, dtypes, the compile rows and the peak-memory method: ``_harness.py``. Results:
``results/fused_linear_kd_loss.md`` and ``.json``.

Run: ``python -m pytest benchmarks/bench_fused_linear_kd_loss.py`` (``-k`` picks a subset; a subset
is written to ``results/fused_linear_kd_loss.partial.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import Case, OpSpec, measure, parametrize

from rosita_fast import ops

TEMPERATURE = 2.0
CASES = [Case("n4096-h768-v30522", {"tokens": 4096, "hidden": 768, "vocab": 30522,
                                    "reference_dtype": "fp32"})]


def _fused(sh, sw, th, tw, sb, tb):
    return ops.fused_linear_kd_loss(sh, sw, th, tw, sb, tb, TEMPERATURE, "kl", "batchmean")


def _eager(sh, sw, th, tw, sb, tb):
    s = F.linear(sh, sw, sb)
    t = F.linear(th, tw, tb)
    return F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                    reduction="batchmean", log_target=True)


def _inputs(case: Case, device: str, dtype: torch.dtype):
    n, h, v = (case.params[k] for k in ("tokens", "hidden", "vocab"))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    scale = h**-0.5 * 4
    return randn(n, h), randn(v, h, scale=scale), randn(n, h), randn(v, h, scale=scale), \
        randn(v), randn(v)


SPEC = OpSpec(
    name="fused_linear_kd_loss",
    fused=_fused,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.fused_linear_kd_loss(sh, sw, th, tw, sb, tb, 2.0, 'kl', "
    "'batchmean')`; eager: `kl_div(log_softmax(linear(sh, sw, sb) / 2), log_softmax(linear(th, "
    "tw, tb) / 2), 'batchmean', log_target=True)`. Case `n{tokens}-h{hidden}-v{vocab}`; "
    "gradients for sh, sw, sb only; checked against fp32 eager",
    grad_inputs=(0, 1, 4),
)


def _keep(dtype: str, case: Case, mode: str) -> bool:
    return mode in ("fwd", "fwdbwd")


@parametrize(CASES, dtypes=("fp32",), keep=_keep)
def test_fused_linear_kd_loss(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

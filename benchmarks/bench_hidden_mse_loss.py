"""hidden_mse_loss: rosita_fast's one-launch hidden-state distillation vs PyTorch eager vs per-shape
torch.compile.

``fused`` is ``rosita_fast.ops.hidden_mse_loss(student, teacher, mask=mask)`` over all pairs (C++
backend on CPU: one parallel region over every pair's row blocks, and one more for all the
gradients); ``eager`` sums, pair by pair, the masked mean squared error as
``rosita_fast.distill.losses.hidden_mse`` writes it. Only the student states get gradients. Shapes:
8 layer pairs of BERT-base states (32 x 128 x 768), and of a small batch (8 x 64 x 768); the mask
drops the last quarter of every sequence but the first.
Modes, dtypes, the compile rows and the peak-memory method: ``_harness.py``. Results:
``results/hidden_mse_loss.md`` and ``.json``.

Run: ``python -m pytest benchmarks/bench_hidden_mse_loss.py`` (``-k`` picks a subset; a subset is
written to ``results/hidden_mse_loss.partial.*``).
"""

from __future__ import annotations

import torch
from _harness import Case, OpSpec, measure, parametrize

from rosita_fast import ops

PAIRS = 8
CASES = [Case(f"p{PAIRS}-b{b}-t{t}-h{h}", {"batch": b, "seq": t, "hidden": h})
         for b, t, h in ((32, 128, 768), (8, 64, 768))]


def _fused(*args):
    return ops.hidden_mse_loss(list(args[:PAIRS]), list(args[PAIRS:2 * PAIRS]), mask=args[-1])


def _eager(*args):
    mask = args[-1].to(torch.float32)
    total = 0
    for s, t in zip(args[:PAIRS], args[PAIRS:2 * PAIRS], strict=True):
        d = s.float() - t.float()
        total = total + ((d * d).sum(-1) * mask).sum() / (mask.sum().clamp_min(1) * s.shape[-1])
    return total


def _inputs(case: Case, device: str, dtype: torch.dtype):
    b, t, h = (case.params[k] for k in ("batch", "seq", "hidden"))
    states = [torch.randn(b, t, h, device=device).to(dtype) for _ in range(2 * PAIRS)]
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[1:, (3 * t) // 4:] = False
    return (*states, mask)


SPEC = OpSpec(
    name="hidden_mse_loss",
    fused=_fused,
    eager=_eager,
    make_inputs=_inputs,
    description="fused: `rosita_fast.ops.hidden_mse_loss(student, teacher, mask=mask)` over "
    f"{PAIRS} pairs; eager: the sum over the pairs of the masked mean of `(s - t)**2` (as "
    "`rosita_fast.distill.losses.hidden_mse`). Case `p{pairs}-b{batch}-t{seq}-h{hidden}`; only "
    "the student states get gradients",
    grad_inputs=tuple(range(PAIRS)),
)


@parametrize(CASES)
def test_hidden_mse_loss(benchmark, device, dtype, case, mode, impl):
    measure(benchmark, SPEC, device, dtype, case, mode, impl)

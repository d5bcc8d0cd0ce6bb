"""lowrank_linear: rosita_fast's fused kernel vs PyTorch eager vs torch.compile, at BERT shapes.

CPU rows time the C++ kernel (the default CPU backend); CUDA rows (only where a GPU exists) time
the Triton kernel. The activation follows BERT: GELU on the 768->3072 FFN input projection, none on
the attention (768->768) and FFN output (3072->768) projections; all layers have a bias.

Run: ``pytest benchmarks/bench_lowrank_linear.py`` (see README, "Benchmarks").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rosita_fast
from rosita_fast import ops

TOKENS = (32, 512, 4096)
IN_OUT = ((768, 768), (768, 3072), (3072, 768))
RANKS = (64, 128, 256)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def _eager(x, u, v, bias, activation):
    z = F.linear(F.linear(x, v), u, bias)
    return F.gelu(z) if activation == "gelu" else z


_compiled = torch.compile(_eager, dynamic=False)


def _fused(x, u, v, bias, activation):
    return ops.lowrank_linear(x, u, v, bias, activation)


IMPLS = {"fused": _fused, "eager": _eager, "compile": _compiled}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("in_out", IN_OUT, ids=lambda io: f"{io[0]}x{io[1]}")
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_linear(benchmark, device, tokens, in_out, rank, impl):
    k, n = in_out
    activation = "gelu" if n > k else "none"
    dtype = torch.float32
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    u = torch.randn(n, rank, device=device, dtype=dtype) * rank**-0.5
    v = torch.randn(rank, k, device=device, dtype=dtype) * k**-0.5
    bias = torch.randn(n, device=device, dtype=dtype)
    fn = IMPLS[impl]
    backend = "cpp" if device == "cpu" else "triton"

    def run():
        with torch.no_grad(), rosita_fast.use_backend(backend):
            out = fn(x, u, v, bias, activation)
        _sync(device)
        return out

    out = run()  # warm-up (and compilation for torch.compile)
    expected = _eager(x, u, v, bias, activation)
    assert torch.allclose(out, expected, rtol=1e-3, atol=1e-3)
    benchmark.group = f"{device} tokens={tokens} {k}->{n} rank={rank} act={activation}"
    benchmark.extra_info.update(
        impl=impl, device=device, tokens=tokens, in_features=k, out_features=n, rank=rank,
        activation=activation, threads=torch.get_num_threads(),
    )
    benchmark(run)

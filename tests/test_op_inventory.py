"""Every public op is complete: a reference, launch specs for its Triton kernels, native sources
for its C++/CUDA backends, a test file, a benchmark and a fuzz entry; and the activation codes
are the same in Python and in the C++/CUDA header."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from test_fuzz import FUZZ

from rosita_fast import ops
from rosita_fast.activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = sorted(ops.OPS)


def test_ops_are_listed():
    assert PUBLIC, "rosita_fast.ops.OPS is empty"
    for name in PUBLIC:
        assert callable(getattr(ops, name)), f"rosita_fast.ops.{name} is not exported"


@pytest.mark.parametrize("op", PUBLIC)
def test_op_has_reference_test_benchmark_and_fuzz_entry(op):
    declared = ops.REGISTRY[op]
    assert "reference" in declared.impls, f"{op}: no plain-PyTorch reference"
    assert (ROOT / "tests" / f"test_{op}.py").exists(), f"{op}: no tests/test_{op}.py"
    assert (ROOT / "benchmarks" / f"bench_{op}.py").exists(), f"{op}: no benchmarks/bench_{op}.py"
    assert op in FUZZ, f"{op}: no fuzz entry in tests/test_fuzz.py"


@pytest.mark.parametrize("op", PUBLIC)
def test_op_backends_have_their_sources(op):
    backends = ops.OPS[op]
    # An op built from another op's kernels (a chunk loop around them) names that op.
    src = getattr(importlib.import_module(f"rosita_fast.ops.{op}"), "KERNELS_FROM", op)
    if src != op:
        assert src in ops.OPS and set(backends) <= set(ops.OPS[src]), (
            f"{op}: its backends {backends} must be those of {src}, whose kernels it runs")
    if "triton" in backends:
        module = importlib.import_module(f"rosita_fast.kernels.{src}")
        specs = module.launch_specs()
        assert specs, f"{op}: kernels/{src}.py declares no launch specs (nothing is lowered)"
    if "cpp" in backends:
        assert (ROOT / "csrc" / "cpu" / f"{src}.cpp").exists(), f"{op}: no csrc/cpu/{src}.cpp"
    if "cuda" in backends:
        assert (ROOT / "csrc" / "cuda" / f"{src}.cu").exists(), f"{op}: no csrc/cuda/{src}.cu"


def test_activation_codes_agree_with_epilogue_header():
    header = (ROOT / "csrc" / "include" / "rosita_fast" / "epilogue.h").read_text()
    enum = re.search(r"enum class Activation\s*:\s*\w+\s*\{([^}]*)\}", header)
    assert enum, "enum Activation not found in epilogue.h"
    cpp = {name.strip(): int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", enum[1])}
    # C++ spells the names in CamelCase: gelu_tanh <-> GeluTanh, relu <-> ReLU.
    python = {name.replace("_", "").lower(): code for name, code in ACTIVATIONS.items()}
    assert {name.lower(): code for name, code in cpp.items()} == python


def test_triton_kernels_use_the_python_activation_codes():
    from rosita_fast.kernels import _common

    assert _common.ACTIVATION_CODES is ACTIVATIONS

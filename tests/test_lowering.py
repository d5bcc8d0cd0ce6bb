"""Lowering: every Triton kernel, at every configuration it can be launched with, compiles ahead of
time for sm_80 and sm_90 (PTX and cubin, no GPU needed), its shared memory fits the device, its
2-D pointer offsets are 64-bit, and its products use the tensor cores the docs promise (TF32 for
fp32 operands, as tf32x3; fp16/bf16 MMAs for fp16/bf16 operands)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

# Max dynamic shared memory per block (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# PTX operand types of the mma/wgmma instructions for each LaunchSpec.dot_dtype.
MMA_TYPES = {"fp32": ["tf32"], "fp16": ["f16"], "bf16": ["bf16"]}
WORKER = Path(__file__).with_name("lowering_worker.py")


@pytest.fixture(scope="module")
def lowering_records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, "the lowering worker compiled nothing"
    return records


def _jit_kernels_in_package():
    """Names of all launchable kernels: module-level @triton.jit functions named *_kernel."""
    import rosita_fast.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"rosita_fast.kernels.{info.name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and hasattr(value, "fn"):
                names.add(attr)
    return names


def test_every_kernel_has_launch_specs(lowering_records):
    compiled = {r["name"].split("[")[0] for r in lowering_records}
    missing = _jit_kernels_in_package() - compiled
    assert not missing, f"kernels without launch specs (not lowering-checked): {sorted(missing)}"


def test_all_specs_lower_for_sm80_and_sm90(lowering_records):
    failures, too_big = [], []
    for r in lowering_records:
        if "error" in r:
            failures.append(f"{r['name']} sm_{r['cc']}: {r['error']}")
            continue
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, r
        assert r["compiled_warps"] == r["num_warps"], r
        if r["shared"] > SHARED_LIMIT[r["cc"]]:
            too_big.append(f"{r['name']} sm_{r['cc']}: {r['shared']} B > {SHARED_LIMIT[r['cc']]} B")
    assert not failures, "lowering failed:\n" + "\n".join(failures)
    assert not too_big, "shared memory over the per-block limit:\n" + "\n".join(too_big)
    per_target = {cc: sum(1 for r in lowering_records if r["cc"] == cc) for cc in SHARED_LIMIT}
    assert per_target[80] == per_target[90] > 0
    # Printed with -s / in the CI log: the resource report for every config.
    for r in lowering_records:
        print(f"{r['name']:<48} sm_{r['cc']} shared={r['shared']:>7} B warps={r['num_warps']}")


def _rank(kind: str) -> int:
    return 0 if kind.startswith("scalar_") else int(kind.split("d_")[0])


def _compiled(records):
    return [r for r in records if "error" not in r]


def test_no_32bit_tile_offsets(lowering_records):
    """Tile pointer offsets (rows * stride + cols * stride) must be 64-bit: int32 ones wrap past
    2^31 elements (an [M, N] scratch buffer, a strided view). Counted on the TTIR's tt.addptr."""
    bad = []
    for r in _compiled(lowering_records):
        counts = r["addptr_offsets"]
        assert counts, f"{r['name']}: no tt.addptr found in the TTIR (parser out of date?)"
        # kinds: "scalar_i32", "1d_i64", "2d_i32", ... (see lowering_worker.addptr_offsets)
        n32 = sum(n for kind, n in counts.items() if kind.endswith("_i32") and _rank(kind) >= 2)
        if n32:
            bad.append(f"{r['name']} sm_{r['cc']}: {n32} tt.addptr with 2-D int32 offsets")
    assert not bad, "32-bit 2-D pointer offsets:\n" + "\n".join(bad)


def test_products_use_the_documented_tensor_cores(lowering_records):
    """fp32 operands: tf32x3 products (TF32 tensor cores, three products each); fp16/bf16: native
    fp16/bf16 tensor cores with fp32 accumulation (not upcast to TF32)."""
    bad = []
    for r in _compiled(lowering_records):
        dtype = r["dot_dtype"]
        if dtype is None:
            continue
        if r["mma_types"] != MMA_TYPES[dtype]:
            bad.append(f"{r['name']} sm_{r['cc']}: mma operands {r['mma_types']}, "
                       f"expected {MMA_TYPES[dtype]}")
        if dtype == "fp32" and r["dot_precisions"] != ["tf32x3"]:
            bad.append(f"{r['name']} sm_{r['cc']}: tt.dot input precisions {r['dot_precisions']}, "
                       "expected ['tf32x3']")
    assert not bad, "products off the documented tensor-core path:\n" + "\n".join(bad)

"""Lowering: every Triton kernel, at every configuration it can be launched with, compiles ahead of
time for sm_80 and sm_90 (PTX and cubin, no GPU needed) and its shared memory fits the device."""

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
        print(f"{r['name']:<44} sm_{r['cc']} shared={r['shared']:>7} B warps={r['num_warps']}")

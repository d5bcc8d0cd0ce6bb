"""Compile every Triton kernel at every launch configuration for real GPU targets, without a GPU.

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter replaces kernels with
Python callables that cannot be lowered). Prints one JSON object per (kernel spec, target): the
resources, plus what test_lowering checks in the generated code: the offset types of the TTIR's
``tt.addptr`` ops (2-D int32 offsets overflow past 2^31 elements), the ``tt.dot`` input precisions
and the operand types of the PTX's ``mma``/``wgmma`` tensor-core instructions.

Arguments (optional): module names under rosita_fast.kernels to compile (default: all).
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import pkgutil
import re
import sys
from concurrent.futures import ProcessPoolExecutor

TARGETS = (80, 90)

# "%p = tt.addptr %base, %off : tensor<64x64x!tt.ptr<f16>>, tensor<64x64xi32> loc(...)": the
# offset operand's type is the last tensor type of the line.
_ADDPTR_OFFSET = re.compile(r"tt\.addptr\b.*:.*,\s*(tensor<((?:\d+x)+)(i\d+)>|i\d+)")
_DOT_PRECISION = re.compile(r"tt\.dot\b.*inputPrecision\s*=\s*(\w+)")
# sm_80: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (D, A, B, C types);
# sm_90: wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 (D, A, B types).
_MMA = re.compile(r"\bmma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.\w+\.(\w+)\.(\w+)\.")
_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.(\w+)\.(\w+)")


def addptr_offsets(ttir: str) -> dict[str, int]:
    """Count of ``tt.addptr`` ops per offset type: "scalar_i32", "1d_i64", "2d_i32", ..."""
    counts = collections.Counter()
    for line in ttir.splitlines():
        m = _ADDPTR_OFFSET.search(line)
        if m is None:
            continue
        if m[2] is None:
            counts[f"scalar_{m[1]}"] += 1
        else:
            counts[f"{m[2].count('x')}d_{m[3]}"] += 1
    return dict(counts)


def mma_operand_types(ptx: str) -> list[str]:
    """The operand types (A and B) of every tensor-core MMA instruction in the PTX."""
    types = set()
    for pattern in (_MMA, _WGMMA):
        for a, b in pattern.findall(ptx):
            types.update((a, b))
    return sorted(types)


def _all_specs(names=None):
    import rosita_fast.kernels as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if names and info.name not in names:
            continue
        module = importlib.import_module(f"rosita_fast.kernels.{info.name}")
        if hasattr(module, "launch_specs"):
            specs.extend((info.name, i) for i in range(len(module.launch_specs())))
    return specs


def _compile(job):
    module_name, index, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"rosita_fast.kernels.{module_name}")
    spec = module.launch_specs()[index]
    record = {
        "module": module_name,
        "name": spec.name,
        "cc": cc,
        "num_warps": spec.num_warps,
        "dot_dtype": getattr(spec, "dot_dtype", None),
    }
    try:
        src = ASTSource(
            fn=spec.kernel,
            signature=spec.signature,
            constexprs=spec.constexprs,
            attrs=getattr(spec, "attrs", None),
        )
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        record.update(
            shared=compiled.metadata.shared,
            ptx_bytes=len(compiled.asm.get("ptx", "")),
            cubin_bytes=len(compiled.asm.get("cubin", b"")),
            compiled_warps=compiled.metadata.num_warps,
            addptr_offsets=addptr_offsets(compiled.asm["ttir"]),
            dot_precisions=sorted(set(_DOT_PRECISION.findall(compiled.asm["ttir"]))),
            mma_types=mma_operand_types(compiled.asm.get("ptx", "")),
        )
    except Exception as exc:  # reported per spec so one failure does not hide the others
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run the lowering worker with TRITON_INTERPRET unset")
    jobs = [(m, i, cc) for (m, i) in _all_specs(sys.argv[1:]) for cc in TARGETS]
    workers = int(os.environ.get("ROSITA_FAST_LOWERING_WORKERS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for record in pool.map(_compile, jobs):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

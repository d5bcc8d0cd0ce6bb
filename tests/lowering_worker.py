"""Compile every Triton kernel at every launch configuration for real GPU targets, without a GPU.

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter replaces kernels with
Python callables that cannot be lowered). Prints one JSON object per (kernel spec, target).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from concurrent.futures import ProcessPoolExecutor

TARGETS = (80, 90)


def _all_specs():
    import rosita_fast.kernels as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
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
    record = {"module": module_name, "name": spec.name, "cc": cc, "num_warps": spec.num_warps}
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
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
        )
    except Exception as exc:  # reported per spec so one failure does not hide the others
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run the lowering worker with TRITON_INTERPRET unset")
    jobs = [(m, i, cc) for (m, i) in _all_specs() for cc in TARGETS]
    workers = int(os.environ.get("ROSITA_FAST_LOWERING_WORKERS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for record in pool.map(_compile, jobs):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

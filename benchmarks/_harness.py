"""Shared machinery of the benchmark files: one op's file declares an :class:`OpSpec` and its
cases, this module does the measuring and ``conftest.py`` writes the results.

Every benchmark row is (device, dtype, case, mode) and is timed for three implementations:

- ``fused``: the rosita_fast op (``rosita_fast.use_backend`` forces the backend: ``cpp`` on CPU,
  ``triton`` on CUDA, so a row never measures a fallback; the forcing is a context variable, which
  CUDA backward calls, run on autograd's device thread, do not see: they take the op's default
  route, the Triton kernels for the ranks benchmarked here);
- ``eager``: the plain PyTorch composition a user would write, in the benchmark dtype;
- ``compile``: that same function through ``torch.compile(dynamic=False, fullgraph=True)``,
  compiled afresh for every shape, dtype and mode after ``torch._dynamo.reset()``, with
  ``fail_on_recompile_limit_hit`` on (never a silent eager fallback), ``error_on_recompile`` on
  while timing (the timed calls run the graph compiled for exactly this shape) and a check that
  dynamo did compile a graph (``TORCHDYNAMO_DISABLE=1`` would otherwise time eager). Compile time
  is spent in the warm-up, outside the timings. For ``bwd``/``fwdbwd`` the forward function is
  compiled and AOTAutograd produces the compiled backward.

Modes:

- ``fwd``: forward under ``torch.no_grad()`` (inference);
- ``bwd``: backward only. The forward graph is built once, outside the timed region, with every
  floating-point input requiring grad; each timed call is
  ``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)``: the gradients of all inputs,
  nothing of the forward;
- ``fwdbwd``: forward with grad enabled, then ``torch.autograd.grad(out, inputs, grad_out)``.

Before timing, each implementation's output (and, for ``bwd``/``fwdbwd``, every input gradient) is
checked against the eager function run in float64 on the same inputs: max |error| must stay within
``TOLERANCE[dtype] * max |reference|``.

Peak memory is measured in one separate, untimed call after the warm-up, as the largest amount of
memory allocated during the call above what was allocated when it started (so it counts the
outputs, the saved activations of ``fwdbwd``, the gradients and every temporary; the retained graph
of ``bwd`` predates the call and is not counted). CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. CPU (torch keeps no allocator statistics there): the memory events of
``torch.profiler.profile(profile_memory=True)`` in time order, peak of their running sum. That sees
every tensor allocated through torch's CPU allocator on the calling thread, which is where eager
ATen ops and the code ``torch.compile`` generates allocate; it does not see allocations made on
OpenMP worker threads (the profiler state is thread-local), i.e. the per-thread scratch blocks of
the C++ kernels, nor memory that BLAS/oneDNN take from their own allocators.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import itertools
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo

import rosita_fast

IMPLS = ("fused", "eager", "compile")
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Max |error| allowed, relative to max |reference| (float64 eager). Measured at the BERT shapes:
# fp32 ~1e-6, bf16 ~4e-3 (inputs and, in eager, the rank-r intermediate rounded to bf16).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DEVICES = ("cpu", "cuda")
# pytest-benchmark settings for every row: after our own warm-up, at least MIN_ROUNDS rounds, and
# more while the row has taken under MAX_TIME seconds.
MIN_ROUNDS = 7
MAX_TIME = 0.3
BENCH_OPTIONS = {"min_rounds": MIN_ROUNDS, "max_time": MAX_TIME, "warmup": False}

METHOD = {
    "time": f"median wall time of pytest-benchmark rounds (at least {MIN_ROUNDS} rounds, more "
    f"while under {MAX_TIME} s) after two warm-up calls; CUDA calls end with a synchronize",
    "compile": "torch.compile(eager, dynamic=False, fullgraph=True), a fresh callable per shape, "
    "dtype and mode after torch._dynamo.reset(); fail_on_recompile_limit_hit=True, "
    "error_on_recompile=True while timing, and a check that dynamo compiled a graph (never an "
    "eager fallback); compile time excluded",
    "fwd": "forward under torch.no_grad()",
    "bwd": "backward only: torch.autograd.grad(out, inputs, grad_out, retain_graph=True) on a "
    "forward graph built once outside the timed region (gradients of all floating inputs)",
    "fwdbwd": "forward with grad enabled, then torch.autograd.grad(out, inputs, grad_out)",
    "bf16": "all inputs bf16; eager and compile run in bf16 as a user would; the fused op "
    "accumulates in fp32 internally",
    "peak": "peak memory allocated during one separate untimed call, above what was allocated "
    "when it started, in MiB. CUDA: torch.cuda.max_memory_allocated. CPU: running sum of "
    "torch.profiler memory events; this sees tensors allocated through torch's allocator on the "
    "calling thread (all of eager's and compiled code's tensors, the fused op's outputs and "
    "buffers), not the per-thread scratch the C++ kernels allocate on OpenMP worker threads nor "
    "BLAS/oneDNN-internal memory",
    "check": "before timing, outputs and input gradients match float64 eager within "
    + ", ".join(f"{n} {TOLERANCE[d]:g}" for n, d in DTYPES.items()) + " x max|reference|",
}


@dataclass(frozen=True)
class Case:
    """One shape of an op. ``id`` is what ``-k`` matches and the table shows (no spaces)."""

    id: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class OpSpec:
    """What a benchmark file declares about its op.

    ``make_inputs(case, device, dtype)`` returns the positional arguments of both ``fused`` and
    ``eager``; its floating-point tensors are the differentiable inputs, or those at the positions
    ``grad_inputs`` lists (e.g. a loss's student logits, not the teacher's). ``fused`` and
    ``eager`` must compute the same function; ``eager`` is also what ``torch.compile`` compiles
    and, run in float64, the reference of the correctness check.
    """

    name: str
    fused: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]
    make_inputs: Callable[[Case, str, torch.dtype], tuple]
    description: str
    backends: dict[str, str] = field(default_factory=lambda: {"cpu": "cpp", "cuda": "triton"})
    grad_inputs: tuple[int, ...] | None = None


def parametrize(cases: Sequence[Case], *, dtypes: Sequence[str] = DTYPES,
                keep: Callable[[str, Case, str], bool] | None = None):
    """Decorator: one test per (device, dtype, case, mode, impl), in that nesting order, with
    ids like ``cpu-fp32-t32-768x768-r64-none-fwd-fused``, and the pytest-benchmark settings.
    CUDA rows are skipped where there is no GPU. ``keep(dtype, case, mode)``, if given, drops
    the rows it returns False for (e.g. training modes of inference-only cases)."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    params = [
        pytest.param(
            device, dtype, case, mode, impl,
            id=f"{device}-{dtype}-{case.id}-{mode}-{impl}",
            marks=[no_gpu] if device == "cuda" else [],
        )
        for device, dtype, case, mode, impl in itertools.product(
            DEVICES, dtypes, cases, MODES, IMPLS
        )
        if keep is None or keep(dtype, case, mode)
    ]

    def deco(fn):
        fn = pytest.mark.parametrize("device,dtype,case,mode,impl", params)(fn)
        return pytest.mark.benchmark(**BENCH_OPTIONS)(fn)

    return deco


def row_key(params: dict[str, Any]) -> tuple[str, str, str, str]:
    """(device, dtype, case id, mode) of a test's parameters: the row its impl belongs to."""
    case = params["case"]
    return (params["device"], params["dtype"], getattr(case, "id", str(case)), params["mode"])


# ---- measuring ----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _check_close(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], dtype, what: str):
    names = ["output"] + [f"grad of input {i}" for i in range(len(ref) - 1)]
    for name, g, r in zip(names, got, ref, strict=True):
        scale = r.abs().max().item() if r.numel() else 0.0
        err = (g.double() - r).abs().max().item() if r.numel() else 0.0
        assert err <= TOLERANCE[dtype] * max(scale, 1e-30), (
            f"{what}: {name} differs from float64 eager by {err:.3g} "
            f"(max |reference| {scale:.3g}, tolerance {TOLERANCE[dtype]:g} x that)"
        )


def measure(benchmark, spec: OpSpec, device: str, dtype: str, case: Case, mode: str, impl: str):
    """Check, warm up, measure peak memory and time one (row, impl)."""
    torch_dtype = DTYPES[dtype]
    torch.manual_seed(0)
    args = list(spec.make_inputs(case, device, torch_dtype))
    floating = [i for i, a in enumerate(args)
                if isinstance(a, torch.Tensor) and a.is_floating_point()]
    diff = list(spec.grad_inputs) if spec.grad_inputs is not None else floating
    training = mode != "fwd"

    ref, grad_out = _reference(spec, args, floating, diff, training,
                               (device, dtype, case.id, mode),
                               _REFERENCE_DTYPES[case.params.get("reference_dtype", "fp64")])
    if training:
        for i in diff:
            args[i].requires_grad_(True)
    inputs = [args[i] for i in diff]

    if impl == "compile":
        torch._dynamo.reset()  # fresh caches: this shape compiles on its own, no recompile limit
        fn = torch.compile(spec.eager, dynamic=False, fullgraph=True)
    else:
        fn = spec.fused if impl == "fused" else spec.eager

    with contextlib.ExitStack() as stack:
        stack.enter_context(rosita_fast.use_backend(spec.backends[device]))
        stack.enter_context(torch._dynamo.config.patch(fail_on_recompile_limit_hit=True))
        stack.enter_context(torch.set_grad_enabled(training))
        graphs = _compiled_graphs()
        run = _runner(fn, args, inputs, grad_out, mode, device)  # bwd: compiles the forward here
        first = run()  # compiles (compile rows) and is checked
        _check_close(first if training else [first], ref, torch_dtype,
                     f"{spec.name} {impl} {device} {dtype} {case.id} {mode}")
        del first
        if impl == "compile" and _compiled_graphs() <= graphs:
            raise RuntimeError("torch.compile compiled no graph (is dynamo disabled?): the compile "
                               "row would time eager")
        run()
        stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
        peak = peak_memory_mib(run, device)
        benchmark.group = f"{device} {dtype} {case.id} {mode}"
        benchmark.extra_info.update(
            op=spec.name, impl=impl, device=device, dtype=dtype, case=case.id, mode=mode,
            peak_mib=peak, threads=torch.get_num_threads(), backend=spec.backends[device],
            **{f"case_{k}": v for k, v in case.params.items()},
        )
        benchmark(run)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


_REFERENCE: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
_REFERENCE_DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def _reference(spec: OpSpec, args: list, floating: list[int], diff: list[int], training: bool,
               row: tuple, ref_dtype: torch.dtype = torch.float64):
    """Eager in float64 (or the case's ``reference_dtype``: for shapes whose float64 copies would
    not fit in memory) on the same values: the output and, when training, the input gradients
    for a random output gradient (returned too, in the benchmark dtype). The three impls of a row
    run one after the other and share it; only the latest row is kept."""
    key = (spec.name, *row)
    if key not in _REFERENCE:
        _REFERENCE.clear()
        ref_args = [a.detach().to(ref_dtype).requires_grad_(training and i in diff)
                    if i in floating else a for i, a in enumerate(args)]
        with torch.set_grad_enabled(training):
            ref_out = spec.eager(*ref_args)
        grad_out = torch.randn(ref_out.shape, device=ref_out.device, dtype=args[diff[0]].dtype)
        ref = [ref_out.detach()]
        if training:
            ref += torch.autograd.grad(ref_out, [ref_args[i] for i in diff],
                                       grad_out.to(ref_dtype))
        _REFERENCE[key] = (ref, grad_out)
    return _REFERENCE[key]


def _runner(fn, args, inputs, grad_out, mode, device) -> Callable[[], Any]:
    if mode == "fwd":
        def run():
            out = fn(*args)
            _sync(device)
            return out
    elif mode == "bwd":
        out = fn(*args)  # the graph, built once, outside the timed calls

        def run():
            grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
            _sync(device)
            return [out.detach(), *grads]
    else:
        def run():
            out = fn(*args)
            grads = torch.autograd.grad(out, inputs, grad_out)
            _sync(device)
            return [out.detach(), *grads]
    return run


def peak_memory_mib(fn: Callable[[], Any], device: str) -> float:
    """Peak memory allocated by torch during one call of ``fn``, above the level at its start."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak / 2**20
    _check_cpu_peak_method()
    return _cpu_peak_bytes(fn) / 2**20


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()  # kept alive until the profile ends: the outputs count
    del result
    # Raw events (FunctionEvent attributes allocations to ops and drops most "[memory]" rows).
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


@functools.cache
def _check_cpu_peak_method() -> None:
    # The method must see a known allocation exactly, and a temporary freed within the call.
    x = torch.ones(1 << 18)  # 1 MiB
    one = _cpu_peak_bytes(lambda: torch.empty(1 << 18))
    two = _cpu_peak_bytes(lambda: (x * 2) + 1)  # a temporary and the result, each 1 MiB
    assert one == 1 << 20 and (2 << 20) <= two < (2 << 20) + 4096, (
        f"the profiler-based CPU peak-memory measurement is off: {one} and {two} bytes where "
        f"{1 << 20} and {2 << 20} were expected"
    )


# ---- the machine --------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(command: str, load_before: float | None) -> dict[str, Any]:
    """What the results file is headed with. ``load_before``: the 1-minute load average when the
    run started (the run itself then keeps about ``torch_threads`` cores busy)."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("diff", "--quiet", "HEAD", "--")
    gpu = torch.cuda.is_available()
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "load_average_before_run": load_before,
        "load_average_after_run": load_average(),
        "git_commit": commit.stdout.strip() if commit and commit.returncode == 0 else None,
        "git_uncommitted_changes": bool(dirty.returncode) if dirty else None,
        "argv": sys.argv,
    }

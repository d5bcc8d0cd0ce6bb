"""Which library runs the fp32 GEMMs of the C++ backend: oneDNN or ATen (MKL in torch's wheels).

Neither is fastest on every CPU (``csrc/include/rosita_fast/onednn_linear.h`` has the
measurements): oneDNN fuses the bias, activation or residual add into the GEMM, ATen's GEMM can be
faster enough to outweigh the extra pass over the output. By default (``"auto"``) both libraries
are timed on a BERT-layer-sized product, for forward products and for the backward ones
separately, and oneDNN is kept for a kind only where it is at least 5 % faster. The timing runs
once per machine (~0.2 s, on the first import of ``rosita_fast`` there) and is kept in
``<cache>/gemm_route.json`` (``$ROSITA_FAST_CACHE``, else ``~/.cache/rosita_fast``), keyed by the
CPU (model name, family/model/stepping, vector extensions), its core count and the torch version;
every later process installs it instead of timing again. So all processes on a machine route
alike, which exact reproducibility needs (the two libraries round differently: a resumed or
repeated run must compute what the first did).
Delete the file to measure again.

``"onednn"`` and ``"aten"`` force one library (small products always go to ATen, and bf16 always
to oneDNN: see the header). The environment variable ``ROSITA_FAST_GEMM`` (``auto``, ``onednn``
or ``aten``) sets the route when ``rosita_fast`` is imported. The route changes only speed and
rounding, never what is computed.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["GEMM_ROUTES", "gemm_route", "set_gemm_route", "use_gemm_route"]

#: The routes :func:`set_gemm_route` takes, in the order of their codes in the C++ library.
GEMM_ROUTES = ("auto", "onednn", "aten")
ENV = "ROSITA_FAST_GEMM"


def _native() -> bool:
    from rosita_fast._extension import HAS_CPP

    return HAS_CPP and hasattr(torch.ops.rosita_fast, "gemm_route_info")


def set_gemm_route(route: str) -> None:
    """Route the C++ backend's fp32 GEMMs: ``"auto"`` (by the machine's calibration, see the
    module docstring), ``"onednn"`` or ``"aten"``. Raises ``ValueError`` for another name and
    ``RuntimeError`` without the C++ extension."""
    if route not in GEMM_ROUTES:
        raise ValueError(f"set_gemm_route: route must be one of {GEMM_ROUTES}, got {route!r}")
    if not _native():
        raise RuntimeError("set_gemm_route: the C++ extension (rosita_fast._C) is not loaded")
    torch.ops.rosita_fast.set_gemm_route(GEMM_ROUTES.index(route))


@contextmanager
def use_gemm_route(route: str) -> Iterator[None]:
    """Within the block, route the fp32 GEMMs as :func:`set_gemm_route` does; the previous
    setting is restored afterwards (also on an exception)."""
    before = gemm_route()
    set_gemm_route(route)
    try:
        yield
    finally:
        set_gemm_route(before["setting"])


def gemm_route() -> dict[str, Any] | None:
    """The current route, or ``None`` without the C++ extension: ``setting`` (``auto``,
    ``onednn`` or ``aten``), the library fp32 ``forward`` and ``backward`` products use now
    (``"onednn"`` or ``"aten"``), and ``calibration_us``: the calibration's best time per product
    for each library and kind (the machine's cached one, installed at import; all zeros where
    torch has no oneDNN)."""
    if not _native():
        return None
    setting, fwd, bwd, f_dnn, f_aten, b_dnn, b_aten = torch.ops.rosita_fast.gemm_route_info()
    return {
        "setting": GEMM_ROUTES[int(setting)],
        "forward": "onednn" if fwd else "aten",
        "backward": "onednn" if bwd else "aten",
        "calibration_us": {"forward_onednn": f_dnn, "forward_aten": f_aten,
                           "backward_onednn": b_dnn, "backward_aten": b_aten},
    }


CACHE_FILE = "gemm_route.json"
_TIMINGS = ("forward_onednn", "forward_aten", "backward_onednn", "backward_aten")


def machine_key(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """What the cached calibration is keyed by: the CPU (model name, family/model/stepping and
    its widest vector extensions), logical cores and torch version.

    The model name alone is not enough: virtual machines often report a bare ``AMD EPYC``, which
    covers CPUs with and without AVX-512 whose fastest library differs (oneDNN ran this project's
    calibration product 2x faster than ATen on a Zen 5 and slower on a Zen 3, both "AMD EPYC").
    """
    fields = _cpuinfo_fields(Path(cpuinfo),
                             ("model name", "cpu family", "model", "stepping", "flags"))
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = ",".join(f for f in _ISA_FLAGS if f in flags) or "-"
    ident = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return (f"{name} ({ident}; {isa}) | {os.cpu_count()} logical cores | "
            f"torch {torch.__version__}")


#: The vector extensions whose presence changes which GEMM library is faster.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpuinfo_fields(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """The first value of each of ``keys`` in a ``/proc/cpuinfo`` file (none if unreadable)."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key in keys and key not in out:
                    out[key] = value.strip()
                if len(out) == len(keys):
                    break
    except OSError:
        pass
    return out


def cache_file() -> Path:
    """The file that keeps each machine's calibration."""
    from rosita_fast._jit_build import cache_root

    return cache_root() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(entry: Any) -> bool:
    return (isinstance(entry, dict) and all(
        isinstance(entry.get(k), int | float) and entry[k] >= 0 for k in _TIMINGS))


def _install(entry: dict[str, float]) -> None:
    torch.ops.rosita_fast.set_gemm_calibration([float(entry[k]) for k in _TIMINGS])


def _store(path: Path, key: str, timings: dict[str, float]) -> dict[str, float]:
    """Add this machine's timings to the cache unless another process got there first; returns
    the entry every process will use."""
    data = _read_cache(path)
    if _valid(data.get(key)):
        return data[key]
    data[key] = timings
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return timings  # a read-only cache: this process keeps its own measurement
    # Two first processes may race: whichever file landed last is what everyone reads from now.
    final = _read_cache(path).get(key)
    return final if _valid(final) else timings


def init_route() -> None:
    """Set the route when ``rosita_fast.ops`` is imported: ``ROSITA_FAST_GEMM`` if set, else the
    machine's cached calibration (measured and stored now if there is none)."""
    value = os.environ.get(ENV)
    if value:
        if value not in GEMM_ROUTES:
            raise ValueError(f"{ENV}={value!r}: must be one of {GEMM_ROUTES}")
        if _native():
            set_gemm_route(value)
        return
    if not _native():
        return
    path, key = cache_file(), machine_key()
    entry = _read_cache(path).get(key)
    if not _valid(entry):
        entry = _store(path, key, gemm_route()["calibration_us"])  # measures now
    _install(entry)

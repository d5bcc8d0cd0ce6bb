"""Compile the C++ CPU kernels on first import when the install did not (pip's isolated build).

``pip install --no-build-isolation -e .`` compiles ``rosita_fast._C`` at install time. A plain
``pip install -e .`` or ``pip install .`` runs ``setup.py`` in an isolated environment without
torch, so it installs the package without compiling; the first ``import rosita_fast`` then builds
the same sources with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory keyed by
the torch version and a hash of the sources and flags, and loads the result as a plain shared
library (its static initializers register the ``torch.ops.rosita_fast`` ops). Later imports load
the cached library without ninja and without a word.

Environment:

- ``ROSITA_FAST_JIT_BUILD``: unset/``auto`` builds on first import only when no compiled
  ``rosita_fast._C`` is installed; ``0`` never builds (the ops fall back to the reference
  backend, with a warning); ``1`` always uses the first-import build, even over an installed
  ``_C``.
- ``ROSITA_FAST_CACHE``: the cache root (default ``$XDG_CACHE_HOME/rosita_fast``, else
  ``~/.cache/rosita_fast``); libraries go to ``<root>/torch_extensions/<torch>-<hash>/``.
- ``ROSITA_FAST_CSRC``: the C++ source tree to build (default: ``rosita_fast/_csrc`` of a wheel
  install, else the repository's ``csrc/``); for development and tests.
- ``MAX_JOBS``: parallel compile jobs (torch's variable).

This module imports only the standard library at import time: ``setup.py`` reads the flags below
from it, so install-time and first-import builds compile with the same flags.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# -fno-trapping-math/-fno-math-errno (torch's own flags) let GCC if-convert and vectorize the fused
# epilogues; without them the clamp in the polynomial exp keeps the loops scalar.
CXX_FLAGS: tuple[str, ...] = ("-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math",
                              "-fno-math-errno")
LD_FLAGS: tuple[str, ...] = ("-fopenmp",)
#: The Python entry point of ``rosita_fast._C``; the first-import build (a plain library) omits it.
PYTHON_ENTRY = "module.cpp"
LIB_NAME = "rosita_fast_C"
_DONE = "complete"  # written after a successful build and load; a build dir without it is unusable
_STALE_LOCK_S = 15 * 60  # a lock this old belongs to a build that was killed, not a slow one
_LOG_TAIL_LINES = 60


class JitBuildError(RuntimeError):
    """The first-import build failed; the message carries the compiler's output (its tail)."""


def mode() -> str:
    """``"auto"``, ``"off"`` or ``"force"``, from ``ROSITA_FAST_JIT_BUILD``."""
    flag = os.environ.get("ROSITA_FAST_JIT_BUILD", "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return "off"
    if flag in ("1", "true", "on", "yes", "force"):
        return "force"
    return "auto"


def source_dir() -> Path:
    """The C++ source tree (``cpu/``, ``include/``): a wheel's copy or the repository's."""
    if env := os.environ.get("ROSITA_FAST_CSRC"):
        return Path(env)
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise JitBuildError(
        f"the C++ sources are missing: neither {package / '_csrc'} nor {package.parent / 'csrc'} "
        "has a cpu/ folder"
    )


def sources(csrc: Path) -> list[Path]:
    """The translation units of the op library: ``cpu/*.cpp`` minus the Python entry point."""
    return sorted(p for p in (csrc / "cpu").glob("*.cpp") if p.name != PYTHON_ENTRY)


def cache_root() -> Path:
    """The rosita_fast cache root (same rule as ``rosita_fast.models.pretrained.cache_dir``)."""
    if env := os.environ.get("ROSITA_FAST_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rosita_fast"


def build_dir(csrc: Path) -> Path:
    """``<cache>/torch_extensions/<torch version>-<hash of sources, headers, flags, toolchain>``."""
    import torch

    h = hashlib.sha256()
    key = [LIB_NAME, torch.__version__, str(torch.version.git_version), sys.platform,
           f"py{sys.version_info[0]}.{sys.version_info[1]}", os.environ.get("CXX", ""),
           *CXX_FLAGS, "|", *LD_FLAGS]
    h.update("\0".join(key).encode())
    files = sources(csrc) + sorted(p for p in (csrc / "include").rglob("*") if p.is_file())
    for path in files:
        h.update(b"\0" + path.relative_to(csrc).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", torch.__version__)
    return cache_root() / "torch_extensions" / f"{tag}-{h.hexdigest()[:16]}"


def library_path(bdir: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return bdir / f"{LIB_NAME}{LIB_EXT}"


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    # torch runs `ninja` from PATH; a venv used without activating it has the pip-installed ninja
    # next to its python (and in the ninja package), not on PATH.
    if shutil.which("ninja") is not None:
        yield
        return
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        extra.append(ninja.BIN_DIR)
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([*extra, *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def _wait_for_other_build(lock: Path) -> None:
    # torch's file baton waits forever on its lock; a build killed mid-way leaves it behind.
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > _STALE_LOCK_S:
            print(f"rosita_fast: removing stale build lock {lock}", file=sys.stderr, flush=True)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return
        time.sleep(0.2)


def _compiler_output(message: str, bdir: Path) -> str:
    """The tail of a failed build's output, without ninja's long command lines."""
    # ninja -v prints "[i/n] <command>" per step (the first one after torch's "Error building
    # extension ...: " prefix) and repeats the command after "FAILED: <target>".
    progress = re.compile(r"\[\d+/\d+\] (.*)$")
    lines = message.splitlines()
    commands = {m.group(1).strip() for line in lines if (m := progress.search(line))}
    kept = [line for line in lines if not progress.search(line) and line.strip() not in commands]
    tail = kept[-_LOG_TAIL_LINES:]
    if len(kept) > len(tail):
        tail.insert(0, f"[... {len(kept) - len(tail)} earlier lines ...]")
    log = bdir / "build.log"
    with contextlib.suppress(OSError):
        log.write_text(message)
        tail.append(f"(full build output: {log})")
    return "\n".join(tail)


def load() -> str:
    """Load the op library from the cache, compiling it first if needed; return its path.

    Prints one line to stderr when it compiles. Raises :class:`JitBuildError` (with the compiler's
    output) when the sources are missing or do not build or load.
    """
    csrc = source_dir()
    bdir: Path | None = None
    try:
        import torch

        bdir = build_dir(csrc)
        lib = library_path(bdir)
        if (bdir / _DONE).is_file() and lib.is_file():
            torch.ops.load_library(str(lib))
            return str(lib)
        print(
            "rosita_fast: compiling the C++ kernels, about a minute "
            f"(first import; cached in {bdir})",
            file=sys.stderr,
            flush=True,
        )
        bdir.mkdir(parents=True, exist_ok=True)
        _wait_for_other_build(bdir / "lock")
        from torch.utils.cpp_extension import load as cpp_load

        with _ninja_on_path():
            path = cpp_load(
                name=LIB_NAME,
                sources=[str(p) for p in sources(csrc)],
                extra_cflags=list(CXX_FLAGS),
                extra_ldflags=list(LD_FLAGS),
                extra_include_paths=[str(csrc / "include")],
                build_directory=str(bdir),
                is_python_module=False,
                verbose=False,
            )
        done, tmp = bdir / _DONE, bdir / f"{_DONE}.{os.getpid()}"
        with contextlib.suppress(OSError):  # a read-only cache still works, it just rebuilds
            tmp.write_text(f"{path}\n")
            os.replace(tmp, done)
    except JitBuildError:
        raise
    except Exception as exc:  # compiler or ninja missing, compile error, unwritable cache, ...
        message = str(exc)
        if bdir is not None and "\n" in message:
            message = _compiler_output(message, bdir)
        raise JitBuildError(
            f"compiling the C++ kernels from {csrc} on first import failed "
            f"({type(exc).__name__}):\n{message}"
        ) from exc
    return str(path)

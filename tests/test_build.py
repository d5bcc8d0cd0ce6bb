"""The first-import build of the C++ kernels (``rosita_fast/_jit_build.py``).

A plain ``pip install -e .`` runs setup.py in pip's isolated environment, which has no torch, so
nothing is compiled at install time; the first ``import rosita_fast`` compiles ``csrc/cpu`` with
``torch.utils.cpp_extension.load`` into ``$ROSITA_FAST_CACHE``. These tests force that path with
``ROSITA_FAST_JIT_BUILD=1`` (this checkout also has the install-time ``_C``) in subprocesses, each
with its own temporary cache, so they never touch the user's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosita_fast import _jit_build

ROOT = Path(__file__).resolve().parents[1]
COMPILE_LINE = "rosita_fast: compiling the C++ kernels"

# Runs the cpp backend and reports where the op library came from.
PROBE = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, rosita_fast
from rosita_fast import _extension

torch.manual_seed(0)
x, u, v, b = torch.randn(3, 5, 32), torch.randn(48, 8), torch.randn(8, 32), torch.randn(48)
expected = torch.nn.functional.gelu(x @ v.t() @ u.t() + b)
with rosita_fast.use_backend("cpp"):
    y = rosita_fast.ops.lowrank_linear(x, u, v, b, "gelu")
torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
direct = torch.ops.rosita_fast.lowrank_linear_cpp(x, u, v, b, 2)  # 2: gelu
torch.testing.assert_close(direct, expected, rtol=1e-4, atol=1e-4)
print(json.dumps({
    "origin": _extension.CPP_ORIGIN,
    "library": _extension.CPP_LIBRARY,
    "loaded": sorted(torch.ops.loaded_libraries),
    "installed_C_imported": sys.modules.get("rosita_fast._C") is not None,
    "backends": rosita_fast.available_backends(),
    "warnings": [str(w.message) for w in caught if "rosita_fast" in str(w.message)],
}))
"""

# Makes this process look like an install without a compiled rosita_fast._C (find_spec -> None).
HIDE_INSTALLED_C = "import sys; sys.modules['rosita_fast._C'] = None\n"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ROSITA_FAST_JIT_BUILD", "ROSITA_FAST_CSRC", "ROSITA_FAST_CACHE")
    }
    env["ROSITA_FAST_CACHE"] = str(cache)
    env.update(extra)
    return env


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _report(proc: subprocess.CompletedProcess | tuple) -> dict:
    rc, out, err = proc if isinstance(proc, tuple) else (proc.returncode, proc.stdout, proc.stderr)
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    report = json.loads(out.strip().splitlines()[-1])
    report["stderr"] = err
    return report


def _check_jit_loaded(report: dict, cache: Path) -> None:
    assert report["origin"] == "jit", report
    library = Path(report["library"])
    assert library.is_file() and cache in library.parents, report
    # The ops come from the library built into this test's cache, not from the installed _C.
    assert report["loaded"] == [report["library"]], report
    assert not report["installed_C_imported"], report
    assert "cpp" in report["backends"], report
    assert report["warnings"] == [], report


@pytest.mark.slow
def test_first_import_compiles_once_then_loads_from_cache(tmp_path):
    cache = tmp_path / "cache"
    env = _env(cache, ROSITA_FAST_JIT_BUILD="1")
    # Two concurrent first imports on a cold cache: one compiles, the other waits on its lock;
    # both must end up with a working library and the cache must stay usable.
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            _python(PROBE), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    cold = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        cold.append(_report((p.returncode, out, err)))
    print(f"cold first import (compile): {time.perf_counter() - start:.1f}s")
    for report in cold:
        _check_jit_loaded(report, cache)
        assert report["stderr"].count(COMPILE_LINE) == 1, report["stderr"]
        assert "first import; cached in" in report["stderr"], report["stderr"]
    assert cold[0]["library"] == cold[1]["library"]

    # Warm cache: the same library loads without a word.
    warm = _report(subprocess.run(_python(PROBE), env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=600))
    _check_jit_loaded(warm, cache)
    assert warm["library"] == cold[0]["library"]
    assert "rosita_fast:" not in warm["stderr"], warm["stderr"]

    # The default mode builds (here: reuses the cached build) when no compiled _C is installed,
    # which is what a plain `pip install -e .` leaves behind.
    auto = _report(subprocess.run(_python(HIDE_INSTALLED_C + PROBE), env=_env(cache), cwd=ROOT,
                                  capture_output=True, text=True, timeout=600))
    _check_jit_loaded(auto, cache)
    assert auto["library"] == cold[0]["library"]
    assert "rosita_fast:" not in auto["stderr"], auto["stderr"]


@pytest.mark.slow
def test_failed_first_import_build_shows_the_compiler_output(tmp_path):
    # A source tree whose only translation unit does not compile (cheap: it includes nothing).
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc" / "include", csrc / "include")
    (csrc / "cpu").mkdir()
    (csrc / "cpu" / "broken.cpp").write_text("int rosita_fast_broken( { return 0; }\n")
    cache = tmp_path / "cache"
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import rosita_fast\n"
        "from rosita_fast._extension import HAS_CPP, load_error\n"
        "msgs = [str(w.message) for w in caught if 'fall back' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print('WARNING<<', msgs[0], '>>')\n"
        "print('HAS_CPP', HAS_CPP, 'cpp' in rosita_fast.available_backends())\n"
        "print('ERROR<<', load_error('_C'), '>>')\n"
        "try:\n"
        "    with rosita_fast.use_backend('cpp'):\n"
        "        pass\n"
        "except RuntimeError as e:\n"
        "    print('RAISED<<', e, '>>')\n"
    )
    out = subprocess.run(
        _python(code), env=_env(cache, ROSITA_FAST_JIT_BUILD="1", ROSITA_FAST_CSRC=str(csrc)),
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr  # a failed build never breaks `import rosita_fast`
    assert out.stderr.count(COMPILE_LINE) == 1, out.stderr
    assert "HAS_CPP False False" in out.stdout, out.stdout
    for section in ("WARNING<<", "ERROR<<", "RAISED<<"):
        text = out.stdout.split(section, 1)[1].split(">>", 1)[0]
        # The compiler's own diagnostic, with file and line.
        assert "broken.cpp:1:" in text and "error:" in text, (section, text)
    assert "lowrank_linear" in out.stdout.split("WARNING<<", 1)[1]
    # Nothing is marked as built, so the next import tries again.
    assert not list(cache.rglob(_jit_build._DONE)), list(cache.rglob("*"))


def test_jit_build_off_keeps_the_reference_fallback(tmp_path):
    cache = tmp_path / "cache"
    code = HIDE_INSTALLED_C + (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import rosita_fast\n"
        "print(sum('fall back' in str(w.message) for w in caught))\n"
        "print('cpp' in rosita_fast.available_backends())\n"
    )
    out = subprocess.run(_python(code), env=_env(cache, ROSITA_FAST_JIT_BUILD="0"), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["1", "False"], out.stdout + out.stderr
    assert COMPILE_LINE not in out.stderr
    assert not cache.exists()


def test_build_dir_is_keyed_by_torch_version_and_source_hash(tmp_path, monkeypatch):
    import torch

    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    monkeypatch.setenv("ROSITA_FAST_CACHE", str(tmp_path / "cache"))
    first = _jit_build.build_dir(csrc)
    assert first.parent == tmp_path / "cache" / "torch_extensions"
    assert first.name.startswith(torch.__version__.replace("+", "_") + "-")
    assert _jit_build.build_dir(csrc) == first  # deterministic
    # The Python entry point is not part of the op library.
    assert [p.name for p in _jit_build.sources(csrc)] == sorted(
        p.name for p in (csrc / "cpu").glob("*.cpp") if p.name != "module.cpp"
    )
    header = next((csrc / "include").rglob("*.h"))
    header.write_text(header.read_text() + "\n// changed\n")
    edited = _jit_build.build_dir(csrc)
    assert edited != first  # a header edit is a rebuild
    monkeypatch.setattr(_jit_build, "CXX_FLAGS", (*_jit_build.CXX_FLAGS, "-g"))
    assert _jit_build.build_dir(csrc) not in (first, edited)  # so is a flag change


def test_stale_build_lock_is_removed(tmp_path, capsys):
    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - _jit_build._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    _jit_build._wait_for_other_build(lock)
    assert not lock.exists()
    assert "stale build lock" in capsys.readouterr().err


def test_sources_are_found_in_the_checkout(monkeypatch):
    # An editable install builds from the repository's csrc/ (a wheel ships the same files as
    # rosita_fast/_csrc, which source_dir() looks for first).
    monkeypatch.delenv("ROSITA_FAST_CSRC", raising=False)
    assert _jit_build.source_dir().resolve() == (ROOT / "csrc").resolve()

"""Backend registry: listing, forcing, and clear errors instead of silent fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rosita_fast
from rosita_fast import ops
from rosita_fast._extension import HAS_CPP


def test_cpp_extension_is_built():
    # The test suite runs after `pip install --no-build-isolation -e .`; a missing _C here means
    # the build is broken, which must fail loudly rather than skip every cpp test.
    assert HAS_CPP, rosita_fast._extension.load_error("_C")
    assert "cpp" in rosita_fast.available_backends()


def test_triton_available_under_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" in rosita_fast.available_backends()


def test_available_backends_order_and_reference():
    names = rosita_fast.available_backends()
    assert names[0] == "reference"
    assert names == [b for b in rosita_fast.BACKENDS if b in names]
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with rosita_fast.use_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_backend_without_gpu_is_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        with rosita_fast.use_backend("cuda"):
            pass


def test_forced_backend_is_used_and_restored(monkeypatch):
    calls = []
    impls = ops.REGISTRY["lowrank_linear"].impls
    real = impls["reference"]
    monkeypatch.setitem(impls, "reference", lambda *a: calls.append("reference") or real(*a))
    x, u, v = torch.randn(3, 8), torch.randn(5, 2), torch.randn(2, 8)
    ops.lowrank_linear(x, u, v)
    assert calls == [], "the CPU default must be the C++ kernel, not the reference"
    with rosita_fast.use_backend("reference"):
        ops.lowrank_linear(x, u, v)
        assert rosita_fast.backends.forced_backend() == "reference"
    assert calls == ["reference"]
    assert rosita_fast.backends.forced_backend() is None


def test_triton_backend_refuses_cpu_tensors_without_interpreter():
    code = (
        "import torch, rosita_fast\n"
        "try:\n"
        "    with rosita_fast.use_backend('triton'):\n"
        "        pass\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if torch.cuda.is_available():
        pytest.skip("with a GPU the triton backend is available")
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_import_without_interpreter_and_without_cpp_extension(tmp_path):
    # `import rosita_fast` must work with TRITON_INTERPRET unset, and when _C cannot load it must
    # say once which ops fall back to the reference backend.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ok = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c",
         "import rosita_fast; print(rosita_fast.available_backends())"],
        env=env, capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "cpp" in ok.stdout
    # Simulate a failed C++ build: a module named rosita_fast._C that fails to import.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'rosita_fast._C':\n"
        "            raise ImportError('simulated build failure')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import rosita_fast, torch\n"
        "    msgs = [str(x.message) for x in w if 'fall back' in str(x.message)]\n"
        "print(len(msgs), msgs[0] if msgs else '')\n"
        "print(rosita_fast.available_backends())\n"
        "x = torch.randn(2, 4); print(rosita_fast.ops.lowrank_linear(x, torch.randn(3, 2),"
        " torch.randn(2, 4)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("1 ") and "lowrank_linear" in lines[0], out.stdout
    assert "cpp" not in lines[1]
    assert lines[2] == "torch.Size([2, 3])"

"""The fp32 GEMM route of the C++ backend (``rosita_fast.ops.gemm_route`` / ``set_gemm_route``).

Whichever library the calibration picks on the machine running the tests, every GEMM call site
of the C++ kernels is checked here under both forced routes, against the float64 reference,
forward and backward, with strided inputs and products above the small-product threshold
(2^20 multiply-adds, where the route decides): linear_act (every activation, packed and plain
weights), linear_residual_layernorm (with dropout) and the factorized embedding's projection.
Also: the API, ``ROSITA_FAST_GEMM`` at import, the per-machine calibration cache (measured once,
installed by later processes), and that the modules skip packing weights that the ATen route
would never read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_harness import assert_close, f64, rand

import rosita_fast
from rosita_fast import ops

pytestmark = pytest.mark.skipif("cpp" not in rosita_fast.available_backends(),
                                reason="the C++ extension is not available")

ROUTES = ("onednn", "aten")


@pytest.fixture
def route(request):
    with ops.use_gemm_route(request.param):
        yield request.param


def _grads(fn, inputs, seed):
    out = fn(*inputs)
    torch.manual_seed(seed)
    g = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, g)


def _both(fn, inputs):
    """fn on the C++ backend and on the float64 reference, with gradients of every leaf."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    with rosita_fast.use_backend("cpp"):
        out, grads = _grads(fn, inputs, seed)
    ref_inputs = [f64(t).detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                  and t.is_floating_point() else t for t in inputs]
    with rosita_fast.use_backend("reference"):
        ref, ref_grads = _grads(fn, ref_inputs, seed)
    return out, grads, ref, ref_grads


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_route_is_reported(route):
    info = ops.gemm_route()
    assert info["setting"] == route
    assert info["forward"] == info["backward"] == route
    assert set(info["calibration_us"]) == {"forward_onednn", "forward_aten", "backward_onednn",
                                           "backward_aten"}
    assert all(v > 0 for v in info["calibration_us"].values())


def test_auto_follows_the_calibration():
    with ops.use_gemm_route("auto"):
        info = ops.gemm_route()
    c = info["calibration_us"]
    assert info["forward"] == ("onednn" if c["forward_onednn"] < 0.95 * c["forward_aten"]
                               else "aten")
    assert info["backward"] == ("onednn" if c["backward_onednn"] < 0.95 * c["backward_aten"]
                                else "aten")


def test_use_gemm_route_restores_the_setting_after_an_exception():
    before = ops.gemm_route()["setting"]
    other = "aten" if before != "aten" else "onednn"
    with pytest.raises(RuntimeError, match="boom"), ops.use_gemm_route(other):
        assert ops.gemm_route()["setting"] == other
        raise RuntimeError("boom")
    assert ops.gemm_route()["setting"] == before


@pytest.mark.parametrize("bad", ["mkl", "", None, 1])
def test_bad_route_is_refused(bad):
    with pytest.raises(ValueError, match="route must be one of"):
        ops.set_gemm_route(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_linear_act_under_each_route(route, activation, dtype):
    # 133 x 257 x 129 = 4.4M multiply-adds: above the small-product threshold.
    x = rand(133, 257, dtype=dtype, contiguous=False).requires_grad_()
    w = rand(129, 257, dtype=dtype, scale=257**-0.5).requires_grad_()
    b = rand(129, dtype=dtype).requires_grad_()

    def fn(x, w, b):
        return ops.linear_act(x, w, b, activation)

    out, grads, ref, ref_grads = _both(fn, [x, w, b])
    assert_close(out, ref, dtype, f"{route} forward", k=257)
    for name, g, r in zip("xwb", grads, ref_grads, strict=True):
        assert_close(g, r, dtype, f"{route} d{name}", k=133)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_packed_weight_under_each_route(route):
    x = rand(3, 71, 384)
    w = rand(1152, 384, scale=384**-0.5)
    b = rand(1152)
    packed = ops.pack_linear_weight(w, batch_hint=213)
    if packed is None:
        pytest.skip("oneDNN packing is not supported here")
    with torch.no_grad(), rosita_fast.use_backend("cpp"):
        out = ops.linear_act(x, w, b, "gelu", packed)
        plain = ops.linear_act(x, w, b, "gelu")
    with rosita_fast.use_backend("reference"):
        ref = ops.linear_act(f64(x), f64(w), f64(b), "gelu")
    assert_close(out, ref, torch.float32, f"{route} packed", k=384)
    assert_close(plain, ref, torch.float32, f"{route} plain", k=384)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_linear_residual_layernorm_under_each_route(route, dropout_p):
    x = rand(2, 67, 259, contiguous=False).requires_grad_()
    w = rand(131, 259, scale=259**-0.5).requires_grad_()
    b = rand(131).requires_grad_()
    res = rand(2, 67, 131, contiguous=False).requires_grad_()
    g = rand(131, shift=1.0).requires_grad_()
    beta = rand(131).requires_grad_()
    seed = 1234

    def fn(x, w, b, res, g, beta):
        return ops.linear_residual_layernorm(x, w, b, res, g, beta, 1e-5, dropout_p=dropout_p,
                                             dropout_seed=seed)

    out, grads, ref, ref_grads = _both(fn, [x, w, b, res, g, beta])
    assert_close(out, ref, torch.float32, f"{route} forward", k=259)
    for name, gr, r in zip(("x", "w", "b", "res", "ln_w", "ln_b"), grads, ref_grads,
                           strict=True):
        assert_close(gr, r, torch.float32, f"{route} d{name}", k=134)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_factorized_embedding_under_each_route(route):
    batch, length, vocab, rank, hidden = 9, 37, 301, 112, 384  # 333 x 384 x 112 = 14M MACs
    ids = torch.randint(0, vocab, (batch, length))
    pos = torch.arange(length).expand(batch, length)
    tt = torch.randint(0, 2, (batch, length))
    word = rand(vocab, rank).requires_grad_()
    proj = rand(hidden, rank, scale=rank**-0.5).requires_grad_()
    pos_w = rand(64, hidden).requires_grad_()
    tt_w = rand(2, hidden).requires_grad_()
    g = rand(hidden, shift=1.0).requires_grad_()
    beta = rand(hidden).requires_grad_()

    def fn(word, pos_w, tt_w, g, beta, proj):
        return ops.embedding_layernorm(ids, word, pos, pos_w, tt, tt_w, g, beta, 1e-12, proj)

    out, grads, ref, ref_grads = _both(fn, [word, pos_w, tt_w, g, beta, proj])
    assert_close(out, ref, torch.float32, f"{route} forward", k=rank)
    for name, gr, r in zip(("word", "pos", "tt", "ln_w", "ln_b", "proj"), grads, ref_grads,
                           strict=True):
        assert_close(gr, r, torch.float32, f"{route} d{name}", k=batch * length)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_modules_pack_only_for_onednn(route):
    from rosita_fast.modules._derived import pack_for_inference

    w = rand(384, 384)
    packed = pack_for_inference(w, 64)
    if route == "aten":
        assert packed is None
    elif ops.packing_supported(torch.float32):
        assert packed is not None
    assert pack_for_inference(w.double(), 64) is None  # fp64 never packs


def _import_with(value: str) -> subprocess.CompletedProcess:
    code = "import rosita_fast; print(rosita_fast.ops.gemm_route()['setting'])"
    env = dict(os.environ, ROSITA_FAST_GEMM=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_environment_variable_sets_the_route():
    done = _import_with("aten")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "aten"
    bad = _import_with("fastest")
    assert bad.returncode != 0
    assert "ROSITA_FAST_GEMM='fastest'" in bad.stderr


def _route_in_subprocess(cache, **env) -> dict:
    code = ("import json, rosita_fast; "
            "print(json.dumps(rosita_fast.ops.gemm_route()))")
    base = {k: v for k, v in os.environ.items() if k != "ROSITA_FAST_GEMM"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**base, "ROSITA_FAST_CACHE": str(cache), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_calibration_is_measured_once_per_machine_and_shared(tmp_path):
    from rosita_fast.ops._gemm_route import CACHE_FILE, machine_key

    first = _route_in_subprocess(tmp_path)
    path = tmp_path / CACHE_FILE
    stored = json.loads(path.read_text())
    assert stored == {machine_key(): first["calibration_us"]}
    # A later process installs the stored timings instead of measuring: doctored ones that favour
    # oneDNN forward and ATen backward are what it routes by.
    fake = {"forward_onednn": 1.0, "forward_aten": 100.0, "backward_onednn": 100.0,
            "backward_aten": 1.0}
    path.write_text(json.dumps({machine_key(): fake, "another machine": first["calibration_us"]}))
    second = _route_in_subprocess(tmp_path)
    assert second["calibration_us"] == fake
    assert (second["setting"], second["forward"], second["backward"]) == ("auto", "onednn", "aten")
    # A broken file is measured again and rewritten.
    path.write_text("{not json")
    third = _route_in_subprocess(tmp_path)
    assert json.loads(path.read_text()) == {machine_key(): third["calibration_us"]}
    assert all(v > 0 for v in third["calibration_us"].values())


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: {family}
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx fma avx2{extra}

processor\t: 1
model name\t: something else entirely
"""


def test_machine_key_tells_apart_cpus_behind_one_model_name(tmp_path):
    # VMs report a bare "AMD EPYC" for CPUs with and without AVX-512, whose faster GEMM library
    # differs: a calibration cached on one must not be installed on the other.
    from rosita_fast.ops._gemm_route import machine_key

    def key(family: int, extra: str) -> str:
        path = tmp_path / f"cpuinfo-{family}-{len(extra)}"
        path.write_text(_CPUINFO.format(family=family, extra=extra))
        return machine_key(path)

    zen3, zen4 = key(25, ""), key(25, " avx512f avx512_bf16")
    assert zen3 != zen4 and zen3 != key(26, "")
    assert zen3 == key(25, "")  # stable for the same CPU
    assert zen3.startswith("AMD EPYC (25/1/1; avx2,fma) |"), zen3
    assert "avx512f,avx512_bf16" in zen4
    assert "something else" not in zen3  # the first processor's fields only
    # No readable cpuinfo: still a usable key.
    assert "logical cores" in machine_key(tmp_path / "missing")


@pytest.mark.parametrize("bad", [[1.0, 2.0, 3.0], [1.0, -1.0, 1.0, 1.0], [float("nan")] * 4])
def test_bad_calibration_is_refused(bad):
    with pytest.raises(RuntimeError, match="set_gemm_calibration"):
        torch.ops.rosita_fast.set_gemm_calibration(bad)

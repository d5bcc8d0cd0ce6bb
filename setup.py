"""Build rosita_fast: the Python layer, the Triton kernels and the C++/CUDA extensions.

Two ways to install (see README, "Set-up"):

    pip install --no-build-isolation -e .   # compiles the C++ extension now, against the torch
                                            # installed here (what scripts/install.sh does)
    pip install -e .                        # pip's isolated build cannot see torch: installs
                                            # without compiling; the C++ kernels compile on first
                                            # import (rosita_fast/_jit_build.py), cached

Extensions (only when torch is importable here):
- ``rosita_fast._C``: C++ CPU ops from ``csrc/cpu`` (OpenMP), built on every machine.
- ``rosita_fast._C_cuda``: CUDA ops from ``csrc/cuda``, built only when torch has CUDA
  (``torch.version.cuda``) and ``nvcc`` is found. ``ROSITA_FAST_BUILD_CUDA=1`` forces it on (and
  fails loudly if it cannot be built), ``ROSITA_FAST_BUILD_CUDA=0`` forces it off.

The C++ sources (``csrc/cpu``, ``csrc/include``) always ship inside the package as
``rosita_fast/_csrc``, so a wheel built without torch can compile them on first import.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's isolated build environment: no torch, so nothing to compile against
    torch = None

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")


def _jit_build_module():
    # The compile flags live in rosita_fast/_jit_build.py (stdlib-only at import), so install-time
    # and first-import builds use the same ones; load the file without importing the package.
    path = os.path.join(ROOT, "rosita_fast", "_jit_build.py")
    spec = importlib.util.spec_from_file_location("_rosita_fast_jit_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda() -> bool:
    flag = os.environ.get("ROSITA_FAST_BUILD_CUDA", "").strip().lower()
    has_toolchain = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if flag in ("0", "false", "off", "no"):
        return False
    if flag in ("1", "true", "on", "yes"):
        if torch.version.cuda is None:
            sys.exit("ROSITA_FAST_BUILD_CUDA=1 but this torch has no CUDA support.")
        return True
    return has_toolchain


def _extensions() -> list:
    if torch is None:
        cuda_flag = os.environ.get("ROSITA_FAST_BUILD_CUDA", "").strip().lower()
        if cuda_flag in ("1", "true", "on", "yes"):
            sys.exit(
                "ROSITA_FAST_BUILD_CUDA=1 but torch is not importable in this build environment: "
                "install torch first, then `pip install --no-build-isolation -e .`."
            )
        print(
            "rosita_fast: torch is not importable in this build environment (pip's isolated "
            "build); installing without compiling: the C++ kernels compile on first import. "
            "Use `pip install --no-build-isolation` to compile them now.",
            file=sys.stderr,
        )
        return []
    jit = _jit_build_module()
    exts = [
        CppExtension(
            "rosita_fast._C",
            sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
            include_dirs=[INCLUDE],
            extra_compile_args={"cxx": list(jit.CXX_FLAGS)},
            extra_link_args=list(jit.LD_FLAGS),
        )
    ]
    if _want_cuda():
        sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        archs = os.environ.get("ROSITA_FAST_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        exts.append(
            CUDAExtension(
                "rosita_fast._C_cuda",
                sources,
                include_dirs=[INCLUDE],
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc},
            )
        )
    return exts


packages = find_packages(include=["rosita_fast", "rosita_fast.*"])
packages += ["rosita_fast.kernels", "rosita_fast._csrc"]
ext_modules = _extensions()

setup(
    name="rosita_fast",
    version="0.1.0",
    description="Kernel-accelerated ROSITA compression for BERT-family models",
    python_requires=">=3.10",
    packages=packages,
    # The Triton kernels live in the top-level kernels/ directory but ship as rosita_fast.kernels:
    # a top-level module named `kernels` would collide with an unrelated PyPI package.
    # The C++ sources ship as rosita_fast/_csrc (data only) for the first-import build.
    package_dir={"rosita_fast.kernels": "kernels", "rosita_fast._csrc": "csrc"},
    # The shipped recipes (rosita_fast/recipes/*.yaml) are data, not modules.
    package_data={
        "rosita_fast": ["recipes/*.yaml", "recipes/*.json"],
        "rosita_fast._csrc": ["cpu/*.cpp", "include/**/*"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)} if ext_modules else {},
    install_requires=[
        # No torch here on purpose: a bare requirement would let pip replace the installed CPU or
        # CUDA build with a multi-GB download. Install torch first (README).
        "triton>=3.3",
        "transformers>=4.40",
        "datasets",
        "safetensors",
        "tqdm",
        "pyyaml",
        "numpy",
        "matplotlib",  # the pipeline's report plot
        "ninja",  # the first-import build of the C++ kernels (torch.utils.cpp_extension.load)
    ],
    entry_points={"console_scripts": ["rosita=rosita_fast.cli:main"]},
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "ninja", "matplotlib"],
    },
)

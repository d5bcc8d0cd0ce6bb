"""Build rosita_fast: the Python layer, the Triton kernels and the C++/CUDA extensions.

Install with torch already present and without build isolation (see README):

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

Extensions:
- ``rosita_fast._C``: C++ CPU ops from ``csrc/cpu`` (OpenMP), built on every machine.
- ``rosita_fast._C_cuda``: CUDA ops from ``csrc/cuda``, built only when torch has CUDA
  (``torch.version.cuda``) and ``nvcc`` is found. ``ROSITA_FAST_BUILD_CUDA=1`` forces it on (and
  fails loudly if it cannot be built), ``ROSITA_FAST_BUILD_CUDA=0`` forces it off.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - only hit by a misconfigured install
    sys.exit(
        "rosita_fast builds against the installed torch: install torch first "
        "(pip install torch==2.13.0), then `pip install --no-build-isolation -e .`."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")


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
    # -fno-trapping-math/-fno-math-errno (torch's own flags) let GCC if-convert and vectorize the
    # fused epilogues; without them the clamp in the polynomial exp keeps the loops scalar.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    exts = [
        CppExtension(
            "rosita_fast._C",
            sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
            include_dirs=[INCLUDE],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
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


packages = find_packages(include=["rosita_fast", "rosita_fast.*"]) + ["rosita_fast.kernels"]

setup(
    name="rosita_fast",
    version="0.1.0",
    description="Kernel-accelerated ROSITA compression for BERT-family models",
    python_requires=">=3.10",
    packages=packages,
    # The Triton kernels live in the top-level kernels/ directory but ship as rosita_fast.kernels:
    # a top-level module named `kernels` would collide with an unrelated PyPI package.
    package_dir={"rosita_fast.kernels": "kernels"},
    # The shipped recipes (rosita_fast/recipes/*.yaml) are data, not modules.
    package_data={"rosita_fast": ["recipes/*.yaml", "recipes/*.json"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
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
    ],
    entry_points={"console_scripts": ["rosita=rosita_fast.cli:main"]},
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "ninja", "matplotlib"],
    },
)

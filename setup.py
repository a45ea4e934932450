"""Builds red_kernels._C from csrc/.

The CPU kernels (csrc/**/*.cpp) are always compiled. The CUDA kernels (csrc/**/*.cu) are added when
torch was built with CUDA and nvcc is found (or FORCE_CUDA=1). RED_KERNELS_NO_EXT=1 skips the
extension entirely: the `reference` and `triton` backends still work in that install.

Switches (environment variables):
  RED_KERNELS_NO_EXT=1     pure-Python install
  FORCE_CUDA=1             build the CUDA kernels even without a visible GPU
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    )


def _ext_modules():
    if os.environ.get("RED_KERNELS_NO_EXT", "0") == "1":
        print("red_kernels: RED_KERNELS_NO_EXT=1, building without the compiled extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        sys.exit(
            "red_kernels: no C++ compiler found. Install one (Debian/Ubuntu: apt-get install g++) "
            "or set RED_KERNELS_NO_EXT=1 for a pure-Python install."
        )
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "red_kernels: torch must be installed before building (pip install torch, then "
            "pip install --no-build-isolation .)"
        )

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and (force_cuda or torch.cuda.is_available())
    if force_cuda and not with_cuda:
        sys.exit(
            f"red_kernels: FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}; "
            "install a CUDA build of torch and the CUDA toolkit"
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = _sources("*.cpp")
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++20", "-DRED_KERNELS_PYTHON_MODULE"]
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        sources += _sources("*.cu")
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        macros.append(("RED_KERNELS_WITH_CUDA", None))
        cls = CUDAExtension
    else:
        cls = CppExtension
    ext = cls(
        name="red_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=macros,
    )
    print(f"red_kernels: building _C with {len(sources)} sources (CUDA: {with_cuda})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

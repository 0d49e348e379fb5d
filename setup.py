"""Builds ltdd_fast._C: the C++ operators always, the CUDA ones when torch has CUDA and nvcc is found.

Environment overrides: FORCE_ONLY_CPU=1 skips CUDA, FORCE_CUDA=1 builds it even when torch sees no GPU
(nvcc and a CUDA-enabled torch are still needed). A CUDA build that fails falls back to the CPU-only build
with a warning, so an install never breaks for want of a GPU toolchain.
"""
import glob
import os
import platform
import shutil
import sys
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["ltdd_fast", "ltdd_fast.*"])


def _want_cuda():
    if os.environ.get("FORCE_ONLY_CPU", "0") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return False
    return os.environ.get("FORCE_CUDA", "0") == "1" or torch.cuda.is_available()


def _torch_uses_openmp():
    import torch

    info = torch.__config__.parallel_info()
    return sys.platform.startswith("linux") and "parallel backend: OpenMP" in info


def _extension(with_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp-simd"]  # honour the kernels' `omp simd` reductions
    # The extension is compiled on the machine that runs it, so let the CPU kernels use its full vector width
    # (libtorch itself dispatches to AVX2/AVX-512 at run time); LTDD_PORTABLE=1 builds for any x86-64.
    if os.environ.get("LTDD_PORTABLE", "0") != "1" and platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=native")
    # at::parallel_for is an inline template that runs in parallel only where the extension itself is compiled
    # with OpenMP (without _OPENMP it runs the whole range on the calling thread). Linking with -fopenmp names
    # libgomp.so.1, which the loader resolves to the copy torch has already loaded: one thread pool, sized by
    # torch.set_num_threads. Done where torch's own parallel backend is OpenMP, as pytorch_scatter does.
    link = []
    if _torch_uses_openmp():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "ltdd_fast._C",
            sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link,
        )
    return CppExtension("ltdd_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


def main():
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils.cpp_extension import BuildExtension

    kwargs = dict(packages=PACKAGES, package_data={"ltdd_fast": ["presets/*.yaml"]},
                  cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
    if _want_cuda():
        try:
            return setup(ext_modules=[_extension(True)], **kwargs)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any CUDA toolchain failure falls back to CPU
            warnings.warn(f"ltdd_fast: CUDA build failed ({exc}); building the CPU operators only")
    setup(ext_modules=[_extension(False)], **kwargs)


main()

"""Every CUDA source compiles with nvcc alone: the check of the CUDA kernels on machines without a GPU or a CUDA
build of torch (the .cu files include no torch headers, only csrc/cuda/launchers.h and CUDA's own).

Two flag sets per file: the plain one, and the one the extension build uses (torch's nvcc defines, which forbid
implicit half/bfloat16 conversions, plus setup.py's -O3 --use_fast_math) for every architecture setup.py targets.
The host side, csrc/cuda/bindings.cpp, is type-checked by the host compiler against this torch's headers.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
TIMEOUT_S = 600

# what torch.utils.cpp_extension passes to nvcc (COMMON_NVCC_FLAGS) and what setup.py adds
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
BUILD_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", *TORCH_NVCC_FLAGS,
               "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _compile(src: Path, out: Path, flags):
    cmd = [NVCC, *flags, "-c", str(src), "-o", str(out), "-I", str(CUDA_DIR)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nvcc took over {TIMEOUT_S} s on {src.name}: {' '.join(cmd)}")
    assert res.returncode == 0, f"{src.name} failed to compile:\n$ {' '.join(cmd)}\n{res.stdout}{res.stderr}"
    assert out.is_file() and out.stat().st_size > 0


def test_every_operator_has_a_cuda_source():
    assert {p.stem for p in CU_FILES} >= {"student_sgd_step", "param_distance", "soft_ce_stats", "class_grad_stats",
                                          "scatter_add_rows", "class_feature_stats"}


@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles(src, tmp_path):
    _compile(src, tmp_path / f"{src.stem}.o", ["-std=c++17", "-O2", "-arch=sm_90"])


@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_extension_build_flags(src, tmp_path):
    _compile(src, tmp_path / f"{src.stem}.o", BUILD_FLAGS)


def _host_compiler_and_cuda_include():
    """(the host C++ compiler, CUDA's include folder), or the test is skipped."""
    cxx = shutil.which("c++") or shutil.which("g++")
    homes = [Path(NVCC).resolve().parent.parent, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             "/usr/local/cuda"]
    include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()),
                   None)
    if cxx is None or include is None:
        pytest.skip("no host C++ compiler or no CUDA headers found")
    return cxx, include


def test_launchers_header_is_plain_cpp(tmp_path):
    """bindings.cpp includes launchers.h with the host compiler: it must not need nvcc."""
    cxx, include = _host_compiler_and_cuda_include()
    src = tmp_path / "use_launchers.cpp"
    src.write_text('#include "launchers.h"\nint main() { return 0; }\n')
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-I", str(CUDA_DIR), "-I", str(include), str(src)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# Headers of CUDA's math libraries that torch's ATen/cuda headers include but bindings.cpp never uses; a machine
# with the CUDA compiler alone lacks them, so the check below declares just the types torch's headers name.
_LIBRARY_STUBS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                   "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n",
}


def test_bindings_compile_against_torch_headers(tmp_path):
    """csrc/cuda/bindings.cpp (input checks, allocation, dispatch; built only with a CUDA torch) type-checks with
    the host compiler against this torch's headers, as the extension build compiles it: the check of the CUDA
    operators' host side where no CUDA build of torch exists. Library headers this machine lacks are stubbed."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx, cuda_include = _host_compiler_and_cuda_include()
    torch_includes = include_paths()
    stubs = tmp_path / "stubs"
    for name, body in _LIBRARY_STUBS.items():
        if not (cuda_include / name).is_file():
            (stubs / name).parent.mkdir(parents=True, exist_ok=True)
            (stubs / name).write_text(f"#pragma once\n{body}")
    # written by CMake in a CUDA build of torch; a CPU build ships c10/cuda's headers without it
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(d) / macros).is_file() for d in torch_includes):
        (stubs / macros).parent.mkdir(parents=True, exist_ok=True)
        (stubs / macros).write_text("#pragma once\n")
    includes = [f"-I{d}" for d in [*torch_includes, cuda_include, stubs, sysconfig.get_paths()["include"]]]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DWITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C", *includes, str(CUDA_DIR / "bindings.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert res.returncode == 0, f"bindings.cpp failed to compile:\n$ {' '.join(cmd)}\n" + "\n".join(errors[:30])

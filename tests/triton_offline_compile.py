"""Compiles every Triton kernel of ltdd_fast for an NVIDIA GPU (sm_90, the H100) on a machine that has none.

Without a GPU the tests run the kernels in Triton's interpreter, which never compiles them: a kernel that the
interpreter runs can still fail to compile for a GPU (a type the backend rejects, a block too large for shared
memory, a construct the interpreter allows). Here Triton's compiler runs through ptxas to a GPU binary, nothing is
launched:
- Triton's active driver is replaced by one that only names the target, with no device behind it;
- every launch becomes Triton's warm-up (compile, no launch), and an autotuned kernel compiles each of its
  configurations instead of timing them;
- each operator is called on CPU tensors of every dtype and of shapes that reach its distinct block choices, so
  every kernel is compiled in each form a GPU run would ask for. Outputs are never written; they are not looked at.

Run as a script (TRITON_INTERPRET must not be 1: the kernels must be defined in compiled mode); it prints one line
per kernel and exits non-zero on the first failure, with Triton's error. tests/test_triton_ops.py runs it.
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET=0: the kernels must be defined for the compiler, not the interpreter")
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class OfflineDriver:
    """Names the target; there is no device, stream or launcher behind it."""

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled = {}  # kernel name -> the distinct binaries compiled for it (a repeated form hits Triton's cache)
_jit_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _jit_run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.setdefault(self.fn.__name__, set()).add(id(kernel))
    return kernel


def _compile_every_config(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    for config in self.configs:
        self.fn.run(*args, grid=None, warmup=True, **{**kwargs, **config.all_kwargs()})


def main():
    driver.set_active(OfflineDriver())
    JITFunction.run = _compile_only
    Autotuner.run = _compile_every_config

    import ltdd_fast.kernels as kernels
    from ltdd_fast.kernels import class_grad_stats, dsa, norm_relu_pool, param_distance, soft_ce_stats
    from ltdd_fast.kernels import student_sgd_step
    if not kernels.AVAILABLE or kernels.INTERPRET:
        sys.exit(f"the kernels are not in compiled mode here: {kernels.IMPORT_ERROR or 'TRITON_INTERPRET is set'}")
    for module in (kernels, class_grad_stats, dsa, norm_relu_pool, soft_ce_stats):
        module.supports = lambda device: True  # the operators' own device check: there is no GPU to run on

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        def randn(*shape):
            return torch.randn(*shape, generator=g).to(dt)
        p, a = randn(5000), torch.tensor(0.01, dtype=dt)
        student_sgd_step.student_sgd_step(p, p, p, a, 10, 20)
        param_distance.param_distance(p, p, p, a, None)
        param_distance.param_distance(p, p, p, a, torch.rand(5000, generator=g).to(dt))
        param_distance.param_distance(p, p, p, a, torch.rand(5000, generator=g) > 0.5)
        # the class reduction's tiles follow (rows, classes): few classes, many, and one
        for b, c in ((500, 10), (1000, 100), (256, 1000), (1, 1)):
            z, classes = randn(b, c), torch.randint(c, (b,), generator=g)
            for w in (None, torch.rand(c, generator=g).to(dt)):
                soft_ce_stats.soft_ce_stats(z, randn(b, c), w, classes, c)
            class_grad_stats.class_grad_stats(randn(b, 3, 8, 8), classes, c)
        for shape in ((4, 3, 32, 32), (2, 1, 8, 8), (2, 3, 64, 64)):
            x = randn(*shape)
            values, flags = randn(shape[0], 11), torch.ones(8, dtype=torch.int32)
            for transpose in (False, True):
                dsa.dsa(x, values, flags, shape[2] // 2, shape[3] // 2, transpose)
        for shape in ((2, 8, 32, 32), (2, 128, 8, 8), (1, 4, 64, 64)):
            x, w, bias = randn(*shape), randn(shape[1]), randn(shape[1])
            y, mean, rstd = norm_relu_pool.forward(x, w, bias, 1e-5)
            norm_relu_pool.backward(torch.ones_like(y), x, mean, rstd, w, bias)
    for name, binaries in sorted(compiled.items()):
        print(f"{name}: {len(binaries)} binaries for sm_{TARGET.arch}")


if __name__ == "__main__":
    main()

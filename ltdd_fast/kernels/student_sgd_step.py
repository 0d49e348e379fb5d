"""The student's SGD step on the flat parameter vector, in one pass (reference: ltdd_fast/ops/sgd_step.py).

theta' = theta - alpha * g', G' = G + g', g' = grad with the slice [frozen_start, frozen_end) zeroed: three
vectors read, two written, instead of the four passes of the plain version. alpha is read from device memory,
so a learnable lr costs no host synchronisation. Computed in fp32 (fp64 for fp64 vectors).
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_dtype


def _configs():
    if INTERPRET:  # the interpreter runs one numpy program per block: few large blocks
        return [triton.Config({"BLOCK": 1 << 16}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


@triton.autotune(configs=_configs(), key=["n"])
@triton.jit
def _sgd_step_kernel(theta_ptr, grad_ptr, sum_ptr, alpha_ptr, theta_out_ptr, sum_out_ptr, n, frozen_start,
                     frozen_end, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(alpha_ptr).to(ACC)
    g = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(ACC)
    g = tl.where((offs < frozen_start) | (offs >= frozen_end), g, 0.0)
    theta = tl.load(theta_ptr + offs, mask=inside, other=0.0).to(ACC)
    gsum = tl.load(sum_ptr + offs, mask=inside, other=0.0).to(ACC)
    tl.store(theta_out_ptr + offs, (theta - a * g).to(theta_out_ptr.dtype.element_ty), mask=inside)
    tl.store(sum_out_ptr + offs, (gsum + g).to(sum_out_ptr.dtype.element_ty), mask=inside)


def student_sgd_step(theta: torch.Tensor, grad: torch.Tensor, grad_sum: torch.Tensor, alpha: torch.Tensor,
                     frozen_start: int, frozen_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta - alpha g', grad_sum + g'): flat vectors of one dtype and device, alpha a one-element tensor."""
    theta, grad, grad_sum = theta.contiguous(), grad.contiguous(), grad_sum.contiguous()
    theta_out, sum_out = torch.empty_like(theta), torch.empty_like(grad_sum)
    n = theta.numel()
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _sgd_step_kernel[grid](theta, grad, grad_sum, alpha.reshape(()), theta_out, sum_out, n, frozen_start,
                               frozen_end, ACC=acc_dtype(theta.dtype))
    return theta_out, sum_out


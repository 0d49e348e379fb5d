"""The fused operators of the hot loop: one module per operator, each holding its input checks, its plain
PyTorch reference, its fake kernel, its autograd formula and the public function that picks a backend.

    sgd_step      student_sgd_step    theta -= alpha g, G += g, frozen slice zeroed, one pass
    distance      param_distance      masked normalised distance, v = dL/dG and dL/dalpha, one reduction
    soft_ce       soft_ce_stats       DAM cross-entropy, both gradients, per-class loss/count/grad norm
    grad_norms    class_grad_stats    per-class sum and max of image-gradient norms
    scatter_rows  scatter_add_rows_   a step's batch gradients into the synthetic set (native only)
    fused_dsa     dsa                 the DSA chain of a step, or its transpose, one kernel
    norm_pool     norm_relu_pool      instance norm + ReLU + 2x2 avg pool (Triton only)
    feature_stats class_feature_stats per-class count, sum and sum of squares of [N, C, ...] features per channel

dispatch.py picks the backend and registers each operator once (dispatch.register): the native twin comes from
ltdd_fast._C (csrc/), the Triton twin runs ltdd_fast.kernels. May import: torch, ltdd_fast._C, ltdd_fast.kernels
(lazily: Triton is optional), and the leaves dam and dsa_chain.
"""
import os

from . import dispatch
from .dispatch import (BACKENDS, CUDA_BACKENDS, NATIVE_AVAILABLE, OPERATORS, backend_problem, cuda_backends_from_env,
                       set_cuda_backend)
# imported in the order of the hot loop, which is the order of OPS (and of the bench's rows)
from .sgd_step import student_sgd_step  # noqa: I001
from .distance import param_distance
from .soft_ce import soft_ce_stats
from .grad_norms import class_grad_stats
from .scatter_rows import scatter_add_rows_
from .norm_pool import norm_relu_pool
from .fused_dsa import dsa
from .feature_stats import class_feature_stats  # statistics matching (unilevel), outside that loop

OPS = dispatch.public()  # the public operators, by name
CUDA_BACKENDS.update(cuda_backends_from_env(os.environ.get("LTDD_CUDA_BACKENDS", "")))

__all__ = ["BACKENDS", "CUDA_BACKENDS", "NATIVE_AVAILABLE", "OPERATORS", "OPS", "backend_problem",
           "class_feature_stats", "class_grad_stats", "dispatch", "dsa", "norm_relu_pool", "param_distance",
           "scatter_add_rows_", "set_cuda_backend", "soft_ce_stats", "student_sgd_step"]

"""ltdd_fast: long-tailed dataset distillation with fused kernels."""

__version__ = "0.1.0"

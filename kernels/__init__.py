"""Triton kernels of ltdd_fast, one file per operator; installed as ltdd_fast.kernels."""

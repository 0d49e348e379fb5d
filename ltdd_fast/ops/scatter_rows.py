"""scatter_add_rows_: a step's batch gradients added into the synthetic set's rows, in place (native only).
Twins: csrc/cpu/scatter_add_rows.cpp, csrc/cuda/scatter_add_rows.cu.
"""
import torch

from .dispatch import Operator, call_fast, pick, register


def reference(target, index, src):
    """A new tensor: target with src[i] added to row index[i] for every i (repeated indices accumulate)."""
    return target.index_add(0, index, src)


def _fake(target, index, src):
    return None


OPERATOR = register(Operator(
    "scatter_add_rows_", "scatter_add_rows_(Tensor(a!) target, Tensor index, Tensor src) -> ()",
    reference, _fake, None, None, mutates=("target",)))


def scatter_add_rows_(target, index, src, backend="auto"):
    """target[index[i]] += src[i] for every i, in place (repeated indices accumulate); returns target.

    Deterministic on CPU. No autograd: it accumulates gradients, it is not differentiated itself."""
    if target.dim() < 1 or not target.is_floating_point():
        raise ValueError(f"target must be a floating point [M, ...] tensor, got {target.dtype} {tuple(target.shape)}")
    if not torch.is_tensor(index) or index.dtype != torch.int64 or index.dim() != 1 or index.device != target.device:
        got = f"{index.dtype} {tuple(index.shape)} on {index.device}" if torch.is_tensor(index) else type(index).__name__
        raise ValueError(f"index must be a 1-D int64 tensor on {target.device}, got {got}")
    want = (index.shape[0], *target.shape[1:])
    if src.shape != want or src.dtype != target.dtype or src.device != target.device:
        raise ValueError(f"src must be {want} {target.dtype} on {target.device}, "
                         f"got {tuple(src.shape)} {src.dtype} on {src.device}")
    if index.device.type == "cpu" and index.numel():
        lo, hi = (int(x) for x in torch.aminmax(index))  # one pass for both bounds
        if not (0 <= lo and hi < target.shape[0]):
            raise ValueError(f"index must lie in [0, {target.shape[0]}) (rows of target), got values in [{lo}, {hi}]")
    which = pick(backend, "scatter_add_rows_", target.device)
    if which != "reference":
        call_fast(which, "scatter_add_rows_", target, index, src)
    else:
        target.copy_(reference(target, index, src))
    return target

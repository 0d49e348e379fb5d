"""One Expert-Decoupling phase's matching problem (METHOD section 8) and the draws it is built from: its
minibatches and augmentations, moved to the device at once. A leaf beside dsa_chain: it imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Phase:
    """One Expert-Decoupling phase's matching problem for one iteration."""

    theta_0: Tensor  # [P] expert snapshot at the start epoch (float32 or float64)
    theta_T: Tensor  # [P] snapshot M epochs later
    batches: list[Tensor]  # syn_steps int64 index tensors into the synthetic set (minibatches X_k)
    mask: Tensor | None = None  # [P] bool: parameters the loss compares; None = all
    frozen: tuple[int, int] | None = None  # slice of each student gradient zeroed (classifier phase)
    class_weights: Tensor | None = None  # DAM weights [C] for the student's inner loss; None = plain soft CE
    aug: list | None = None  # per-step AugParams (None entries = no augmentation), replayed in the second pass


def move_at_once(tensors, device) -> list[Tensor]:
    """tensors on `device`, moved in one copy per dtype (views of it come back, in order; tensors already there
    come back as they are). On CUDA a copy from pageable host memory waits for the stream to drain, so an
    iteration's small draws (a minibatch and an augmentation per student step) moved one by one would stall the
    GPU hundreds of times; here the copies are from pinned memory and do not wait."""
    device = torch.device(device)
    tensors, out, by_dtype = list(tensors), list(tensors), {}
    for i, t in enumerate(tensors):
        # "cuda" is whichever device is current: a tensor on a CUDA device is taken as there
        if not (t.device.type == device.type and device.index in (None, t.device.index)):
            by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        if device.type == "cuda" and flat.device.type == "cpu":
            flat = flat.pin_memory()
        parts = flat.to(device, non_blocking=flat.is_pinned()).split([tensors[i].numel() for i in idx])
        for i, part in zip(idx, parts):
            out[i] = part.view(tensors[i].shape)
    return out


def sample_phase_aug(dsa, batches, im_size, generator) -> list:
    """One augmentation draw per student step, so both passes can replay the same transform: drawn on the
    generator's device, then moved to the batches' device all at once (move_at_once)."""
    if dsa is None:
        return [None] * len(batches)
    here = generator.device if generator is not None else torch.device("cpu")
    augs = [dsa.sample(len(b), tuple(im_size), generator, device=here) for b in batches]
    slots = [(aug, op) for aug in augs for op in aug.ops]
    moved = move_at_once([aug.tensors[op] for aug, op in slots], batches[0].device if batches else here)
    for (aug, op), t in zip(slots, moved):
        aug.tensors[op] = t
    return augs

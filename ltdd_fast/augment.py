"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021), differentiable w.r.t. the images.

Random values are drawn once into an AugParams (per image, from an explicit generator) and applied
deterministically, so a distillation step can be replayed exactly in the second pass. The transforms and the
draws' format live in dsa_chain; this module draws them and runs the chain, fused (ops.dsa) or op by op.
"""

from __future__ import annotations

import torch

from . import ops
from .dsa_chain import (BRIGHTNESS, CONTRAST, CROP_RATIO, FAMILIES, FLIP_PROB, ROTATE_DEG, SATURATION,
                        SCALE, AugParams, apply_chain)
from .errors import ConfigError

MODES = ("single", "multiple")

def _sample_op(op: str, b: int, im_size: tuple[int, int], g: torch.Generator | None, dev) -> torch.Tensor:
    def rand(*shape):
        return torch.rand(*shape, generator=g, device=dev)

    def randint(low, high):
        return torch.randint(low, high, (b,), generator=g, device=dev)

    h, w = im_size
    if op == "brightness":
        return (rand(b) - 0.5) * BRIGHTNESS
    if op == "saturation":
        return rand(b) * SATURATION
    if op == "contrast":
        return rand(b) * (2 * CONTRAST) + (1 - CONTRAST)
    if op == "crop":
        my, mx = int(h * CROP_RATIO + 0.5), int(w * CROP_RATIO + 0.5)
        return torch.stack([randint(-my, my + 1), randint(-mx, mx + 1)], 1)
    if op == "cutout":
        return torch.stack([randint(0, h), randint(0, w)], 1)
    if op == "flip":
        return rand(b) < FLIP_PROB
    if op == "scale":
        return rand(b, 2) * (SCALE[1] - SCALE[0]) + SCALE[0]
    if op == "rotate":
        return (rand(b) * 2 - 1) * ROTATE_DEG
    raise AssertionError(op)


class DSA:
    """DSA over a strategy such as "color_crop_cutout_flip_scale_rotate" ("none" or "" is identity).

    mode "single" applies one family drawn per call (DSA's default); "multiple" applies every family
    in order. Each image in the batch gets its own random values.
    """

    STRATEGY = "color_crop_cutout_flip_scale_rotate"

    def __init__(self, strategy: str = STRATEGY, mode: str = "single"):
        if mode not in MODES:
            raise ConfigError(f"unknown DSA mode {mode!r}: expected one of {', '.join(MODES)}")
        families = () if strategy in ("", "none") else tuple(strategy.split("_"))
        for fam in families:
            if fam not in FAMILIES:
                raise ConfigError(f"unknown DSA op {fam!r} in strategy {strategy!r}: expected '_'-joined names from {', '.join(FAMILIES)}, or 'none'")
        if len(set(families)) != len(families):
            raise ConfigError(f"DSA strategy {strategy!r} repeats an op: expected each op at most once")
        self.strategy, self.mode, self.families = strategy, mode, families

    def __repr__(self) -> str:
        return f"DSA({self.strategy!r}, mode={self.mode!r})"

    def sample(self, batch_size: int, im_size: tuple[int, int], generator: torch.Generator | None = None, device="cpu") -> AugParams:
        """Draw all random values on the generator's device, then move them to `device`."""
        dev = generator.device if generator is not None else "cpu"
        families = self.families
        if self.mode == "single" and families:
            pick = int(torch.randint(len(families), (1,), generator=generator, device=dev))
            families = (families[pick],)
        ops = tuple(op for fam in families for op in FAMILIES[fam])
        tensors = {op: _sample_op(op, batch_size, tuple(im_size), generator, dev).to(device) for op in ops}
        return AugParams(ops, tensors)

    def apply(self, x: torch.Tensor, params: AugParams, backend: str = "reference") -> torch.Tensor:
        """The chain of `params` on x. backend "reference" runs it op by op in PyTorch; any other (see ops.dsa)
        runs the fused chain, one kernel forward and one for its transpose in the backward (the op by op chain
        where the draws' order is not the fused one)."""
        if x.dim() != 4:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (B, C, H, W)")
        for op in params.ops:
            t = params.tensors[op]
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"augmentation values for {op!r} are for batch size {t.shape[0]}: expected {x.shape[0]} to match x")
        if backend != "reference" and params.ops:
            packed = params.packed(x.dtype, x.device)
            if packed is not None:
                return ops.dsa(x, *packed, backend=backend)
        return apply_chain(x, params)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, AugParams]:
        params = self.sample(x.shape[0], tuple(x.shape[-2:]), generator=generator, device=x.device)
        return self.apply(x, params), params

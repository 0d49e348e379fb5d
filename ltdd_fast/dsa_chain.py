"""DSA's transforms (Zhao & Bilen 2021) as plain PyTorch functions, their draws (AugParams) and the packed format
the fused chain takes (values [B, PACKED_WIDTH], flags [len(OPS)]).

A leaf: it imports torch only. apply_chain, the ops applied one by one, is the reference of the fused chain
(ltdd_fast.ops.dsa); augment.DSA draws the values and picks the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# DSA's default ranges
BRIGHTNESS = 1.0  # add U(-0.5, 0.5) * BRIGHTNESS
SATURATION = 2.0  # scale distance to the per-pixel channel mean by U(0, SATURATION)
CONTRAST = 0.5  # scale distance to the image mean by U(1 - CONTRAST, 1 + CONTRAST)
CROP_RATIO = 0.125  # shift by up to this fraction of each side, zero filled
CUTOUT_RATIO = 0.5  # side of the zeroed square, as a fraction of each side
FLIP_PROB = 0.5
SCALE = (0.8, 1.2)  # per-axis affine scale
ROTATE_DEG = 15.0  # rotation in U(-ROTATE_DEG, ROTATE_DEG) degrees

FAMILIES = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
OPS = tuple(op for ops in FAMILIES.values() for op in ops)
# The fused chain (ops.dsa, csrc/dsa_chain.h) takes each image's draws as one row of values: the columns of each op
# (an op's draws of shape [B] or [B, 2]), and one flag per op of OPS saying whether it runs. It applies the ops in
# the order of OPS, which is every draw's order but for a strategy that names its families in another order
# in "multiple" mode (AugParams.packed then says None and apply runs the unfused chain).
PACKED_COLUMNS = {"brightness": slice(0, 1), "saturation": slice(1, 2), "contrast": slice(2, 3), "crop": slice(3, 5),
                  "cutout": slice(5, 7), "flip": slice(7, 8), "scale": slice(8, 10), "rotate": slice(10, 11)}
PACKED_WIDTH = 11
_FLAGS = {}  # (ops, device) -> flags: made once, so that packing never copies from the host to a GPU


@dataclass
class AugParams:
    """Everything random about one call: the ops applied, in order, and their per-image values."""

    ops: tuple[str, ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _packed: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.ops = tuple(self.ops)
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"unknown augmentation op {op!r}: expected one of {', '.join(OPS)}")
            if op not in self.tensors:
                raise ValueError(f"augmentation op {op!r} has no random values")

    def to(self, device) -> "AugParams":
        return AugParams(self.ops, {k: v.to(device) for k, v in self.tensors.items()})

    def packed(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values [B, PACKED_WIDTH] of dtype, flags [len(OPS)] int32), both on device: the fused chain's inputs
        (ops.dsa), made once per dtype and device (pass 1 and pass 2 replay the same draws). None when the ops
        are not in the order of OPS."""
        key = (dtype, torch.device(device))
        if key not in self._packed:
            order = [OPS.index(op) for op in self.ops]
            if order != sorted(order):
                self._packed[key] = None
            else:
                b = next(iter(self.tensors.values())).shape[0] if self.tensors else 0
                values = torch.zeros(b, PACKED_WIDTH, dtype=dtype, device=device)
                for op in self.ops:
                    values[:, PACKED_COLUMNS[op]] = self.tensors[op].to(device=device, dtype=dtype).view(b, -1)
                if (self.ops, key[1]) not in _FLAGS:
                    _FLAGS[self.ops, key[1]] = torch.tensor([op in self.ops for op in OPS], dtype=torch.int32,
                                                            device=device)
                self._packed[key] = (values, _FLAGS[self.ops, key[1]])
        return self._packed[key]

    @classmethod
    def unpacked(cls, values: torch.Tensor, flags: torch.Tensor) -> "AugParams":
        """The draws that packed() turned into (values, flags), the integer and boolean ones as such."""
        on = [op for op, f in zip(OPS, flags.tolist()) if f]
        tensors = {}
        for op in on:
            t = values[:, PACKED_COLUMNS[op]]
            if op in ("crop", "cutout"):
                t = t.round().long()
            elif op == "flip":
                t = t[:, 0] != 0
            elif t.shape[1] == 1:
                t = t[:, 0]
            tensors[op] = t
        return cls(tuple(on), tensors)

    def state_dict(self) -> dict:
        return {"ops": list(self.ops), "tensors": {k: v.detach().cpu().clone() for k, v in self.tensors.items()}}

    @classmethod
    def from_state_dict(cls, d: dict) -> "AugParams":
        return cls(tuple(d["ops"]), dict(d["tensors"]))


def _shift_indices(shift: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index of each output position after shifting by `shift` [B], and whether it is inside."""
    src = torch.arange(n, device=shift.device) - shift[:, None]
    inside = (src >= 0) & (src < n)
    return src.clamp(0, n - 1), inside


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def brightness(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    return x + add.view(-1, 1, 1, 1)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def crop(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i - dy, j - dx], zero outside; shift [B, 2] = (dy, dx)."""
    b, c, h, w = x.shape
    src_y, in_y = _shift_indices(shift[:, 0], h)
    src_x, in_x = _shift_indices(shift[:, 1], w)
    index = (src_y[:, :, None] * w + src_x[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out * (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).to(x.dtype)


def cutout_size(h: int, w: int) -> tuple[int, int]:
    """The side lengths of the cutout hole in an h x w image."""
    return int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)


def cutout(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Zero a square of CUTOUT_RATIO of each side around `centre` [B, 2] = (cy, cx), clipped at the border."""
    _, _, h, w = x.shape
    size_h, size_w = cutout_size(h, w)
    rows = torch.arange(h, device=x.device) - (centre[:, :1] - size_h // 2)
    cols = torch.arange(w, device=x.device) - (centre[:, 1:] - size_w // 2)
    hole = ((rows >= 0) & (rows < size_h))[:, :, None] & ((cols >= 0) & (cols < size_w))[:, None, :]
    return x * (~hole).unsqueeze(1).to(x.dtype)


def flip(x: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    return torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)


def scale(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Affine scale; factors [B, 2] = (sx, sy) multiply the sampling grid's coordinates."""
    sx, sy = factors.to(x.dtype).unbind(1)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    a = degrees.to(x.dtype) * (math.pi / 180)
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_APPLY = {
    "brightness": lambda x, t: brightness(x, t.to(x.dtype)),
    "saturation": lambda x, t: saturation(x, t.to(x.dtype)),
    "contrast": lambda x, t: contrast(x, t.to(x.dtype)),
    "crop": crop,
    "cutout": cutout,
    "flip": flip,
    "scale": scale,
    "rotate": rotate,
}


def apply_chain(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """params' ops applied to x one after another, in plain PyTorch (the reference of the fused chain)."""
    for op in params.ops:
        x = _APPLY[op](x, params.tensors[op].to(x.device))
    return x

"""ConvNet-D, the distillation field's standard network, as a module and as plain functional ops."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..ops.norm_pool import INSTANCE_NORM_EPS, reference as norm_relu_pool


def convnet_depth(im_size: tuple[int, int]) -> int:
    """Depth that brings the image down to about 4x4: 2 up to 16 px, 3 at 32, 4 at 64."""
    side = min(im_size)
    if side < 2:
        raise ConfigError(f"im_size {tuple(im_size)} is too small for a ConvNet: expected both sides >= 2")
    depth = max(2, round(math.log2(side)) - 2)
    # each block halves the image, so a very small image allows fewer blocks
    while depth > 1 and 2**depth > side:
        depth -= 1
    return depth


class ConvNet(nn.Module):
    """`depth` x [conv3x3 -> instance norm -> ReLU -> avg-pool 2x2], then one linear classifier.

    norm="batchnorm" puts batch norm in place of the instance norm: the BN variant that the uni-level distiller's
    observer and teacher use (METHOD section 11), whose running statistics are its target.

    The backbone lives in `features` and the classifier is registered last, so in
    named_parameters() order the classifier's weight and bias come at the end.
    """

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128, depth: int | None = None,
                 norm: str = "instancenorm"):
        super().__init__()
        if norm not in ("instancenorm", "batchnorm"):
            raise ConfigError(f"unknown norm {norm!r}: expected instancenorm or batchnorm")
        depth = convnet_depth(im_size) if depth is None else depth
        if depth < 1:
            raise ConfigError(f"ConvNet depth {depth} is invalid: expected >= 1")
        if min(im_size) < 2**depth:
            raise ConfigError(f"im_size {tuple(im_size)} is too small for ConvNet depth {depth}: expected sides >= {2**depth}")
        if width < 1:
            raise ConfigError(f"width {width} is invalid: expected >= 1")
        self.depth, self.width, self.norm = depth, width, norm
        layers: list[nn.Module] = []
        in_ch = channel
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_ch, width, 3, padding=1),
                (nn.GroupNorm(width, width, eps=INSTANCE_NORM_EPS, affine=True) if norm == "instancenorm"
                 else nn.BatchNorm2d(width)),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            in_ch = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        h, w = im_size[0] >> depth, im_size[1] >> depth
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def convnet_features(params: Sequence[torch.Tensor], x: torch.Tensor, block=norm_relu_pool) -> torch.Tensor:
    """Backbone output [B, width*h*w]; `params` are the backbone tensors in named_parameters() order
    (conv weight, conv bias, norm weight, norm bias per block). `block` computes the block's tail, instance norm
    -> ReLU -> 2x2 average pool (ops.norm_pool.reference by default; a fused kernel may stand in for it)."""
    for i in range(0, len(params), 4):
        conv_w, conv_b, norm_w, norm_b = params[i : i + 4]
        x = block(F.conv2d(x, conv_w, conv_b, padding=1), norm_w, norm_b)
    return x.flatten(1)

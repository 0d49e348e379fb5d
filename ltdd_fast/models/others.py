"""VGG-11, ResNet-18 and AlexNet sized for small images (32x32 down to 8x8), for cross-architecture
evaluation. Each keeps its backbone in `features` (ending in a flatten) and registers the final
nn.Linear `classifier` last, so the classifier's parameters close the flat vector.

Pools are dropped once the feature map would fall below 1x1, and an adaptive average pool feeds the
classifier, so any input size works. `width` = 128 gives the standard channel counts; other values
scale every layer by width/128 (small widths make quick test networks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ltdd_fast.errors import ConfigError

NORMS = ("instancenorm", "batchnorm")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        # one group per channel: instance norm with affine parameters, as the distillation field uses
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ConfigError(f"unknown norm {kind!r}: expected one of {', '.join(NORMS)}")


def _scaled(channels: int, width: int) -> int:
    if width < 1:
        raise ConfigError(f"width {width} is invalid: expected >= 1")
    return max(1, round(channels * width / 128))


class _Classified(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PoolTracker:
    """Adds a 2x2 pool only while the feature map is still at least 2x2."""

    def __init__(self, im_size: tuple[int, int]):
        self.h, self.w = im_size

    def pool(self, layers: list[nn.Module], make) -> None:
        if min(self.h, self.w) >= 2:
            layers.append(make())
            self.h, self.w = self.h // 2, self.w // 2


class VGG11(_Classified):
    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128, norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        size, in_ch = _PoolTracker(im_size), channel
        for v in self.CFG:
            if v == "M":
                size.pool(layers, lambda: nn.MaxPool2d(2))
            else:
                out_ch = _scaled(v, width)
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), make_norm(norm, out_ch), nn.ReLU()]
                in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), make_norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(_Classified):
    """CIFAR-style ResNet-18: 3x3 stem without max-pool, four stages of two basic blocks."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128, norm: str = "instancenorm"):
        super().__init__()
        stem = _scaled(64, width)
        layers: list[nn.Module] = [nn.Conv2d(channel, stem, 3, 1, 1, bias=False), make_norm(norm, stem), nn.ReLU()]
        in_ch = stem
        for i, base in enumerate((64, 128, 256, 512)):
            out_ch = _scaled(base, width)
            # a stride-2 conv on a 1x1 map still gives 1x1, so small images need no special case
            layers += [BasicBlock(in_ch, out_ch, 1 if i == 0 else 2, norm), BasicBlock(out_ch, out_ch, 1, norm)]
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)


class AlexNet(_Classified):
    """Five convolutions (5x5, 5x5, 3x3 x3) with three max-pools and no normalisation, as in the
    dataset-condensation benchmarks."""

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128):
        super().__init__()
        c1, c2, c3, c4 = (_scaled(c, width) for c in (128, 192, 256, 192))
        size = _PoolTracker(im_size)
        layers: list[nn.Module] = [nn.Conv2d(channel, c1, 5, padding=2), nn.ReLU()]
        size.pool(layers, lambda: nn.MaxPool2d(2))
        layers += [nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU()]
        size.pool(layers, lambda: nn.MaxPool2d(2))
        layers += [nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(c4, c4, 3, padding=1), nn.ReLU()]
        size.pool(layers, lambda: nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c4, num_classes)

"""Networks by name, freshly initialised as nn.Modules."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .convnet import ConvNet
from .others import NORMS, VGG11, AlexNet, ResNet18

MODELS = ("convnet", "convnet1", "convnet2", "convnet3", "convnet4", "convnet5", "vgg11", "resnet18", "alexnet")


def _check_shape_args(channel: int, num_classes: int, im_size) -> tuple[int, int]:
    if int(channel) != channel or channel < 1:
        raise ConfigError(f"channel {channel!r} is invalid: expected a positive integer")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ConfigError(f"num_classes {num_classes!r} is invalid: expected a positive integer")
    try:
        h, w = (int(s) for s in im_size)
    except (TypeError, ValueError):
        raise ConfigError(f"im_size {im_size!r} is invalid: expected (height, width)") from None
    if h < 1 or w < 1:
        raise ConfigError(f"im_size {im_size!r} is invalid: expected positive sides")
    return h, w


def get_network(
    name: str, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128, norm: str = "instancenorm"
) -> nn.Module:
    """A freshly initialised network. `norm` ("instancenorm" or "batchnorm") applies to the ConvNets, vgg11 and
    resnet18; AlexNet has none."""
    im_size = _check_shape_args(channel, num_classes, im_size)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}: expected one of {', '.join(NORMS)}")
    if name in ("vgg11", "resnet18"):
        cls = VGG11 if name == "vgg11" else ResNet18
        return cls(channel, num_classes, im_size, width=width, norm=norm)
    if name == "alexnet":
        if norm != "instancenorm":
            raise ConfigError(f"norm {norm!r} is not available for alexnet: it has no norm layers")
        return AlexNet(channel, num_classes, im_size, width=width)
    depth = None if name == "convnet" else int(name[len("convnet") :])
    return ConvNet(channel, num_classes, im_size, width=width, depth=depth, norm=norm)

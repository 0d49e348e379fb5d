"""Networks by name, as nn.Modules (zoo.get_network) and as functions of one flat parameter vector
(functional.functional_model). May import: errors, ops (the ConvNet block's fused tail)."""

from .convnet import ConvNet, convnet_depth, convnet_features
from .functional import FunctionalNet, functional_model
from .others import NORMS, VGG11, AlexNet, ResNet18
from .zoo import MODELS, get_network

__all__ = [
    "MODELS", "NORMS", "get_network", "functional_model", "FunctionalNet", "ConvNet", "VGG11", "ResNet18",
    "AlexNet", "convnet_depth", "convnet_features",
]

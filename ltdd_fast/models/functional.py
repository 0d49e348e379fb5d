"""Networks as pure functions of one flat parameter vector.

Flat order is module.named_parameters() order: backbone first, then the classifier's weight and
bias, so the classifier is the slice starting at `classifier_offset`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import ops
from ..ops.norm_pool import reference as norm_relu_pool
from .convnet import ConvNet, convnet_features
from .zoo import get_network


class FunctionalNet:
    def __init__(self, name: str, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128, norm: str = "instancenorm"):
        self.name, self.channel, self.num_classes = name, channel, num_classes
        self.im_size, self.width, self.norm = tuple(int(s) for s in im_size), width, norm
        # a meta-device copy gives names, shapes and the forward structure without allocating weights
        with torch.device("meta"):
            module = self.make_module()
        named = list(module.named_parameters())
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        numels = [math.prod(s) for s in self.param_shapes]
        self._offsets = [sum(numels[:i]) for i in range(len(numels))]
        self._numels = numels
        self.num_params = sum(numels)
        if self.param_names[-2:] != ["classifier.weight", "classifier.bias"] or any(
            n.startswith("classifier.") for n in self.param_names[:-2]
        ):
            raise AssertionError(f"{name}: classifier parameters must come last, got {self.param_names[-3:]}")
        self.classifier_offset = self._offsets[-2]
        self.feature_dim = self.param_shapes[-2][1]
        self._is_convnet = isinstance(module, ConvNet)
        self._backbone = module.features
        # the functional forward always uses batch statistics and must not mutate running stats,
        # so that replaying a step (second pass of the constant-memory gradient) is exact
        for m in self._backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self._backbone.train()
        self._backbone_names = [n[len("features.") :] for n in self.param_names[:-2]]
        self.block_backend = "reference"
        self._block = None  # convnet_features' default, the PyTorch block

    def set_block_backend(self, backend: str) -> None:
        """Run each ConvNet block's instance norm + ReLU + pool with ltdd_fast.ops.norm_relu_pool on `backend`
        (any of ops.BACKENDS: "native" is the PyTorch block, as norm_relu_pool has no native twin);
        other networks are unaffected."""
        if backend not in ops.BACKENDS:
            raise ValueError(f"block backend must be one of {', '.join(ops.BACKENDS)}, got {backend!r}")
        if backend == "native":
            backend = "reference"
        self.block_backend = backend
        self._block = None if backend == "reference" else (lambda x, w, b: ops.norm_relu_pool(x, w, b, backend=backend))

    @contextmanager
    def block_backend_as(self, backend: str):
        """set_block_backend(backend) inside the block, the previous backend after it."""
        previous = self.block_backend
        self.set_block_backend(backend)
        try:
            yield self
        finally:
            self.set_block_backend(previous)

    @property
    def is_convnet(self) -> bool:
        return self._is_convnet

    @property
    def uses_batch_statistics(self) -> bool:
        """True when a sample's output depends on the rest of its batch (batch norm): then a batch may not be
        split into chunks."""
        return not self._is_convnet and self.norm == "batchnorm"

    def __repr__(self) -> str:
        return f"FunctionalNet({self.name!r}, channel={self.channel}, num_classes={self.num_classes}, im_size={self.im_size}, num_params={self.num_params})"

    def make_module(self) -> nn.Module:
        return get_network(self.name, self.channel, self.num_classes, self.im_size, width=self.width, norm=self.norm)

    def init_flat(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The module's default initialisation, flattened (float32). With a generator, a seed drawn
        from it initialises the module under a forked global RNG, so equal generator states give
        equal vectors and the global RNG is left alone."""
        if generator is None:
            return self.flatten_module(self.make_module()).float()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.make_module()
        return self.flatten_module(module).float()

    def _check_flat(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.shape[0] != self.num_params:
            raise ValueError(f"flat has shape {tuple(flat.shape)}: expected ({self.num_params},) for {self.name}")

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat`, keyed by parameter name (gradients flow back to `flat`)."""
        return dict(zip(self.param_names, self._views(flat)))

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        self._check_flat(flat)
        # one split, not a slice per parameter: its backward is a single cat of the parameter gradients, where
        # slices would each scatter into a zero vector of the full size and those vectors be summed (3 launches
        # and 3 passes over P per parameter, in every backward and double backward of a student step)
        return [piece.view(s) for piece, s in zip(flat.split(self._numels), self.param_shapes)]

    def _check_module(self, module: nn.Module) -> list[torch.Tensor]:
        named = list(module.named_parameters())
        if [n for n, _ in named] != self.param_names or [tuple(p.shape) for _, p in named] != self.param_shapes:
            raise ValueError(f"module does not match {self!r}: its parameter names or shapes differ")
        return [p for _, p in named]

    def flatten_module(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._check_module(module)])

    def load_into(self, module: nn.Module, flat: torch.Tensor) -> nn.Module:
        params = self._check_module(module)
        with torch.no_grad():
            for p, v in zip(params, self._views(flat)):
                p.copy_(v)
        return module

    def backbone_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        mask = torch.zeros(self.num_params, dtype=torch.bool, device=device)
        mask[: self.classifier_offset] = True
        return mask

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channel or tuple(x.shape[2:]) != self.im_size:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (B, {self.channel}, {self.im_size[0]}, {self.im_size[1]})")

    def _block_of(self, block):
        # `is None`, not truthiness: dynamo (torch 2.11) refuses to branch on a closure's truth value
        if block is not None:
            return block
        return self._block if self._block is not None else norm_relu_pool

    def _features(self, views: list[torch.Tensor], x: torch.Tensor, block=None) -> torch.Tensor:
        self._check_input(x)
        backbone = views[:-2]
        if self._is_convnet:
            return convnet_features(backbone, x, self._block_of(block))
        return functional_call(self._backbone, dict(zip(self._backbone_names, backbone)), (x,))

    def features(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Backbone output [B, feature_dim], the classifier's input."""
        return self._features(self._views(flat), x)

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]; differentiable (to any order) in both `flat` and `x`."""
        views = self._views(flat)
        return F.linear(self._features(views, x), views[-2], views[-1])

    __call__ = forward

    def forward_students(self, flats: torch.Tensor, x: torch.Tensor, classifier: torch.Tensor | None = None,
                         block=None) -> torch.Tensor:
        """Logits [K, B, num_classes] of K students at once: flats [K, num_params], x [K, B, C, H, W] (student k
        sees x[k]). ConvNet runs the K students as one network of K-grouped convolutions (each group one student's
        weights), so K small networks fill a device like one wide one; other networks run one student after the
        other. K = 1 is exactly forward().

        classifier [K, num_params - classifier_offset], if given, replaces the classifier slice of flats; the
        backbone then comes from flats alone, so a gradient taken against `classifier` never enters the
        backbone's backward for weights.

        block, if given, computes each ConvNet block's norm_relu_pool(x, norm_weight, norm_bias) in place of the
        backend set_block_backend chose (other networks ignore it)."""
        if flats.dim() != 2 or flats.shape[1] != self.num_params:
            raise ValueError(f"flats has shape {tuple(flats.shape)}: expected (K, {self.num_params})")
        k = flats.shape[0]
        if x.dim() != 5 or x.shape[0] != k:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (K={k}, B, C, H, W)")
        if classifier is None:
            classifier = flats[:, self.classifier_offset :]
        n_weight = self._numels[-2]
        weight = classifier[:, :n_weight].reshape(k, *self.param_shapes[-2])  # [K, classes, F]
        bias = classifier[:, n_weight:]  # [K, classes]
        if k == 1 or not self._is_convnet:
            return torch.stack([F.linear(self._features(self._views(flats[i]), x[i], block), weight[i], bias[i])
                                for i in range(k)])
        self._check_input(x[0])
        views = [piece.reshape(k, *s) for piece, s in zip(flats.split(self._numels, dim=1), self.param_shapes)]
        b = x.shape[1]
        h = x.transpose(0, 1).reshape(b, k * self.channel, *self.im_size)  # student i's channels are group i
        backbone = views[:-2]
        block = self._block_of(block)
        for i in range(0, len(backbone), 4):
            conv_w, conv_b, norm_w, norm_b = backbone[i : i + 4]
            h = F.conv2d(h, conv_w.reshape(-1, *conv_w.shape[2:]), conv_b.reshape(-1), padding=1, groups=k)
            h = block(h, norm_w.reshape(-1), norm_b.reshape(-1))  # instance norm: per channel, so per student
        features = h.reshape(b, k, -1).transpose(0, 1)  # [K, B, F]
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


def functional_model(
    name: str, channel: int, num_classes: int, im_size: tuple[int, int], width: int = 128, norm: str = "instancenorm"
) -> FunctionalNet:
    return FunctionalNet(name, channel, num_classes, im_size, width=width, norm=norm)

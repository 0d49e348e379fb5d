"""Fair batch-norm recalibration (METHOD section 11, item 2): the recovery's target statistics.

One forward pass of the frozen observer over the whole long-tailed set collects, at the input of every BN layer,
each class's channel means and variances. The paper accumulates them with momentum B_c / (N_c + B_c) (B_c: the
class's images in this batch, N_c: its images so far), which makes every image of a class weigh the same
whatever its place in the pass: that running mean is exactly the class's plain mean, so it is computed here from
the class's count, sum and sum of squares (ops.class_feature_stats, accumulated in float64), which gives the same
numbers in any batch order and size. The global target weighs every class the same: its mean and second moment
are the plain averages of the classes' (so its variance includes the spread between the class means, as the
variance of a class-balanced set does).

The observer's own running statistics stay as they are: the network the recovery runs is the one the targets were
measured through. The statistics file (stats.pt, beside observer.pt) records the observer's sha256 and the data,
and is refused for any other observer or data set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..errors import DataError
from ..files import load_torch, save_torch_atomic

FORMAT = "ltdd-fair-bn-stats/1"
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def bn_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's batch-norm layers, in forward order (module order)."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, BN_TYPES)]


def check_bn_network(net: nn.Module, what: str):
    if not bn_layers(net):
        raise DataError(f"{what} has no batch-norm layer: the uni-level distiller matches BN statistics, so it "
                        f"needs a BN network (the debiased experts of `ltdd experts --recipe debiased`)")


def moments(count, total, total_sq):
    """(mean, var) from a count [..., 1 or K] and the sum and sum of squares [..., C]; an empty class gives 0."""
    n = count.clamp(min=1).unsqueeze(-1).to(total)
    mean = total / n
    return mean, (total_sq / n - mean * mean).clamp(min=0)


def balanced_target(class_mean, class_var):
    """(mean [C], var [C]) of the class-balanced mixture: the plain averages of the classes' first and second
    moments."""
    mean = class_mean.mean(0)
    second = (class_var + class_mean * class_mean).mean(0)
    return mean, (second - mean * mean).clamp(min=0)


class FeatureTap:
    """Holds, during a forward pass, the input of every BN layer of a network."""

    def __init__(self, net):
        self.layers = bn_layers(net)
        self.inputs = [None] * len(self.layers)
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i):
        def hook(module, args):
            self.inputs[i] = args[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.inputs = [None] * len(self.layers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class FairStatistics:
    layers: list[str]
    class_count: torch.Tensor       # [K] images
    class_mean: list[torch.Tensor]  # per layer [K, C] (float64)
    class_var: list[torch.Tensor]
    mean: list[torch.Tensor]        # per layer [C]: the class-balanced target
    var: list[torch.Tensor]

    def to(self, device, dtype=torch.float32):
        move = lambda ts: [t.to(device=device, dtype=dtype) for t in ts]  # noqa: E731
        return FairStatistics(self.layers, self.class_count, move(self.class_mean), move(self.class_var),
                              move(self.mean), move(self.var))


@torch.no_grad()
def fair_statistics(net, images, labels, num_classes, batch_size=512, device="cpu", backend="auto",
                    progress=False) -> FairStatistics:
    """The per-class BN-input statistics of `net` (frozen, eval mode) over (images, labels), and their
    class-balanced targets."""
    check_bn_network(net, "the observer")
    net = net.eval()
    device = torch.device(device)
    with FeatureTap(net) as tap:
        sums = None  # per layer: [positions [K], sum [K, C], sum of squares [K, C]] in float64
        count = torch.zeros(num_classes, dtype=torch.float64)
        batches = list(zip(images.split(batch_size), labels.split(batch_size)))
        for x, y in tqdm(batches, desc="fair BN statistics", disable=not progress, leave=False):
            y = y.to(device)
            net(x.to(device))
            parts = [ops.class_feature_stats(f, y, num_classes, backend=backend) for f in tap.inputs]
            if sums is None:
                sums = [[torch.zeros(t.shape, dtype=torch.float64) for t in p] for p in parts]
            for acc, part in zip(sums, parts):
                for a, t in zip(acc, part):
                    a += t.double().cpu()
            count += torch.bincount(y.cpu(), minlength=num_classes).double()
        names = [n for n, _ in tap.layers]
    if sums is None or (count == 0).any():
        empty = int(torch.nonzero(count == 0)[0]) if sums is not None else 0
        raise DataError(f"class {empty} has no image in the set the statistics are taken over: every class needs "
                        f"one")
    class_mean, class_var, mean, var = [], [], [], []
    for positions, s, sq in sums:
        m, v = moments(positions, s, sq)
        class_mean.append(m)
        class_var.append(v)
        gm, gv = balanced_target(m, v)
        mean.append(gm)
        var.append(gv)
    return FairStatistics(names, count, class_mean, class_var, mean, var)


def save_statistics(path, stats: FairStatistics, observer_sha256: str, manifest: dict):
    record = {"format": FORMAT, "observer_sha256": observer_sha256, "layers": stats.layers,
              "class_count": stats.class_count, "class_mean": stats.class_mean, "class_var": stats.class_var,
              "mean": stats.mean, "var": stats.var,
              "data": {k: manifest.get(k) for k in ("dataset", "imbalance_factor", "data_seed", "class_counts",
                                                    "im_size", "zca")}}
    return save_torch_atomic(path, record)


def load_statistics(path, observer_sha256: str, layers: list[str]) -> FairStatistics:
    """The fair statistics of `path`, refused unless they were taken with this observer (its sha256) and name its
    BN layers."""
    path = Path(path)
    record = load_torch(path, "fair BN statistics", required=("format", "observer_sha256", "layers", "class_count",
                                                              "class_mean", "class_var", "mean", "var"))
    if record["format"] != FORMAT:
        raise DataError(f"{path} is not a fair-statistics file: format {record['format']!r}, expected {FORMAT!r}")
    if record["observer_sha256"] != observer_sha256:
        raise DataError(f"{path} holds the statistics of another observer (sha256 {record['observer_sha256'][:12]}"
                        f"..., this observer's is {observer_sha256[:12]}...): recompute them (delete the file)")
    if list(record["layers"]) != list(layers):
        raise DataError(f"{path} has statistics for BN layers {record['layers']}, the observer has {layers}")
    return FairStatistics(list(record["layers"]), record["class_count"], record["class_mean"], record["class_var"],
                          record["mean"], record["var"])

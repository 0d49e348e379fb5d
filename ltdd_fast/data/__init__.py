"""Long-tailed data sets: on-disk readers, the exponential profile, normalisation and ZCA."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .cifar import read_cifar
from .digits import read_digits
from .idx import SYSTEM_DIRS, read_idx_dataset
from .imagenet_lt import is_lt_list_form, read_imagenet_lt
from .longtail import long_tail_counts, long_tail_indices
from .tiny import read_tiny_imagenet
from .zca import ZCA

__all__ = ["DATASETS", "LTDataset", "load_dataset", "long_tail_counts", "long_tail_indices", "ZCA",
           "read_cifar", "read_tiny_imagenet", "read_imagenet_lt", "is_lt_list_form", "read_digits",
           "read_idx_dataset"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "tiny", "imagenet-lt")
# published per-class head sizes (MNIST and Fashion-MNIST: the 6,000 train images of a Fashion-MNIST class)
_N_MAX = {"cifar10": 5000, "cifar100": 500, "tiny": 500, "mnist": 6000, "fashion-mnist": 6000}
_ZCA_DEFAULT = {"digits": False, "mnist": False, "fashion-mnist": False, "cifar10": True, "cifar100": True,
                "tiny": True, "imagenet-lt": False}
# the IDX data sets: a system package can provide them, so data_dir is optional (data/idx.py says where it looks)
IDX_DATASETS = tuple(SYSTEM_DIRS)
ZCA_REGULARIZATION = 0.1
_CHUNK = 8192


@dataclass
class LTDataset:
    name: str
    images_train: torch.Tensor   # float32 [N,C,H,W], normalised (and ZCA-whitened if zca is not None)
    labels_train: torch.Tensor   # int64 [N]
    images_test: torch.Tensor    # float32, same preprocessing, balanced
    labels_test: torch.Tensor
    class_names: list[str]
    imbalance_factor: float
    seed: int
    mean: list[float]            # per-channel mean/std of the [0,1]-scaled train images
    std: list[float]
    zca: ZCA | None
    notes: list[str] = field(default_factory=list)  # how the set deviates from the plain recipe
    data_dir: str | None = None  # the folder it was read from (None: built in, or a system package's folder)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channel(self) -> int:
        return int(self.images_train.shape[1])

    @property
    def im_size(self) -> tuple[int, int]:
        return int(self.images_train.shape[2]), int(self.images_train.shape[3])

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels_train, minlength=self.num_classes).tolist()

    def describe(self) -> str:
        counts = self.class_counts
        test = torch.bincount(self.labels_test, minlength=self.num_classes).tolist()
        h, w = self.im_size
        test_txt = f"{test[0]} per class" if len(set(test)) == 1 else f"{min(test)}..{max(test)} per class"
        pre = "per-channel mean/std" + (f", ZCA (regularization {self.zca.regularization:g})" if self.zca else "")
        lines = [f"{self.name}: {self.num_classes} classes, images {self.channel}x{h}x{w}, "
                 f"imbalance factor {self.imbalance_factor:g}, seed {self.seed}",
                 f"train {len(self.labels_train)} (head {counts[0]}, tail {counts[-1]}), test {len(self.labels_test)} ({test_txt})",
                 f"preprocessing: {pre}"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("train images per class (class index: count):")
        if self.num_classes <= 20:
            width = max(len(n) for n in self.class_names)
            lines += [f"  {c:>3} {n:<{width}} {k:>6}" for c, (n, k) in enumerate(zip(self.class_names, counts))]
        elif self.num_classes <= 200:
            lines += [f"  {c:>4}-{min(c + 9, self.num_classes - 1):<4} " + " ".join(f"{k:>5}" for k in counts[c:c + 10])
                      for c in range(0, self.num_classes, 10)]
        else:  # too many classes for one number each: ten bands, head to tail
            step = math.ceil(self.num_classes / 10)
            for c in range(0, self.num_classes, step):
                band = counts[c:c + step]
                lines.append(f"  {c:>4}-{c + len(band) - 1:<4} min {min(band):>5}  max {max(band):>5}  total {sum(band)}")
        return "\n".join(lines)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0,1] pixels for viewing: undo ZCA (if any), then the mean/std normalisation."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x * std + mean).clamp(0, 1)


def _to_float(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.cat([F.interpolate(b, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                      for b in x.split(_CHUNK)]).clamp_(0, 1)


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    # float64 sums over chunks: float32 accumulation over millions of pixels drifts.
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for b in x.split(_CHUNK):
        s += b.double().sum((0, 2, 3))
        s2 += b.double().pow(2).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)  # a constant channel must not divide by 0
    return mean.tolist(), std.tolist()


def _normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return x.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))


def load_dataset(name: str, data_dir: str | None = None, imbalance_factor: float = 1.0, seed: int = 0,
                 zca: bool | None = None, resolution: int | None = None) -> LTDataset:
    """Read a data set, keep a long-tailed subset of its train split (class 0 = head), normalise,
    and ZCA-whiten; the test split stays balanced and gets the same preprocessing."""
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    try:
        beta = float(imbalance_factor)
    except (TypeError, ValueError):
        raise ConfigError(f"imbalance_factor must be a number >= 1, got {imbalance_factor!r}") from None
    if not math.isfinite(beta) or beta < 1:
        raise ConfigError(f"imbalance_factor must be a finite number >= 1 (n_head / n_tail), got {imbalance_factor!r}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ConfigError(f"resolution must be a positive integer or None, got {resolution!r}")
    if name != "digits":  # scikit-learn ships the digits; every other set is read from files
        if data_dir is None and name not in IDX_DATASETS:
            raise DataError(f"data set {name!r} needs data_dir: expected the folder holding its files")
        if data_dir is not None and not os.path.isdir(data_dir):
            raise DataError(f"data directory {data_dir} does not exist or is not a directory: expected the {name} files there")
        data_dir = None if data_dir is None else str(data_dir)

    notes: list[str] = []
    if name == "digits":
        raw = read_digits(seed=seed)
    elif name in IDX_DATASETS:
        raw = read_idx_dataset(name, data_dir)
    elif name in ("cifar10", "cifar100"):
        raw = read_cifar(data_dir, 10 if name == "cifar10" else 100)
    elif name == "tiny":
        raw = read_tiny_imagenet(data_dir)
    else:
        raw = read_imagenet_lt(data_dir, resolution or 64)
    x_train, y_train, x_test, y_test, class_names = raw
    C = len(class_names)

    if name == "imagenet-lt" and is_lt_list_form(data_dir):
        counts = np.bincount(y_train, minlength=C)
        notes.append(f"imbalance_factor argument ({beta:g}) ignored: ImageNet_LT_train.txt is already long-tailed; "
                     f"the factor shown is its measured head/tail ratio")
        beta = float(counts.max() / counts.min())
    else:
        available = int(np.bincount(y_train, minlength=C).min())
        n_max = _N_MAX.get(name, available)
        if available < n_max:
            notes.append(f"n_max reduced from {n_max} to {available}: the smallest class on disk has only {available} images")
            n_max = available
        keep = long_tail_indices(y_train, beta, seed, n_max=n_max, num_classes=C)
        x_train, y_train = x_train[keep], y_train[keep]

    images_train, images_test = _to_float(x_train), _to_float(x_test)
    if resolution is not None:
        images_train, images_test = _resize(images_train, resolution), _resize(images_test, resolution)
    mean, std = _channel_stats(images_train)
    images_train, images_test = _normalize(images_train, mean, std), _normalize(images_test, mean, std)

    whitener = None
    if _ZCA_DEFAULT[name] if zca is None else zca:
        whitener = ZCA().fit(images_train, ZCA_REGULARIZATION)
        images_train, images_test = whitener.transform(images_train), whitener.transform(images_test)

    return LTDataset(name=name, images_train=images_train, labels_train=torch.from_numpy(np.asarray(y_train, np.int64)),
                     images_test=images_test, labels_test=torch.from_numpy(np.asarray(y_test, np.int64)),
                     class_names=list(class_names), imbalance_factor=beta, seed=seed, mean=mean, std=std,
                     zca=whitener, notes=notes, data_dir=data_dir if name != "digits" else None)

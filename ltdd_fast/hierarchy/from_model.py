"""What a trained model says about the classes: its predictions, class-mean features, the grouping learned from
them (on training images it was not trained on), and an expert's network as a model."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError, TrajectoryError
from ..evaluate import predict_logits
from ..models.functional import functional_model
from .groups import METHODS, Grouping, confusion_matrix, group_by_confusion, group_by_features, group_by_frequency


def model_predictions(net: torch.nn.Module, images: Tensor, device="cpu") -> Tensor:
    return predict_logits(net, images, device).argmax(1)


@torch.no_grad()
def class_mean_features(net: torch.nn.Module, images: Tensor, labels: Tensor, num_classes: int,
                        device="cpu", batch: int = 1024) -> Tensor:
    """[C, D] mean penultimate features (the classifier's input) of each class's images."""
    if not hasattr(net, "features"):
        raise ConfigError(f"{type(net).__name__} has no `features` backbone to take class-mean features from")
    net.eval()
    feats = torch.cat([net.features(images[i:i + batch].to(device)).flatten(1).double().cpu()
                       for i in range(0, images.shape[0], batch)])
    labels = labels.long().cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise DataError(f"class {int((counts == 0).nonzero()[0])} has no image to take its mean feature from")
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats)
    return sums / counts[:, None]


def held_out_mask(train_images: Tensor, train_labels: Tensor, used_images: Tensor | None, num_classes: int) -> Tensor:
    """True for training images that are not (bit for bit) in `used_images`; a class left with none
    keeps all of its images, so that every class has a row in the confusion matrix."""
    keep = torch.ones(train_images.shape[0], dtype=torch.bool)
    if used_images is None or used_images.shape[0] == 0:
        return keep
    def rows(x):
        return np.ascontiguousarray(x.detach().cpu().float().flatten(1).numpy()).view(np.uint8)

    used = {r.tobytes() for r in rows(used_images)}
    keep = torch.tensor([r.tobytes() not in used for r in rows(train_images)], dtype=torch.bool)
    labels = train_labels.long().cpu()
    for c in range(num_classes):
        in_class = labels == c
        if in_class.any() and not keep[in_class].any():
            keep[in_class] = True
    return keep


def grouping_from_model(method: str, net, dataset, num_groups=None, many: int = 100, few: int = 20, seed: int = 0,
                        used_images: Tensor | None = None, cluster_on: str = "train", device="cpu",
                        source: str = "") -> tuple[Grouping, Tensor | None]:
    """The grouping `method` makes from a trained network; also the confusion it clustered, if any.

    confusion: on the training images not in `used_images` (cluster_on="train"; all of them when
    used_images is None, as for an expert trained on them) or, for a diagnosis only, on the test set (cluster_on="test": the analysis on the same test confusion is then circular).
    features: class means over all training images (or the test images with cluster_on="test").
    """
    if method not in METHODS:
        raise ConfigError(f"unknown grouping method {method!r}: expected one of {', '.join(METHODS)}")
    if cluster_on not in ("train", "test"):
        raise ConfigError(f"cluster_on must be 'train' or 'test', got {cluster_on!r}")
    counts = [int(c) for c in dataset.class_counts]
    if method == "frequency":
        return group_by_frequency(counts, many, few), None
    if cluster_on == "test":
        images, labels, where = dataset.images_test, dataset.labels_test, "test images"
    else:
        images, labels, where = dataset.images_train, dataset.labels_train, "training images"
    if method == "features":
        means = class_mean_features(net, images, labels, dataset.num_classes, device)
        return group_by_features(means, num_groups, counts, seed, source=f"{source}: class-mean features of the "
                                                                                f"{where}"), None
    if cluster_on == "train" and used_images is not None:
        keep = held_out_mask(images, labels, used_images, dataset.num_classes)
        images, labels = images[keep], labels[keep]
        where = f"{int(keep.sum())} training images not in its training set"
    elif cluster_on == "train":
        where = f"all {images.shape[0]} training images"
    confusion = confusion_matrix(model_predictions(net, images, device), labels, dataset.num_classes)
    return group_by_confusion(confusion, num_groups, counts, seed, source=f"{source}: confusion on {where}"), confusion


def expert_network(store, dataset, index: int | None = None, epoch: int | None = None, device="cpu"):
    """The network of one expert (default: the first complete one) at `epoch` (default: its last)."""

    m = store.manifest
    net = functional_model(m["model"], dataset.channel, dataset.num_classes, dataset.im_size, width=m["width"])
    store.check_compatible(dataset, net)
    done = store.completed()
    if not done:
        raise TrajectoryError(f"{store.root} has no complete expert")
    index = done[0] if index is None else index
    if index not in done:
        raise TrajectoryError(f"expert {index} is not complete in {store.root} (complete: {done})")
    epoch = store.num_snapshots - 1 if epoch is None else epoch
    module = net.load_into(net.make_module(), store.snapshot(index, epoch)).to(device)
    return module, f"expert {index} of {store.root} at epoch {epoch}"

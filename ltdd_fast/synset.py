"""The synthetic-set file: what distillation writes and `ltdd eval --synset` reads.

One torch.save'd dict holding the images (in the data set's preprocessed space), their labels (hard
class indices or learned soft logits), the learned student lr, and everything needed to check the set
against a data set and to view it (class names, normalisation, ZCA).
"""
from pathlib import Path

import torch

from .errors import DataError
from .files import load_torch, save_torch_atomic

FORMAT = "ltdd-synset/1"
REQUIRED = ("images", "labels", "lr", "dataset", "class_names", "channel", "im_size", "zca")


def save_synset(path, images, labels, lr, dataset, method, classes=None, **meta):
    """classes [M] (int64): each image's class, which the ce+mse evaluation protocol takes as its hard label."""
    path = Path(path)
    record = {
        "format": FORMAT,
        "method": method,
        "images": images.detach().cpu(),
        "labels": labels.detach().cpu(),
        "lr": float(lr),
        "dataset": dataset.name,
        "imbalance_factor": float(dataset.imbalance_factor),
        "data_seed": dataset.seed,
        "class_names": list(dataset.class_names),
        "class_counts": list(dataset.class_counts),
        "channel": dataset.channel,
        "im_size": list(dataset.im_size),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "zca": dataset.zca.state_dict() if dataset.zca is not None else None,
        "meta": meta,
    }
    if classes is not None:
        record["classes"] = torch.as_tensor(classes).detach().cpu().long()
    return save_torch_atomic(path, record)


def load_synset(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"synthetic set {path} not found: expected a file written by `ltdd distill`")
    record = load_torch(path, "synthetic-set file")
    if record.get("format") != FORMAT:
        raise DataError(f"{path} is not a synthetic-set file: format {record.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: the file is incomplete")
    for key in ("images", "labels"):
        if not isinstance(record[key], torch.Tensor):
            raise DataError(f"{path} is damaged: {key} is a {type(record[key]).__name__}, expected a tensor")
    return record


def check_synset_compatible(record, dataset, path="synthetic set"):
    """Refuse a set made for other data: class count, image shape and preprocessing must agree."""
    checks = {
        "dataset": (record["dataset"], dataset.name),
        "number of classes": (len(record["class_names"]), dataset.num_classes),
        "channels": (record["channel"], dataset.channel),
        "image size": (list(record["im_size"]), list(dataset.im_size)),
        "ZCA whitening": (record["zca"] is not None, dataset.zca is not None),
    }
    for what, (have, want) in checks.items():
        if have != want:
            raise DataError(f"{path} was made for {what} {have!r}, but the evaluation data has {want!r}")


def synset_classes(record) -> torch.Tensor:
    """Each image's class: the file's own record where it has one (sets written since the uni-level distiller),
    else ipc images per class in class order (how ltdd distill writes them) when the meta's ipc says so, else the
    argmax of the label."""
    if isinstance(record.get("classes"), torch.Tensor):
        return record["classes"].long()
    labels, k = record["labels"], len(record["class_names"])
    ipc = record.get("meta", {}).get("ipc")
    if isinstance(ipc, int) and labels.shape[0] == ipc * k:
        return torch.arange(k).repeat_interleave(ipc)
    return labels.argmax(1) if labels.is_floating_point() else labels.long()

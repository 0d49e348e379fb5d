"""Groupings of the classes: by frequency, by rank, by clustering a confusion matrix or class-mean features."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..evaluate import head_tail_classes

METHODS = ("frequency", "confusion", "features")
FREQUENCY_NAMES = ("head", "medium", "tail")


@dataclass
class Grouping:
    """A partition of the classes: groups[k] lists the classes of group k (ascending)."""

    groups: list[list[int]]
    method: str
    names: list[str] = field(default_factory=list)
    source: str = ""  # where a learned grouping came from, for reports

    def __post_init__(self):
        self.groups = [sorted(int(c) for c in g) for g in self.groups]
        if not self.names:
            self.names = [f"group {k}" for k in range(len(self.groups))]
        classes = [c for g in self.groups for c in g]
        if any(len(g) == 0 for g in self.groups):
            raise DataError(f"every group needs at least one class, got {self.groups}")
        if sorted(classes) != list(range(len(classes))):
            raise DataError(f"groups must partition the classes 0..C-1 exactly once each, got {self.groups}")
        if len(self.names) != len(self.groups):
            raise DataError(f"{len(self.names)} group names for {len(self.groups)} groups")

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_classes(self) -> int:
        return sum(len(g) for g in self.groups)

    def group_of(self) -> Tensor:
        """[C] int64: the group of each class."""
        out = torch.empty(self.num_classes, dtype=torch.long)
        for k, g in enumerate(self.groups):
            out[g] = k
        return out

    def order(self) -> list[int]:
        """The classes, group by group: the order of a heatmap."""
        return [c for g in self.groups for c in g]

    def to_dict(self) -> dict:
        return {"method": self.method, "groups": self.groups, "names": self.names, "source": self.source}


def check_counts(class_counts) -> list[int]:
    counts = [int(c) for c in class_counts]
    if not counts or any(c < 0 for c in counts):
        raise DataError(f"class_counts must be a non-empty list of non-negative counts, got {class_counts!r}")
    return counts


def _head_first(groups: list[list[int]], class_counts) -> list[list[int]]:
    """Groups sorted by the mean training count of their classes, largest first (ties: lowest class)."""
    counts = check_counts(class_counts)
    return sorted((sorted(g) for g in groups), key=lambda g: (-sum(counts[c] for c in g) / len(g), g[0]))


def group_by_frequency(class_counts, many: int = 100, few: int = 20) -> Grouping:
    """head: count > many; medium: few <= count <= many; tail: count < few (empty groups dropped)."""
    counts = check_counts(class_counts)
    if few > many:
        raise ConfigError(f"few threshold ({few}) must not exceed many threshold ({many})")
    members = {name: [] for name in FREQUENCY_NAMES}
    for c, n in enumerate(counts):
        members["head" if n > many else ("tail" if n < few else "medium")].append(c)
    names = [k for k in FREQUENCY_NAMES if members[k]]
    return Grouping([members[k] for k in names], "frequency", names,
                    source=f"training counts (head > {many}, tail < {few})")


def group_by_rank(class_counts, k: int = 3) -> Grouping:
    """head: the k classes with the most training images; tail: the k with the fewest; medium: the rest (dropped
    when empty), as evaluate.head_tail_classes ranks them: for sets where the many/few thresholds leave a group
    empty."""
    counts = check_counts(class_counts)
    head, tail = head_tail_classes(counts, k)
    parts = {"head": head, "medium": [c for c in range(len(counts)) if c not in head + tail], "tail": tail}
    names = [n for n in FREQUENCY_NAMES if parts[n]]
    return Grouping([parts[n] for n in names], "rank", names,
                    source=f"training counts (head: the {k} largest classes, tail: the {k} smallest)")


def check_num_groups(num_groups, num_classes: int):
    if num_groups is None:
        return
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 2 <= num_groups <= num_classes - 1:
        raise ConfigError(f"num_groups must be an int in 2..{num_classes - 1} for {num_classes} classes, got {num_groups!r}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """[C, C] int64 counts, rows the true class and columns the predicted one."""
    pred, target = torch.as_tensor(pred).long().cpu().flatten(), torch.as_tensor(target).long().cpu().flatten()
    if pred.shape != target.shape:
        raise DataError(f"pred and target must have equal length, got {pred.numel()} and {target.numel()}")
    for what, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise DataError(f"{what} labels must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confusion_affinity(confusion) -> np.ndarray:
    """Symmetric class affinity from a confusion matrix: rows normalised (each class counts equally,
    whatever its size), diagonal dropped, (M + M^T) / 2, and a floor of 1e-3 times the mean positive
    entry so that a class that is never confused still belongs to the graph."""
    m = np.asarray(torch.as_tensor(confusion, dtype=torch.float64).numpy(), dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise DataError(f"confusion must be a square [C, C] matrix with C >= 2, got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise DataError("confusion must hold finite non-negative counts")
    rows = m.sum(1, keepdims=True)
    m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    np.fill_diagonal(m, 0.0)
    a = (m + m.T) / 2
    positive = a[a > 0]
    floor = 1e-3 * positive.mean() if positive.size else 1.0
    a = a + floor
    np.fill_diagonal(a, 0.0)
    return a


def max_auto_groups(num_classes: int) -> int:
    """The most groups a grouping picks by itself for C classes."""
    return min(num_classes - 1, max(2, num_classes // 2))


def eigengap_num_groups(affinity: np.ndarray, max_groups: int | None = None) -> int:
    """k in 2..max_groups with the largest gap lambda_k - lambda_{k-1} of the normalised Laplacian."""
    c = affinity.shape[0]
    max_groups = c - 1 if max_groups is None else min(max_groups, c - 1)
    if max_groups < 2:
        raise ConfigError(f"{c} classes are too few to split into groups: need at least 3")
    d = affinity.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(d, 1e-300))
    lap = np.eye(c) - inv[:, None] * affinity * inv[None, :]
    lam = np.sort(np.linalg.eigvalsh(lap))
    gaps = [lam[k] - lam[k - 1] for k in range(2, max_groups + 1)]
    return 2 + int(np.argmax(gaps))


def group_by_confusion(confusion, num_groups: int | None = None, class_counts=None, seed: int = 0,
                       source: str = "") -> Grouping:
    """Spectral clustering of confusion_affinity(confusion) into num_groups (default: by eigengap)."""
    from sklearn.cluster import SpectralClustering

    affinity = confusion_affinity(confusion)
    c = affinity.shape[0]
    check_num_groups(num_groups, c)
    k = num_groups or eigengap_num_groups(affinity, max_auto_groups(c))
    labels = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="cluster_qr",
                                random_state=seed).fit_predict(affinity)
    groups = [np.flatnonzero(labels == g).tolist() for g in range(k) if (labels == g).any()]
    counts = class_counts if class_counts is not None else [1] * c
    return Grouping(_head_first(groups, counts), "confusion", source=source)


def group_by_features(class_means, num_groups: int | None = None, class_counts=None, seed: int = 0,
                      source: str = "") -> Grouping:
    """k-means of the L2-normalised class-mean features [C, D] (default k: the best silhouette)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(torch.as_tensor(class_means, dtype=torch.float64).numpy())
    if x.ndim != 2 or x.shape[0] < 3:
        raise DataError(f"class_means must be [C, D] with C >= 3 classes, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError("class_means contain NaN or inf")
    c = x.shape[0]
    check_num_groups(num_groups, c)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def fit(k):
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)

    if num_groups is not None:
        labels = fit(num_groups)
    else:
        best = None
        for k in range(2, max_auto_groups(c) + 1):
            labels_k = fit(k)
            if len(set(labels_k.tolist())) < 2:
                continue
            score = silhouette_score(x, labels_k)
            if best is None or score > best[0] + 1e-12:
                best = (score, labels_k)
        if best is None:
            raise DataError("the class-mean features are all identical: no grouping can be learned from them")
        labels = best[1]
    groups = [np.flatnonzero(labels == g).tolist() for g in sorted(set(labels.tolist()))]
    counts = class_counts if class_counts is not None else [1] * c
    return Grouping(_head_first(groups, counts), "features", source=source)

"""Grouping and two-stage hierarchical classification on distilled data (METHOD section 10).

Grouping. Classes are put into groups
- by frequency: head (more than `many` training images), medium, tail (fewer than `few`), the
  thresholds of the many/medium/few split; empty groups are dropped;
- by confusion: spectral clustering of the symmetrised, row-normalised confusion matrix of a model
  (affinity of classes i and j = (M[i, j] + M[j, i]) / 2, M = confusion with rows summing to 1,
  diagonal dropped); the number of groups, unless given, is the largest eigengap of the normalised
  graph Laplacian;
- by features: k-means of the model's class-mean penultimate features (L2-normalised); the number
  of groups, unless given, is the one with the best silhouette.
A chosen number of groups lies in 2..max(2, C // 2): more would leave mostly one-class groups.
Groups are ordered head-most first (by the mean training count of their classes).

Grouping analysis (`grouping_analysis`, `ltdd groups`): on a confusion matrix, the share of errors
that stay inside a group against the share expected if each class's errors fell uniformly on the
other classes, a permutation test (classes shuffled among groups of the same sizes), and the
direction of errors: cross-group errors toward the more or the less frequent group, and between the
frequency groups (tail predicted as head and the reverse).

Two-stage classification (`train_two_stage`, `ltdd eval --two-stage`): on any training set (a
distilled set, random real images), a group classifier trained on all images with the group of each
image's class as its label, then one classifier per group on that group's images (soft labels
restricted to the group's classes and renormalised; a group of one class needs none). Every network
is trained by evaluate.py's protocol with the same settings (epochs, lr, DSA, batch size) as the
flat evaluation, and all networks of run r are seeded with config.seed + r. Inference: the group
first, then the class inside it ("hard"), or p(class) = p(group) * p(class | group) ("soft").

Honesty of groupings learned from a model: two-stage training never looks at test labels. The
confusion grouping uses the flat network's confusion on the long-tailed *training* images that are
not themselves in the training set of that network (a class all of whose images are in it keeps
them), the feature grouping the class means over all training images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError
from .evaluate import (
    EvalConfig, EvalReport, _check_config, _check_inputs, bias_measures, fit_network, format_comparison,
    head_tail_classes, make_dsa, predict_logits, progress_bar, run_results, train_and_evaluate,
)

METHODS = ("frequency", "confusion", "features")
COMBINES = ("hard", "soft")
FREQUENCY_NAMES = ("head", "medium", "tail")


# ---------------------------------------------------------------- groupings


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


def _check_counts(class_counts) -> list[int]:
    counts = [int(c) for c in class_counts]
    if not counts or any(c < 0 for c in counts):
        raise DataError(f"class_counts must be a non-empty list of non-negative counts, got {class_counts!r}")
    return counts


def _head_first(groups: list[list[int]], class_counts) -> list[list[int]]:
    """Groups sorted by the mean training count of their classes, largest first (ties: lowest class)."""
    counts = _check_counts(class_counts)
    return sorted((sorted(g) for g in groups), key=lambda g: (-sum(counts[c] for c in g) / len(g), g[0]))


def group_by_frequency(class_counts, many: int = 100, few: int = 20) -> Grouping:
    """head: count > many; medium: few <= count <= many; tail: count < few (empty groups dropped)."""
    counts = _check_counts(class_counts)
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
    counts = _check_counts(class_counts)
    head, tail = head_tail_classes(counts, k)
    parts = {"head": head, "medium": [c for c in range(len(counts)) if c not in head + tail], "tail": tail}
    names = [n for n in FREQUENCY_NAMES if parts[n]]
    return Grouping([parts[n] for n in names], "rank", names,
                    source=f"training counts (head: the {k} largest classes, tail: the {k} smallest)")


def _check_num_groups(num_groups, num_classes: int):
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
    _check_num_groups(num_groups, c)
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
    _check_num_groups(num_groups, c)
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


# ---------------------------------------------------------------- what a model says


@torch.no_grad()
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


# ---------------------------------------------------------------- grouping analysis


def grouping_analysis(confusion, grouping: Grouping, class_counts, many: int = 100, few: int = 20,
                      permutations: int | None = None, seed: int = 0, circular: bool = False) -> dict:
    """How the errors of a confusion matrix (rows true, columns predicted) sit with respect to groups.

    within_group_share: errors whose prediction is another class of the true class's group, over all
    errors; within_group_share_chance: the same if each class's errors fell uniformly on the C-1 other
    classes; permutation_p_value: share of random groupings with the same group sizes whose within
    share is at least as large (add-one smoothed). Cross-group errors go toward_head when the predicted
    group's mean training count is larger than the true group's. frequency_flow[i][j]: errors from
    frequency group i to j (head/medium/tail by the many/few thresholds, whatever `grouping` is).
    circular: the grouping was learned from this same confusion (the verdict says so).
    """
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    c = conf.shape[0]
    if conf.dim() != 2 or conf.shape[1] != c or c != grouping.num_classes:
        raise DataError(f"confusion must be [C, C] with C = {grouping.num_classes} (the grouping's classes), "
                        f"got shape {tuple(conf.shape)}")
    counts = _check_counts(class_counts)
    if len(counts) != c:
        raise DataError(f"class_counts has {len(counts)} entries for {c} classes")
    errors = conf.clone()
    errors.fill_diagonal_(0)
    total = float(errors.sum())
    group_of = grouping.group_of()
    same = group_of[:, None] == group_of[None, :]
    within = float(errors[same].sum())
    sizes = torch.tensor([len(grouping.groups[int(g)]) for g in group_of], dtype=torch.float64)
    per_class_errors = errors.sum(1)
    chance = float((per_class_errors * (sizes - 1) / max(c - 1, 1)).sum())
    # permutation test: the same group sizes, classes shuffled among them
    n_perm = permutations if permutations is not None else (1000 if c <= 200 else 100)
    rng = np.random.default_rng(seed)
    e = errors.numpy()
    g = group_of.numpy()
    at_least = 0
    for _ in range(n_perm):
        gp = g[rng.permutation(c)]
        if e[gp[:, None] == gp[None, :]].sum() >= within - 1e-9:
            at_least += 1
    # direction of cross-group errors, by the groups' mean training counts
    mean_count = [sum(counts[k] for k in grp) / len(grp) for grp in grouping.groups]
    toward_head = toward_tail = 0.0
    group_conf = torch.zeros(grouping.num_groups, grouping.num_groups, dtype=torch.float64)
    for a in range(grouping.num_groups):
        for b in range(grouping.num_groups):
            n = float(errors[grouping.groups[a]][:, grouping.groups[b]].sum())
            group_conf[a, b] = n
            if a != b:
                if mean_count[b] > mean_count[a]:
                    toward_head += n
                elif mean_count[b] < mean_count[a]:
                    toward_tail += n
    cross = total - within
    # errors between single classes: toward a class with more training images, or fewer
    cnt = torch.tensor(counts, dtype=torch.float64)
    to_more = float(errors[cnt[None, :] > cnt[:, None]].sum())
    to_fewer = float(errors[cnt[None, :] < cnt[:, None]].sum())
    freq = group_by_frequency(counts, many, few)
    flow = {a: {b: 0 for b in FREQUENCY_NAMES} for a in FREQUENCY_NAMES}
    for name_a, grp_a in zip(freq.names, freq.groups):
        for name_b, grp_b in zip(freq.names, freq.groups):
            flow[name_a][name_b] = int(errors[grp_a][:, grp_b].sum())
    correct = float(conf.diag().sum())
    tested = float(conf.sum())
    per_class = [float(conf[k, k] / conf[k].sum()) if conf[k].sum() > 0 else None for k in range(c)]
    pred_counts = conf.sum(0).tolist()

    def share(x, of):
        return x / of if of > 0 else None

    result = {
        "grouping": grouping.to_dict(),
        "num_groups": grouping.num_groups,
        "class_counts": counts,
        "confusion": conf.long().tolist(),
        "accuracy": share(correct, tested),
        "per_class": per_class,
        "errors": int(total),
        "within_group_errors": int(within),
        "cross_group_errors": int(cross),
        "within_group_share": share(within, total),
        "within_group_share_chance": share(chance, total),
        "within_group_lift": share(within, chance),
        "permutation_p_value": (at_least + 1) / (n_perm + 1) if n_perm else None,
        "permutations": n_perm,
        "group_mean_count": mean_count,
        "group_confusion": group_conf.long().tolist(),
        "cross_toward_head": int(toward_head),
        "cross_toward_tail": int(toward_tail),
        "cross_toward_head_share": share(toward_head, toward_head + toward_tail),
        "errors_toward_more_frequent_class_share": share(to_more, to_more + to_fewer),
        "frequency_flow": flow,
        "tail_predicted_as_head": flow["tail"]["head"],
        "head_predicted_as_tail": flow["head"]["tail"],
    }
    if tested > 0 and sum(pred_counts) > 0:
        result.update(bias_measures(per_class, counts, pred_counts, many, few))
    if grouping.method != "frequency":
        from sklearn.metrics import adjusted_rand_score
        result["agreement_with_frequency_ari"] = float(adjusted_rand_score(freq.group_of().numpy(),
                                                                           group_of.numpy()))
    result["circular"] = bool(circular)
    result["verdict"] = _verdict(result, circular)
    return result


def _verdict(r: dict, circular: bool = False) -> str:
    if not r["errors"]:
        return "no errors: nothing to say about the grouping hypothesis"
    p, lift = r["permutation_p_value"], r["within_group_lift"]
    supported = p is not None and p < 0.05 and lift is not None and lift > 1
    parts = [f"{100 * r['within_group_share']:.0f}% of errors stay inside a group against "
             f"{100 * r['within_group_share_chance']:.0f}% by chance (x{lift:.2f}, permutation p={p:.3g}): "
             + ("errors concentrate inside the groups" if supported else "errors do not concentrate inside the groups")]
    if r["cross_toward_head_share"] is not None:
        parts.append(f"{100 * r['cross_toward_head_share']:.0f}% of cross-group errors go toward the more frequent group")
    parts.append(f"tail predicted as head {r['tail_predicted_as_head']}, head predicted as tail "
                 f"{r['head_predicted_as_tail']}")
    if circular:
        parts.append("caution: the groups were learned from this same confusion, so the within-group share is "
                     "inflated by construction")
    return "; ".join(parts)


def format_analysis(r: dict, title: str = "") -> str:
    names = r["grouping"]["names"]
    lines = [title] if title else []
    lines.append(f"grouping {r['grouping']['method']}" + (f" ({r['grouping']['source']})" if r["grouping"]["source"] else ""))
    for name, grp, mean in zip(names, r["grouping"]["groups"], r["group_mean_count"]):
        lines.append(f"  {name:<8} classes {grp}  (mean training count {mean:.1f})")
    acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
    lines.append(f"test accuracy {acc}, {r['errors']} errors: {r['within_group_errors']} inside groups, "
                 f"{r['cross_group_errors']} across ({r['cross_toward_head']} toward head, "
                 f"{r['cross_toward_tail']} toward tail)")
    if "agreement_with_frequency_ari" in r:
        lines.append(f"agreement with the frequency grouping (adjusted Rand index): {r['agreement_with_frequency_ari']:.2f}")
    lines.append(r["verdict"])
    return "\n".join(lines)


def save_heatmap(confusion, grouping: Grouping, path, class_names=None, class_counts=None, title: str = ""):
    """Row-normalised confusion (%) with rows and columns ordered group by group, groups outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    conf = torch.as_tensor(confusion, dtype=torch.float64)
    order = grouping.order()
    conf = conf[order][:, order]
    rows = conf.sum(1, keepdim=True)
    pct = torch.where(rows > 0, 100 * conf / rows.clamp(min=1), torch.zeros_like(conf)).numpy()
    c = len(order)
    names = class_names or [str(k) for k in range(c)]
    labels = [f"{names[k]} ({class_counts[k]})" if class_counts is not None else names[k] for k in order]
    side = min(max(4.0, 0.45 * c + 1.5), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(pct, cmap="viridis", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of the true class's test images")
    if c <= 40:
        ax.set_xticks(range(c), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(c), labels, fontsize=7)
        for i in range(c):
            for j in range(c):
                if pct[i, j] >= 0.5:
                    ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if pct[i, j] > 60 else "white")
    start = 0
    for grp in grouping.groups:
        ax.add_patch(matplotlib.patches.Rectangle((start - 0.5, start - 0.5), len(grp), len(grp), fill=False,
                                                  edgecolor="red", linewidth=1.5))
        start += len(grp)
    ax.set_xlabel("predicted class (training images)")
    ax.set_ylabel("true class (training images)")
    ax.set_title(title or f"confusion ordered by {grouping.method} grouping", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- two-stage classification


def image_classes_of(labels: Tensor, num_classes: int) -> Tensor:
    """The class each training image stands for: its hard label, or for soft labels the layout of
    `ltdd distill` (ipc images per class, class by class), which a learned label may have drifted from."""
    if not labels.is_floating_point():
        return labels.long().cpu()
    m = labels.shape[0]
    if m % num_classes:
        raise DataError(f"a soft-labelled set of {m} images is not {num_classes} equal class blocks: "
                        f"give the class of each image (image_classes)")
    return torch.arange(num_classes).repeat_interleave(m // num_classes)


def group_targets(labels: Tensor, image_classes: Tensor, grouping: Grouping, soft_group_labels: bool = False):
    """Training targets of the two stages.

    Returns (group_targets, per_group) where group_targets are the group of each image's class (int [M]),
    or with soft_group_labels and soft labels the log of the label's probability mass on each group
    (logits [M, G], so softmax gives the summed class probabilities); per_group[k] is
    (image indices, targets) for group k's classifier: within-group class indices (hard labels) or the
    soft logits restricted to the group's classes (softmax renormalises them), or None for a one-class group.
    """
    group_of = grouping.group_of()
    image_classes = image_classes.long().cpu()
    soft = labels.is_floating_point()
    if soft_group_labels and soft:
        gt = torch.stack([torch.logsumexp(labels[:, grp].float(), dim=1) for grp in grouping.groups], dim=1)
    else:
        gt = group_of[image_classes]
    per_group = []
    for k, grp in enumerate(grouping.groups):
        idx = torch.nonzero(group_of[image_classes] == k).flatten()
        if idx.numel() == 0:
            raise DataError(f"group {grouping.names[k]} (classes {grp}) has no training image")
        if len(grp) == 1:
            per_group.append(None)
            continue
        if soft:
            t = labels[idx][:, grp].float()
        else:
            local = torch.full((grouping.num_classes,), -1, dtype=torch.long)
            local[grp] = torch.arange(len(grp))
            t = local[image_classes[idx]]
        per_group.append((idx, t))
    return gt, per_group


def combine_stages(group_probs: Tensor, within_probs: list, grouping: Grouping, combine: str = "hard") -> Tensor:
    """Class predictions [N] from p(group | x) [N, G] and p(class | group, x) per group ([N, |g|], or
    None for a one-class group). hard: the class inside the most likely group; soft: argmax over
    classes of p(group) * p(class | group)."""
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    n = group_probs.shape[0]
    if group_probs.dim() != 2 or group_probs.shape[1] != grouping.num_groups or len(within_probs) != grouping.num_groups:
        raise DataError(f"need group probabilities [N, {grouping.num_groups}] and one entry per group, got "
                        f"{tuple(group_probs.shape)} and {len(within_probs)}")
    full = torch.zeros(n, grouping.num_classes, dtype=group_probs.dtype)
    within_full = torch.zeros(n, grouping.num_classes, dtype=group_probs.dtype)
    for k, (grp, p) in enumerate(zip(grouping.groups, within_probs)):
        p = torch.ones(n, 1, dtype=group_probs.dtype) if p is None else p.to(group_probs.dtype)
        if p.shape != (n, len(grp)):
            raise DataError(f"group {k} probabilities must be [{n}, {len(grp)}], got {tuple(p.shape)}")
        within_full[:, grp] = p
        full[:, grp] = group_probs[:, k:k + 1] * p
    if combine == "soft":
        return full.argmax(1)
    chosen = grouping.group_of()[None, :] == group_probs.argmax(1)[:, None]
    return torch.where(chosen, within_full, torch.full_like(within_full, -1.0)).argmax(1)


class TwoStageClassifier:
    """A trained group classifier and per-group classifiers (None for one-class groups)."""

    def __init__(self, group_net, group_nets: list, grouping: Grouping, device="cpu"):
        if len(group_nets) != grouping.num_groups:
            raise DataError(f"need one classifier (or None) per group: {len(group_nets)} for {grouping.num_groups}")
        self.group_net, self.group_nets, self.grouping, self.device = group_net, group_nets, grouping, device

    def probabilities(self, images: Tensor) -> tuple[Tensor, list]:
        group_probs = torch.softmax(predict_logits(self.group_net, images, self.device), dim=1)
        within = [None if net is None else torch.softmax(predict_logits(net, images, self.device), dim=1)
                  for net in self.group_nets]
        return group_probs, within

    def predict(self, images: Tensor, combine: str = "hard") -> Tensor:
        return combine_stages(*self.probabilities(images), self.grouping, combine)


@dataclass
class TwoStageResult:
    report: EvalReport                 # the two-stage classifier (combine as asked)
    grouping: Grouping
    combine: str
    group_accuracy: float              # test accuracy of the group classifier, mean over runs
    within_group_accuracy: list        # per group: accuracy of its classifier on its classes' test images
    flat: EvalReport | None = None     # the flat network trained on the same set, if any
    by_combine: dict = field(default_factory=dict)  # the same networks under each inference rule

    def to_dict(self) -> dict:
        d = self.report.to_dict()
        d.update({"grouping": self.grouping.to_dict(), "combine": self.combine,
                  "group_accuracy": self.group_accuracy, "within_group_accuracy": self.within_group_accuracy,
                  "by_combine": {k: r.to_dict() for k, r in self.by_combine.items()}})
        if self.flat is not None:
            d["flat"] = self.flat.to_dict()
        return d

    def format(self) -> str:
        lines = [f"grouping {self.grouping.method}" + (f" ({self.grouping.source})" if self.grouping.source else "")
                 + f", inference {self.combine}"]
        for name, grp, acc in zip(self.grouping.names, self.grouping.groups, self.within_group_accuracy):
            within = "no classifier" if len(grp) == 1 else f"within-group accuracy {100 * acc:.2f}%"
            lines.append(f"  {name:<8} classes {grp}: {within}")
        lines.append(f"group classifier test accuracy {100 * self.group_accuracy:.2f}%")
        others = [r for c, r in self.by_combine.items() if c != self.combine]
        lines.append(format_comparison([r for r in (self.flat, self.report, *others) if r is not None]))
        return "\n".join(lines)


def train_two_stage(images: Tensor, labels: Tensor, dataset, config: EvalConfig, grouping: Grouping,
                    combine: str = "hard", image_classes: Tensor | None = None, soft_group_labels: bool = False,
                    name: str = "", progress: bool = True, flat: EvalReport | None = None) -> TwoStageResult:
    """config.num_runs two-stage classifiers on (images, labels), tested on dataset's test set.

    labels as for train_and_evaluate; image_classes: the class each image stands for (default:
    image_classes_of). Every network uses the flat evaluation's protocol and settings.
    """
    device = _check_config(config)
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if not isinstance(grouping, Grouping):
        raise ConfigError(f"grouping must be a Grouping, got {type(grouping).__name__}")
    if grouping.num_classes != dataset.num_classes:
        raise DataError(f"the grouping covers {grouping.num_classes} classes but {dataset.name} has {dataset.num_classes}")
    if grouping.num_groups < 2:
        raise ConfigError(f"the {grouping.method} grouping has a single group ({grouping.names[0]}): a two-stage "
                          f"classifier needs at least two (change the thresholds or the grouping method)")
    images, labels, soft = _check_inputs(images, labels, dataset)
    if image_classes is None:
        image_classes = image_classes_of(labels, dataset.num_classes)
    image_classes = torch.as_tensor(image_classes).long().cpu()
    if image_classes.shape != (images.shape[0],) or image_classes.min() < 0 or image_classes.max() >= dataset.num_classes:
        raise DataError(f"image_classes must be [{images.shape[0]}] class indices in [0, {dataset.num_classes})")
    gt, per_group = group_targets(labels.cpu(), image_classes, grouping, soft_group_labels)
    soft_groups = gt.is_floating_point()
    images = images.detach().to(device)
    gt = (torch.softmax(gt, dim=1) if soft_groups else gt).to(device)
    stage2 = [None if pg is None else (images[pg[0].to(device)],
                                       (torch.softmax(pg[1], dim=1) if soft else pg[1]).to(device))
              for pg in per_group]
    dsa = make_dsa(config)
    nets_per_run = 1 + sum(s is not None for s in stage2)
    bar = progress_bar(config.num_runs * config.epochs * nets_per_run, name or "two-stage", progress)
    test_labels = dataset.labels_test.cpu()
    test_groups = grouping.group_of()[test_labels]
    runs = {c: ([], [], []) for c in COMBINES}  # accuracies, per-class lists, prediction counts
    group_acc = []
    within_hits = torch.zeros(grouping.num_groups, dtype=torch.float64)
    for r in range(config.num_runs):
        seed = config.seed + r
        group_net = fit_network(images, gt, soft_groups, grouping.num_groups, dataset, config, seed, dsa, bar)
        nets = [None if s is None else fit_network(s[0], s[1], soft, len(grp), dataset, config, seed, dsa, bar)
                for s, grp in zip(stage2, grouping.groups)]
        model = TwoStageClassifier(group_net, nets, grouping, device)
        group_probs, within = model.probabilities(dataset.images_test)
        for c in COMBINES:
            for store, value in zip(runs[c], run_results(combine_stages(group_probs, within, grouping, c), dataset)):
                store.append(value)
        group_acc.append(float((group_probs.argmax(1) == test_groups).double().mean()))
        for k, (grp, p) in enumerate(zip(grouping.groups, within)):
            rows = test_groups == k
            if p is None:
                within_hits[k] += 1.0
            elif rows.any():
                local = torch.tensor(grp)[p[rows].argmax(1)]
                within_hits[k] += float((local == test_labels[rows]).double().mean())
        bar.set_postfix(run=r, acc=f"{100 * runs[combine][0][-1]:.2f}%")
    bar.close()
    counts = [int(c) for c in dataset.class_counts]
    by_combine = {c: EvalReport.from_runs(name if c == combine else f"{name} ({c})".strip(), *runs[c], counts,
                                          config.many_threshold, config.few_threshold) for c in COMBINES}
    return TwoStageResult(report=by_combine[combine], grouping=grouping, combine=combine,
                          group_accuracy=sum(group_acc) / len(group_acc),
                          within_group_accuracy=(within_hits / config.num_runs).tolist(), flat=flat,
                          by_combine=by_combine)


def evaluate_flat_and_two_stage(images: Tensor, labels: Tensor, dataset, config: EvalConfig, groups: str = "frequency",
                                num_groups: int | None = None, combine: str = "hard", name: str = "",
                                image_classes: Tensor | None = None, soft_group_labels: bool = False,
                                progress: bool = True) -> TwoStageResult:
    """The flat evaluation and the two-stage one on the same set, by the same protocol.

    A learned grouping (confusion, features) comes from the flat run-0 network (see module doc).
    """
    if groups not in METHODS:
        raise ConfigError(f"unknown grouping method {groups!r}: expected one of {', '.join(METHODS)}")
    if groups == "frequency" and num_groups is not None:
        raise ConfigError("num_groups does not apply to the frequency grouping (its groups come from the many/few thresholds)")
    _check_num_groups(num_groups, dataset.num_classes)
    if groups == "frequency":
        # refuse a one-group split before any training
        grouping = group_by_frequency(dataset.class_counts, config.many_threshold, config.few_threshold)
        if grouping.num_groups < 2:
            raise ConfigError(f"at many > {config.many_threshold} and few < {config.few_threshold} every class of "
                              f"{dataset.name} is {grouping.names[0]}: a two-stage classifier needs at least two "
                              f"groups (change the thresholds or the grouping method)")
    flat, nets = train_and_evaluate(images, labels, dataset, config, name=name, progress=progress,
                                    return_networks=True)
    if groups != "frequency":
        grouping, _ = grouping_from_model(groups, nets[0], dataset, num_groups, seed=config.seed, used_images=images,
                                          device=config.device, source="flat network, run 0")
    del nets
    two = train_two_stage(images, labels, dataset, config, grouping, combine, image_classes, soft_group_labels,
                          name=f"{name} two-stage".strip(), progress=progress, flat=flat)
    return two


def expert_network(store, dataset, index: int | None = None, epoch: int | None = None, device="cpu"):
    """The network of one expert (default: the first complete one) at `epoch` (default: its last)."""
    from .errors import TrajectoryError
    from .models.functional import functional_model

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

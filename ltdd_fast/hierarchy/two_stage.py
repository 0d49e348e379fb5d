"""Two-stage classification: a group classifier, then one classifier per group, trained under the flat
evaluation's protocol and compared with it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import distributed
from ..errors import ConfigError, DataError
from ..evaluate import (
    EvalConfig, EvalReport, check_config, check_inputs, fit_network, format_comparison, make_dsa, predict_logits,
    progress_bar, run_results, spread_runs, train_and_evaluate,
)
from .from_model import grouping_from_model
from .groups import METHODS, Grouping, check_num_groups, group_by_frequency

COMBINES = ("hard", "soft")


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
    device = check_config(config)
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if not isinstance(grouping, Grouping):
        raise ConfigError(f"grouping must be a Grouping, got {type(grouping).__name__}")
    if grouping.num_classes != dataset.num_classes:
        raise DataError(f"the grouping covers {grouping.num_classes} classes but {dataset.name} has {dataset.num_classes}")
    if grouping.num_groups < 2:
        raise ConfigError(f"the {grouping.method} grouping has a single group ({grouping.names[0]}): a two-stage "
                          f"classifier needs at least two (change the thresholds or the grouping method)")
    images, labels, soft = check_inputs(images, labels, dataset)
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
    world = distributed.world()
    local = len(world.mine(range(config.num_runs))) if world.active else config.num_runs
    bar = progress_bar(local * config.epochs * nets_per_run, name or "two-stage", progress)
    test_labels = dataset.labels_test.cpu()
    test_groups = grouping.group_of()[test_labels]

    def run(r):
        """Run r's results: per combine rule (accuracy, per-class list, prediction counts), the group accuracy and
        each group's within-group accuracy."""
        seed = config.seed + r
        group_net = fit_network(images, gt, soft_groups, grouping.num_groups, dataset, config, seed, dsa, bar)
        nets = [None if s is None else fit_network(s[0], s[1], soft, len(grp), dataset, config, seed, dsa, bar)
                for s, grp in zip(stage2, grouping.groups)]
        model = TwoStageClassifier(group_net, nets, grouping, device)
        group_probs, within = model.probabilities(dataset.images_test)
        by_rule = {c: run_results(combine_stages(group_probs, within, grouping, c), dataset) for c in COMBINES}
        hits = []
        for k, (grp, p) in enumerate(zip(grouping.groups, within)):
            rows = test_groups == k
            if p is None:
                hits.append(1.0)
            elif rows.any():
                local_pred = torch.tensor(grp)[p[rows].argmax(1)]
                hits.append(float((local_pred == test_labels[rows]).double().mean()))
            else:
                hits.append(0.0)
        bar.set_postfix(run=r, acc=f"{100 * by_rule[combine][0]:.2f}%")
        return by_rule, float((group_probs.argmax(1) == test_groups).double().mean()), hits

    runs = {c: ([], [], []) for c in COMBINES}  # accuracies, per-class lists, prediction counts
    group_acc = []
    within_hits = torch.zeros(grouping.num_groups, dtype=torch.float64)
    for by_rule, accuracy, hits in spread_runs(config.num_runs, run, f"two-stage evaluation of {name or 'a set'}"):
        for c in COMBINES:
            for store, value in zip(runs[c], by_rule[c]):
                store.append(value)
        group_acc.append(accuracy)
        within_hits += torch.tensor(hits, dtype=torch.float64)
    bar.close()
    counts = [int(c) for c in dataset.class_counts]
    by_combine = {c: EvalReport.from_runs(name if c == combine else f"{name} ({c})".strip(), *runs[c], counts,
                                          config.many_threshold, config.few_threshold) for c in COMBINES}
    for report in by_combine.values():
        report.world_size = world.size
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
    check_num_groups(num_groups, dataset.num_classes)
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

"""Evaluation: train fresh networks on a (synthetic or real) set, test on the balanced set.

Protocol (METHOD section 9): SGD with momentum 0.9 and weight decay 5e-4 at the
given (possibly learned) lr, lr x0.1 half way, DSA on every batch, several runs
with seeds config.seed + r; report mean/std over runs, per-class accuracy and the
many/medium/few-shot split over the long-tailed training counts.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DataError

_TEST_BATCH = 1024


def per_class_accuracy(pred: Tensor, target: Tensor, num_classes: int) -> list[float | None]:
    """Accuracy of each class over the samples whose target is that class; None if it has none."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.dim() != 1 or target.dim() != 1 or pred.shape != target.shape:
        raise DataError(f"pred and target must be 1-D of equal length, got {tuple(pred.shape)} and {tuple(target.shape)}")
    target = target.long().cpu()
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise DataError(f"target labels must lie in [0, {num_classes}), got range [{int(target.min())}, {int(target.max())}]")
    correct = (pred.long().cpu() == target).double()
    totals = torch.bincount(target, minlength=num_classes)
    hits = torch.bincount(target, weights=correct, minlength=num_classes)
    return [float(h / t) if t > 0 else None for h, t in zip(hits.tolist(), totals.tolist())]


def shot_split(per_class_acc: list, class_counts: list[int], many: int = 100, few: int = 20) -> dict:
    """Mean accuracy of the many (count > many), medium (many >= count >= few) and few (count < few) groups.

    Classes with no accuracy (None) are skipped; a group with no usable class is None.
    """
    if len(per_class_acc) != len(class_counts):
        raise DataError(f"per_class_acc has {len(per_class_acc)} entries but class_counts has {len(class_counts)}; expected one per class")
    if few > many:
        raise ConfigError(f"few threshold ({few}) must not exceed many threshold ({many})")
    groups: dict[str, list[float]] = {"many": [], "medium": [], "few": []}
    for acc, count in zip(per_class_acc, class_counts):
        if acc is None:
            continue
        key = "many" if count > many else ("few" if count < few else "medium")
        groups[key].append(float(acc))
    return {k: (sum(v) / len(v) if v else None) for k, v in groups.items()}


@dataclass
class EvalConfig:
    model: str = "convnet"
    epochs: int = 300
    num_runs: int = 5
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    seed: int = 0
    device: str = "cpu"
    many_threshold: int = 100
    few_threshold: int = 20


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


@dataclass
class EvalReport:
    """Accuracies are fractions in 0..1; overall_std is the population std over runs (ddof=0)."""

    name: str
    run_accuracies: list[float]
    per_class: list[float | None]
    class_counts: list[int]
    many: float | None
    medium: float | None
    few: float | None
    overall_mean: float
    overall_std: float
    # Trailing, defaulted: only so the printed table can say where the split lies.
    many_threshold: int = 100
    few_threshold: int = 20

    def to_dict(self) -> dict:
        d = asdict(self)
        d["std_ddof"] = 0
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def format_table(self) -> str:
        lines = [
            f"{self.name or 'evaluation'}: {_pct(self.overall_mean)} ± {_pct(self.overall_std)} % "
            f"over {len(self.run_accuracies)} run(s) (population std)",
            f"many (>{self.many_threshold}) {_pct(self.many)}   medium {_pct(self.medium)}   "
            f"few (<{self.few_threshold}) {_pct(self.few)}",
            f"{'class':>5}  {'train':>6}  {'acc %':>6}",
        ]
        lines += [f"{c:>5}  {n:>6}  {_pct(a):>6}" for c, (n, a) in enumerate(zip(self.class_counts, self.per_class))]
        return "\n".join(lines)


def format_comparison(reports: list[EvalReport]) -> str:
    """One row per report: overall mean ± std, many, medium, few (all in %)."""
    width = max([len("name")] + [len(r.name) for r in reports])
    lines = [f"{'name':<{width}}  {'overall %':>15}  {'many':>6}  {'medium':>6}  {'few':>6}"]
    for r in reports:
        overall = f"{_pct(r.overall_mean)} ± {_pct(r.overall_std)}"
        lines.append(f"{r.name:<{width}}  {overall:>15}  {_pct(r.many):>6}  {_pct(r.medium):>6}  {_pct(r.few):>6}")
    return "\n".join(lines)


def random_real(dataset, ipc: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """ipc random real training images per class with hard labels, grouped by class.

    A class with fewer than ipc images contributes all it has, so the set is just smaller there.
    """
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"ipc must be a positive int, got {ipc!r}")
    g = torch.Generator().manual_seed(seed)
    labels = dataset.labels_train.cpu()
    picks = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    idx = torch.cat(picks)
    return dataset.images_train[idx].clone(), dataset.labels_train[idx].clone().long()


def _check_config(config: EvalConfig) -> torch.device:
    for key in ("epochs", "num_runs", "batch_size"):
        v = getattr(config, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.{key} must be an int >= 1, got {v!r}")
    lr = float(config.lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"config.lr must be a finite positive number, got {config.lr!r}")
    if config.momentum < 0 or config.weight_decay < 0:
        raise ConfigError(f"config.momentum and weight_decay must be >= 0, got {config.momentum} and {config.weight_decay}")
    try:
        return torch.device(config.device)
    except RuntimeError:
        raise ConfigError(f"config.device {config.device!r} is not a torch device (expected e.g. 'cpu' or 'cuda:0')") from None


def _check_inputs(images: Tensor, labels: Tensor, dataset) -> tuple[Tensor, Tensor, bool]:
    """Return (float32 images, labels, soft?) or raise a DataError naming the problem."""
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise DataError("images and labels must be torch tensors")
    expected = (dataset.channel, *dataset.im_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise DataError(f"images must have shape [M, {expected[0]}, {expected[1]}, {expected[2]}] for {dataset.name}, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError("images is empty; expected at least one training image")
    if not images.is_floating_point():
        raise DataError(f"images must be floating point, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise DataError("images contain NaN or inf")
    if labels.shape[0:1] != images.shape[0:1]:
        raise DataError(f"labels has {labels.shape[0] if labels.dim() else 0} rows but images has {images.shape[0]}; expected one label per image")
    k = dataset.num_classes
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != k:
            raise DataError(f"soft labels must have shape [M, {k}], got {tuple(labels.shape)}")
        if not torch.isfinite(labels).all():
            raise DataError("soft labels contain NaN or inf")
        return images.float(), labels.float(), True
    if labels.dtype == torch.bool or labels.is_complex() or labels.dim() != 1:
        raise DataError(f"hard labels must be a 1-D integer tensor [M], got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(f"hard labels must lie in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}]")
    return images.float(), labels.long(), False


def _test_predictions(net: torch.nn.Module, images: Tensor, device: torch.device) -> Tensor:
    net.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, images.shape[0], _TEST_BATCH):
            preds.append(net(images[i:i + _TEST_BATCH].to(device)).argmax(1).cpu())
    return torch.cat(preds)


def train_and_evaluate(images: Tensor, labels: Tensor, dataset, config: EvalConfig, name: str = "",
                       progress: bool = True) -> EvalReport:
    """Train config.num_runs fresh networks on (images, labels); test each on dataset's test set.

    labels: hard int [M] (cross entropy) or soft float [M, num_classes] logits
    (soft cross entropy against softmax(labels)). Deterministic for fixed inputs and seed on CPU.
    """
    device = _check_config(config)
    images, labels, soft = _check_inputs(images, labels, dataset)
    # Imported late so that bad input is reported even where a dependency fails to import.
    from tqdm import tqdm

    from .models import get_network

    images, labels = images.detach().to(device), labels.detach().to(device)
    targets = torch.softmax(labels, dim=1) if soft else labels
    dsa = None
    if config.dsa:
        from .augment import DSA
        dsa = DSA(strategy=config.dsa_strategy, mode="single")

    m, lr0 = images.shape[0], float(config.lr)
    # Halving point: no decay at all for a single epoch rather than decaying from the start.
    decay_at = config.epochs // 2 if config.epochs > 1 else None
    run_acc, run_per_class = [], []
    bar = tqdm(total=config.num_runs * config.epochs, file=sys.stderr, disable=not progress,
               desc=name or "evaluate", leave=False)
    for r in range(config.num_runs):
        seed = config.seed + r
        # Init under a forked RNG on CPU so the caller's global RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = get_network(config.model, dataset.channel, dataset.num_classes, tuple(dataset.im_size))
        net = net.to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        opt = torch.optim.SGD(net.parameters(), lr=lr0, momentum=config.momentum, weight_decay=config.weight_decay)
        net.train()
        for epoch in range(config.epochs):
            if epoch == decay_at:
                for group in opt.param_groups:
                    group["lr"] = lr0 * 0.1
            order = torch.randperm(m, generator=gen, device=device)
            for i in range(0, m, config.batch_size):
                idx = order[i:i + config.batch_size]
                x, y = images[idx], targets[idx]
                if dsa is not None:
                    x, _ = dsa(x, generator=gen)
                out = net(x)
                loss = -(y * F.log_softmax(out, dim=1)).sum(1).mean() if soft else F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.update(1)
        pred = _test_predictions(net, dataset.images_test, device)
        test_labels = dataset.labels_test.cpu()
        run_acc.append(float((pred == test_labels).double().mean()))
        run_per_class.append(per_class_accuracy(pred, test_labels, dataset.num_classes))
        bar.set_postfix(run=r, acc=f"{100 * run_acc[-1]:.2f}%")
    bar.close()

    per_class = [None if any(p[c] is None for p in run_per_class) else sum(p[c] for p in run_per_class) / len(run_per_class)
                 for c in range(dataset.num_classes)]
    counts = [int(c) for c in dataset.class_counts]
    split = shot_split(per_class, counts, config.many_threshold, config.few_threshold)
    acc = torch.tensor(run_acc, dtype=torch.float64)
    return EvalReport(
        name=name, run_accuracies=run_acc, per_class=per_class, class_counts=counts,
        many=split["many"], medium=split["medium"], few=split["few"],
        overall_mean=float(acc.mean()), overall_std=float(acc.std(unbiased=False)),
        many_threshold=config.many_threshold, few_threshold=config.few_threshold,
    )

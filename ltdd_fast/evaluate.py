"""Evaluation: train fresh networks on a (synthetic or real) set, test on the balanced set.

Protocol (METHOD section 9): SGD with momentum 0.9 and weight decay 5e-4 at the
given (possibly learned) lr, lr x0.1 half way, DSA on every batch, several runs
with seeds config.seed + r; report mean/std over runs, per-class accuracy and the
many/medium/few-shot split over the long-tailed training counts.

Inter-class bias (METHOD section 10), computed for each run's network and averaged over runs:
- per_class_std: population std (ddof=0) of the per-class test accuracies;
- head_tail_gap: mean accuracy of the many-shot (head) classes minus that of the few-shot (tail)
  classes, by the same thresholds as the many/medium/few split (None when either group is empty);
- pred_kl_uniform: KL(q || uniform) in nats of the histogram q of test predictions; the test set is
  balanced, so 0 means the network predicts every class equally often (at most log C).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .augment import DSA
from .checks import check_device, check_number
from .errors import ConfigError, DataError
from .models import get_network

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


def head_tail_classes(class_counts: list[int], k: int = 3) -> tuple[list[int], list[int]]:
    """(head, tail) by rank, as the CIFAR-10-LT literature splits them: the k classes with the most training
    images and the k with the fewest (ties: the lower class index counts as larger)."""
    counts = [int(c) for c in class_counts]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(counts) // 2:
        raise ConfigError(f"k must be an int in 1..{len(counts) // 2} (half the {len(counts)} classes), got {k!r}")
    ranked = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    return ranked[:k], ranked[-k:]


def rank_split(run_per_class: list, class_counts: list[int], k: int = 3) -> dict:
    """Head and tail accuracy by rank (head_tail_classes): head and tail are the mean over runs of each run's
    mean over those classes, head_std and tail_std their population std over runs."""
    out = {}
    for name, classes in zip(("head", "tail"), head_tail_classes(class_counts, k)):
        per_run = []
        for per_class in run_per_class:
            if len(per_class) != len(class_counts):
                raise DataError(f"a run has {len(per_class)} per-class accuracies but there are "
                                f"{len(class_counts)} classes")
            accs = [per_class[c] for c in classes if per_class[c] is not None]
            per_run.append(sum(accs) / len(accs) if accs else None)
        valid = torch.tensor([a for a in per_run if a is not None], dtype=torch.float64)
        out[name] = float(valid.mean()) if valid.numel() else None
        out[f"{name}_std"] = float(valid.std(unbiased=False)) if valid.numel() else None
    return out


def prediction_counts(pred: Tensor, num_classes: int) -> list[int]:
    """How often each class is predicted."""
    pred = torch.as_tensor(pred).long().cpu().flatten()
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise DataError(f"predictions must lie in [0, {num_classes}), got range [{int(pred.min())}, {int(pred.max())}]")
    return torch.bincount(pred, minlength=num_classes).tolist()


def kl_from_uniform(counts: list) -> float:
    """KL(q || uniform) in nats, q = counts / sum(counts); 0 log 0 = 0."""
    q = torch.as_tensor(counts, dtype=torch.float64)
    if q.dim() != 1 or q.numel() == 0 or (q < 0).any() or q.sum() <= 0:
        raise DataError(f"prediction counts must be a non-empty 1-D list of non-negative numbers with a positive sum, got {counts!r}")
    q = q / q.sum()
    nz = q > 0
    return float((q[nz] * torch.log(q[nz] * q.numel())).sum())


def bias_measures(per_class_acc: list, class_counts: list[int], pred_counts: list, many: int = 100,
                  few: int = 20) -> dict:
    """Inter-class bias of one network: per_class_std, head_tail_gap, pred_kl_uniform (see module doc)."""
    if len(pred_counts) != len(class_counts):
        raise DataError(f"pred_counts has {len(pred_counts)} entries but class_counts has {len(class_counts)}; expected one per class")
    accs = torch.tensor([float(a) for a in per_class_acc if a is not None], dtype=torch.float64)
    split = shot_split(per_class_acc, class_counts, many, few)
    gap = None if split["many"] is None or split["few"] is None else split["many"] - split["few"]
    return {"per_class_std": float(accs.std(unbiased=False)) if accs.numel() else None,
            "head_tail_gap": gap, "pred_kl_uniform": kl_from_uniform(pred_counts)}


def _mean_or_none(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


@dataclass
class EvalConfig:
    model: str = "convnet"
    width: int = 128          # the network's width (channels of a ConvNet block); 128 is the field's protocol
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
    # the student's loss: "soft-ce" (METHOD section 9: soft cross-entropy against softmax(label)) or "ce+mse" (the
    # uni-level paper's: ce_weight * CE(s(x), class) + mse_weight * |softmax(label) - softmax(s(x))|^2, summed over
    # the classes; both weights 1 are ours, the paper does not give them)
    protocol: str = "soft-ce"
    ce_weight: float = 1.0
    mse_weight: float = 1.0


PROTOCOLS = ("soft-ce", "ce+mse")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


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
    # Inter-class bias, each the mean over runs of the measure of one run's network (module doc).
    per_class_std: float | None = None
    head_tail_gap: float | None = None
    pred_kl_uniform: float | None = None
    # What the aggregates are computed from: per run, the per-class accuracies and prediction counts.
    run_per_class: list | None = None
    run_pred_counts: list | None = None
    # how many torchrun processes shared the runs (1: one process); the numbers do not depend on it
    world_size: int = 1

    @classmethod
    def from_runs(cls, name: str, run_accuracies: list[float], run_per_class: list, run_pred_counts: list,
                  class_counts: list[int], many_threshold: int = 100, few_threshold: int = 20) -> "EvalReport":
        """Aggregate per-run results: mean accuracies per class, the many/medium/few split, the bias measures."""
        if not run_accuracies or not len(run_accuracies) == len(run_per_class) == len(run_pred_counts):
            raise DataError(f"need one per-class list and one prediction histogram per run, got {len(run_accuracies)} "
                            f"accuracies, {len(run_per_class)} per-class lists and {len(run_pred_counts)} histograms")
        num_classes = len(class_counts)
        per_class = [_mean_or_none([p[c] for p in run_per_class]) for c in range(num_classes)]
        split = shot_split(per_class, class_counts, many_threshold, few_threshold)
        bias = [bias_measures(p, class_counts, h, many_threshold, few_threshold)
                for p, h in zip(run_per_class, run_pred_counts)]
        acc = torch.tensor(run_accuracies, dtype=torch.float64)
        return cls(
            name=name, run_accuracies=list(run_accuracies), per_class=per_class, class_counts=list(class_counts),
            many=split["many"], medium=split["medium"], few=split["few"],
            overall_mean=float(acc.mean()), overall_std=float(acc.std(unbiased=False)),
            many_threshold=many_threshold, few_threshold=few_threshold,
            per_class_std=_mean_or_none([b["per_class_std"] for b in bias]),
            head_tail_gap=_mean_or_none([b["head_tail_gap"] for b in bias]),
            pred_kl_uniform=_mean_or_none([b["pred_kl_uniform"] for b in bias]),
            run_per_class=[list(p) for p in run_per_class], run_pred_counts=[list(h) for h in run_pred_counts],
        )

    def first_runs(self, k: int, name: str | None = None) -> "EvalReport":
        """The report of runs 0..k-1 only (seeds config.seed .. config.seed + k - 1)."""
        if self.run_per_class is None or self.run_pred_counts is None:
            raise DataError("this report carries no per-run results, so it cannot be cut to fewer runs")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.run_accuracies):
            raise ConfigError(f"k must be an int in 1..{len(self.run_accuracies)}, got {k!r}")
        return EvalReport.from_runs(self.name if name is None else name, self.run_accuracies[:k],
                                    self.run_per_class[:k], self.run_pred_counts[:k], self.class_counts,
                                    self.many_threshold, self.few_threshold)

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
            f"bias: per-class std {_pct(self.per_class_std)}   head-tail gap {_pct(self.head_tail_gap)}   "
            f"prediction KL from uniform {_num(self.pred_kl_uniform)}",
            f"{'class':>5}  {'train':>6}  {'acc %':>6}",
        ]
        lines += [f"{c:>5}  {n:>6}  {_pct(a):>6}" for c, (n, a) in enumerate(zip(self.class_counts, self.per_class))]
        return "\n".join(lines)


def format_comparison(reports: list[EvalReport]) -> str:
    """One row per report: overall mean ± std, many, medium, few, per-class std, head-tail gap (all in %)
    and the prediction histogram's KL divergence from uniform (nats)."""
    width = max([len("name")] + [len(r.name) for r in reports])
    lines = [f"{'name':<{width}}  {'overall %':>15}  {'many':>6}  {'medium':>6}  {'few':>6}  "
             f"{'cls-std':>7}  {'gap':>6}  {'KL':>6}"]
    for r in reports:
        overall = f"{_pct(r.overall_mean)} ± {_pct(r.overall_std)}"
        lines.append(f"{r.name:<{width}}  {overall:>15}  {_pct(r.many):>6}  {_pct(r.medium):>6}  {_pct(r.few):>6}  "
                     f"{_pct(r.per_class_std):>7}  {_pct(r.head_tail_gap):>6}  {_num(r.pred_kl_uniform):>6}")
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


def check_config(config: EvalConfig) -> torch.device:
    for key in ("epochs", "num_runs", "batch_size", "width"):
        check_number(f"config.{key}", getattr(config, key), low=1, integer=True)
    check_number("config.lr", config.lr, low=0, low_open=True)
    check_number("config.momentum", config.momentum, low=0)
    check_number("config.weight_decay", config.weight_decay, low=0)
    for key in ("many_threshold", "few_threshold", "seed"):
        check_number(f"config.{key}", getattr(config, key), low=0, integer=True)
    if config.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {config.protocol!r}")
    check_number("config.ce_weight", config.ce_weight, low=0)
    check_number("config.mse_weight", config.mse_weight, low=0)
    if config.few_threshold > config.many_threshold:
        raise ConfigError(f"config.few_threshold ({config.few_threshold}) must not exceed many_threshold ({config.many_threshold})")
    return torch.device(check_device(config.device, "config.device"))


def check_inputs(images: Tensor, labels: Tensor, dataset) -> tuple[Tensor, Tensor, bool]:
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


def predict_logits(net: torch.nn.Module, images: Tensor, device) -> Tensor:
    """The network's logits on images (in eval mode, batched, no gradient), on the CPU."""
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], _TEST_BATCH):
            out.append(net(images[i:i + _TEST_BATCH].to(device)).float().cpu())
    return torch.cat(out)


def make_dsa(config: EvalConfig):
    """The evaluation's augmentation (None without DSA)."""
    if not config.dsa:
        return None
    return DSA(strategy=config.dsa_strategy, mode="single")


def student_loss(out, targets, soft, config, hard=None):
    """The evaluation student's loss under config.protocol; hard [B] are the images' classes (ce+mse), targets
    the class indices or the probabilities [B, K] (soft)."""
    if config.protocol == "soft-ce":
        return -(targets * F.log_softmax(out, dim=1)).sum(1).mean() if soft else F.cross_entropy(out, targets)
    if hard is None:
        hard = targets.argmax(1) if soft else targets
    probs = targets if soft else F.one_hot(targets, out.shape[1]).to(out)
    mse = (torch.softmax(out, dim=1) - probs).pow(2).sum(1).mean()
    return config.ce_weight * F.cross_entropy(out, hard) + config.mse_weight * mse


def fit_network(images: Tensor, targets: Tensor, soft: bool, num_outputs: int, dataset, config: EvalConfig,
                seed: int, dsa=None, bar=None, hard=None) -> torch.nn.Module:
    """One fresh network (config.model, num_outputs logits) trained by the protocol of the module doc.

    images and targets are already on config.device and checked; targets are class indices, or
    probabilities [M, num_outputs] (soft=True) for the soft cross entropy. hard [M]: each image's class, the
    ce+mse protocol's CE target (default: the argmax of the targets). The network is initialised
    under a forked RNG seeded with `seed`, and `seed` also drives batch order and augmentation.
    """

    device = torch.device(config.device)
    # Init under a forked RNG on CPU so the caller's global RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_network(config.model, dataset.channel, num_outputs, tuple(dataset.im_size), width=config.width)
    net = net.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    m, lr0 = images.shape[0], float(config.lr)
    opt = torch.optim.SGD(net.parameters(), lr=lr0, momentum=config.momentum, weight_decay=config.weight_decay)
    # Halving point: no decay at all for a single epoch rather than decaying from the start.
    decay_at = config.epochs // 2 if config.epochs > 1 else None
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
            loss = student_loss(out, y, soft, config, None if hard is None else hard[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bar is not None:
            bar.update(1)
    return net


def run_results(pred: Tensor, dataset) -> tuple[float, list, list[int]]:
    """(accuracy, per-class accuracies, prediction counts) of test predictions."""
    test_labels = dataset.labels_test.cpu()
    pred = pred.long().cpu()
    return (float((pred == test_labels).double().mean()), per_class_accuracy(pred, test_labels, dataset.num_classes),
            prediction_counts(pred, dataset.num_classes))


def progress_bar(total: int, name: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, disable=not progress, desc=name or "evaluate", leave=False)


def spread_runs(num_runs: int, run, what: str, spread: bool = True) -> list:
    """[run(r) for r in range(num_runs)], the runs dealt round-robin over the torchrun ranks (run r on rank
    r mod world size) and gathered on every rank in run order, so that every rank builds the report a single
    process would. spread=False (or no torchrun): every run here."""
    world = distributed.world()
    if not (spread and world.active):
        return [run(r) for r in range(num_runs)]
    mine = {r: run(r) for r in world.mine(list(range(num_runs)))}
    merged = {}
    for part in distributed.gather_objects(mine, what):
        merged.update(part)
    return [merged[r] for r in range(num_runs)]


def train_and_evaluate(images: Tensor, labels: Tensor, dataset, config: EvalConfig, name: str = "",
                       progress: bool = True, return_networks: bool = False, classes: Tensor | None = None):
    """Train config.num_runs fresh networks on (images, labels); test each on dataset's test set.

    labels: hard int [M] (cross entropy) or soft float [M, num_classes] logits
    (soft cross entropy against softmax(labels)); classes [M]: each image's class, the ce+mse protocol's hard
    label (default: the argmax of the label). Deterministic for fixed inputs and seed on CPU.
    Returns the EvalReport, or (report, the trained networks) with return_networks=True. Under torchrun the runs
    are spread over the ranks (spread_runs), except with return_networks, which needs every network here.
    """
    device = check_config(config)
    images, labels, soft = check_inputs(images, labels, dataset)
    images, labels = images.detach().to(device), labels.detach().to(device)
    targets = torch.softmax(labels, dim=1) if soft else labels
    hard = None
    if classes is not None:
        hard = torch.as_tensor(classes).long()
        if hard.shape != (images.shape[0],) or int(hard.min()) < 0 or int(hard.max()) >= dataset.num_classes:
            raise DataError(f"classes must be [{images.shape[0]}] in [0, {dataset.num_classes}), got "
                            f"{tuple(hard.shape)}")
        hard = hard.to(device)
    dsa = make_dsa(config)
    world = distributed.world()
    spread = not return_networks
    local = len(world.mine(range(config.num_runs))) if spread and world.active else config.num_runs
    bar = progress_bar(local * config.epochs, name, progress)
    nets = {}

    def run(r):
        net = fit_network(images, targets, soft, dataset.num_classes, dataset, config, config.seed + r, dsa, bar,
                          hard=hard)
        acc, per_class, counts = run_results(predict_logits(net, dataset.images_test, device).argmax(1), dataset)
        if return_networks:
            nets[r] = net
        bar.set_postfix(run=r, acc=f"{100 * acc:.2f}%")
        return acc, per_class, counts

    results = spread_runs(config.num_runs, run, f"evaluating {name or 'a set'}", spread)
    bar.close()
    run_acc, run_per_class, run_counts = (list(x) for x in zip(*results))
    report = EvalReport.from_runs(name, run_acc, run_per_class, run_counts, [int(c) for c in dataset.class_counts],
                                  config.many_threshold, config.few_threshold)
    report.world_size = world.size
    return (report, [nets[r] for r in range(config.num_runs)]) if return_networks else report

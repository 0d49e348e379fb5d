"""The uni-level distiller's experts (METHOD section 11, item 1): an observer, whose batch-norm statistics become
the recovery's target, and a teacher, which gives the soft labels, both trained on the long-tailed set with the
debiased loss of unilevel/debias.py. Both are batch-norm networks (the BN ConvNet, or resnet18/vgg11 with BN).

The directory (`ltdd experts --recipe debiased --out DIR`) holds manifest.json (the data and settings, checked on
every reuse as the trajectory experts' manifest is), observer.pt and teacher.pt (each the network's state dict,
its test accuracy and the sha256 the manifest records), and while one trains, its checkpoint (ROLE.ckpt, written
each epoch: a rerun continues there and gives the same numbers). The fair statistics (unilevel/statistics.py)
go beside them.

Ours (the paper gives no values): SGD with momentum 0.9 and weight decay 5e-4, the lr falling on a cosine, mixup
with lam ~ Beta(1, 1) for the mixed-label views, each view drawn by DSA, a projection to 128 features and a linear
prediction layer, q = 1, g1 = g2 = 1.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..augment import DSA
from ..checks import check_device, check_number
from ..errors import ConfigError, DataError, LTDDError
from ..evaluate import head_tail_classes, per_class_accuracy
from ..files import RunLock, append_line, ensure_dir, load_torch, read_json, save_torch_atomic, write_json_atomic
from ..models import MODELS, get_network
from .debias import debias_loss, debias_schedule, mixed_target, rebalance_weights, robust_loss

FORMAT = "ltdd-debiased-experts/1"
ROLES = ("observer", "teacher")
BN_MODELS = tuple(m for m in MODELS if m != "alexnet")
# what a reuse must agree on: the data and the networks
RUN_KEYS = ("format", "dataset", "imbalance_factor", "data_seed", "class_counts", "channel", "im_size", "zca",
            "model", "teacher_model", "width", "epochs", "lr", "momentum", "weight_decay", "batch_size", "q",
            "g_robust", "g_debias", "mix_alpha", "proj_dim", "dsa", "dsa_strategy", "seed")


@dataclass
class DebiasConfig:
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    model: str = "convnet"           # the observer; batch norm
    teacher_model: str | None = None  # default: the observer's
    width: int = 128
    q: float = 1.0                   # sharpness of the rebalancing weights r_k^-q
    g_robust: float = 1.0
    g_debias: float = 1.0
    mix_alpha: float = 1.0           # mixup's Beta(alpha, alpha)
    proj_dim: int = 128
    dsa: bool = True
    dsa_strategy: str = DSA.STRATEGY
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        self.teacher_model = self.teacher_model or self.model
        for key in ("epochs", "batch_size", "width", "proj_dim"):
            check_number(key, getattr(self, key), low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("mix_alpha", self.mix_alpha, low=0, low_open=True)
        for key in ("momentum", "weight_decay", "q", "g_robust", "g_debias"):
            check_number(key, getattr(self, key), low=0)
        for key in ("model", "teacher_model"):
            if getattr(self, key) not in BN_MODELS:
                raise ConfigError(f"{key} {getattr(self, key)!r} cannot be a debiased expert: it needs batch norm, "
                                  f"expected one of {', '.join(BN_MODELS)}")
        check_device(self.device)


class DebiasedNet(nn.Module):
    """A BN network plus the robust term's heads: z = proj(features), p = pred(z)."""

    def __init__(self, net: nn.Module, feature_dim: int, proj_dim: int):
        super().__init__()
        self.net = net
        self.proj = nn.Linear(feature_dim, proj_dim)
        self.pred = nn.Linear(proj_dim, proj_dim)

    def forward(self, x):
        f = self.net.features(x)
        z = self.proj(f)
        return self.net.classifier(f), z, self.pred(z)


def make_network(model, dataset, width):
    return get_network(model, dataset.channel, dataset.num_classes, tuple(dataset.im_size), width=width,
                       norm="batchnorm")


def _manifest(dataset, config):
    m = {"format": FORMAT, "dataset": dataset.name, "imbalance_factor": float(dataset.imbalance_factor),
         "data_seed": dataset.seed, "class_counts": list(dataset.class_counts),
         "class_names": list(dataset.class_names), "num_classes": dataset.num_classes, "channel": dataset.channel,
         "im_size": list(dataset.im_size), "zca": dataset.zca is not None, "recipe": "debiased", "models": {}}
    m.update({k: v for k, v in asdict(config).items() if k != "device"})
    return m


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ExpertStore:
    """A directory of debiased experts: the manifest's checks and the trained networks."""

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise DataError(f"{self.root} holds no debiased experts (no manifest.json): run `ltdd experts --recipe "
                            f"debiased --out {self.root}` first")
        self.manifest = read_json(path, "debiased-expert manifest")
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{self.root} holds {self.manifest.get('recipe', 'trajectory')} experts, not debiased "
                            f"ones (format {self.manifest.get('format')!r}, expected {FORMAT!r}): the uni-level "
                            f"distiller needs `ltdd experts --recipe debiased`")

    def check_compatible(self, dataset):
        expected = {"dataset": dataset.name, "imbalance_factor": float(dataset.imbalance_factor),
                    "class_counts": list(dataset.class_counts), "channel": dataset.channel,
                    "im_size": list(dataset.im_size), "zca": dataset.zca is not None}
        for key, want in expected.items():
            if self.manifest.get(key) != want:
                raise DataError(f"the debiased experts in {self.root} do not match: {key} is "
                                f"{self.manifest.get(key)!r} there, expected {want!r} for this run")

    def done(self, role) -> bool:
        return role in self.manifest.get("models", {}) and (self.root / f"{role}.pt").is_file()

    def load(self, role, dataset, device="cpu") -> nn.Module:
        """The trained `role` network in eval mode, its file checked against the manifest's sha256."""
        if not self.done(role):
            raise DataError(f"{self.root} has no trained {role} yet: run `ltdd experts --recipe debiased --out "
                            f"{self.root}` (it continues where it stopped)")
        path = self.root / f"{role}.pt"
        want = self.manifest["models"][role]["sha256"]
        if file_sha256(path) != want:
            raise DataError(f"{path} differs from the file its manifest records (sha256 mismatch): retrain it")
        state = load_torch(path, f"{role} network", required=("state_dict", "model", "width"))
        net = make_network(state["model"], dataset, state["width"])
        net.load_state_dict(state["state_dict"])
        return net.to(device).eval()

    def sha256(self, role) -> str:
        return self.manifest["models"][role]["sha256"]


def _open(out_dir, manifest) -> ExpertStore:
    out = Path(out_dir)
    if (out / "manifest.json").is_file():
        old = ExpertStore(out).manifest
        for key in RUN_KEYS:
            if old.get(key) != manifest.get(key):
                raise DataError(f"{out} already holds debiased experts of another run ({key} is {old.get(key)!r} "
                                f"there, {manifest.get(key)!r} now): use another --out or the same settings")
        manifest["models"] = old.get("models", {})
    ensure_dir(out, "expert directory")
    write_json_atomic(out / "manifest.json", manifest)
    return ExpertStore(out)


def train_debiased(dataset, config: DebiasConfig, out_dir, progress=True) -> ExpertStore:
    """Train the observer and the teacher into out_dir, continuing a stopped run where it stopped. Under torchrun
    the two networks train on different ranks (observer on rank 0, teacher on rank 1 mod the world size)."""
    world = distributed.world()
    lock = RunLock(out_dir, "expert directory")
    manifest = _manifest(dataset, config)
    distributed.all_ok(lambda: lock.acquire() if world.main else None, "locking the expert directory")
    try:
        store = distributed.all_ok(lambda: _open(out_dir, manifest) if world.main else None,
                                   "opening the expert directory")
        if not world.main:
            store = ExpertStore(out_dir)
        todo = [r for r in ROLES if not store.done(r)]
        mine = world.mine(todo)
        records, error = {}, None
        for role in mine:
            try:
                records[role] = _train_one(role, dataset, config, store.root, progress)
            except LTDDError as exc:
                error = str(exc)
                break
        gathered = distributed.gather_objects(records, "recording the debiased experts")
        if world.main:
            for part in gathered:
                manifest["models"].update(part)
            write_json_atomic(store.root / "manifest.json", manifest)
        distributed.barrier("recording the debiased experts")
        distributed.all_ok(lambda: _raise(error), "training the debiased experts")
        return ExpertStore(out_dir)
    finally:
        lock.release()


def _beta(alpha, generator) -> float:
    """A Beta(alpha, alpha) draw that follows `generator` (torch.distributions would follow the global RNG)."""
    if alpha == 1:
        return float(torch.rand((), generator=generator))
    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _raise(message):
    if message is not None:
        raise LTDDError(message)


def _train_one(role, dataset, config, root, progress):
    index = ROLES.index(role)
    model = config.model if role == "observer" else config.teacher_model
    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1_000_003 + index)
        net = make_network(model, dataset, config.width)
        feature_dim = net.classifier.in_features
        module = DebiasedNet(net, feature_dim, config.proj_dim)
    module = module.to(device)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    optimizer = torch.optim.SGD(module.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    n = dataset.labels_train.numel()
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    ckpt, metrics = Path(root) / f"{role}.ckpt", Path(root) / "metrics.jsonl"
    start = 0
    if ckpt.is_file():
        state = load_torch(ckpt, f"{role} checkpoint", required=("module", "optimizer", "scheduler", "generator",
                                                                  "epoch"))
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start = state["epoch"]
    weights = rebalance_weights(dataset.class_counts, config.q).float().to(device)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    bar = tqdm(total=config.epochs, initial=start, desc=f"debiased {role}", disable=not progress, unit="epoch",
               dynamic_ncols=True)
    loss = float("nan")
    for epoch in range(start + 1, config.epochs + 1):
        t0 = time.perf_counter()
        a, b = debias_schedule(epoch, config.epochs)
        totals = {"robust": 0.0, "debias": 0.0}
        module.train()
        for batch in torch.randperm(n, generator=generator).split(config.batch_size):
            x = dataset.images_train[batch].to(device)
            y = dataset.labels_train[batch].to(device)
            perm = torch.randperm(x.shape[0], generator=generator).to(device)
            lam = _beta(config.mix_alpha, generator)
            views = []
            for _ in range(2):
                v = dsa(x, generator)[0] if dsa is not None else x
                views.append(lam * v + (1 - lam) * v[perm])
            target = mixed_target(y, perm, lam, dataset.num_classes)
            (l1, z1, p1), (l2, z2, p2) = module(views[0]), module(views[1])
            robust = robust_loss(z1, p1, z2, p2)
            debias = (debias_loss(l1, target, weights, a, b) + debias_loss(l2, target, weights, a, b)) / 2
            loss_t = config.g_robust * robust + config.g_debias * debias
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            optimizer.step()
            scheduler.step()
            totals["robust"] += robust.item() * y.numel()
            totals["debias"] += debias.item() * y.numel()
        loss = (config.g_robust * totals["robust"] + config.g_debias * totals["debias"]) / n
        if not math.isfinite(loss):
            raise LTDDError(f"the debiased {role} diverged at epoch {epoch} (loss {loss}): lower --lr (now "
                            f"{config.lr}); its checkpoint of epoch {epoch - 1}, {ckpt}, is kept")
        append_line(metrics, json.dumps({"role": role, "epoch": epoch, "a": a, "loss_robust": totals["robust"] / n,
                                         "loss_debias": totals["debias"] / n, "seconds": time.perf_counter() - t0}))
        save_torch_atomic(ckpt, {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                                 "epoch": epoch})
        bar.set_postfix(loss=f"{loss:.3f}", a=f"{a:.2f}")
        bar.update(1)
    bar.close()
    net = module.net.eval()
    acc, tail = _test_accuracy(net, dataset, device)
    path = Path(root) / f"{role}.pt"
    save_torch_atomic(path, {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "model": model,
                             "width": config.width, "role": role})
    if progress:
        print(f"{role}: test accuracy {100 * acc:.1f}%, tail (3 smallest classes) {100 * tail:.1f}%")
    ckpt.unlink(missing_ok=True)
    return {"model": model, "test_acc": acc, "tail_acc": tail, "sha256": file_sha256(path)}


@torch.no_grad()
def _test_accuracy(net, dataset, device, batch_size=1024):
    """(overall accuracy, mean accuracy of the 3 smallest classes) on the balanced test set."""
    preds = torch.cat([net(x.to(device)).argmax(1).cpu() for x in dataset.images_test.split(batch_size)])
    acc = float((preds == dataset.labels_test).double().mean())
    per_class = per_class_accuracy(preds, dataset.labels_test, dataset.num_classes)
    k = min(3, dataset.num_classes // 2) or 1
    tail = head_tail_classes(dataset.class_counts, k)[1] if dataset.num_classes >= 2 else [0]
    accs = [per_class[c] for c in tail if per_class[c] is not None]
    return acc, (sum(accs) / len(accs) if accs else float("nan"))

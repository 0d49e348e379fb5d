"""Expert trajectories (METHOD section 4, Expert Decoupling's training side).

Stage 1, representation experts: the whole network on the long-tailed set, shuffled sampling, SGD with the
weight-balancing recipe (lr 0.01, momentum 0, weight decay 5e-3), DSA, optionally SAM/GSAM.
Stage 2, classifier experts: from a stage-1 expert's last snapshot, the backbone frozen, only the classifier
retrained with class-balanced sampling and no weight decay, optionally projected onto a max-norm ball.
Each expert's flat parameters are saved after every epoch (trajectories.py).
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .augment import DSA
from .checks import check_device, check_number
from .errors import ConfigError, LTDDError, TrajectoryError
from .files import RunLock, append_line, ensure_dir, filter_log, free_bytes, write_json_atomic
from .models import MODELS
from .models.functional import functional_model
from .trajectories import DTYPES, FORMAT, RUN_KEYS, TrajectoryStore, TrajectoryWriter

SAM_KINDS = ("none", "sam", "gsam")


@dataclass
class ExpertConfig:
    stage: int = 1
    num_experts: int = 5
    epochs: int | None = None           # default: 50 for stage 1, 10 for stage 2
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float | None = None   # default: 5e-3 (weight balancing) for stage 1, 0 for stage 2
    batch_size: int = 256
    model: str = "convnet"
    width: int = 128
    dsa: bool = True
    dsa_strategy: str = DSA.STRATEGY
    sam: str = "none"                   # "sam" or "gsam": sharpness-aware steps
    sam_rho: float = 0.01
    gsam_alpha: float = 0.3
    max_norm: float | None = None       # stage 2: project classifier rows onto this L2 ball (0.1 published)
    balanced: bool | None = None        # class-balanced sampling; default: stage 2 only
    dtype: str = "float32"              # of the stored trajectories
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        self.epochs = self.epochs if self.epochs is not None else (50 if self.stage == 1 else 10)
        self.weight_decay = self.weight_decay if self.weight_decay is not None else (5e-3 if self.stage == 1 else 0.0)
        self.balanced = self.balanced if self.balanced is not None else self.stage == 2
        for key in ("num_experts", "epochs", "batch_size", "width"):
            check_number(key, getattr(self, key), low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        for key in ("momentum", "weight_decay", "sam_rho", "gsam_alpha"):
            check_number(key, getattr(self, key), low=0)
        check_number("max_norm", self.max_norm, low=0, low_open=True, allow_none=True)
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}: expected one of {', '.join(MODELS)}"),
            (self.sam in SAM_KINDS, f"unknown sam {self.sam!r}: expected one of {', '.join(SAM_KINDS)}"),
            (self.dtype in DTYPES, f"unknown trajectory dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_device(self.device)


def _manifest(dataset, net, config, source):
    m = {
        "format": FORMAT,
        "dataset": dataset.name,
        "imbalance_factor": float(dataset.imbalance_factor),
        "data_seed": dataset.seed,
        "class_counts": list(dataset.class_counts),
        "class_names": list(dataset.class_names),
        "num_classes": dataset.num_classes,
        "channel": dataset.channel,
        "im_size": list(dataset.im_size),
        "zca": dataset.zca is not None,
        "data_dir": str(Path(dataset.data_dir).resolve()) if getattr(dataset, "data_dir", None) else None,
        "num_params": net.num_params,
        "classifier_offset": net.classifier_offset,
        "source": source,
        "experts": {},
    }
    m.update({k: v for k, v in asdict(config).items() if k != "device"})
    m["model"] = net.name
    return m


def _open_store(out_dir, manifest):
    """Create the directory's manifest, or check that an existing one describes the same run."""
    out = Path(out_dir)
    if (out / "manifest.json").is_file():
        old = TrajectoryStore(out).manifest
        for key in RUN_KEYS:
            if old.get(key) != manifest.get(key):
                raise TrajectoryError(f"{out} already holds trajectories of another run ({key} is {old.get(key)!r} "
                                      f"there, {manifest.get(key)!r} now): use another --out or the same settings")
        manifest["experts"] = old.get("experts", {})
        manifest["num_experts"] = max(manifest["num_experts"], old["num_experts"])
    ensure_dir(out)
    write_json_atomic(out / "manifest.json", manifest)
    store = TrajectoryStore(out)
    for index in store.completed():  # a rerun trusts only whole, unaltered experts
        store.trajectory(index)
    return store


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_size(net, config, out_dir):
    """Refuse, before anything is allocated, experts whose trajectories cannot fit on the disk."""
    per_expert = (config.epochs + 1) * net.num_params * (2 if config.dtype == "float16" else 4)
    free = free_bytes(out_dir)
    working = 4 * net.num_params * 4  # parameters, gradients, the flat copy and one snapshot, in float32
    memory = available_memory()
    if config.device == "cpu" and memory is not None and working > memory:
        raise ConfigError(f"an expert of {net.num_params:,} parameters needs about {working / 1e9:.3g} GB of memory to "
                          f"train but {memory / 1e9:.3g} GB is available: lower --width")
    if free is not None and per_expert > free:
        raise ConfigError(f"one expert's trajectory needs {per_expert / 1e9:.3g} GB ({net.num_params:,} parameters x "
                          f"{config.epochs + 1} snapshots) but {out_dir} has {free / 1e9:.3g} GB free: lower --width "
                          f"or --epochs, or use --dtype float16")


def _sharpness_aware_grads(params, loss_fn, rho, gsam_alpha):
    """SAM: the gradient at theta + rho * g/|g|. GSAM also removes alpha times g's part orthogonal to it."""
    grads = torch.autograd.grad(loss_fn(), params)
    norm = torch.sqrt(sum((g * g).sum() for g in grads)) + 1e-12
    eps = [rho * g / norm for g in grads]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    adv = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    if gsam_alpha == 0:
        return adv
    dot = sum((g * a).sum() for g, a in zip(grads, adv))
    adv_sq = sum((a * a).sum() for a in adv) + 1e-12
    return [a - gsam_alpha * (g - dot / adv_sq * a) for g, a in zip(grads, adv)]


def _epoch_order(labels, balanced, num_classes, generator):
    n = labels.numel()
    if not balanced:
        return torch.randperm(n, generator=generator)
    # every class equally likely per draw: weight each image by 1 / its class size
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return torch.multinomial(1.0 / counts[labels], n, replacement=True, generator=generator)


def _train_epoch(module, trainable, optimizer, dataset, config, dsa, generator, classifier_weight):
    device = torch.device(config.device)
    images, labels = dataset.images_train, dataset.labels_train
    order = _epoch_order(labels, config.balanced, dataset.num_classes, generator)
    total, seen = 0.0, 0
    for batch in order.split(config.batch_size):
        x = images[batch].to(device)
        y = labels[batch].to(device)
        if dsa is not None:
            x, _ = dsa(x, generator)
        loss_fn = lambda: F.cross_entropy(module(x), y)  # noqa: E731 - SAM evaluates it twice
        optimizer.zero_grad(set_to_none=True)
        if config.sam == "none":
            loss = loss_fn()
            loss.backward()
        else:
            alpha = config.gsam_alpha if config.sam == "gsam" else 0.0
            for p, g in zip(trainable, _sharpness_aware_grads(trainable, loss_fn, config.sam_rho, alpha)):
                p.grad = g
            with torch.no_grad():
                loss = loss_fn()
        optimizer.step()
        if config.max_norm is not None:
            with torch.no_grad():
                norms = classifier_weight.norm(dim=1, keepdim=True).clamp(min=config.max_norm)
                classifier_weight.mul_(config.max_norm / norms)
        total += loss.item() * y.numel()
        seen += y.numel()
    return total / seen


@torch.no_grad()
def test_accuracy(module, dataset, device="cpu", batch_size=1024):
    module.eval()
    correct = 0
    for x, y in zip(dataset.images_test.split(batch_size), dataset.labels_test.split(batch_size)):
        correct += (module(x.to(device)).argmax(1).cpu() == y).sum().item()
    module.train()
    return correct / dataset.labels_test.numel()


def train_experts(dataset, config: ExpertConfig, out_dir, source_dir=None, progress=True) -> TrajectoryStore:
    """Train config.num_experts experts into out_dir, continuing at the first unfinished one.

    Stage 2 needs source_dir, the stage-1 trajectories whose last snapshots it starts from. Under torchrun the
    ranks train disjoint experts (expert i on rank i mod world size), each writing its own trajectory file; rank 0
    holds the directory's lock and writes the manifest. A rerun resumes at the unfinished experts with any world
    size: an expert's numbers depend on its index and seed only.
    """
    net = functional_model(config.model, dataset.channel, dataset.num_classes, dataset.im_size, width=config.width)
    _check_size(net, config, out_dir)
    world = distributed.world()
    lock = RunLock(out_dir, "expert directory")
    distributed.all_ok(lambda: lock.acquire() if world.main else None, "locking the expert directory")
    try:
        return _train_experts(dataset, config, out_dir, source_dir, progress and world.main, net)
    finally:
        lock.release()


def _train_experts(dataset, config, out_dir, source_dir, progress, net):
    world = distributed.world()
    source = None
    if config.stage == 2:
        if source_dir is None:
            raise ConfigError("stage 2 needs the stage-1 trajectories it starts from (--from DIR)")
        source = TrajectoryStore(source_dir)
        if source.manifest["stage"] != 1:
            raise TrajectoryError(f"{source_dir} holds stage-{source.manifest['stage']} trajectories, expected stage 1")
        source.check_compatible(dataset, net)
        if len(source) < config.num_experts:
            raise ConfigError(f"stage 2 asks for {config.num_experts} experts but {source_dir} has only "
                              f"{len(source)} complete stage-1 experts")
    manifest = _manifest(dataset, net, config, str(Path(source_dir).resolve()) if source_dir else None)
    metrics = Path(out_dir) / "metrics.jsonl"

    def open_store():  # rank 0 writes the manifest and checks the finished experts; the others wait for it
        store = _open_store(out_dir, manifest)
        filter_log(metrics, lambda record: record.get("expert") in set(store.completed()))  # logged again
        return store
    store = distributed.all_ok(lambda: open_store() if world.main else None, "opening the expert directory")
    if not world.main:
        store = TrajectoryStore(out_dir)
    manifest = store.manifest
    done = set(store.completed())
    todo = [i for i in range(config.num_experts) if i not in done]
    mine = [i for i in todo if i % world.size == world.rank]
    rounds = max(len([i for i in todo if i % world.size == r]) for r in range(world.size))
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    bar = tqdm(total=len(mine) * config.epochs, desc=f"stage-{config.stage} experts", disable=not progress,
               unit="epoch", dynamic_ncols=True)
    for turn in range(rounds):  # every rank takes its next expert; the manifest is written once per round
        index = mine[turn] if turn < len(mine) else None
        writer, record, error = None, None, None
        if index is not None:
            try:
                writer, record = _train_one(index, dataset, config, net, source, store, dsa, metrics, bar)
            except LTDDError as exc:
                error = str(exc)

        def commit(digest, record=record):
            # recorded before the files are renamed complete: a complete expert always has its record
            records = distributed.gather_objects(None if digest is None else (index, {**record, "sha256": digest}),
                                                 "recording the experts in the manifest")
            if world.main:
                for entry in records:
                    if entry is not None:
                        manifest["experts"][str(entry[0])] = entry[1]
                write_json_atomic(store.root / "manifest.json", manifest)
            distributed.barrier("recording the experts in the manifest")

        if writer is not None:
            writer.finish(commit)
            append_line(metrics, json.dumps({"expert": index, "epoch": config.epochs, "test_acc": record["test_acc"]}))
            if progress:
                bar.write(f"expert {index}: final training loss {record['train_loss']:.4f}, test accuracy "
                          f"{100 * record['test_acc']:.1f}%")
        else:
            commit(None)
        distributed.all_ok(lambda: _raise(error), "training the experts")
    bar.close()
    return TrajectoryStore(store.root)


def _raise(message):
    if message is not None:
        raise LTDDError(message)


def _train_one(index, dataset, config, net, source, store, dsa, metrics, bar):
    """Train expert `index` into its trajectory file: (the writer, not yet finished; its manifest record)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    flat = source.snapshot(index, source.num_snapshots - 1) if source else net.init_flat(generator)
    module = net.load_into(net.make_module(), flat).to(config.device)
    params = list(module.parameters())
    # parameters are laid out backbone first, classifier last; stage 2 trains only the classifier
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    trainable = [p for p, start in zip(params, offsets) if config.stage == 1 or start >= net.classifier_offset]
    for p in params:
        p.requires_grad_(any(p is q for q in trainable))
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    writer = TrajectoryWriter(store.root, index, config.epochs + 1, net.num_params, config.dtype)
    writer.append(net.flatten_module(module))
    for epoch in range(config.epochs):
        start = time.perf_counter()
        loss = _train_epoch(module, trainable, optimizer, dataset, config, dsa, generator,
                            classifier_weight=params[-2])
        append_line(metrics, json.dumps({"expert": index, "epoch": epoch + 1, "train_loss": loss,
                                         "seconds": time.perf_counter() - start}))
        if not math.isfinite(loss):
            raise LTDDError(f"expert {index} diverged at epoch {epoch + 1} (training loss {loss}): "
                            f"lower --lr (now {config.lr}); the completed experts are kept")
        writer.append(net.flatten_module(module))
        bar.set_postfix(expert=index, epoch=epoch + 1, loss=f"{loss:.3f}")
        bar.update(1)
    return writer, {"train_loss": loss, "test_acc": test_accuracy(module, dataset, config.device)}

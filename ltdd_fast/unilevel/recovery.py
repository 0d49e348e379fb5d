"""Recovery and relabelling (METHOD section 11, items 4 and 5): the uni-level distiller.

Each iteration optimises the synthetic pixels so that the frozen observer's BN-input statistics on the synthetic
set match the fair targets (unilevel/statistics.py), layer by layer:

    loss = sum_l [ |mu_l(S) - mu_l|_2 + |var_l(S) - var_l|_2
                   + lambda_class * mean_c ( |mu_lc(S) - mu_lc|_2 + |var_lc(S) - var_lc|_2 ) ]
           + lambda_ce * CE(observer(S), class)

over the whole synthetic set (every image, augmented afresh each iteration by DSA's `augment` ops). Then every
image's soft label is the teacher's logits on it (divided by label_temperature), and the set is written in the
synthetic-set format that `ltdd eval` reads.

Memory does not grow with the set: the statistics are sums (ops.class_feature_stats), so with batch_chunk the set
goes through the observer in chunks twice, first without a graph to sum the statistics and take the loss's
gradient with respect to those sums, then chunk by chunk with a graph, back-propagating that gradient (the
chain rule through the sums; the same gradient as one pass over the whole set, up to rounding). Under torchrun
the chunks are dealt over the ranks and the sums and the image gradients are summed across them, so every rank
takes the same step. The run checkpoints (images, Adam's state, the generator) and a rerun continues exactly.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed, ops
from ..augment import DSA
from ..checks import parse_bytes
from ..config import UnilevelConfig, load_resumable
from ..data import load_dataset
from ..dsa_chain import AugParams
from ..errors import ConfigError, LTDDError
from ..evaluate import EvalConfig, train_and_evaluate
from ..files import (RunLock, append_line, check_output_dir, ensure_dir, filter_log, save_torch_atomic,
                     write_json_atomic)
from ..synset import save_synset
from .experts import ExpertStore
from .initialise import initialise
from .statistics import (FeatureTap, bn_layers, check_bn_network, fair_statistics, load_statistics, moments,
                         save_statistics)

CHECKPOINT_KEYS = ("iteration", "images", "classes", "optimizer", "scheduler", "generator", "history", "config")
STATS_FILE = "stats.pt"


def stats_loss(layer_sums, targets, lambda_class):
    """The recovery loss of one set's statistics: layer_sums holds per BN layer (positions [K], sum [K, C],
    sum of squares [K, C]); targets is a FairStatistics on the same device. Returns (loss, {part: value})."""
    total, whole, by_class = 0.0, 0.0, 0.0
    for (count, s, sq), t_mean, t_var, tc_mean, tc_var in zip(layer_sums, targets.mean, targets.var,
                                                              targets.class_mean, targets.class_var):
        c_mean, c_var = moments(count, s, sq)
        g_mean, g_var = moments(count.sum(0, keepdim=True), s.sum(0, keepdim=True), sq.sum(0, keepdim=True))
        layer_whole = (g_mean[0] - t_mean).norm() + (g_var[0] - t_var).norm()
        layer_class = ((c_mean - tc_mean).norm(dim=1) + (c_var - tc_var).norm(dim=1)).mean()
        total = total + layer_whole + lambda_class * layer_class
        whole, by_class = whole + layer_whole.detach(), by_class + layer_class.detach()
    return total, {"stats_whole": float(whole), "stats_class": float(by_class)}


class Recovery:
    """Distils `dataset` into config.ipc images per class with the uni-level method. `step()` runs one
    iteration, `run()` all of them and the relabelling."""

    def __init__(self, config: UnilevelConfig, dataset=None, progress=True):
        self.config = config.validate()
        self.world = distributed.world()
        self.progress = progress and self.world.main
        self.device = torch.device(config.device)
        self.lock = RunLock(config.out, "distill out")

        def free():
            check_output_dir(config.out, "out")
            self.lock.check_free()
        distributed.all_ok(lambda: free() if self.world.main else None, "checking the out directory")
        if dataset is None:
            dataset = load_dataset(config.dataset, data_dir=config.data_dir, imbalance_factor=config.imbalance_factor,
                                   seed=config.data_seed, zca=config.zca, resolution=config.resolution)
        self.dataset = dataset
        self.store = ExpertStore(config.experts)
        self.store.check_compatible(dataset)
        self.observer = self.store.load("observer", dataset, self.device)
        self.teacher = self.store.load("teacher", dataset, self.device)
        check_bn_network(self.observer, f"the observer in {config.experts}")
        for p in (*self.observer.parameters(), *self.teacher.parameters()):
            p.requires_grad_(False)
        self.layers = [name for name, _ in bn_layers(self.observer)]
        self.targets = self._statistics().to(self.device)
        self.augment = DSA(config.augment, mode="multiple") if config.augment not in (None, "") else None
        flat = dataset.images_train.transpose(0, 1).reshape(dataset.channel, -1)
        self.low, self.high = (t.view(1, -1, 1, 1).to(self.device) for t in torch.aminmax(flat, dim=1))
        self.chunk = config.batch_chunk
        num_images = config.ipc * dataset.num_classes
        if config.memory_budget is not None:
            self.chunk = self._plan_chunk(parse_bytes(config.memory_budget), num_images)
        self.out = Path(config.out)
        self.history = []
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        if not self._resume():
            self._initialise()

    # ---- set-up ----------------------------------------------------------------------------------------

    def _statistics(self):
        """The fair statistics beside the observer: read, or computed once (by rank 0) and written there."""
        path = self.store.root / STATS_FILE
        sha = self.store.sha256("observer")

        def compute():
            if path.is_file():
                return
            ds = self.dataset
            stats = fair_statistics(self.observer, ds.images_train, ds.labels_train, ds.num_classes,
                                    device=self.device, backend=self.config.backend, progress=self.progress)
            save_statistics(path, stats, sha, self.store.manifest)
        distributed.all_ok(lambda: compute() if self.world.main else None, "computing the fair BN statistics")
        return load_statistics(path, sha, self.layers)

    def _plan_chunk(self, budget, num_images):
        """The largest chunk whose forward and backward through the observer fit the budget: the activations the
        graph keeps, measured on a 2-image batch and scaled (about 3 copies: kept, gradient, temporaries)."""
        x = torch.zeros(2, self.dataset.channel, *self.dataset.im_size, device=self.device)
        sizes = []
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
                 for m in self.observer.modules() if not list(m.children())]
        with torch.no_grad():
            self.observer(x)
        for h in hooks:
            h.remove()
        per_image = 3 * 4 * sum(sizes) / 2 + 3 * 4 * x[0].numel()
        fixed = 4 * sum(p.numel() for p in self.observer.parameters()) + 4 * 4 * num_images * x[0].numel()
        chunk = int((budget - fixed) // per_image)
        if chunk < 1:
            raise ConfigError(f"memory_budget {self.config.memory_budget} cannot hold the synthetic set and one "
                              f"image's pass ({(fixed + per_image) / 1e6:.3g} MB): raise it")
        chunk = min(chunk, num_images)
        if self.progress:
            print(f"memory plan: {chunk} image(s) a chunk ({math.ceil(num_images / chunk)} chunk(s) of the "
                  f"{num_images}-image set)", file=sys.stderr)
        return chunk

    def _initialise(self):
        cfg, ds = self.config, self.dataset
        g = torch.Generator().manual_seed(cfg.seed + 1)
        if cfg.init == "multi_round":
            images, classes, _ = initialise(self.teacher, ds.images_train, ds.labels_train, ds.num_classes, cfg.ipc,
                                            crops=cfg.init_crops, min_scale=cfg.init_min_scale, pool=cfg.init_pool,
                                            generator=g, device=self.device)
        else:
            chosen = []
            for c in range(ds.num_classes):
                idx = torch.nonzero(ds.labels_train == c).flatten()
                idx = idx[torch.randperm(idx.numel(), generator=g)]
                chosen.append(idx[torch.arange(cfg.ipc) % idx.numel()])
            images = ds.images_train[torch.cat(chosen)].clone()
            classes = torch.arange(ds.num_classes).repeat_interleave(cfg.ipc)
            if cfg.init == "noise":
                images = torch.randn(images.shape, generator=g)
        self.images = images.to(self.device).detach().clone().requires_grad_(True)
        self.classes = classes
        self._make_optimiser()

    def _make_optimiser(self):
        cfg = self.config
        self.optimizer = torch.optim.Adam([self.images], lr=cfg.lr_img, betas=(0.5, 0.9))
        total = max(cfg.iterations, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))

    # ---- one iteration ---------------------------------------------------------------------------------

    def _chunks(self):
        m = self.images.shape[0]
        size = self.chunk or m
        if self.world.active:  # every rank needs a share
            size = min(size, math.ceil(m / self.world.size))
        return [slice(i, min(i + size, m)) for i in range(0, m, size)]

    def _views(self, params, rows):
        """The observer's input for the images of `rows`: their augmented views."""
        x = self.images[rows]
        if params is None:
            return x
        return self.augment.apply(x, AugParams(params.ops, {k: v[rows] for k, v in params.tensors.items()}))

    def _forward(self, params, rows, tap):
        """(the chunk's per-layer statistics sums, its cross-entropy sum)."""
        logits = self.observer(self._views(params, rows))
        classes = self.classes[rows].to(self.device)
        k = self.dataset.num_classes
        sums = [ops.class_feature_stats(f, classes, k, backend=self.config.backend) for f in tap.inputs]
        ce = F.cross_entropy(logits, classes, reduction="sum") if self.config.lambda_ce else None
        return sums, ce

    def gradient(self, params=None):
        """(loss, parts, d loss / d images) of the current set under augmentation draws `params`."""
        cfg, m = self.config, self.images.shape[0]
        chunks = self._chunks()
        mine = self.world.mine(chunks) if self.world.active else chunks
        with FeatureTap(self.observer) as tap:
            if len(chunks) == 1:
                with torch.enable_grad():
                    sums, ce = self._forward(params, chunks[0], tap)
                    loss, parts = stats_loss(sums, self.targets, cfg.lambda_class)
                    if ce is not None:
                        loss = loss + cfg.lambda_ce * ce / m
                    grad, = torch.autograd.grad(loss, self.images)
                parts["ce"] = ce.item() / m if ce is not None else None
                return loss.item(), parts, grad
            # pass 1: the sums, without a graph
            totals, ce_total = None, torch.zeros((), dtype=torch.float64, device=self.device)
            with torch.no_grad():
                for rows in mine:
                    sums, ce = self._forward(params, rows, tap)
                    if totals is None:
                        totals = [[t.double() for t in s] for s in sums]
                    else:
                        for acc, s in zip(totals, sums):
                            for a, t in zip(acc, s):
                                a += t.double()
                    if ce is not None:
                        ce_total += ce.double()
            if totals is None:  # a rank with no chunk (more ranks than chunks cannot happen: _chunks)
                raise LTDDError("a rank received no chunk of the synthetic set")
            flat = [t for s in totals for t in s] + [ce_total]
            distributed.all_reduce_sum(flat, "summing the synthetic set's statistics")
            leaves = [[t.float().requires_grad_(i > 0) for i, t in enumerate(s)] for s in totals]
            with torch.enable_grad():
                loss, parts = stats_loss(leaves, self.targets, cfg.lambda_class)
                upstream = torch.autograd.grad(loss, [t for s in leaves for t in s[1:]])
            # pass 2: each chunk's graph, with the loss's gradient w.r.t. the sums as its upstream gradient
            grad = torch.zeros_like(self.images)
            for rows in mine:
                with torch.enable_grad():
                    sums, ce = self._forward(params, rows, tap)
                    surrogate = sum((u * t).sum() for u, t in zip(upstream, [t for s in sums for t in s[1:]]))
                    if ce is not None:
                        surrogate = surrogate + cfg.lambda_ce * ce / m
                    g, = torch.autograd.grad(surrogate, self.images)
                grad += g
            distributed.all_reduce_sum([grad], "summing the synthetic images' gradients")
        total = loss.item() + (cfg.lambda_ce * float(ce_total) / m if cfg.lambda_ce else 0.0)
        parts["ce"] = float(ce_total / m) if cfg.lambda_ce else None
        return total, parts, grad

    def step(self):
        params = None
        if self.augment is not None:
            params = self.augment.sample(self.images.shape[0], tuple(self.dataset.im_size), self.generator,
                                         device=self.device)
        loss, parts, grad = self.gradient(params)
        if not math.isfinite(loss):
            kept = (f"the last checkpoint, {self.checkpoint_path}, is kept" if self.checkpoint_path.is_file()
                    else "no checkpoint was written yet")
            raise LTDDError(f"the recovery loss became {loss} at iteration {self.iteration}: lower lr_img; {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        self.images.grad = grad
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.images.copy_(torch.maximum(torch.minimum(self.images, self.high), self.low))
        self.iteration += 1
        return {"loss": loss, **{k: v for k, v in parts.items() if v is not None}}

    # ---- checkpoints -----------------------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return self.out / "checkpoint.pt"

    def state_dict(self):
        return {"iteration": self.iteration, "images": self.images.detach().cpu(), "classes": self.classes,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "history": self.history, "config": asdict(self.config)}

    def save_checkpoint(self):
        distributed.check_replicas((self.images,), self.iteration, self.checkpoint_path)
        if self.world.main:
            save_torch_atomic(self.checkpoint_path, self.state_dict())
        distributed.barrier("writing the checkpoint")

    def _resume(self):
        if not self.checkpoint_path.is_file():
            return False
        free = ("iterations", "eval_epochs", "eval_runs", "checkpoint_every", "device", "batch_chunk",
                "memory_budget", "eval_model", "eval_width", "lr_eval", "backend")
        state = load_resumable(self.checkpoint_path, self.config, free, "recovery checkpoint", CHECKPOINT_KEYS)
        if state["iteration"] > self.config.iterations:
            raise ConfigError(f"{self.checkpoint_path} is at iteration {state['iteration']}, past iterations "
                              f"{self.config.iterations}: the cosine schedule cannot shrink; use another out")
        self.images = state["images"].to(self.device).requires_grad_(True)
        self.classes = state["classes"]
        self._make_optimiser()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.iteration, self.history = state["iteration"], state["history"]
        return True

    # ---- the run ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def relabel(self):
        """The teacher's logits on every synthetic image, divided by label_temperature."""
        out = [self.teacher(x).float() for x in self.images.detach().split(512)]
        return torch.cat(out) / self.config.label_temperature

    @property
    def alpha(self):  # the lr the set records, for callers that print a distiller's
        return torch.tensor(self.config.lr_eval)

    def evaluate(self, epochs=None, runs=None):
        cfg = self.config
        config = EvalConfig(model=cfg.eval_model, width=cfg.eval_width, epochs=epochs or cfg.eval_epochs,
                            num_runs=runs or cfg.eval_runs, lr=cfg.lr_eval, seed=cfg.seed, device=cfg.device)
        return train_and_evaluate(self.images.detach(), self.relabel(), self.dataset, config,
                                  name=f"unilevel ipc {cfg.ipc}", progress=False)

    @property
    def metrics_path(self):
        return self.out / "metrics.jsonl"

    def run(self, stop_after=None):
        distributed.all_ok(lambda: self.lock.acquire() if self.world.main else None, "locking the out directory")
        try:
            return self._run(stop_after)
        finally:
            self.lock.release()

    def _run(self, stop_after):
        cfg, main = self.config, self.world.main
        if main:
            ensure_dir(self.out, "distill out")
            filter_log(self.metrics_path,
                       lambda r: isinstance(r.get("iteration"), int) and r["iteration"] <= self.iteration)
        end = cfg.iterations if stop_after is None else min(cfg.iterations, self.iteration + stop_after)
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="distill unilevel", disable=not self.progress,
                   dynamic_ncols=True, file=sys.stderr)
        while self.iteration < end:
            t0 = time.perf_counter()
            losses = self.step()
            record = {"iteration": self.iteration, "seconds": time.perf_counter() - t0, **losses}
            self.history.append(record)
            if main:
                append_line(self.metrics_path, json.dumps(record))
            bar.set_postfix(loss=f"{losses['loss']:.4f}")
            bar.update(1)
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.iteration >= cfg.iterations:
            self.save_checkpoint()
            return self.write_synset()
        return None

    def write_synset(self):
        path = self.out / "synset.pt"
        labels = self.relabel()
        if self.world.main:
            write_json_atomic(self.out / "history.json", self.history)
            save_synset(path, self.images, labels, self.config.lr_eval, self.dataset, method="unilevel",
                        classes=self.classes, iterations=self.iteration, ipc=self.config.ipc,
                        world_size=self.world.size, label_temperature=self.config.label_temperature)
        distributed.barrier("writing the synthetic set")
        return path



"""The Distiller: Distribution-agnostic Matching + Expert Decoupling over constant-memory trajectory matching.

Every iteration runs the phases of METHOD section 8 and takes one optimiser step on their weighted sum:
- backbone phase (lambda_1): stage-1 trajectories, a random start epoch, the DAM-weighted student loss,
  the loss over the backbone's parameters only;
- classifier phase (lambda_2): stage-2 trajectories from epoch 0, plain soft cross-entropy, the student's
  backbone gradient zeroed, the loss over all parameters.
method="plain_tm" is the baseline: one phase, unweighted loss, whole-network matching.

All randomness of the run (expert and start-epoch draws, minibatch order, augmentation) flows from one
torch.Generator whose state is checkpointed with everything else, so a resumed run continues exactly.
"""
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, matching, memory, ops
from .augment import DSA
from .checks import parse_bytes
from .config import DistillConfig, load_resumable
from .dam import dam_weights
from .data import load_dataset
from .errors import ConfigError, DataError, LTDDError
from .evaluate import EvalConfig, train_and_evaluate
from .files import (
    RunLock, append_line, check_output_dir, ensure_dir, filter_log, save_torch_atomic, write_json_atomic,
)
from .models.functional import functional_model
from .phases import Phase, move_at_once, sample_phase_aug
from .synset import save_synset
from .trajectories import TrajectoryStore

CHECKPOINT_KEYS = ("iteration", "images", "labels", "alpha", "syn_classes", "opt_img", "opt_lr", "opt_y", "generator",
                   "order", "cursor", "history", "config")
def config_keys():
    return [f.name for f in fields(DistillConfig)]


class Distiller:
    """Distils `dataset` into config.ipc images per class. `step()` runs one iteration, `run()` all of them."""

    def __init__(self, config: DistillConfig, dataset=None, progress=True):
        self.config = config.validate()
        self.world = distributed.world()
        self.progress = progress and self.world.main
        self.device = torch.device(config.device)
        units = config.students * (2 if config.method == "ltdd" else 1)
        if self.world.size > units:
            raise ConfigError(f"{self.world.size} ranks but an iteration of method {config.method} with students "
                              f"{config.students} has {units} matching problem(s) to share: run at most {units} "
                              f"processes, or raise students")
        self.lock = RunLock(config.out, "distill out")

        def free():
            check_output_dir(config.out, "out")
            self.lock.check_free()  # a live run on this directory: refused now, before any data is read
        distributed.all_ok(lambda: free() if self.world.main else None, "checking the out directory")
        self.log = config.log
        if self.log == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("log=tensorboard needs the tensorboard package (pip install tensorboard); "
                                  "use log=null to keep only metrics.jsonl")
        if dataset is None:
            dataset = load_dataset(config.dataset, data_dir=config.data_dir, imbalance_factor=config.imbalance_factor,
                                   seed=config.data_seed, zca=config.zca, resolution=config.resolution)
        self.dataset = dataset
        largest = max(dataset.class_counts)
        if config.ipc > largest:
            raise ConfigError(f"ipc {config.ipc} exceeds the largest class of {dataset.name} ({largest} images): a "
                              f"synthetic set of {config.ipc * dataset.num_classes:,} images would be larger than "
                              f"the data it distils; lower ipc")
        self.net = functional_model(config.model, dataset.channel, dataset.num_classes, dataset.im_size,
                                    width=config.width)
        self.stage1 = self._open_experts(config.experts, stage=1)
        self.stage2 = self._open_experts(config.experts_stage2, stage=2) if config.method == "ltdd" else None
        epochs = self.stage1.manifest["epochs"]
        # start epochs are drawn from [min_start_epoch, max_start_epoch): the last one is max_start_epoch - 1
        if config.max_start_epoch - 1 + config.expert_epochs > epochs:
            raise ConfigError(f"max_start_epoch {config.max_start_epoch} - 1 + expert_epochs {config.expert_epochs} "
                              f"exceeds the {epochs} epochs of the stage-1 trajectories in {config.experts}")
        if self.stage2 is not None and config.expert_epochs > self.stage2.manifest["epochs"]:
            raise ConfigError(f"expert_epochs {config.expert_epochs} exceeds the {self.stage2.manifest['epochs']} "
                              f"epochs of the stage-2 trajectories in {config.experts_stage2}")
        self.dsa = DSA(config.dsa_strategy) if config.dsa else None
        # "auto", "native" and "triton" run ltdd_fast/matching/ on the fused operators ("auto": the native op on CPU,
        # ops.CUDA_BACKENDS' choice on CUDA, the reference where this build has no kernel); "reference" runs
        # reference.py. ConvNet blocks use the fused Triton block under "triton" (and "auto" on CUDA).
        self.backend = config.backend
        if config.backend == "triton":
            problem = ops.backend_problem("triton", self.device)
            if problem:
                raise ConfigError(f"backend=triton: {problem}")
        self.net.set_block_backend(config.backend)
        self.batch_chunk, self.precision, self.plan = config.batch_chunk, config.precision, None
        if config.memory_budget is not None:
            self._plan_memory()
        self.class_weights = dam_weights(dataset.class_counts, config.dam_offset).to(self.device)
        self.out = Path(config.out)
        self.history = []
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        if not self._resume():
            self._initialise()

    # ---- set-up ----------------------------------------------------------------------------------------

    def _open_experts(self, root, stage):
        store = TrajectoryStore(root)
        if store.manifest["stage"] != stage:
            raise LTDDError(f"{root} holds stage-{store.manifest['stage']} trajectories, expected stage {stage}")
        store.check_compatible(self.dataset, self.net)
        if len(store) == 0:
            raise LTDDError(f"{root} holds no complete expert yet: run `ltdd experts --out {root}` first")
        for index in store.completed():  # a truncated or altered expert is found now, not when it is drawn
            store.trajectory(index)
        return store

    def _plan_memory(self):
        """Choose batch_chunk and precision so an iteration fits config.memory_budget (memory.plan), and say so."""
        cfg, ds = self.config, self.dataset
        num_images = ds.num_classes * cfg.ipc
        self.plan = memory.plan(parse_bytes(cfg.memory_budget), self.net, num_images, ds.num_classes,
                                min(cfg.batch_syn, num_images), max(cfg.syn_steps, cfg.syn_steps_classifier),
                                second_pass=cfg.second_pass, precision=cfg.precision, students=cfg.students,
                                phases=2 if cfg.method == "ltdd" else 1, device=self.device,
                                max_chunk=cfg.batch_chunk, compile=cfg.compile)
        self.batch_chunk, self.precision = self.plan.chunk, self.plan.precision
        if self.progress:
            print(self.plan.describe(), file=sys.stderr)

    def _final_snapshots(self, store, limit=5):
        return [store.snapshot(i, store.num_snapshots - 1, self.device) for i in store.completed()[:limit]]

    def _initialise(self):
        """Images, soft labels and alpha as in METHOD section 5."""
        cfg, ds = self.config, self.dataset
        label_experts = self._final_snapshots(self.stage2 if self.stage2 is not None else self.stage1)
        images, labels = [], []
        g = torch.Generator().manual_seed(cfg.seed + 1)
        for c in range(ds.num_classes):
            pool = torch.nonzero(ds.labels_train == c).flatten()
            if pool.numel() == 0:
                raise DataError(f"class {c} ({ds.class_names[c]}) has no training image to initialise from")
            pool = pool[torch.randperm(pool.numel(), generator=g)]
            x = ds.images_train[pool].to(self.device)
            with torch.no_grad():
                logits = torch.stack([self.net.forward(theta, x) for theta in label_experts])  # [E, n, C]
            correct = logits.argmax(-1) == c                                                    # [E, n]
            if cfg.init == "correct" and correct.any():
                keep = correct.any(0)
                pool, x, logits, correct = pool[keep], x[keep], logits[:, keep], correct[:, keep]
            n = pool.numel()
            if n < cfg.ipc and not cfg.allow_duplicates:
                raise ConfigError(f"class {c} ({ds.class_names[c]}) can supply only {n} initial images for ipc "
                                  f"{cfg.ipc}; set allow_duplicates=true or lower ipc")
            take = torch.arange(cfg.ipc) % n  # a tail class repeats its images in turn
            chosen = x[take]
            if cfg.init == "noise":
                chosen = torch.randn(chosen.shape, generator=g).to(self.device)
            # soft label: mean logits of the experts that classify the image correctly (all, if none does)
            w = correct[:, take].float()
            w = torch.where(w.sum(0, keepdim=True) > 0, w, torch.ones_like(w))
            soft = (logits[:, take] * w.unsqueeze(-1)).sum(0) / w.sum(0).unsqueeze(-1)
            images.append(chosen)
            labels.append(soft)
        self.images = torch.cat(images).detach().clone().requires_grad_(True)
        self.labels = torch.cat(labels).detach().clone().requires_grad_(cfg.learn_labels)
        self.syn_classes = torch.arange(ds.num_classes).repeat_interleave(cfg.ipc)
        self.alpha = torch.tensor(cfg.lr_teacher, device=self.device).requires_grad_(True)
        self._make_optimisers()
        self.order, self.cursor = torch.randperm(self.images.shape[0], generator=self.generator), 0

    def _make_optimisers(self):
        cfg = self.config
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.opt_lr = torch.optim.SGD([self.alpha], lr=cfg.lr_lr, momentum=cfg.momentum_lr)
        self.opt_y = torch.optim.SGD([self.labels], lr=cfg.lr_y, momentum=cfg.momentum_y)

    # ---- one iteration ---------------------------------------------------------------------------------

    def _batches(self, steps):
        """steps minibatches of batch_syn indices, without replacement, cycling through permutations."""
        m, size, out = self.images.shape[0], min(self.config.batch_syn, self.images.shape[0]), []
        for _ in range(steps):
            if self.cursor + size > m:
                self.order, self.cursor = torch.randperm(m, generator=self.generator), 0
            out.append(self.order[self.cursor:self.cursor + size])
            self.cursor += size
        return move_at_once(out, self.device)

    def _max_start_epoch(self):
        cfg = self.config
        if cfg.initial_max_start_epoch is None or cfg.window_growth_iterations <= 0:
            return cfg.max_start_epoch
        frac = min(1.0, self.iteration / cfg.window_growth_iterations)
        grown = cfg.initial_max_start_epoch + frac * (cfg.max_start_epoch - cfg.initial_max_start_epoch)
        return max(cfg.min_start_epoch + 1, int(grown))

    def _draw(self, high, low=0):
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def _students(self, store, steps, start_epoch, mask, frozen, class_weights):
        """config.students Phases of one kind, each with its own expert, start epoch, minibatches and augmentation."""
        cfg, experts = self.config, store.completed()
        out = []
        for _ in range(cfg.students):
            expert = experts[self._draw(len(experts))]
            start = start_epoch()
            batches = self._batches(steps)
            out.append(Phase(
                theta_0=store.snapshot(expert, start, self.device),
                theta_T=store.snapshot(expert, start + cfg.expert_epochs, self.device),
                batches=batches, mask=mask, frozen=frozen, class_weights=class_weights,
                aug=sample_phase_aug(self.dsa, batches, self.dataset.im_size, self.generator)))
        return out

    def phases(self):
        """The matching problems of this iteration: (name, weight, [Phase] * students)."""
        cfg, off = self.config, self.net.classifier_offset
        ltdd = cfg.method == "ltdd"
        first = self._students(self.stage1, cfg.syn_steps,
                               lambda: self._draw(self._max_start_epoch(), cfg.min_start_epoch),
                               mask=self.net.backbone_mask(self.device) if ltdd else None, frozen=None,
                               class_weights=self.class_weights if ltdd else None)
        if not ltdd:
            return [("matching", 1.0, first)]
        second = self._students(self.stage2, cfg.syn_steps_classifier, lambda: 0, mask=None, frozen=(0, off),
                                class_weights=None)
        return [("backbone", cfg.lambda_backbone, first), ("classifier", cfg.lambda_classifier, second)]

    def step(self):
        """One iteration: every phase's two-pass gradient, weighted and summed, then one optimiser step. Under
        torchrun every rank draws the same phases from the one generator and computes its share of them
        (matching.iteration_gradients), and every rank takes the same step."""
        cfg = self.config
        losses, g_img, g_y, g_a = matching.iteration_gradients(
            self.net, self.images.detach(), self.labels.detach(), self.alpha.detach(), self.phases(), self.dsa,
            classes=self.syn_classes, backend=self.backend, second_pass=cfg.second_pass, chunk=self.batch_chunk,
            precision=self.precision, compile=cfg.compile, cudnn_benchmark=cfg.cudnn_benchmark)
        losses = {name: loss.item() for name, loss in losses.items()}  # one host sync per loss
        for name, loss in losses.items():
            if not math.isfinite(loss):
                kept = (f"the last checkpoint, {self.checkpoint_path}, is kept" if self.checkpoint_path.is_file()
                        else "no checkpoint was written yet")
                raise LTDDError(f"the {name} phase's matching loss became {loss} at iteration "
                                f"{self.iteration}: lower lr_img / lr_lr; {kept}")
        for opt, param, grad in ((self.opt_img, self.images, g_img), (self.opt_y, self.labels, g_y),
                                 (self.opt_lr, self.alpha, g_a)):
            if param.requires_grad:
                opt.zero_grad(set_to_none=True)
                param.grad = grad
                opt.step()
        # the head/tail gradient-bias monitor: mean L2 norm of the image gradients of each class
        norm_sum, _ = ops.class_grad_stats(g_img, self.syn_classes.to(self.device), self.dataset.num_classes,
                                           backend=self.backend)
        self.last_class_grad_norm = (norm_sum / self.config.ipc).tolist()
        self.iteration += 1
        return losses

    # ---- checkpoints -----------------------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return self.out / "checkpoint.pt"

    def state_dict(self):
        return {
            "iteration": self.iteration, "images": self.images.detach().cpu(), "labels": self.labels.detach().cpu(),
            "alpha": self.alpha.detach().cpu(), "syn_classes": self.syn_classes,
            "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(), "opt_y": self.opt_y.state_dict(),
            "generator": self.generator.get_state(), "order": self.order, "cursor": self.cursor,
            "history": self.history, "config": asdict(self.config),
        }

    def save_checkpoint(self):
        distributed.check_replicas((self.images, self.labels, self.alpha), self.iteration, self.checkpoint_path)
        if self.world.main:
            save_torch_atomic(self.checkpoint_path, self.state_dict())
        distributed.barrier("writing the checkpoint")

    def _resume(self):
        if not self.checkpoint_path.is_file():
            return False
        # settings that change neither the method nor its numbers beyond reassociation may differ on resume
        free = ("iterations", "eval_every", "eval_epochs", "eval_runs", "checkpoint_every", "device", "batch_chunk",
                "memory_budget", "log")
        state = load_resumable(self.checkpoint_path, self.config, free, "distillation checkpoint", CHECKPOINT_KEYS)
        self.images = state["images"].to(self.device).requires_grad_(True)
        self.labels = state["labels"].to(self.device).requires_grad_(self.config.learn_labels)
        self.alpha = state["alpha"].to(self.device).requires_grad_(True)
        self.syn_classes = state["syn_classes"]
        self._make_optimisers()
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.opt_y.load_state_dict(state["opt_y"])
        self.generator.set_state(state["generator"])
        self.order, self.cursor = state["order"], state["cursor"]
        self.iteration, self.history = state["iteration"], state["history"]
        return True

    # ---- the run ---------------------------------------------------------------------------------------

    def evaluate(self, epochs=None, runs=None):
        cfg = self.config
        config = EvalConfig(model=cfg.model, epochs=epochs or cfg.eval_epochs, num_runs=runs or cfg.eval_runs,
                            lr=float(self.alpha.detach()), seed=cfg.seed, device=cfg.device, dsa=cfg.dsa)
        return train_and_evaluate(self.images.detach(), self.labels.detach(), self.dataset, config,
                                  name=f"{cfg.method} ipc {cfg.ipc}", progress=False)

    @property
    def metrics_path(self):
        return self.out / "metrics.jsonl"

    def _log(self, record, tensorboard):
        append_line(self.metrics_path, json.dumps(record))
        if tensorboard is not None:
            step = record["iteration"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    tensorboard.add_scalar(key, value, step)
            for c, value in enumerate(record.get("class_grad_norm") or []):
                tensorboard.add_scalar(f"class_grad_norm/{c}", value, step)

    def run(self, stop_after=None):
        """Iterate up to config.iterations (or stop_after more), checkpointing; then write the synthetic set.

        Holds the out directory's lock throughout: a second process on it is refused at once.
        """
        distributed.all_ok(lambda: self.lock.acquire() if self.world.main else None, "locking the out directory")
        try:
            return self._run(stop_after)
        finally:
            self.lock.release()

    def _run(self, stop_after):
        cfg = self.config
        main = self.world.main
        if main:
            ensure_dir(self.out, "distill out")
            # records a kill left beyond the checkpoint are made again
            filter_log(self.metrics_path,
                       lambda record: isinstance(record.get("iteration"), int) and record["iteration"] <= self.iteration)
        tensorboard = None
        if self.log == "tensorboard" and main:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.iteration + 1)
        end = cfg.iterations if stop_after is None else min(cfg.iterations, self.iteration + stop_after)
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=f"distill {cfg.method}",
                   disable=not self.progress, dynamic_ncols=True, file=sys.stderr)
        last_eval = None
        while self.iteration < end:
            t0 = time.perf_counter()
            losses = self.step()
            record = {"iteration": self.iteration, "seconds": time.perf_counter() - t0,
                      "alpha": float(self.alpha.detach()), **{f"loss_{k}": v for k, v in losses.items()},
                      "class_grad_norm": self.last_class_grad_norm}
            if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                last_eval = self.evaluate().overall_mean
                record["eval_overall"] = last_eval
            self.history.append(record)
            if main:
                self._log(record, tensorboard)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in losses.items()},
                             **({"eval": f"{100 * last_eval:.1f}%"} if last_eval is not None else {})})
            bar.update(1)
            if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if tensorboard is not None:
            tensorboard.close()
        if self.iteration >= cfg.iterations:
            self.save_checkpoint()
            return self.write_synset()
        return None

    def write_synset(self):
        path = self.out / "synset.pt"
        if self.world.main:
            write_json_atomic(self.out / "history.json", self.history)
            save_synset(path, self.images, self.labels, float(self.alpha.detach()), self.dataset,
                        method=self.config.method, classes=self.syn_classes, iterations=self.iteration,
                        ipc=self.config.ipc,
                        world_size=self.world.size)
        distributed.barrier("writing the synthetic set")
        return path

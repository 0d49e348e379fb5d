"""`ltdd bench e2e` and `ltdd bench memory`: whole distillation iterations on synthetic tensors of a preset's shapes.

No data set or trained expert is needed: the synthetic set, soft labels and expert snapshots are random tensors of
the shapes the preset would use (its data set's image size and classes, ipc, network, syn_steps, batch_syn), and
an iteration runs both Expert-Decoupling phases as the Distiller does (matching.iteration_gradients).

e2e: the fast path (fused operators, K students, the chosen second pass, chunking and precision) against the plain
reference loop (reference.two_pass_gradients, student after student), in one run: gradients first, compared,
then iterations per second and peak memory of each. A path's peak counts what it keeps between iterations too
(fast_held_bytes: on CUDA, the memory its first iteration left reserved, such as a compiled path's CUDA-graph
pools, recorded then and kept whole, free blocks included: memory.reserved_bytes), not only what one iteration
allocates above that; what a replay allocates inside the pools may count twice, so on CUDA that peak is an upper
bound.
memory: the peak of one iteration at several syn_steps, each point in a fresh process (CPU: the process's peak
resident size, so every tensor counts, and the profiler's tensor peak beside it; CUDA: the allocator's peak).
"""
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .. import distributed, matching
from ..augment import DSA
from ..checks import check_device
from ..config import load_config
from ..dam import dam_weights
from ..data import long_tail_counts
from ..errors import ConfigError
from ..memory import peak_bytes, reserved_bytes
from ..models.functional import functional_model
from ..phases import Phase, move_at_once, sample_phase_aug
from .timing import device_name, time_median

# bench preset -> the distillation preset whose shapes it uses
PRESETS = {
    "cifar10-lt-ipc10": "cifar10-lt-if10-ipc10",
    "cifar100-lt-ipc50": "cifar100-lt-if10-ipc50",
    "tiny-lt-ipc10": "tiny-lt-if10-ipc10",
    "imagenet-lt-ipc10": "imagenet-lt-if10-ipc10",
    "imagenet-lt-ipc50": "imagenet-lt-if10-ipc50",
}
# data set -> (channels, classes, image side at its default resolution, head class size)
SHAPES = {"digits": (1, 10, 8, 170), "cifar10": (3, 10, 32, 5000), "cifar100": (3, 100, 32, 500),
          "tiny": (3, 200, 64, 500), "imagenet-lt": (3, 1000, 64, 1280)}
# --quick: the preset's network, image size and classes, with few steps, small batches and ipc 1
QUICK = {"syn_steps": 2, "syn_steps_classifier": 2, "batch_syn": 8, "ipc": 1}


def _overrides(quick, overrides, *extra):
    """--quick's settings, then the user's --set, then what the command itself fixes."""
    return [f"{k}={v}" for k, v in QUICK.items()] * quick + list(overrides) + list(extra)


def resolve(preset, overrides=()):
    """A bench preset name (or any distillation preset or YAML file) with key=value overrides -> DistillConfig."""
    source = PRESETS.get(preset, preset)
    try:
        return load_config(source, overrides)
    except ConfigError as exc:
        if source == preset and preset not in PRESETS and "no preset" in str(exc):
            raise ConfigError(f"no bench preset {preset!r}: expected one of {', '.join(PRESETS)} (or a distillation "
                              f"preset)") from None
        raise


@dataclass
class Options:
    """How the fast path runs (matching.two_pass_gradients' options and the backend)."""
    backend: str = "auto"
    students: int = 1
    second_pass: str = "exact"
    chunk: int | None = None
    precision: str = "full"
    compile: str | None = None
    cudnn_benchmark: bool = False

    def matching(self):
        return {"second_pass": self.second_pass, "chunk": self.chunk, "precision": self.precision,
                "compile": self.compile, "cudnn_benchmark": self.cudnn_benchmark}


class Problem:
    """Random tensors of the shapes config describes, and a generator that draws each iteration's phases."""

    def __init__(self, config, device, students=1, backend="reference", seed=0):
        if config.dataset not in SHAPES:
            raise ConfigError(f"dataset {config.dataset!r} has no bench shapes: expected one of {', '.join(SHAPES)}")
        channel, num_classes, side, head = SHAPES[config.dataset]
        side = config.resolution or side
        self.config, self.device, self.students = config, torch.device(device), students
        self.net = functional_model(config.model, channel, num_classes, (side, side), width=config.width)
        self.net.set_block_backend(backend)  # the fast path's blocks (the reference loop's are PyTorch either way)
        g = torch.Generator().manual_seed(seed)
        m = num_classes * config.ipc
        self.images = torch.randn(m, channel, side, side, generator=g).to(self.device)
        self.labels = (3 * torch.randn(m, num_classes, generator=g)).to(self.device)
        self.classes = torch.arange(num_classes).repeat_interleave(config.ipc).to(self.device)
        self.alpha = torch.tensor(config.lr_teacher, device=self.device)
        counts = long_tail_counts(head, num_classes, config.imbalance_factor)
        self.class_weights = dam_weights(counts).to(self.device)
        self.dsa = DSA(config.dsa_strategy) if config.dsa else None
        # experts: a start point per student and phase and an end point a little way off, like 2 epochs of SGD
        self.experts = [[self._expert(g) for _ in range(students)] for _ in range(2)]
        self.generator = g

    def _expert(self, g):
        theta_0 = self.net.init_flat(g)
        return theta_0.to(self.device), (theta_0 + 0.01 * torch.randn(theta_0.shape, generator=g)).to(self.device)

    def tensor_bytes(self):
        tensors = [self.images, self.labels] + [t for phase in self.experts for pair in phase for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def phases(self):
        """One iteration's (name, weight, [Phase] * students), as Distiller.phases() for method ltdd."""
        cfg, g, m = self.config, self.generator, self.images.shape[0]
        size = min(cfg.batch_syn, m)
        out = []
        for p, (name, weight, steps) in enumerate((("backbone", cfg.lambda_backbone, cfg.syn_steps),
                                                    ("classifier", cfg.lambda_classifier, cfg.syn_steps_classifier))):
            students = []
            for theta_0, theta_T in self.experts[p]:
                batches = move_at_once([torch.randperm(m, generator=g)[:size] for _ in range(steps)],
                                                 self.device)
                students.append(Phase(
                    theta_0=theta_0, theta_T=theta_T, batches=batches,
                    mask=self.net.backbone_mask(self.device) if p == 0 else None,
                    frozen=None if p == 0 else (0, self.net.classifier_offset),
                    class_weights=self.class_weights if p == 0 else None,
                    aug=sample_phase_aug(self.dsa, batches, self.net.im_size, g)))
            out.append((name, weight, students))
        return out

    def iteration(self, phases, options=None):
        """The iteration's gradients on the fast path (options) or, with options None, the reference loop."""
        if options is None:
            return matching.iteration_gradients(self.net, self.images, self.labels, self.alpha, phases, self.dsa,
                                                backend="reference")
        return matching.iteration_gradients(self.net, self.images, self.labels, self.alpha, phases, self.dsa,
                                            classes=self.classes, backend=options.backend, **options.matching())


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def bench_e2e(preset, device="cpu", iterations=3, options=None, overrides=(), quick=False, progress=None,
              profile=0):
    """One row: gradients of both paths compared on the same phases, then their speed and peak memory; with
    profile=N also the N operators that took most of one fast iteration's time (row["profile"])."""
    options = options or Options()
    device = torch.device(check_device(device, "--device"))
    if iterations < 1:
        raise ConfigError(f"--iterations must be at least 1, got {iterations}")
    overrides = _overrides(quick, overrides)
    config = resolve(preset, overrides)
    say = progress or (lambda text: None)
    problem = Problem(config, device, students=options.students, backend=options.backend)
    net = problem.net

    phases = problem.phases()
    say("gradients: reference loop")
    ref = problem.iteration(phases)
    say("gradients: fast path" + (f" (compiling, mode {options.compile})" if options.compile else ""))
    before = reserved_bytes(device)
    start = time.perf_counter()
    fast = problem.iteration(phases, options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - start  # with compile: mostly compilation
    check = {"grad_cosine": _cosine(fast[1], ref[1]), "label_grad_cosine": _cosine(fast[2], ref[2]),
             "lr_grad_rel_err": float((fast[3] - ref[3]).abs() / ref[3].abs().clamp(min=1e-30)),
             "loss_rel_err": max(abs(float(fast[0][k]) - float(ref[0][k])) / max(abs(float(ref[0][k])), 1e-30)
                                 for k in ref[0])}
    del fast
    held = max(0, reserved_bytes(device) - before)

    say(f"timing: {iterations} iterations of each")
    # the gradient check above was each path's warm-up
    reference_s = time_median(lambda: problem.iteration(problem.phases()), device, iterations, warmup=0)
    fast_s = time_median(lambda: problem.iteration(problem.phases(), options), device, iterations, warmup=0)
    scaling = _scaling(problem, phases, options, device, iterations, fast_s, say)
    say("peak memory: one iteration of each")
    live = problem.tensor_bytes()
    _, ref_peak = peak_bytes(lambda: problem.iteration(phases), device)
    _, fast_peak = peak_bytes(lambda: problem.iteration(phases, options), device)
    extra = {}
    if profile:
        say(f"profile: one fast iteration, the {profile} costliest operators")
        try:
            extra["profile"], extra["profile_total_ms"] = profile_iteration(
                lambda: problem.iteration(phases, options), device, profile)
            extra["profile_time"] = "device" if device.type == "cuda" else "cpu"
        except Exception as e:  # the measured row above stands without it
            say(f"profile failed, left out: {type(e).__name__}: {e}")
    return {
        "preset": preset, "device": device_name(device), "date": time.strftime("%Y-%m-%d"),
        "backend": options.backend, "students": options.students, "second_pass": options.second_pass,
        "chunk": options.chunk, "precision": options.precision, "compile": options.compile,
        "cudnn_benchmark": options.cudnn_benchmark, "quick": quick, "overrides": list(overrides), "model": config.model, "ipc": config.ipc, "batch_syn": config.batch_syn,
        "syn_steps": config.syn_steps, "syn_steps_classifier": config.syn_steps_classifier,
        "num_params": net.num_params,
        "reference_it_s": 1 / reference_s, "fast_it_s": 1 / fast_s, "speedup": reference_s / fast_s,
        "reference_peak_bytes": live + ref_peak, "fast_peak_bytes": live + held + fast_peak,
        "fast_held_bytes": held,
        "fast_first_iteration_s": first_s, **check, **scaling, **extra,
    }


def _scaling(problem, phases, options, device, iterations, fast_s, say):
    """Under torchrun: each rank's fast it/s (its share of every iteration, in lockstep with the others) and the
    scaling against one process, measured first on rank 0 alone with the whole machine's threads (on a CPU:
    world size x its own) while the other ranks wait. {"world_size": 1} without torchrun."""
    world = distributed.world()
    if not world.active:
        return {"world_size": 1}
    def alone():
        say(f"timing: one process alone ({iterations} iterations)")
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(threads * world.size)
        try:
            with distributed.alone():  # the same phases each time: the other ranks' draws stay in step
                return time_median(lambda: problem.iteration(phases, options), device, iterations, warmup=1)
        finally:
            torch.set_num_threads(threads)
    solo_s = distributed.computed_by_main(alone, "bench-e2e-alone", "measuring one process alone")
    per_rank = distributed.gather_objects(1 / fast_s, "gathering each rank's speed")
    speedup = solo_s / fast_s
    return {"world_size": world.size, "fast_it_s_per_rank": per_rank, "single_process_fast_it_s": 1 / solo_s,
            "single_process_threads": torch.get_num_threads() * (world.size if device.type == "cpu" else 1),
            "scaling": speedup, "scaling_efficiency": speedup / world.size}


def profile_iteration(fn, device, top):
    """The `top` operators by self time in one call of fn under torch.profiler (device time on CUDA, where the
    kernels are what an iteration waits for; CPU time on a CPU), as rows {name, calls, self_ms, share}, share
    being the fraction of all operators' self time; and that total in ms (on CUDA, against the iteration's wall
    time, how long the device was busy)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    rows = [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
            for e in ranked]
    return rows, total / 1e3


def format_e2e(row):
    lines = [f"{row['preset']} on {row['device']}: {row['model']}, {row['num_params']:,} parameters, ipc {row['ipc']}, "
             f"batch_syn {row['batch_syn']}, syn_steps {row['syn_steps']}/{row['syn_steps_classifier']}; fast path: "
             f"backend {row['backend']}, {row['students']} student(s), second pass {row['second_pass']}, chunk "
             f"{row['chunk'] or 'none'}, precision {row['precision']}, compile {row.get('compile') or 'none'}"
             + (", cuDNN benchmark" if row.get("cudnn_benchmark") else ""),
             f"{'':<10} {'it/s':>10} {'peak MB':>10}",
             f"{'reference':<10} {row['reference_it_s']:>10.4f} {row['reference_peak_bytes'] / 1e6:>10.1f}",
             f"{'fast':<10} {row['fast_it_s']:>10.4f} {row['fast_peak_bytes'] / 1e6:>10.1f}",
             f"speedup {row['speedup']:.2f}x; memory {row['fast_peak_bytes'] / row['reference_peak_bytes']:.2f}x of "
             f"the reference's; image-gradient cosine {row['grad_cosine']:.6f}, label-gradient cosine "
             f"{row['label_grad_cosine']:.6f}, lr-gradient relative error {row['lr_grad_rel_err']:.2e}"]
    if row.get("world_size", 1) > 1:
        lines.append(f"{row['world_size']} ranks: fast it/s per rank {', '.join(f'{v:.4f}' for v in row['fast_it_s_per_rank'])}; "
                     f"one process alone ({row['single_process_threads']} threads) {row['single_process_fast_it_s']:.4f} "
                     f"it/s: scaling {row['scaling']:.2f}x, efficiency {row['scaling_efficiency']:.2f}")
    if row.get("compile"):
        lines.append(f"the fast path's first iteration, compilation included: {row['fast_first_iteration_s']:.1f} s")
    if row.get("profile"):
        lines.append(f"one fast iteration's costliest operators, by self {row['profile_time']} time (all operators: "
                     f"{row['profile_total_ms']:.1f} ms; an iteration's wall time: {1e3 / row['fast_it_s']:.1f} ms):")
        lines.append(f"{'operator':<60} {'calls':>7} {'ms':>10} {'share':>6}")
        lines += [f"{p['name'][:60]:<60} {p['calls']:>7} {p['self_ms']:>10.2f} {p['share']:>6.1%}"
                  for p in row["profile"]]
    return "\n".join(lines)


# ---- ltdd bench memory -----------------------------------------------------------------------------------------

def memory_point(preset, device, syn_steps, path, options, overrides=(), quick=False):
    """Peak memory of one iteration at syn_steps (both phases), in this process: {"peak_bytes", "rss_bytes",
    "tensor_peak_bytes"}. Meant to run in a fresh process (bench_memory starts one per point)."""
    device = torch.device(device)
    overrides = _overrides(quick, overrides, f"syn_steps={syn_steps}", f"syn_steps_classifier={syn_steps}")
    problem = Problem(resolve(preset, overrides), device, students=options.students, backend=options.backend)
    phases = problem.phases()
    run = (lambda: problem.iteration(phases)) if path == "reference" else (lambda: problem.iteration(phases, options))
    live = problem.tensor_bytes()
    if device.type == "cuda":
        _, peak = peak_bytes(run, device)
        return {"peak_bytes": live + peak}
    run()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    _, tensor_peak = peak_bytes(run, device)
    return {"peak_bytes": rss, "rss_bytes": rss, "tensor_peak_bytes": live + tensor_peak}


def bench_memory(preset, device="cpu", syn_steps=(10, 80), options=None, overrides=(), quick=False, progress=None):
    """{"fast": {"10": bytes, ...}, "reference": {...}, "tensor_peak": {...} (CPU), settings...}."""
    options = options or Options()
    device = torch.device(check_device(device, "--device"))
    if not syn_steps or any(n < 1 for n in syn_steps):
        raise ConfigError(f"--syn-steps must be positive numbers, got {list(syn_steps)}")
    resolve(preset, overrides)  # a bad preset or override fails here, not in a child process
    say = progress or (lambda text: None)
    out = {"fast": {}, "reference": {}}
    tensor = {"fast": {}, "reference": {}}
    for path in ("fast", "reference"):
        for n in syn_steps:
            say(f"{path} path, syn_steps {n}: a fresh process")
            spec = {"preset": preset, "device": str(device), "syn_steps": n, "path": path,
                    "options": options.__dict__, "overrides": list(overrides), "quick": quick}
            done = subprocess.run([sys.executable, "-m", "ltdd_fast.bench.e2e", json.dumps(spec)],
                                  capture_output=True, text=True, env={**os.environ})
            if done.returncode != 0:
                raise RuntimeError(f"the memory point {path} at syn_steps {n} failed:\n{done.stderr[-2000:]}")
            point = json.loads(done.stdout.strip().splitlines()[-1])
            out[path][str(n)] = point["peak_bytes"]
            if "tensor_peak_bytes" in point:
                tensor[path][str(n)] = point["tensor_peak_bytes"]
    result = {**out, "measure": "peak_rss" if device.type == "cpu" else "cuda_max_allocated",
              "preset": preset, "device": device_name(device), "date": time.strftime("%Y-%m-%d"),
              "syn_steps": list(syn_steps), "options": options.__dict__, "overrides": list(overrides), "quick": quick}
    if device.type == "cpu":
        result["tensor_peak"] = tensor
    return result


def format_memory(result):
    steps = [str(n) for n in result["syn_steps"]]
    lines = [f"{result['preset']} on {result['device']}: peak memory of one iteration ({result['measure']}"
             f"{'; tensor peak beside it' if 'tensor_peak' in result else ''}), MB"]
    lines.append(f"{'syn_steps':<10} " + " ".join(f"{s:>18}" for s in steps) + f" {'last/first':>11}")
    for path in ("fast", "reference"):
        cells = []
        for s in steps:
            cell = f"{result[path][s] / 1e6:.1f}"
            if "tensor_peak" in result:
                cell += f" ({result['tensor_peak'][path][s] / 1e6:.1f})"
            cells.append(f"{cell:>18}")
        ratio = result[path][steps[-1]] / result[path][steps[0]]
        extra = ""
        if "tensor_peak" in result:
            extra = f" ({result['tensor_peak'][path][steps[-1]] / result['tensor_peak'][path][steps[0]]:.2f}x)"
        lines.append(f"{path:<10} " + " ".join(cells) + f" {ratio:>10.2f}x{extra}")
    return "\n".join(lines)


if __name__ == "__main__":  # one memory point, in a fresh process (bench_memory)
    spec = json.loads(sys.argv[1])
    point = memory_point(spec["preset"], spec["device"], spec["syn_steps"], spec["path"], Options(**spec["options"]),
                         spec["overrides"], spec["quick"])
    print(json.dumps(point))

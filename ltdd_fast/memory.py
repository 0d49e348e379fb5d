"""Memory: measuring the peak of a piece of work, and planning a distillation run into a memory budget.

The planner's model of one iteration's peak (bytes):
    state  = the synthetic set and its gradients, optimiser buffers and accumulators (4 copies of images and of
             labels) + the parameter vectors (two expert snapshots per student and phase, and the student's
             theta, G, v, theta_k and step gradient)
    pieces = K * chunk * per_image + fixed, the activation memory of pass 2 on one piece of a minibatch,
             measured on the run's own device and network (two small pieces, a straight line through them).
Pass 2 re-walks the trajectory (ltdd_fast/matching/), so no term grows with syn_steps: there is no checkpoint interval to
choose. The reference (TESLA) keeps N = syn_steps parameter vectors and runs whole minibatches; `reference_bytes`
gives its estimate beside the plan.
"""
import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from . import matching
from .errors import ConfigError
from .phases import Phase



def format_bytes(n) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def peak_bytes(fn, device) -> tuple[object, int]:
    """(fn(), the most tensor memory fn held at once above what was allocated when it started).

    CUDA: the caching allocator's peak statistics. CPU: the profiler's allocation and free events, summed in
    time order (every tensor counts, including autograd's saved tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints its start and stop lines on file descriptor 2: hold them back, so that what
    the user sees (a plan, or a one-line refusal) is not buried under them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def reserved_bytes(device) -> int:
    """CUDA: the device memory the caching allocator keeps once its free cache is returned (torch.cuda.empty_cache):
    the segments of live tensors and the CUDA-graph memory pools, whose free blocks stay reserved for the graphs
    (torch.cuda.memory_allocated leaves those out). 0 on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


def measure_piece(net, num_classes, second_pass, precision, device, sizes=(2, 4), students=1):
    """(per_image, fixed) bytes of one matching step on a piece of n images per student, from two sizes."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    peaks = []
    for n in sizes:
        images = torch.randn(n, net.channel, *net.im_size, generator=g).to(device)
        labels = torch.randn(n, num_classes, generator=g).to(device)
        theta_0 = net.init_flat(g).to(device)
        phases = [Phase(theta_0=theta_0, theta_T=theta_0 + 0.01, batches=[torch.arange(n, device=device)])
                  for _ in range(students)]
        alpha = torch.tensor(0.01, device=device)
        _, peak = peak_bytes(lambda: matching.two_pass_gradients(
            net, images, labels, alpha, phases, None, second_pass=second_pass, precision=precision,
            backend="auto"), device)
        peaks.append(peak)
    per_image = max(0.0, (peaks[1] - peaks[0]) / ((sizes[1] - sizes[0]) * students))
    return per_image, max(0, int(peaks[0] - per_image * sizes[0] * students))


def state_bytes(num_images, image_numel, num_classes, num_params, students, phases=2, elem=4) -> int:
    synthetic = 4 * num_images * (image_numel + num_classes) * elem
    vectors = phases * students * 2 + 6 * students
    return int(synthetic + vectors * num_params * elem)


@dataclass
class Plan:
    budget: int
    chunk: int             # images per student per piece (batch_syn: no chunking)
    precision: str
    predicted_bytes: int   # the model's peak at this plan
    reference_bytes: int   # the model's estimate for the reference loop (TESLA) at full batch
    batch: int
    compile: str | None = None  # the run's torch.compile mode (the model is measured eagerly)

    def describe(self) -> str:
        chunking = "no chunking" if self.chunk >= self.batch else f"minibatches in chunks of {self.chunk} images"
        graphs = "" if self.compile not in ("reduce-overhead", "max-autotune") else (
            f"; the model is measured on the eager path: compile={self.compile} keeps CUDA-graph memory pools on a "
            f"GPU that it does not include, so leave headroom")
        return (f"memory plan for {format_bytes(self.budget)}: {chunking}, precision {self.precision}, predicted "
                f"peak {format_bytes(self.predicted_bytes)}; pass 2 re-walks the trajectory, so no theta_k is "
                f"stored and no checkpoint interval is needed (the reference loop would need about "
                f"{format_bytes(self.reference_bytes)}){graphs}")


def plan(budget, net, num_images, num_classes, batch, syn_steps, second_pass="exact", precision="full",
         students=1, phases=2, device="cpu", measure=measure_piece, max_chunk=None, compile=None) -> Plan:
    """The largest chunk, at most max_chunk (a chunk asked for), and full precision before bf16 (unless bf16 was
    asked for) whose predicted peak fits `budget` bytes; ConfigError naming the smallest need when nothing fits."""
    image_numel = net.channel * net.im_size[0] * net.im_size[1]
    state = state_bytes(num_images, image_numel, num_classes, net.num_params, students, phases)
    tried, measured = [], {}

    def activation(mode, prec):  # each (second pass, precision) measured once
        if (mode, prec) not in measured:
            measured[mode, prec] = measure(net, num_classes, mode, prec, device)
        return measured[mode, prec]
    for prec in ([precision] if precision == "bf16" else ["full", "bf16"]):
        per_image, fixed = activation(second_pass, prec)
        ref_per_image, ref_fixed = activation("exact", "full") if prec == "full" else (per_image, fixed)
        reference_bytes = int(state + students * (syn_steps * net.num_params * 4 + batch * ref_per_image)
                              + ref_fixed)

        def need(chunk):
            return int(state + students * chunk * per_image + fixed)
        if need(1) > budget:
            tried.append(f"{prec}: {format_bytes(need(1))} with chunks of 1 image")
            continue
        largest = batch if per_image == 0 else min(batch, int((budget - state - fixed) // (students * per_image)))
        # as few pieces as the largest chunk allows, then the smallest chunk giving that many pieces
        pieces = -(-batch // largest)
        chunk = min(-(-batch // pieces), max_chunk or batch)  # a smaller chunk asked for still fits
        return Plan(budget, chunk, prec, need(chunk), reference_bytes, batch, compile)
    raise ConfigError(f"nothing fits a memory budget of {format_bytes(budget)}: the smallest plans need "
                      f"{'; '.join(tried)} (of which {format_bytes(state)} is the synthetic set, its optimiser "
                      f"state and the parameter vectors); raise the budget or lower ipc")

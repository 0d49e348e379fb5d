"""`ltdd bench ops`: every fast operator against its reference, checked first, then timed in the same run.

On a GPU each row also gives the bandwidth the fast op achieves, from the least traffic it needs (its inputs read
once, its outputs written once), as a fraction of the device's copy bandwidth measured in the same run. On a CPU
the Triton kernels run in Triton's interpreter: those rows check agreement with the reference, and their times
mean nothing.
"""
import math

import torch

from .. import ops
from ..augment import DSA
from ..dsa_chain import FAMILIES
from ..checks import check_device
from ..errors import ConfigError
from .timing import copy_bandwidth, device_name, time_median

BACKENDS = ("native", "triton")


def _gen(device, seed=0):
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(shape, g, device, dtype=torch.float32):
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


def _sgd_case(n, device):
    g = _gen(device)
    theta, grad, gsum = (_randn(n, g, device) for _ in range(3))
    alpha = torch.tensor(0.01, device=device)
    frozen = (0, n // 2)
    return (lambda backend: ops.student_sgd_step(theta, grad, gsum, alpha, frozen=frozen, backend=backend),
            lambda: ops.OPERATORS["student_sgd_step"].reference(theta, grad, gsum, alpha, *frozen),
            5 * n * theta.element_size())  # theta, grad, grad_sum read; theta', grad_sum' written


def _distance_case(n, device):
    g = _gen(device)
    theta_0, theta_T, gsum = (_randn(n, g, device) for _ in range(3))
    alpha = torch.tensor(0.01, device=device)
    mask = torch.arange(n, device=device) < int(0.9 * n)  # a backbone-like mask
    return (lambda backend: ops.param_distance(theta_0, theta_T, gsum, alpha, mask, backend=backend),
            lambda: ops.OPERATORS["param_distance"].reference(theta_0, theta_T, gsum, alpha, mask),
            4 * n * theta_0.element_size() + n)  # three vectors and the bool mask read, v written


def _soft_ce_case(shape, device):
    b, c = shape
    g = _gen(device)
    logits, target = _randn(shape, g, device), _randn(shape, g, device)
    weights = torch.rand(c, generator=g).to(device)
    classes = torch.randint(0, c, (b,), generator=g).to(device)
    return (lambda backend: ops.soft_ce_stats(logits, target, weights, classes, c, backend=backend),
            lambda: ops.OPERATORS["soft_ce_stats"].reference(logits, target, weights, classes, c),
            4 * b * c * logits.element_size())  # logits and targets read, both gradients written


def _grad_stats_case(shape, device, num_classes=10):
    g = _gen(device)
    grads = _randn(shape, g, device)
    classes = torch.randint(0, num_classes, (shape[0],), generator=g).to(device)
    return (lambda backend: ops.class_grad_stats(grads, classes, num_classes, backend=backend),
            lambda: ops.OPERATORS["class_grad_stats"].reference(grads, classes, num_classes),
            grads.numel() * grads.element_size())


def _feature_stats_case(shape, device, num_classes=10):
    g = _gen(device)
    features = _randn(shape, g, device)
    classes = torch.randint(0, num_classes, (shape[0],), generator=g).to(device)
    return (lambda backend: ops.class_feature_stats(features, classes, num_classes, backend=backend),
            lambda: ops.OPERATORS["class_feature_stats"].reference(features, classes, num_classes),
            features.numel() * features.element_size())  # features read once; the [K, C] outputs are small


def _scatter_case(shape, device):
    rows, width = shape
    g = _gen(device)
    target = _randn((rows * 2, width), g, device)
    index = torch.randint(0, rows * 2, (rows,), generator=g).to(device)
    src = _randn((rows, width), g, device)

    def fast(backend):
        out = target.clone()
        ops.scatter_add_rows_(out, index, src, backend=backend)
        return out
    return fast, lambda: ops.OPERATORS["scatter_add_rows_"].reference(target, index, src), 3 * src.numel() * src.element_size()


def _block_case(shape, device):
    """norm_relu_pool forward and backward (gradients to x, weight and bias) together."""
    b, c, h, w = shape
    g = _gen(device)
    x = _randn(shape, g, device).requires_grad_()
    weight = (1 + 0.1 * _randn(c, g, device)).requires_grad_()
    bias = (0.1 * _randn(c, g, device)).requires_grad_()
    dy = _randn((b, c, h // 2, w // 2), g, device)

    def run(fn):
        y = fn(x, weight, bias)
        return (y.detach(), *torch.autograd.grad(y, (x, weight, bias), dy))
    # forward: x read, y written (a quarter); backward: x and dy read, dx written
    return (lambda backend: run(lambda *a: ops.norm_relu_pool(*a, backend=backend)),
            lambda: run(ops.OPERATORS["norm_relu_pool"].reference),
            int(3.5 * x.numel() * x.element_size()))


def _dsa_case(shape, device):
    """The DSA chain and its transpose (an image gradient through it), for each family and for all of them in
    turn: a distillation step draws one family (mode "single")."""
    b, _, h, w = shape
    g = _gen(device)
    x = _randn(shape, g, device).requires_grad_()
    dy = _randn(shape, g, device)
    draws = [(dsa, dsa.sample(b, (h, w), g, device=device))
             for dsa in [DSA(f) for f in FAMILIES] + [DSA(mode="multiple")]]
    for _, params in draws:
        params.packed(x.dtype, device)  # made once per draw (a distillation step shares it between its passes)

    def run(backend):
        outs = []
        for dsa, params in draws:
            y = dsa.apply(x, params, backend)
            outs += [y.detach(), *torch.autograd.grad(y, x, dy)]
        return outs
    # per draw: x read and y written, dy read and dx written
    return run, lambda: run("reference"), 4 * len(draws) * x.numel() * x.element_size()


# op -> (case builder, full sizes, quick sizes); sizes follow the issues: ConvNet-3 (0.3M), 1.1M and ResNet-18
# (11M) parameters; logits of CIFAR-10, CIFAR-100 and ImageNet-LT batches; a CIFAR batch of image gradients.
# a DSA step on a CIFAR batch (batch_syn 500) and a 64-pixel one; the per-class statistics of a ConvNet-3's
# feature maps at CIFAR sizes (width 128: the first block's 16x16 maps of 256 images, the last block's 4x4 maps of
# 500) and of 500 pooled 512-channel features, over 10 classes.
CASES = {
    "student_sgd_step": (_sgd_case, [320_010, 1_100_000, 11_000_000], [320_010]),
    "param_distance": (_distance_case, [320_010, 1_100_000, 11_000_000], [320_010]),
    "soft_ce_stats": (_soft_ce_case, [(500, 10), (1000, 100), (10000, 1000)], [(500, 10), (1000, 100)]),
    "class_grad_stats": (_grad_stats_case, [(500, 3, 32, 32), (100, 3, 64, 64)], [(500, 3, 32, 32)]),
    "scatter_add_rows_": (_scatter_case, [(500, 3 * 32 * 32), (1000, 3 * 64 * 64)], [(500, 3 * 32 * 32)]),
    "norm_relu_pool": (_block_case, [(500, 128, 32, 32), (100, 128, 64, 64)], [(8, 16, 32, 32)]),
    "dsa": (_dsa_case, [(500, 3, 32, 32), (100, 3, 64, 64)], [(8, 3, 16, 16)]),
    "class_feature_stats": (_feature_stats_case, [(256, 128, 16, 16), (500, 128, 4, 4), (500, 512)],
                            [(256, 128, 16, 16)]),
}


def _flat(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def check_agreement(name, size, fast_out, ref_out, tolerance=1e-5):
    """Each output of the fast op against the reference's, by relative error ||fast - ref|| / ||ref|| in float64
    (a whole-tensor measure: float32 reductions of thousands of terms move single elements by more than an
    element-wise tolerance would allow, while the norm stays near 1e-7).

    norm_relu_pool's gradient may differ at a handful of elements: where the normalised value z is within a few
    ulps of 0, the kernel's and PyTorch's roundings of z can fall on opposite sides of the ReLU's kink, and that
    element's gradient (with its plane's mean terms) is then of the other branch. At [100, 128, 64, 64] on an H100
    that was enough for a relative error of 5e-4 over 52M elements. So for it the largest differences, one per
    million elements, are left out of the measure (bench rows use random inputs, on which such ties occur).

    Its weight and bias gradients are per-channel sums over a whole batch's planes (409,600 terms a channel at
    [100, 128, 64, 64]); summed in another order, float32 moves them by about eps * sqrt(terms) relatively (2.0e-5
    measured there on an H100), so their tolerance grows with sqrt(terms)."""
    for i, (a, b) in enumerate(zip(_flat(fast_out), _flat(ref_out))):
        if a.shape != b.shape:
            raise AssertionError(f"{name} at size {size}: output {i} has shape {tuple(a.shape)}, the reference's "
                                 f"{tuple(b.shape)}")
        a64, b64 = a.detach().double(), b.detach().to(a.dtype).double()
        diff = (a64 - b64).flatten().abs()
        kinks = diff.numel() // 1_000_000 if name == "norm_relu_pool" else 0
        if kinks:
            diff[diff.topk(kinks).indices] = 0.0
        error = (diff.norm() / b64.norm().clamp_min(1e-30)).item()
        tol = tolerance
        if name == "norm_relu_pool" and i >= 2:  # per-channel sums of batch * plane terms
            tol = max(tolerance, 4 * torch.finfo(torch.float32).eps * math.sqrt(size[0] * size[2] * size[3]))
        finite = bool(torch.isfinite(a64).all())
        if not finite or not math.isfinite(error) or error > tol:
            raise AssertionError(f"{name} at size {size}: output {i} differs from the reference: relative error "
                                 f"{error:.2e} (at most {tol:.0e}){'' if finite else ', non-finite values'}")


def bench_ops(device="cpu", backend="native", quick=False, repeats=None, only=None):
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(check_device(device, "--device"))
    problem = ops.backend_problem(backend, device)
    if problem:
        raise ConfigError(f"--backend {backend} on {device.type}: {problem}")
    unknown = sorted(set(only or ()) - set(ops.dispatch.has(backend)))
    if unknown:
        raise ConfigError(f"--op {', '.join(unknown)}: the {backend} backend has {', '.join(ops.dispatch.has(backend))}")
    interpreted = backend == "triton" and device.type == "cpu"
    repeats = repeats or (1 if interpreted else 3 if quick else 10)
    copy_bps = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for name in ops.dispatch.has(backend):
        build, sizes, quick_sizes = CASES[name]
        if only and name not in only:
            continue
        for size in quick_sizes if quick else sizes:
            fast, ref, nbytes = build(size, device)
            check_agreement(name, size, fast(backend), ref())
            ref_s = time_median(ref, device, repeats)
            fast_s = time_median(lambda: fast(backend), device, repeats)
            row = {"op": name, "size": list(size) if isinstance(size, tuple) else [size],
                   "reference_s": ref_s, "fast_s": fast_s, "speedup": ref_s / fast_s,
                   "device": device_name(device), "backend": backend, "bytes": nbytes,
                   "fast_gb_s": nbytes / fast_s / 1e9}
            if copy_bps:
                row["copy_gb_s"] = copy_bps / 1e9
                row["copy_fraction"] = nbytes / fast_s / copy_bps
            if interpreted:
                row["interpreted"] = True  # Triton's interpreter: the agreement check counts, not the time
            rows.append(row)
    return rows


def format_rows(rows):
    bandwidth = any("copy_fraction" in r for r in rows)
    head = f"{'op':<20} {'size':<20} {'reference ms':>13} {'fast ms':>10} {'speedup':>8}"
    lines = [head + (f" {'GB/s':>8} {'of copy':>8}" if bandwidth else "")]
    for r in rows:
        size = "x".join(str(s) for s in r["size"])
        line = (f"{r['op']:<20} {size:<20} {1e3 * r['reference_s']:>13.3f} {1e3 * r['fast_s']:>10.3f} "
                f"{r['speedup']:>7.2f}x")
        if "copy_fraction" in r:
            line += f" {r['fast_gb_s']:>8.1f} {100 * r['copy_fraction']:>7.1f}%"
        lines.append(line)
    if bandwidth:
        lines.append(f"copy bandwidth of this device, measured in this run: {rows[0]['copy_gb_s']:.1f} GB/s")
    if any(r.get("interpreted") for r in rows):
        lines.append("triton on cpu runs in Triton's interpreter: each row agreed with its reference; its times "
                     "mean nothing")
    return "\n".join(lines)

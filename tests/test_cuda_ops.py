"""CUDA kernels of the native operators (csrc/cuda) against a float64 PyTorch version of each schema in
csrc/ops.cpp, against autograd where an output is a derivative, and against the CPU kernels where the build has
them. Runs only on a machine with a GPU and a CUDA build of ltdd_fast._C; CI without a GPU compile-checks the
same code in test_cuda_compile.py.

Inputs are drawn in float64, rounded to the dtype under test, and the reference is computed in float64 from the
rounded values, so each tolerance measures the kernel alone: outputs are compared with
rtol and an atol of rtol * max|reference| (per output), which lets tiny entries of a low-precision result err by
its rounding at the output's scale.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ltdd_fast import dam, ops
from ltdd_fast.ops import distance, sgd_step

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="ltdd_fast._C not built"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICE = "cuda"
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# float16 resolves nothing finer than its smallest subnormal, 2^-24, near zero (bfloat16 has float32's range)
ABS_FLOOR = {torch.float16: 2.0**-24}


def _has_kernel(op, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ltdd_fast::{op}", key)
    except RuntimeError:  # no such operator in this build
        return False


def _need_cuda_kernel(op):
    if not _has_kernel(op, "CUDA"):
        pytest.skip(f"ltdd_fast._C was built without a CUDA kernel for {op}")


def _cpu_kernel(op):
    return _has_kernel(op, "CPU")


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x.to(dtype).to(DEVICE)


def _close(got, want, dtype, factor=1.0, name="", scale=0.0):
    """got (any device and dtype) against a float64 reference on the CPU: rtol, and an atol of rtol times the
    larger of max|want| and `scale` (the natural size of the output, for one whose reference may be all zeros)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    rtol = RTOL[dtype] * factor
    if want.numel():
        scale = max(scale, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + ABS_FLOOR.get(dtype, 1e-300),
                               msg=lambda m: f"{name} ({dtype}): {m}")


def _misaligned(x):
    """The same values at an address that is not 16-byte aligned (forces the kernels' scalar paths)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    assert out.data_ptr() % 16 != 0
    return out


# ---- float64 references of the schemas ----------------------------------------------------------------------


def ref_student_sgd_step(theta, grad, grad_sum, alpha, start, end):
    return sgd_step.reference(theta.double().cpu(), grad.double().cpu(), grad_sum.double().cpu(),
                                      float(alpha), start, end)


def ref_param_distance(theta_0, theta_T, grad_sum, alpha, mask):
    t0, tT, G = (t.double().cpu() for t in (theta_0, theta_T, grad_sum))
    a = float(alpha)
    m2 = torch.ones_like(t0) if mask is None else mask.double().cpu() ** 2
    D = (m2 * (t0 - tT) ** 2).sum()
    tN = t0 - a * G
    loss = (m2 * (tN - tT) ** 2).sum() / D
    v = 2 * m2 * (a * (tT - t0) + a * a * G) / D
    d_alpha = -2 * (G * m2 * (tN - tT)).sum() / D
    return loss, v, d_alpha


def ref_soft_ce_stats(logits, target, weights, classes, K):
    z = logits.double().cpu().requires_grad_()
    y = target.double().cpu().requires_grad_()
    w = None if weights is None else weights.to(logits.dtype).double().cpu()  # the weights take the logits' dtype
    per_row = -(F.softmax(y, 1) * F.log_softmax(z, 1) * (1 if w is None else w)).sum(1)
    loss = per_row.mean()
    grad_logits, grad_target = torch.autograd.grad(loss, (z, y))
    k = classes.cpu()
    class_loss = torch.zeros(K, dtype=torch.float64).index_add_(0, k, per_row.detach())
    count = torch.bincount(k, minlength=K)
    norm = torch.zeros(K, dtype=torch.float64).index_add_(0, k, grad_logits.pow(2).sum(1)).sqrt()
    return loss.detach(), grad_logits, grad_target, class_loss, count, norm


def ref_class_grad_stats(grads, classes, K):
    norms = grads.double().cpu().flatten(1).norm(dim=1) if grads.shape[0] else torch.zeros(0, dtype=torch.float64)
    k = classes.cpu()
    s = torch.zeros(K, dtype=torch.float64).index_add_(0, k, norms)
    m = torch.zeros(K, dtype=torch.float64).scatter_reduce_(0, k, norms, "amax", include_self=True)
    return s, m


def ref_class_feature_stats(features, classes, K):
    n, c = features.shape[:2]
    positions = math.prod(features.shape[2:])
    x = features.double().cpu().reshape(n, c, positions)
    k = classes.cpu()
    s = torch.zeros(K, c, dtype=torch.float64).index_add_(0, k, x.sum(2))
    q = torch.zeros(K, c, dtype=torch.float64).index_add_(0, k, (x * x).sum(2))
    return torch.bincount(k, minlength=K).double() * positions, s, q


def ref_scatter_add_rows(target, index, src):
    return target.double().cpu().index_add(0, index.cpu(), src.double().cpu())


# ---- student_sgd_step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 4096, 16_387, 299_520 + 20_490])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen", [None, "backbone", "middle", "all"])
def test_student_sgd_step(n, dtype, frozen):
    _need_cuda_kernel("student_sgd_step")
    theta, grad, gsum = (_randn(n, dtype, seed) for seed in (0, 1, 2))
    start, end = {None: (0, 0), "backbone": (0, n // 2), "middle": (n // 3, n - n // 3), "all": (0, n)}[frozen]
    alpha = torch.tensor(0.03, dtype=dtype, device=DEVICE)
    t_next, s_next = torch.ops.ltdd_fast.student_sgd_step(theta, grad, gsum, alpha, start, end)
    want_t, want_s = ref_student_sgd_step(theta, grad, gsum, alpha.item(), start, end)
    for got, want, name in ((t_next, want_t, "theta_next"), (s_next, want_s, "grad_sum_next")):
        assert got.dtype == dtype and got.device.type == "cuda"
        _close(got, want, dtype, name=name)
    # the frozen slice is exactly untouched
    assert torch.equal(t_next[start:end], theta[start:end])
    assert torch.equal(s_next[start:end], gsum[start:end])


@pytest.mark.parametrize("dtype", DTYPES)
def test_student_sgd_step_unaligned_and_cpu_alpha(dtype):
    _need_cuda_kernel("student_sgd_step")
    n = 1000
    theta, grad, gsum = (_misaligned(_randn(n, dtype, seed)) for seed in (3, 4, 5))
    alpha = torch.tensor(0.5, dtype=torch.float64)  # a CPU scalar of another dtype is accepted
    t_next, s_next = torch.ops.ltdd_fast.student_sgd_step(theta, grad, gsum, alpha, 10, 20)
    want_t, want_s = ref_student_sgd_step(theta, grad, gsum, 0.5, 10, 20)
    _close(t_next, want_t, dtype, name="theta_next")
    _close(s_next, want_s, dtype, name="grad_sum_next")


def test_student_sgd_step_through_ops_and_autograd():
    _need_cuda_kernel("student_sgd_step")
    theta, grad, gsum = (_randn(33, torch.float64, seed).requires_grad_() for seed in (6, 7, 8))
    alpha = torch.tensor(0.2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w1, w2 = _randn(33, torch.float64, 9), _randn(33, torch.float64, 10)
    grads = []
    for backend in ("native", "reference"):
        t_next, s_next = ops.student_sgd_step(theta, grad, gsum, alpha, frozen=(5, 20), backend=backend)
        loss = (t_next * w1).sum() + (s_next * w2).sum() ** 2
        grads.append(torch.autograd.grad(loss, (theta, grad, gsum, alpha)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_student_sgd_step_opcheck():
    _need_cuda_kernel("student_sgd_step")
    theta, grad, gsum = (_randn(17, torch.float32, seed) for seed in (11, 12, 13))
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (theta, grad, gsum)]
        alpha = torch.tensor(0.1, device=DEVICE, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.ltdd_fast.student_sgd_step, (*args, alpha, 3, 10))


# ---- param_distance -----------------------------------------------------------------------------------------


def _param_distance_inputs(n, dtype, mask_kind, seed):
    theta_0 = _randn(n, dtype, seed)
    # |theta_T - theta_0| >= 0.05 survives rounding to bfloat16 (so D > 0 even for n = 1)
    r = _randn(n, torch.float64, seed + 1)
    theta_T = (theta_0.double() + r.sign() * (0.05 + 0.05 * r.abs())).to(dtype)
    grad_sum = _randn(n, dtype, seed + 2, scale=2.0)
    g = torch.Generator().manual_seed(seed + 3)
    if mask_kind == "bool":
        mask = (torch.rand(n, generator=g) < 0.7).to(DEVICE)
        mask[0] = True  # D > 0
    elif mask_kind == "float":
        mask = torch.rand(n, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    else:
        mask = None
    return theta_0, theta_T, grad_sum, mask


@pytest.mark.parametrize("n", [1, 5, 4097, 299_520 + 20_490])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_param_distance(n, dtype, mask_kind):
    _need_cuda_kernel("param_distance")
    theta_0, theta_T, grad_sum, mask = _param_distance_inputs(n, dtype, mask_kind, seed=n)
    alpha = torch.tensor(0.01, dtype=dtype, device=DEVICE)
    loss, v, d_alpha = torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask)
    want = ref_param_distance(theta_0, theta_T, grad_sum, alpha.item(), mask)
    for got, w, name in zip((loss, v, d_alpha), want, ("loss", "v", "d_alpha")):
        assert got.dtype == dtype and got.device.type == "cuda"
        _close(got, w, dtype, factor=4 if name != "v" else 1, name=name)
    assert loss.shape == () and d_alpha.shape == () and v.shape == (n,)
    if mask_kind == "bool":
        assert torch.all(v[~mask] == 0)
    # deterministic: no atomics in the sums
    again = torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask)
    for a, b in zip((loss, v, d_alpha), again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_param_distance_unaligned(dtype):
    _need_cuda_kernel("param_distance")
    theta_0, theta_T, grad_sum, mask = _param_distance_inputs(1001, dtype, "bool", seed=40)
    theta_0, theta_T, grad_sum = (_misaligned(t) for t in (theta_0, theta_T, grad_sum))
    alpha = torch.tensor(0.02, dtype=dtype, device=DEVICE)
    got = torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask)
    want = ref_param_distance(theta_0, theta_T, grad_sum, alpha.item(), mask)
    for g, w, name in zip(got, want, ("loss", "v", "d_alpha")):
        _close(g, w, dtype, factor=4, name=name)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_param_distance_outputs_are_derivatives(mask_kind):
    """v = d loss / d grad_sum and d_alpha = d loss / d alpha, by autograd through the definition of loss."""
    _need_cuda_kernel("param_distance")
    theta_0, theta_T, grad_sum, mask = _param_distance_inputs(257, torch.float64, mask_kind, seed=50)
    alpha = torch.tensor(0.05, dtype=torch.float64, device=DEVICE)
    loss, v, d_alpha = torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask)
    G = grad_sum.clone().requires_grad_()
    a = alpha.clone().requires_grad_()
    want = distance.distance(theta_0 - a * G, theta_0, theta_T, mask)
    dG, da = torch.autograd.grad(want, (G, a))
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(v, dG)
    torch.testing.assert_close(d_alpha, da)


# ---- soft_ce_stats ------------------------------------------------------------------------------------------

# C covers the three row layouts: 8 lanes (C <= 64), a warp (C <= 1024), a block
SOFT_CE_SHAPES = [(1, 1), (3, 10), (37, 64), (5, 65), (64, 100), (33, 1000), (7, 1025), (4, 3000), (10_000, 1000)]


def _soft_ce_inputs(B, C, K, dtype, weighted, seed, scale=2.0):
    logits = _randn((B, C), dtype, seed, scale=scale)
    target = _randn((B, C), dtype, seed + 1, scale=scale)
    g = torch.Generator().manual_seed(seed + 2)
    weights = (torch.rand(C, generator=g) + 0.05).to(DEVICE) if weighted else None
    classes = torch.randint(0, K, (B,), generator=g).to(DEVICE)
    return logits, target, weights, classes


def _check_soft_ce(got, want, dtype, K, B, C):
    names = ("loss", "grad_logits", "grad_target", "class_loss_sum", "class_count", "class_grad_norm")
    loss, gl, gt, cls_loss, count, norm = got
    assert loss.shape == () and gl.shape == (B, C) and gt.shape == (B, C)
    assert cls_loss.shape == (K,) and count.shape == (K,) and norm.shape == (K,)
    for t in (loss, gl, gt, cls_loss, norm):
        assert t.dtype == dtype and t.device.type == "cuda"
    assert torch.equal(count.cpu().long(), want[4]), "class_count"
    # natural sizes: a loss is O(1), a logit gradient O(1 / B) (C = 1 makes both exactly 0 in the reference)
    scales = {"loss": 1.0, "class_loss_sum": 1.0, "grad_logits": 1.0 / B, "grad_target": 1.0 / B,
              "class_grad_norm": 1.0 / B}
    for g, w, name in zip(got, want, names):
        if name != "class_count":
            _close(g, w, dtype, factor=4, name=name, scale=scales[name])


@pytest.mark.parametrize("B,C", SOFT_CE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_ce_stats(B, C, dtype, weighted):
    _need_cuda_kernel("soft_ce_stats")
    K = max(C, 2)
    logits, target, weights, classes = _soft_ce_inputs(B, C, K, dtype, weighted, seed=B + C)
    got = torch.ops.ltdd_fast.soft_ce_stats(logits, target, weights, classes, K)
    want = ref_soft_ce_stats(logits, target, weights, classes, K)
    _check_soft_ce(got, want, dtype, K, B, C)
    # the loss and both gradients are deterministic (the per-class statistics use atomics)
    again = torch.ops.ltdd_fast.soft_ce_stats(logits, target, weights, classes, K)
    for a, b in zip(got[:3], again[:3]):
        assert torch.equal(a, b)


def test_soft_ce_stats_matches_reference_loss_and_empty_classes():
    _need_cuda_kernel("soft_ce_stats")
    B, C, K = 50, 10, 13  # classes 10..12 never occur; num_classes independent of C
    logits, target, weights, classes = _soft_ce_inputs(B, C, 10, torch.float32, True, seed=60)
    got = torch.ops.ltdd_fast.soft_ce_stats(logits, target, weights, classes, K)
    _check_soft_ce(got, ref_soft_ce_stats(logits, target, weights, classes, K), torch.float32, K, B, C)
    torch.testing.assert_close(got[0], dam.soft_cross_entropy(logits, target, weights))
    assert torch.all(got[3][10:] == 0) and torch.all(got[4][10:] == 0) and torch.all(got[5][10:] == 0)


@pytest.mark.parametrize("C", [10, 100, 3000])
def test_soft_ce_stats_large_logits_stay_finite(C):
    """Softmaxes shifted by large offsets (and a near one-hot target): the online max keeps everything finite."""
    _need_cuda_kernel("soft_ce_stats")
    B = 16
    logits, target, weights, classes = _soft_ce_inputs(B, C, C, torch.float32, True, seed=70, scale=30.0)
    logits = logits + 5000.0
    target = target - 3000.0
    got = torch.ops.ltdd_fast.soft_ce_stats(logits, target, weights, classes, C)
    for t in got:
        assert torch.isfinite(t.double()).all()
    # the reference from shifted-back inputs (softmax is shift invariant; the shifted float32 values are exact)
    want = ref_soft_ce_stats(logits.double() - 5000.0, target.double() + 3000.0, weights, classes, C)
    _check_soft_ce(got, want, torch.float32, C, B, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_ce_stats_unaligned(dtype):
    _need_cuda_kernel("soft_ce_stats")
    B, C = 9, 77
    logits, target, weights, classes = _soft_ce_inputs(B, C, C, dtype, True, seed=80)
    logits, target = _misaligned(logits), _misaligned(target)
    got = torch.ops.ltdd_fast.soft_ce_stats(logits, target, weights, classes, C)
    _check_soft_ce(got, ref_soft_ce_stats(logits, target, weights, classes, C), dtype, C, B, C)


# ---- class_grad_stats ---------------------------------------------------------------------------------------

GRAD_SHAPES = [(1, 3, 32, 32), (10, 3, 32, 32), (1000, 3, 32, 32), (3, 7), (2, 3, 128, 128), (5, 1), (0, 3, 4)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_grad_stats(shape, dtype):
    _need_cuda_kernel("class_grad_stats")
    K = 10
    grads = _randn(shape, dtype, seed=sum(shape))
    g = torch.Generator().manual_seed(90)
    # skewed class draw, so some classes are empty and some hold many images
    classes = torch.minimum(torch.randint(0, K, (shape[0],), generator=g),
                            torch.randint(0, K, (shape[0],), generator=g)).to(DEVICE)
    norm_sum, norm_max = torch.ops.ltdd_fast.class_grad_stats(grads, classes, K)
    want_sum, want_max = ref_class_grad_stats(grads, classes, K)
    for got, want, name in ((norm_sum, want_sum, "norm_sum"), (norm_max, want_max, "norm_max")):
        assert got.dtype == dtype and got.shape == (K,) and got.device.type == "cuda"
        _close(got, want, dtype, factor=4, name=name)
    empty = torch.bincount(classes.cpu(), minlength=K) == 0
    assert torch.all(norm_sum.cpu()[empty] == 0) and torch.all(norm_max.cpu()[empty] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_class_grad_stats_unaligned(dtype):
    _need_cuda_kernel("class_grad_stats")
    grads = _misaligned(_randn((17, 3, 8, 8), dtype, seed=91))
    classes = torch.arange(17, device=DEVICE) % 4
    got = torch.ops.ltdd_fast.class_grad_stats(grads, classes, 4)
    for g, w, name in zip(got, ref_class_grad_stats(grads, classes, 4), ("norm_sum", "norm_max")):
        _close(g, w, dtype, factor=4, name=name)


# ---- class_feature_stats ------------------------------------------------------------------------------------

# [N, C] features (one value a plane), ConvNet feature maps at CIFAR sizes (planes of 256, 64 and 16 values), planes
# longer than a warp's loads, odd planes (scalar loads), one image, empty extents
FEATURE_SHAPES = [(500, 128), (7, 3), (256, 128, 16, 16), (500, 128, 8, 8), (64, 32, 4, 4), (3, 5, 96, 96),
                  (9, 6, 7, 7), (1, 3, 5), (0, 4, 2), (6, 0, 3), (6, 3, 0)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_feature_stats(shape, dtype):
    _need_cuda_kernel("class_feature_stats")
    K = 10
    features = _randn(shape, dtype, seed=sum(shape)) + 0.5
    g = torch.Generator().manual_seed(92)
    # skewed class draw, so some classes are empty and some hold many images
    classes = torch.minimum(torch.randint(0, K, (shape[0],), generator=g),
                            torch.randint(0, K, (shape[0],), generator=g)).to(DEVICE)
    got = torch.ops.ltdd_fast.class_feature_stats(features, classes, K)
    want = ref_class_feature_stats(features, classes, K)
    c = shape[1]
    # the statistics are summed in float (double for double) from the same rounded inputs as the reference
    rtol_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for a, w, name, out_shape in zip(got, want, ("count", "sum", "sumsq"), [(K,), (K, c), (K, c)]):
        assert a.dtype == _acc(dtype) and a.shape == out_shape and a.device.type == "cuda", (name, a.dtype, a.shape)
        _close(a, w, rtol_dtype, factor=4, name=name)
    assert torch.equal(got[0].double().cpu(), want[0])
    empty = torch.bincount(classes.cpu(), minlength=K) == 0
    assert torch.all(got[1].cpu()[empty] == 0) and torch.all(got[2].cpu()[empty] == 0)
    again = torch.ops.ltdd_fast.class_feature_stats(features, classes, K)  # no atomics: the same bits
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_class_feature_stats_unaligned_and_non_contiguous(dtype):
    _need_cuda_kernel("class_feature_stats")
    features = _misaligned(_randn((17, 3, 8, 8), dtype, seed=93))
    classes = torch.arange(17, device=DEVICE) % 4
    for x in (features, features.transpose(2, 3), features.permute(0, 2, 1, 3)):
        got = torch.ops.ltdd_fast.class_feature_stats(x, classes, 4)
        for a, w, name in zip(got, ref_class_feature_stats(x, classes, 4), ("count", "sum", "sumsq")):
            _close(a, w, torch.float32, factor=4, name=name)


def test_class_feature_stats_gradients_on_cuda():
    _need_cuda_kernel("class_feature_stats")
    features = _randn((5, 2, 3, 2), torch.float64, seed=94).requires_grad_()
    classes = torch.tensor([0, 2, 2, 1, 0], device=DEVICE)
    f = lambda x: ops.class_feature_stats(x, classes, 4, backend="native")[1:]  # noqa: E731
    assert torch.autograd.gradcheck(f, (features,))
    assert torch.autograd.gradgradcheck(f, (features,))
    torch.library.opcheck(torch.ops.ltdd_fast.class_feature_stats, (features, classes, 4))


# ---- scatter_add_rows_ --------------------------------------------------------------------------------------

SCATTER_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("row_shape", [(3, 8, 8), (10,), (5,), (1,), (3, 32, 32)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_rows(row_shape, dtype):
    _need_cuda_kernel("scatter_add_rows_")
    M, N = 50, 200  # every row index repeats about four times
    target = _randn((M, *row_shape), dtype, seed=100)
    src = _randn((N, *row_shape), dtype, seed=101)
    index = torch.randint(0, M, (N,), generator=torch.Generator().manual_seed(102)).to(DEVICE)
    want = ref_scatter_add_rows(target, index, src)
    out = torch.ops.ltdd_fast.scatter_add_rows_(target, index, src)
    assert out is None
    got = target.double().cpu()
    torch.testing.assert_close(got, want, rtol=SCATTER_TOL[dtype], atol=SCATTER_TOL[dtype] * want.abs().max().item())


def test_scatter_add_rows_all_to_one_row_and_empty():
    _need_cuda_kernel("scatter_add_rows_")
    target = torch.zeros(3, 10, device=DEVICE)
    src = _randn((1000, 10), torch.float32, seed=110)
    index = torch.full((1000,), 1, dtype=torch.long, device=DEVICE)
    torch.ops.ltdd_fast.scatter_add_rows_(target, index, src)
    torch.testing.assert_close(target[1].double().cpu(), src.double().cpu().sum(0), rtol=1e-5, atol=1e-3)
    assert torch.all(target[0] == 0) and torch.all(target[2] == 0)
    before = target.clone()
    torch.ops.ltdd_fast.scatter_add_rows_(target, index[:0], src[:0])
    assert torch.equal(target, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_add_rows_noncontiguous_and_unaligned(dtype):
    _need_cuda_kernel("scatter_add_rows_")
    base = _randn((20, 16), dtype, seed=120)
    target = base[:, ::2]  # not contiguous: accumulated in a copy and written back into base
    src = _misaligned(_randn((30, 8), dtype, seed=121))
    index = torch.randint(0, 20, (30,), generator=torch.Generator().manual_seed(122)).to(DEVICE)
    want = ref_scatter_add_rows(target, index, src)
    untouched = base[:, 1::2].clone()
    torch.ops.ltdd_fast.scatter_add_rows_(target, index, src)
    torch.testing.assert_close(base[:, ::2].double().cpu(), want, rtol=SCATTER_TOL[dtype],
                               atol=SCATTER_TOL[dtype] * want.abs().max().item())
    assert torch.equal(base[:, 1::2], untouched)


# ---- CPU parity, streams, CUDA graphs, errors ---------------------------------------------------------------


def _cases():
    """(op, args on CUDA) for every operator, float32."""
    theta, grad, gsum = (_randn(4099, torch.float32, s) for s in (130, 131, 132))
    alpha = torch.tensor(0.03, device=DEVICE)
    t0, tT, G, mask = _param_distance_inputs(4099, torch.float32, "bool", seed=133)
    logits, target, weights, classes = _soft_ce_inputs(40, 100, 100, torch.float32, True, seed=134)
    grads = _randn((12, 3, 8, 8), torch.float32, 135)
    gclasses = torch.arange(12, device=DEVICE) % 5
    features = _randn((24, 16, 6, 6), torch.float32, 136)
    fclasses = torch.arange(24, device=DEVICE) % 7
    return [
        ("student_sgd_step", (theta, grad, gsum, alpha, 100, 2000)),
        ("param_distance", (t0, tT, G, alpha, mask)),
        ("soft_ce_stats", (logits, target, weights, classes, 100)),
        ("class_grad_stats", (grads, gclasses, 5)),
        ("class_feature_stats", (features, fclasses, 8)),
    ]


def _to(x, device):
    return x.to(device) if torch.is_tensor(x) else x


@pytest.mark.parametrize("case", range(5))
def test_cuda_matches_cpu_kernel(case):
    op, args = _cases()[case]
    _need_cuda_kernel(op)
    if not _cpu_kernel(op):
        pytest.skip(f"no CPU kernel for {op} in this build")
    fn = getattr(torch.ops.ltdd_fast, op)
    got, want = fn(*args), fn(*(_to(a, "cpu") for a in args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (op, g.dtype, w.dtype, g.shape, w.shape)
        _close(g, w, torch.float32, factor=8, name=op)


def test_scatter_add_rows_matches_cpu_kernel():
    _need_cuda_kernel("scatter_add_rows_")
    if not _cpu_kernel("scatter_add_rows_"):
        pytest.skip("no CPU kernel for scatter_add_rows_ in this build")
    target = _randn((30, 3, 4, 4), torch.float32, 140)
    src = _randn((70, 3, 4, 4), torch.float32, 141)
    index = torch.randint(0, 30, (70,), generator=torch.Generator().manual_seed(142)).to(DEVICE)
    target_cpu = target.cpu()
    torch.ops.ltdd_fast.scatter_add_rows_(target, index, src)
    torch.ops.ltdd_fast.scatter_add_rows_(target_cpu, index.cpu(), src.cpu())
    _close(target, target_cpu, torch.float32, factor=8, name="scatter_add_rows_")


@pytest.mark.parametrize("case", range(5))
def test_side_stream_and_cuda_graph_capture(case):
    """Each op runs on the current stream and never synchronises (a sync or host copy fails graph capture)."""
    op, args = _cases()[case]
    _need_cuda_kernel(op)
    fn = getattr(torch.ops.ltdd_fast, op)
    want = fn(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = fn(*args)  # also the warm-up before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    for w, s, c in zip(want, on_side, captured):
        _close(s, w, torch.float32, name=f"{op} on a side stream")
        _close(c, w, torch.float32, name=f"{op} in a CUDA graph")


def test_bad_input_is_rejected_with_the_argument_named():
    for op in ("student_sgd_step", "param_distance", "soft_ce_stats", "class_grad_stats", "scatter_add_rows_",
               "class_feature_stats"):
        _need_cuda_kernel(op)
    L = torch.ops.ltdd_fast
    x = _randn(8, torch.float32, 150)
    a = torch.tensor(0.1, device=DEVICE)
    with pytest.raises(RuntimeError, match="student_sgd_step: theta must be 1-D"):
        L.student_sgd_step(x.view(2, 4), x.view(2, 4), x.view(2, 4), a, 0, 0)
    with pytest.raises(RuntimeError, match="frozen range"):
        L.student_sgd_step(x, x, x, a, 3, 9)
    with pytest.raises(RuntimeError, match="param_distance: mask must have theta_0's shape"):
        L.param_distance(x, x, x, a, torch.ones(7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(RuntimeError, match="must be on"):
        L.param_distance(x, x.cpu(), x, a, None)
    z = _randn((4, 5), torch.float32, 151)
    with pytest.raises(RuntimeError, match="soft_ce_stats: classes must be int64"):
        L.soft_ce_stats(z, z, None, torch.zeros(4, dtype=torch.int32, device=DEVICE), 5)
    with pytest.raises(RuntimeError, match="soft_ce_stats: class_weights must have shape"):
        L.soft_ce_stats(z, z, torch.ones(4, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE), 5)
    with pytest.raises(RuntimeError, match="class_grad_stats: classes must have shape"):
        L.class_grad_stats(z, torch.zeros(3, dtype=torch.long, device=DEVICE), 5)
    with pytest.raises(RuntimeError, match="class_feature_stats: classes must have shape"):
        L.class_feature_stats(z, torch.zeros(3, dtype=torch.long, device=DEVICE), 5)
    with pytest.raises(RuntimeError, match=r"class_feature_stats: features must be \[N, C, ...\], got 1-D"):
        L.class_feature_stats(x, torch.zeros(8, dtype=torch.long, device=DEVICE), 5)
    with pytest.raises(RuntimeError, match="class_feature_stats: classes must be int64"):
        L.class_feature_stats(z, torch.zeros(4, dtype=torch.int32, device=DEVICE), 5)
    with pytest.raises(RuntimeError, match="scatter_add_rows_: src must have shape"):
        L.scatter_add_rows_(z, torch.zeros(2, dtype=torch.long, device=DEVICE), _randn((2, 4), torch.float32, 152))

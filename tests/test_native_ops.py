"""The C++ operators param_distance, soft_ce_stats, class_grad_stats, scatter_add_rows_ and class_feature_stats against
their references."""
import pytest
import torch

from ltdd_fast import dam, ops
from ltdd_fast.ops import distance, feature_stats, grad_norms, scatter_rows, soft_ce

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="ltdd_fast._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16]
# relative error allowed against an fp64 reference computed from the same (rounded) inputs
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3}


def _randn(shape, dtype, g, scale=1.0):
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _close(got, want, dtype):
    """got (any dtype) against an fp64 want, errors measured against want's largest entry; the floor is the
    smallest subnormal of dtype (fp16's 6e-8: v of a 320k-parameter distance lives down there)."""
    want = want.double()
    tol, info = TOL[dtype], torch.finfo(dtype)
    floor = info.tiny * info.eps
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item() + floor)


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# ---- param_distance ------------------------------------------------------------------------------------


def _distance_inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta_0 = _randn(n, dtype, g)
    theta_T = (theta_0.double() + _randn(n, torch.float64, g, 0.1)).to(dtype)
    grad_sum = _randn(n, dtype, g, 2.0)
    return theta_0, theta_T, grad_sum, torch.tensor(0.03, dtype=dtype)


def _mask(kind, n, dtype=torch.float64):
    split = n * 9 // 10  # a backbone/classifier split as Expert Decoupling uses
    return {"none": None,
            "backbone": torch.arange(n) < max(1, split),
            "classifier": torch.arange(n) >= split,  # the backbone part all False
            "float": torch.linspace(0.5, 1.5, n, dtype=dtype)}[kind]


@pytest.mark.parametrize("n", [1, 7, 16_387, 320_010])
@pytest.mark.parametrize("mask_kind", ["none", "backbone", "classifier"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_param_distance_matches_reference(n, mask_kind, dtype):
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(n, dtype)
    mask = _mask(mask_kind, n)
    got = ops.param_distance(theta_0, theta_T, grad_sum, alpha, mask, backend="native")
    want = distance.reference(theta_0.double(), theta_T.double(), grad_sum.double(), alpha.double(), mask)
    for a, b, shape in zip(got, want, [(), (n,), ()]):
        assert a.dtype == dtype and a.shape == shape
        _close(a, b, dtype)
    if mask is not None:  # v is exactly zero outside the mask
        assert (got[1][~mask] == 0).all()


def test_param_distance_float_mask_and_threads():
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(50_001, torch.float64, seed=1)
    mask = _mask("float", 50_001)
    got = _with_threads(2, lambda: torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask))
    for a, b in zip(got, distance.reference(theta_0, theta_T, grad_sum, alpha, mask)):
        _close(a, b, torch.float64)
    # fixed chunks combined in order: the same bits on one thread
    one = _with_threads(1, lambda: torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask))
    for a, b in zip(got, one):
        assert torch.equal(a, b)


def test_param_distance_all_false_mask():
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(9, torch.float64)
    mask = torch.zeros(9, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask selects no parameter"):
        ops.param_distance(theta_0, theta_T, grad_sum, alpha, mask)
    # the raw operator follows the reference: 0/0
    assert torch.ops.ltdd_fast.param_distance(theta_0, theta_T, grad_sum, alpha, mask)[0].isnan()
    assert distance.reference(theta_0, theta_T, grad_sum, alpha, mask)[0].isnan()


@pytest.mark.parametrize("mask_kind", ["none", "backbone", "float"])
def test_param_distance_gradients(mask_kind):
    inputs = [t.requires_grad_() for t in _distance_inputs(33, torch.float64, seed=2)]
    mask = _mask(mask_kind, 33)
    grads = []
    for fn in (lambda *p: ops.param_distance(*p, mask, backend="native")[0],
               lambda *p: distance.reference(*p, mask)[0]):
        grads.append(torch.autograd.grad(3.0 * fn(*inputs), inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # v and d_alpha are exactly the loss's gradients w.r.t. grad_sum and alpha
    _, v, d_alpha = ops.param_distance(*inputs, mask, backend="native")
    assert not v.requires_grad and not d_alpha.requires_grad
    torch.testing.assert_close(v, grads[1][2] / 3)
    torch.testing.assert_close(d_alpha, grads[1][3] / 3)
    assert torch.autograd.gradcheck(lambda *p: torch.ops.ltdd_fast.param_distance(*p, mask)[0], inputs)


def test_param_distance_opcheck():
    theta_0, theta_T, grad_sum, _ = _distance_inputs(17, torch.float32, seed=3)
    for mask in (None, _mask("backbone", 17)):
        for requires_grad in (False, True):
            args = [t.clone().requires_grad_(requires_grad) for t in (theta_0, theta_T, grad_sum)]
            alpha = torch.tensor(0.1, requires_grad=requires_grad)
            torch.library.opcheck(torch.ops.ltdd_fast.param_distance, (*args, alpha, mask))


def test_param_distance_rejects_bad_input():
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(8, torch.float32)
    with pytest.raises(ValueError, match="theta_0 must be a flat 1-D"):
        ops.param_distance(theta_0.view(2, 4), theta_T, grad_sum, alpha)
    with pytest.raises(ValueError, match="theta_T must match theta_0"):
        ops.param_distance(theta_0, theta_T[:7], grad_sum, alpha)
    with pytest.raises(ValueError, match="grad_sum must match theta_0"):
        ops.param_distance(theta_0, theta_T, grad_sum.double(), alpha)
    with pytest.raises(ValueError, match="alpha must hold one value"):
        ops.param_distance(theta_0, theta_T, grad_sum, torch.ones(2))
    with pytest.raises(ValueError, match="mask must have theta_0's shape"):
        ops.param_distance(theta_0, theta_T, grad_sum, alpha, torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool or floating"):
        ops.param_distance(theta_0, theta_T, grad_sum, alpha, torch.ones(8, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="theta_T and grad_sum must have theta_0's shape"):
        torch.ops.ltdd_fast.param_distance(theta_0, theta_T[:7], grad_sum, alpha, None)


# ---- soft_ce_stats -------------------------------------------------------------------------------------


def _ce_inputs(b, c, dtype, weighted, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits, target = _randn((b, c), dtype, g, 2.0), _randn((b, c), dtype, g, 2.0)
    weights = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) if weighted else None
    # classes over c + 1 so that class c is always empty in the batch
    classes = torch.randint(0, c, (b,), generator=g)
    return logits, target, weights, classes, c + 1


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (500, 10), (64, 1000)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_ce_stats_matches_reference(shape, weighted, dtype):
    logits, target, weights, classes, k = _ce_inputs(*shape, dtype, weighted)
    got = ops.soft_ce_stats(logits, target, weights, classes, k, backend="native")
    want = soft_ce.reference(logits.double(), target.double(), None if weights is None else weights.double(),
                                   classes, k)
    b, c = shape
    shapes = [(), (b, c), (b, c), (k,), (k,), (k,)]
    for i, (a, w) in enumerate(zip(got, want)):
        assert a.shape == shapes[i] and a.dtype == (torch.int64 if i == 4 else dtype)
        if i == 4:
            assert torch.equal(a, w)
        else:
            _close(a, w, dtype)
    assert got[3][c] == 0 and got[4][c] == 0 and got[5][c] == 0  # the empty class


@pytest.mark.parametrize("weighted", [False, True])
def test_soft_ce_stats_gradients(weighted):
    logits, target, weights, classes, k = _ce_inputs(7, 5, torch.float64, weighted, seed=1)
    z, t = logits.requires_grad_(), target.requires_grad_()
    grads = []
    for fn in (lambda: ops.soft_ce_stats(z, t, weights, classes, k, backend="native")[0],
               lambda: dam.soft_cross_entropy(z, t, weights)):
        grads.append(torch.autograd.grad(2.5 * fn(), (z, t)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.ltdd_fast.soft_ce_stats(a, b, weights, classes, k)[0], (z, t))


def test_soft_ce_stats_opcheck():
    logits, target, weights, classes, k = _ce_inputs(6, 4, torch.float32, True, seed=2)
    for w in (None, weights):
        for requires_grad in (False, True):
            z, t = logits.clone().requires_grad_(requires_grad), target.clone().requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.ltdd_fast.soft_ce_stats, (z, t, w, classes, k))


def test_soft_ce_stats_rejects_bad_input():
    logits, target, weights, classes, k = _ce_inputs(4, 3, torch.float32, True)
    with pytest.raises(ValueError, match=r"logits must be \[B, C\]"):
        ops.soft_ce_stats(logits[:0], target[:0], weights, classes[:0], k)
    with pytest.raises(ValueError, match="target_logits must match logits"):
        ops.soft_ce_stats(logits, target[:, :2], weights, classes, k)
    with pytest.raises(ValueError, match="class_weights must be"):
        ops.soft_ce_stats(logits, target, weights[:2], classes, k)
    with pytest.raises(ValueError, match="classes must be an int64 tensor of shape"):
        ops.soft_ce_stats(logits, target, weights, classes.int(), k)
    with pytest.raises(ValueError, match="classes must lie in"):
        ops.soft_ce_stats(logits, target, weights, classes + 10, k)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ops.soft_ce_stats(logits, target, weights, classes, 0)
    with pytest.raises(RuntimeError, match=r"classes\[0\] = -1 is outside"):
        torch.ops.ltdd_fast.soft_ce_stats(logits, target, weights, torch.full((4,), -1), k)


def _extreme_rows(c, g):
    """[8, c] logits at the edges of exp's range, one kind per row (fp64)."""
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    one = torch.zeros(c, dtype=torch.float64)
    one[c // 3] = 1.0
    return torch.stack([80 * sign,  # +-80: e^(z - max z) down to e^-160, far below float's range
                        1e4 * one,  # one huge logit: every other exponential underflows to 0
                        -80 + 160 * one,  # -80 everywhere but one +80
                        30 * torch.randn(c, generator=g, dtype=torch.float64),  # wide: subnormal exponentials
                        3000 + torch.randn(c, generator=g, dtype=torch.float64),  # large offsets
                        -3000 + torch.randn(c, generator=g, dtype=torch.float64),
                        torch.randn(c, generator=g, dtype=torch.float64) - 1e4 * one,  # one hugely negative logit
                        torch.full((c,), 50.0, dtype=torch.float64)])  # all equal


@pytest.mark.parametrize("c", [3, 16, 17, 100])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_ce_stats_extreme_logits(c, weighted, dtype):
    """Extreme logits and targets, each row its own class: all outputs finite and close to the fp64 reference;
    per-row losses and norms to their own size, gradients row by row against the terms that cancel in them,
    (q_c s + w_c p_c) / B and p_c (w_c (-log q_c) + l) / B (tensor-wide errors would hide a small row's)."""
    g = torch.Generator().manual_seed(7)
    logits = _extreme_rows(c, g).to(dtype)
    target = _extreme_rows(c, g)[[2, 0, 3, 1, 5, 7, 4, 6]].to(dtype)  # each kind against another kind of row
    weights = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) if weighted else None
    b = logits.shape[0]
    classes = torch.arange(b)
    got = ops.soft_ce_stats(logits, target, weights, classes, b, backend="native")
    z, t = logits.double(), target.double()
    w = torch.ones(c, dtype=torch.float64) if weights is None else weights.double()
    want = soft_ce.reference(z, t, None if weights is None else w, classes, b)
    tol, info = TOL[dtype], torch.finfo(dtype)
    floor = info.tiny * info.eps
    for a in got:
        assert torch.isfinite(a).all()
    _close(got[0], want[0], dtype)
    assert torch.equal(got[4], want[4])
    for i in (3, 5):  # per-row loss and gradient norm
        torch.testing.assert_close(got[i].double(), want[i], rtol=tol, atol=floor)
    q, p, nlq = z.softmax(1), t.softmax(1), -z.log_softmax(1)
    s, l = (w * p).sum(1, keepdim=True), (w * p * nlq).sum(1, keepdim=True)
    for i, scale in ((1, (q * s + w * p) / b), (2, p * (w * nlq + l) / b)):
        err = (got[i].double() - want[i]).abs()
        assert (err <= tol * scale.amax(1, keepdim=True) + floor).all(), (i, (err / scale.amax(1, keepdim=True)).max())


# ---- class_grad_stats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (37, 1, 8, 8), (1, 3, 5, 7), (37, 3, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_grad_stats_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    grads = _randn(shape, dtype, g)
    classes = torch.randint(0, 4, (shape[0],), generator=g)  # class 4 is always empty
    got = ops.class_grad_stats(grads, classes, 5, backend="native")
    want = grad_norms.reference(grads.double(), classes, 5)
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == (5,)
        _close(a, b, dtype)
    assert got[0][4] == 0 and got[1][4] == 0


def test_class_grad_stats_opcheck_and_bad_input():
    grads, classes = torch.randn(6, 2, 3), torch.tensor([0, 2, 2, 1, 0, 2])
    torch.library.opcheck(torch.ops.ltdd_fast.class_grad_stats, (grads, classes, 4))
    with pytest.raises(ValueError, match="grads must be a floating point"):
        ops.class_grad_stats(grads.long(), classes, 4)
    with pytest.raises(ValueError, match=r"classes must be an int64 tensor of shape \(6,\)"):
        ops.class_grad_stats(grads, classes[:5], 4)
    with pytest.raises(ValueError, match="classes must lie in"):
        ops.class_grad_stats(grads, classes, 2)
    with pytest.raises(RuntimeError, match="is outside"):
        torch.ops.ltdd_fast.class_grad_stats(grads, classes, 2)


# ---- scatter_add_rows_ ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,n", [((6, 1), 9), ((5, 3, 4), 12), ((50, 3072), 200), ((3, 10), 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_rows_matches_reference(shape, n, dtype):
    g = torch.Generator().manual_seed(0)
    target = _randn(shape, dtype, g)
    index = torch.randint(0, shape[0], (n,), generator=g)
    if n:
        index[: n // 2] = index[0]  # many repeats of one row
    src = _randn((n, *shape[1:]), dtype, g)
    out = target.clone()
    assert ops.scatter_add_rows_(out, index, src, backend="native") is out
    want = scatter_rows.reference(target.double(), index, src.double())
    tol = TOL[dtype] * max(n, 1)  # rows added one at a time in dtype: error grows with the repeats
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_scatter_add_rows_non_contiguous_threads_and_reference_backend():
    target, index = torch.randn(8, 40, dtype=torch.float64), torch.tensor([1, 7, 1, 1, 0])
    out, src_t = target.clone().t(), torch.randn(5, 8, dtype=torch.float64)  # a [40, 8] view, not contiguous
    ops.scatter_add_rows_(out, index, src_t, backend="native")
    torch.testing.assert_close(out, scatter_rows.reference(target.t(), index, src_t))
    # columns split over threads: the same bits on one thread and on two
    big_t, big_i, big_s = torch.randn(64, 4096), torch.randint(0, 64, (300,)), torch.randn(300, 4096)
    two, one = big_t.clone(), big_t.clone()
    _with_threads(2, lambda: torch.ops.ltdd_fast.scatter_add_rows_(two, big_i, big_s))
    _with_threads(1, lambda: torch.ops.ltdd_fast.scatter_add_rows_(one, big_i, big_s))
    assert torch.equal(two, one)
    ref, src = target.clone(), torch.randn(5, 40, dtype=torch.float64)
    ops.scatter_add_rows_(ref, index, src, backend="reference")
    torch.testing.assert_close(ref, target.index_add(0, index, src))


def test_scatter_add_rows_opcheck_and_bad_input():
    target, index, src = torch.randn(4, 3), torch.tensor([0, 3, 3]), torch.randn(3, 3)
    torch.library.opcheck(torch.ops.ltdd_fast.scatter_add_rows_, (target.clone(), index, src))
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        ops.scatter_add_rows_(target, index.int(), src)
    with pytest.raises(ValueError, match=r"src must be \(3, 3\)"):
        ops.scatter_add_rows_(target, index, src[:, :2])
    with pytest.raises(ValueError, match=r"index must lie in \[0, 4\)"):
        ops.scatter_add_rows_(target, index + 2, src)
    before = target.clone()
    with pytest.raises(RuntimeError, match=r"index\[1\] = 5 is outside"):
        torch.ops.ltdd_fast.scatter_add_rows_(target, index + 2, src)
    assert torch.equal(target, before)  # a bad index is caught before any row is written


def test_auto_backend_picks_native_and_reference_agrees():
    logits, target, weights, classes, k = _ce_inputs(9, 4, torch.float64, True, seed=5)
    for a, b in zip(ops.soft_ce_stats(logits, target, weights, classes, k),
                    ops.soft_ce_stats(logits, target, weights, classes, k, backend="reference")):
        torch.testing.assert_close(a, b)
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(20, torch.float64)
    for a, b in zip(ops.param_distance(theta_0, theta_T, grad_sum, 0.03),
                    ops.param_distance(theta_0, theta_T, grad_sum, alpha, backend="reference")):
        torch.testing.assert_close(a, b)


# ---- class_feature_stats -------------------------------------------------------------------------------

FEATURE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# [N, C] features, image-shaped ones, a 1-D spatial axis, one image, planes longer than the kernel's lane block
FEATURE_SHAPES = [(1, 3), (37, 5), (300, 70), (1, 4, 5, 7), (37, 3, 5, 7), (20, 2, 16, 16), (6, 3, 33), (4, 2, 1, 1)]


def _feature_inputs(shape, dtype, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    classes = torch.randint(0, k, (shape[0],), generator=g)
    return features, classes


def _two_pass(features, classes, k):
    """(count, sum, sumsq) class by class in float64: each class's images as [C, n_c * positions]."""
    n, c = features.shape[:2]
    x = features.double()
    count, total, total_sq = torch.zeros(k, dtype=torch.float64), torch.zeros(k, c, dtype=torch.float64), \
        torch.zeros(k, c, dtype=torch.float64)
    for cls in range(k):
        rows = x[classes == cls].transpose(0, 1).reshape(c, -1)
        count[cls] = rows.shape[1]
        total[cls] = rows.sum(1)
        total_sq[cls] = (rows * rows).sum(1)
    return count, total, total_sq


def _check_feature_stats(got, want, dtype, k, c):
    """got (in dtype's accumulation type) against float64 want; counts exactly, sums to FEATURE_TOL of the
    output's largest entry."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, b, shape in zip(("count", "sum", "sumsq"), got, want, [(k,), (k, c), (k, c)]):
        assert a.dtype == acc and a.shape == shape, (name, a.dtype, a.shape)
        scale = b.abs().max().item() if b.numel() else 0.0
        tol = FEATURE_TOL[dtype]
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{name} ({dtype}): {m}")
    assert torch.equal(got[0].double(), want[0].double())


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16], ids=str)
def test_class_feature_stats_matches_reference(shape, dtype):
    features, classes = _feature_inputs(shape, dtype)
    k = 5  # class 4 is always empty
    got = ops.class_feature_stats(features, classes, k, backend="native")
    want = feature_stats.reference(features.double(), classes, k)
    _check_feature_stats(got, want, dtype, k, shape[1])
    assert (got[0][4] == 0).item() and (got[1][4] == 0).all() and (got[2][4] == 0).all()
    positions = features[0, 0].numel()
    assert torch.equal(got[0], torch.bincount(classes, minlength=k).to(got[0].dtype) * positions)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (5, 0, 4), (5, 3, 0, 2)], ids=str)
def test_class_feature_stats_empty_extents(shape):
    features, classes = _feature_inputs(shape, torch.float32, k=3)
    got = ops.class_feature_stats(features, classes, 3, backend="native")
    _check_feature_stats(got, feature_stats.reference(features.double(), classes, 3), torch.float32, 3, shape[1])
    assert not got[1].any() and not got[2].any()


@pytest.mark.parametrize("shape", [(2, 3), (9, 4, 3, 5), (7, 3, 6)], ids=str)
def test_class_feature_stats_reference_is_the_two_pass_statistics(shape):
    features, classes = _feature_inputs(shape, torch.float64, k=3, seed=1)
    want = _two_pass(features, classes, 4)
    for backend in ("reference", "native"):
        got = ops.class_feature_stats(features, classes, 4, backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the batch-norm statistics they give: each class's per-channel mean and (biased) variance
    count, total, total_sq = ops.class_feature_stats(features, classes, 4, backend="native")
    for cls in range(3):
        rows = features[classes == cls].transpose(0, 1).reshape(shape[1], -1)
        if rows.shape[1]:
            mean = total[cls] / count[cls]
            torch.testing.assert_close(mean, rows.mean(1))
            torch.testing.assert_close(total_sq[cls] / count[cls] - mean ** 2, rows.var(1, correction=0))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_class_feature_stats_of_a_split_batch_add_up(backend):
    features, classes = _feature_inputs((11, 3, 4, 2), torch.float64, k=4, seed=2)
    whole = ops.class_feature_stats(features, classes, 4, backend=backend)
    for m in (0, 1, 5, 10, 11):
        first = ops.class_feature_stats(features[:m], classes[:m], 4, backend=backend)
        second = ops.class_feature_stats(features[m:], classes[m:], 4, backend=backend)
        for w, a, b in zip(whole, first, second):
            torch.testing.assert_close(a + b, w, rtol=1e-12, atol=1e-12)
    # and whatever the order of the images
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    for w, a in zip(whole, ops.class_feature_stats(features[perm], classes[perm], 4, backend=backend)):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 40, 9, 9), (2000, 77), (16, 33, 100)], ids=str)
def test_class_feature_stats_deterministic_on_any_thread_count(shape):
    features, classes = _feature_inputs(shape, torch.float32, k=7, seed=4)
    op = torch.ops.ltdd_fast.class_feature_stats
    two = _with_threads(2, lambda: op(features, classes, 7))
    one = _with_threads(1, lambda: op(features, classes, 7))
    again = _with_threads(2, lambda: op(features, classes, 7))
    for a, b, c in zip(two, one, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("shape", [(6, 3), (5, 2, 3, 2)], ids=str)
def test_class_feature_stats_gradients(backend, shape):
    features, _ = _feature_inputs(shape, torch.float64, seed=5)
    features.requires_grad_()
    classes = torch.tensor([0, 2, 2, 1, 0, 2][:shape[0]])  # class 3 is empty

    def f(x):
        return ops.class_feature_stats(x, classes, 4, backend=backend)[1:]
    assert torch.autograd.gradcheck(f, (features,))
    assert torch.autograd.gradgradcheck(f, (features,))
    # the formula: d_sum[classes[n], ch] + 2 x d_sumsq[classes[n], ch]
    g = torch.Generator().manual_seed(6)
    d_sum, d_sumsq = torch.randn(4, shape[1], generator=g, dtype=torch.float64), \
        torch.randn(4, shape[1], generator=g, dtype=torch.float64)
    s, q = f(features)
    grad, = torch.autograd.grad((s * d_sum).sum() + (q * d_sumsq).sum(), features)
    view = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    want = d_sum[classes].view(view) + 2 * features.detach() * d_sumsq[classes].view(view)
    torch.testing.assert_close(grad, want.expand(shape))
    # one output used (the other's gradient never comes), and the count, which is not differentiable
    grad, = torch.autograd.grad(f(features)[0].sum(), features)
    torch.testing.assert_close(grad, torch.ones_like(features))
    assert not ops.class_feature_stats(features, classes, 4, backend=backend)[0].requires_grad


def test_class_feature_stats_low_precision_gradient_dtype():
    features, classes = _feature_inputs((4, 3, 2, 2), torch.float16, seed=7)
    features.requires_grad_()
    _, s, q = ops.class_feature_stats(features, classes, 4, backend="native")
    grad, = torch.autograd.grad(s.sum() + q.sum(), features)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad.double(), 1 + 2 * features.detach().double(), rtol=1e-3, atol=1e-3)


def test_class_feature_stats_opcheck():
    for shape in ((6, 4), (6, 3, 2, 5)):
        for dtype, requires_grad in ((torch.float32, False), (torch.float64, True), (torch.float16, False)):
            features, classes = _feature_inputs(shape, dtype, seed=8)
            features.requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.ltdd_fast.class_feature_stats, (features, classes, 5))


def test_class_feature_stats_rejects_bad_input():
    features, classes = _feature_inputs((6, 3, 2, 2), torch.float32, seed=9)
    with pytest.raises(ValueError, match=r"classes must be an int64 tensor of shape \(6,\)"):
        ops.class_feature_stats(features, classes.int(), 4)
    with pytest.raises(ValueError, match=r"classes must be an int64 tensor of shape \(6,\)"):
        ops.class_feature_stats(features, classes[:5], 4)
    with pytest.raises(ValueError, match=r"classes must be an int64 tensor of shape \(6,\)"):
        ops.class_feature_stats(features, classes.view(2, 3), 4)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 2\)"):
        ops.class_feature_stats(features, torch.tensor([0, 1, 2, 0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 4\)"):
        ops.class_feature_stats(features, torch.tensor([0, 1, -1, 0, 1, 1]), 4)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ops.class_feature_stats(features, classes, 0)
    with pytest.raises(ValueError, match=r"features must be a floating point \[N, C, ...\] tensor, got torch.int64"):
        ops.class_feature_stats(features.long(), classes, 4)
    with pytest.raises(ValueError, match=r"features must be a floating point \[N, C, ...\] tensor, got .* \(6,\)"):
        ops.class_feature_stats(features[:, 0, 0, 0], classes, 4)
    # the kernel's own checks, for callers of torch.ops.ltdd_fast directly
    for args, message in (((features, torch.tensor([0, 1, 7, 0, 1, 1]), 4), r"classes\[2\] = 7 is outside \[0, 4\)"),
                          ((features, classes.int(), 4), "classes must be int64"),
                          ((features.long(), classes, 4), "features must be floating point"),
                          ((features[:, 0, 0, 0], classes, 4), r"features must be \[N, C, ...\], got 1-D")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.ltdd_fast.class_feature_stats(*args)


# ---- the CUDA bindings' C++ signatures ---------------------------------------------------------------------------


def _signature(source, function):
    """'return type (parameter types)' of a function defined at column 0 in C++ source text, names dropped."""
    import re

    at = source.index(f" {function}(")
    start = source.rindex("\n", 0, at) + 1
    while source[start].isspace():  # a return type wrapped onto the line before
        start = source.rindex("\n", 0, start - 1) + 1
    params = source[at + len(function) + 2: source.index(")", at)]
    # c10::optional is std::optional (an alias since torch 2.4)
    types = [re.sub(r"\s*\b\w+$", "", " ".join(p.split())).replace("c10::optional", "std::optional")
             for p in params.split(",") if p.strip()]
    # commas inside template arguments split a type: glue the pieces back where <> are unbalanced
    glued = []
    for t in types:
        if glued and glued[-1].count("<") > glued[-1].count(">"):
            glued[-1] += ", " + t
        else:
            glued.append(t)
    return " ".join(source[start:at].split()), glued


def test_cuda_bindings_have_the_cpu_kernels_signatures():
    """The dispatcher refuses two C++ signatures for one operator when the library loads, so a CUDA binding whose
    signature differs from the CPU kernel's breaks every CUDA build at import, which nvcc's compile check cannot
    see (it happened: scatter_add_rows_ took `Tensor&` on CUDA and `const Tensor&` on the CPU)."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    bindings = (csrc / "cuda" / "bindings.cpp").read_text()
    cpu = "\n".join(p.read_text() for p in sorted((csrc / "cpu").glob("*.cpp")))
    for op in ("student_sgd_step", "param_distance", "soft_ce_stats", "class_grad_stats", "scatter_add_rows_",
               "class_feature_stats"):
        name = op.rstrip("_")
        cuda_sig, cpu_sig = _signature(bindings, f"{name}_cuda"), _signature(cpu, f"{name}_cpu")
        assert cuda_sig == cpu_sig, (op, cuda_sig, cpu_sig)
        assert cpu_sig[1], (op, cpu_sig)  # parameters found

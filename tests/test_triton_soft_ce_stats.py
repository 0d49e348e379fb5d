"""ltdd_triton::soft_ce_stats (kernels/soft_ce_stats.py) against soft_ce.reference computed in fp64.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (one numpy program per grid point), so
batches stay small except in one test; on a GPU the same tests run on cuda tensors, bf16 included.
"""
import pytest
import torch

from ltdd_fast import dam

from triton_setup import DEVICE, DTYPES  # noqa: E402 - skips this module without Triton

from ltdd_fast.kernels import soft_ce_stats as triton_soft_ce  # noqa: E402
from ltdd_fast.ops import soft_ce
# (rtol, atol as a fraction of the reference output's largest magnitude): the outputs are rounded to the dtype
TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-5, 2e-6), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (1.6e-2, 8e-3)}
BIG_C = triton_soft_ce.MAX_BLOCK_C + 904  # more columns than one chunk: the three-pass path
NAMES = ("loss", "grad_logits", "grad_target", "class_loss_sum", "class_count", "class_grad_norm")

op = torch.ops.ltdd_triton.soft_ce_stats


def make_inputs(b, c, k, dtype, weighted, seed=0, scale=3.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, c, generator=g) * scale + offset).to(dtype)
    t = (torch.randn(b, c, generator=g) * scale).to(dtype)
    w = (torch.rand(c, generator=g) + 0.1).to(dtype) if weighted else None
    classes = torch.randint(0, k, (b,), generator=g)
    return [x.to(DEVICE) if x is not None else None for x in (z, t, w, classes)]


def reference_fp64(z, t, w, classes, k):
    """The reference on the same rounded inputs, in fp64."""
    return soft_ce.reference(z.double(), t.double(), None if w is None else w.double(), classes, k)


def error_scales(z, t, w, ref):
    """The magnitude each output's rounding error is relative to. The gradients are differences of larger terms
    (grad_logits = (q S - w p) / B with both terms at most max w / B; grad_target = p (w a - l) / B with both
    terms at most the row loss l / B), which cancel when the target is peaked, so their scale is the terms'."""
    b = z.shape[0]
    z, t = z.double(), t.double()
    w_max = 1.0 if w is None else float(w.double().max())
    per_class = -torch.softmax(t, 1) * torch.log_softmax(z, 1) * (1.0 if w is None else w.double())
    return {"loss": float(ref[0].abs()), "grad_logits": w_max / b, "grad_target": float(per_class.sum(1).max()) / b,
            "class_loss_sum": float(ref[3].abs().max()), "class_grad_norm": float(ref[5].abs().max())}


def check(z, t, w, classes, k, dtype, out=None):
    """Runs the op (unless out is given) and compares every output with the fp64 reference; returns the largest
    error of each output relative to its scale."""
    out = op(z, t, w, classes, k) if out is None else out
    ref = reference_fp64(z, t, w, classes, k)
    scales = error_scales(z, t, w, ref)
    rtol, atol_rel = TOL[dtype]
    errors = {}
    for name, o, r in zip(NAMES, out, ref):
        r = r.detach()
        assert o.shape == r.shape, (name, o.shape, r.shape)
        assert o.device.type == DEVICE, name
        if name == "class_count":
            assert o.dtype == torch.int64
            assert torch.equal(o, r), name
            continue
        assert o.dtype == dtype, (name, o.dtype)
        torch.testing.assert_close(o.double(), r, rtol=rtol, atol=atol_rel * scales[name],
                                   msg=lambda m: f"{name} ({dtype}): {m}")
        errors[name] = float((o.double() - r).abs().max()) / max(scales[name], 1e-300)
    return errors


# (B, C, K): one row, one column, K > C (empty classes), a wide row with a small batch, rows wider than a chunk
SHAPES = [(1, 1, 1), (1, 10, 10), (5, 10, 10), (3, 10, 25), (2, 1000, 1000), (2, BIG_C, 7), (3, 37, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w"])
@pytest.mark.parametrize("b,c,k", SHAPES)
def test_matches_reference(b, c, k, weighted, dtype):
    z, t, w, classes = make_inputs(b, c, k, dtype, weighted)
    check(z, t, w, classes, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_batch(dtype):
    # the one test with many rows: several row tiles on a GPU, a tall tile under the interpreter
    z, t, w, classes = make_inputs(300, 10, 10, dtype, True, seed=1)
    check(z, t, w, classes, 10, dtype)


def test_many_classes_on_the_gpu_tiles(monkeypatch):
    """1000 classes split as on a GPU (8 classes a program, 125 programs; run here under the interpreter if that
    is where the tests run), with the rows more than one chunk: statistics as the reference."""
    from ltdd_fast.kernels import _class_reduce
    monkeypatch.setattr(_class_reduce, "INTERPRET", False)
    assert _class_reduce.tiles(1200, 1000, False) == (8, 512)
    z, t, w, classes = make_inputs(1200, 6, 1000, torch.float32, True, seed=6)
    check(z, t, w, classes, 1000, torch.float32)


def test_widest_rows():
    # C = 50,000 (the largest the op is meant for), one row and a few
    for b in (1, 3):
        z, t, w, classes = make_inputs(b, 50_000, 4, torch.float32, True, seed=2)
        check(z, t, w, classes, 4, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c", [10, BIG_C])
def test_large_logits_stay_finite(c, dtype):
    # logits around 1e3: the softmaxes must subtract the row max (one-chunk and online paths)
    z, t, w, classes = make_inputs(2, c, 3, dtype, True, seed=3, scale=20.0, offset=1000.0)
    out = op(z, t, w, classes, 3)
    assert all(bool(torch.isfinite(o).all()) for o in out)
    check(z, t, w, classes, 3, dtype, out=out)


def test_empty_classes_give_zero():
    z, t, w, _ = make_inputs(4, 10, 10, torch.float32, True)
    classes = torch.tensor([0, 3, 3, 9], device=DEVICE)
    _, _, _, loss_sum, count, grad_norm = op(z, t, w, classes, 12)
    empty = torch.ones(12, dtype=torch.bool, device=DEVICE)
    empty[classes] = False
    assert torch.equal(count, torch.tensor([1, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0], device=DEVICE))
    assert bool((loss_sum[empty] == 0).all()) and bool((grad_norm[empty] == 0).all())
    assert bool((loss_sum[~empty] > 0).all()) and bool((grad_norm[~empty] > 0).all())


@pytest.mark.parametrize("b,c,k", [(5, 10, 7), (3, BIG_C, 4)])
def test_deterministic(b, c, k):
    z, t, w, classes = make_inputs(b, c, k, torch.float32, True, seed=4)
    first = op(z, t, w, classes, k)
    second = op(z, t, w, classes, k)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), name


def test_loss_matches_soft_cross_entropy():
    # the op's loss is the plain DAM loss of the reference
    z, t, w, classes = make_inputs(4, 10, 10, torch.float64, True, seed=5)
    loss = op(z, t, w, classes, 10)[0]
    torch.testing.assert_close(loss, dam.soft_cross_entropy(z, t, w), rtol=1e-12, atol=0)


@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w"])
def test_opcheck(weighted):
    z, t, w, classes = make_inputs(3, 10, 12, torch.float32, weighted, seed=6)
    # autograd is registered by ltdd_fast.ops, not by the kernel module
    torch.library.opcheck(op, (z, t, w, classes, 12), test_utils=("test_schema", "test_faketensor"))


def test_schema_matches_native():
    schema = str(op.default._schema)
    assert schema == ("ltdd_triton::soft_ce_stats(Tensor logits, Tensor target_logits, Tensor? class_weights, "
                      "Tensor classes, int num_classes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def test_bad_input_names_the_argument():
    z, t, w, classes = make_inputs(3, 10, 10, torch.float32, True)
    with pytest.raises(ValueError, match="target_logits"):
        op(z, t[:, :5], w, classes, 10)
    with pytest.raises(ValueError, match="class_weights"):
        op(z, t, w[:5], classes, 10)
    with pytest.raises(ValueError, match="classes"):
        op(z, t, w, classes.int(), 10)
    with pytest.raises(ValueError, match="logits"):
        op(z[:0], t[:0], w, classes[:0], 10)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"classes must lie in \[0, 10\)"):
            op(z, t, w, torch.tensor([0, 10, 1], device=DEVICE), 10)

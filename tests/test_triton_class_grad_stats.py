"""ltdd_triton::class_grad_stats (kernels/class_grad_stats.py) against grad_norms.reference in fp64.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (one numpy program per grid point), so
batches stay small except in one test; on a GPU the same tests run on cuda tensors, bf16 included.
"""
import pytest
import torch


from triton_setup import DEVICE, DTYPES  # noqa: E402 - skips this module without Triton

from ltdd_fast.kernels import class_grad_stats as triton_class_grad_stats  # noqa: E402
from ltdd_fast.ops import grad_norms
# (rtol, atol as a fraction of the reference output's largest value): the outputs are rounded to the dtype
TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (1.6e-2, 8e-3)}
BIG_D = triton_class_grad_stats.MAX_BLOCK_D + 905  # more entries per image than one chunk

op = torch.ops.ltdd_triton.class_grad_stats


def make_inputs(shape, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(shape, generator=g).to(dtype)
    classes = torch.randint(0, k, (shape[0],), generator=g)
    return grads.to(DEVICE), classes.to(DEVICE)


def check(grads, classes, k, dtype):
    """Runs the op and compares both outputs with the reference in fp64 on the same rounded grads; returns the
    largest error of each relative to the output's largest value."""
    out = op(grads, classes, k)
    ref = grad_norms.reference(grads.double(), classes, k)
    rtol, atol_rel = TOL[dtype]
    errors = {}
    for name, o, r in zip(("norm_sum", "norm_max"), out, ref):
        assert o.shape == (k,) and o.dtype == dtype and o.device.type == DEVICE, (name, o.shape, o.dtype)
        scale = float(r.abs().max())
        torch.testing.assert_close(o.double(), r, rtol=rtol, atol=atol_rel * scale,
                                   msg=lambda m: f"{name} ({dtype}): {m}")
        errors[name] = float((o.double() - r).abs().max()) / max(scale, 1e-300)
    return errors


# (shape, K): one image, images of one value, image-shaped grads, K much larger than N (empty classes), images
# wider than one chunk, an empty image
SHAPES = [((1,), 1), ((1, 5), 3), ((6,), 4), ((5, 3, 4, 4), 10), ((3, 7), 40), ((3, BIG_D), 2), ((4, 3, 5, 7), 3),
          ((3, 0), 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", SHAPES, ids=str)
def test_matches_reference(shape, k, dtype):
    grads, classes = make_inputs(shape, k, dtype)
    check(grads, classes, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_batch(dtype):
    # the one test with many images: CIFAR-shaped gradients of a synthetic batch
    grads, classes = make_inputs((100, 3, 32, 32), 10, dtype, seed=1)
    check(grads, classes, 10, dtype)


def test_many_classes_on_the_gpu_tiles(monkeypatch):
    """100 classes split as on a GPU (4 classes a program; run here under the interpreter if that is where the
    tests run), the images more than one chunk: sums and maxima as the reference."""
    from ltdd_fast.kernels import _class_reduce
    monkeypatch.setattr(_class_reduce, "INTERPRET", False)
    assert _class_reduce.tiles(1100, 100, False) == (4, 1024)
    grads, classes = make_inputs((1100, 3), 100, torch.float32, seed=7)
    check(grads, classes, 100, torch.float32)


def test_empty_classes_give_zero():
    grads, _ = make_inputs((4, 3, 8, 8), 10, torch.float32)
    classes = torch.tensor([2, 2, 5, 0], device=DEVICE)
    norm_sum, norm_max = op(grads, classes, 8)
    empty = torch.ones(8, dtype=torch.bool, device=DEVICE)
    empty[classes] = False
    assert bool((norm_sum[empty] == 0).all()) and bool((norm_max[empty] == 0).all())
    assert bool((norm_sum[~empty] > 0).all()) and bool((norm_max[~empty] > 0).all())
    norms = grads.double().flatten(1).norm(dim=1)
    torch.testing.assert_close(norm_max[2].double(), norms[:2].max(), rtol=1e-6, atol=0)


def test_no_images():
    grads = torch.zeros(0, 3, 4, device=DEVICE)
    norm_sum, norm_max = op(grads, torch.zeros(0, dtype=torch.int64, device=DEVICE), 5)
    assert torch.equal(norm_sum, torch.zeros(5, device=DEVICE)) and torch.equal(norm_max, torch.zeros(5, device=DEVICE))


def test_non_contiguous_grads():
    grads, classes = make_inputs((6, 5, 4), 3, torch.float32, seed=2)
    check(grads.transpose(1, 2), classes, 3, torch.float32)


@pytest.mark.parametrize("shape,k", [((5, 3, 4, 4), 7), ((3, BIG_D), 2)], ids=str)
def test_deterministic(shape, k):
    grads, classes = make_inputs(shape, k, torch.float32, seed=3)
    first, second = op(grads, classes, k), op(grads, classes, k)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_nan_shows_in_both_statistics():
    grads, _ = make_inputs((3, 4), 2, torch.float32)
    grads[1, 2] = float("nan")
    norm_sum, norm_max = op(grads, torch.tensor([0, 1, 1], device=DEVICE), 2)
    assert bool(torch.isfinite(norm_sum[0])) and bool(torch.isnan(norm_sum[1])) and bool(torch.isnan(norm_max[1]))


def test_opcheck():
    grads, classes = make_inputs((4, 3, 5), 6, torch.float32, seed=4)
    # a statistic: no autograd formula, so only the schema and the fake kernel are checked
    torch.library.opcheck(op, (grads, classes, 6), test_utils=("test_schema", "test_faketensor"))


def test_schema_matches_native():
    assert str(op.default._schema) == ("ltdd_triton::class_grad_stats(Tensor grads, Tensor classes, "
                                       "int num_classes) -> (Tensor, Tensor)")


def test_bad_input_names_the_argument():
    grads, classes = make_inputs((3, 4), 3, torch.float32)
    with pytest.raises(ValueError, match="grads"):
        op(grads.long(), classes, 3)
    with pytest.raises(ValueError, match="classes"):
        op(grads, classes[:2], 3)
    with pytest.raises(ValueError, match="num_classes"):
        op(grads, classes, 0)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\)"):
            op(grads, torch.tensor([0, -1, 2], device=DEVICE), 3)

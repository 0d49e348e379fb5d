"""ltdd_triton::class_feature_stats (kernels/class_feature_stats.py) against feature_stats.reference in fp64.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (one numpy program per grid point), so
batches stay small except in one test; on a GPU the same tests run on cuda tensors, bf16 included.
"""
import pytest
import torch


from triton_setup import DEVICE, DTYPES  # noqa: E402 - skips this module without Triton

from ltdd_fast import ops  # noqa: E402
from ltdd_fast.kernels import class_feature_stats as triton_class_feature_stats  # noqa: E402
from ltdd_fast.ops import feature_stats
# (rtol, atol as a fraction of the reference output's largest value): the outputs are in the accumulation type
# (fp32 for fp32, fp16 and bf16 inputs, summed from the same rounded inputs as the fp64 reference)
TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6),
       torch.bfloat16: (1e-5, 1e-6)}
BIG_P = triton_class_feature_stats.MAX_BLOCK_P + 905  # more positions per plane than one chunk

op = torch.ops.ltdd_triton.class_feature_stats


def make_inputs(shape, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(shape, generator=g) + 0.5).to(dtype)
    classes = torch.randint(0, k, (shape[0],), generator=g)
    return features.to(DEVICE), classes.to(DEVICE)


def check(features, classes, k, dtype):
    """Runs the op and compares its outputs with the reference in fp64 on the same rounded features (counts
    exactly)."""
    out = op(features, classes, k)
    ref = feature_stats.reference(features.double(), classes, k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol_rel = TOL[dtype]
    c = features.shape[1]
    for name, o, r, shape in zip(("count", "sum", "sumsq"), out, ref, [(k,), (k, c), (k, c)]):
        assert o.shape == shape and o.dtype == acc and o.device.type == DEVICE, (name, o.shape, o.dtype)
        scale = float(r.abs().max()) if r.numel() else 0.0
        torch.testing.assert_close(o.double(), r, rtol=rtol, atol=atol_rel * scale,
                                   msg=lambda m: f"{name} ({dtype}): {m}")
    assert torch.equal(out[0].double(), ref[0])
    return out


# (shape, K): [N, C] features, one image, image-shaped features, K much larger than N (empty classes), planes
# longer than one chunk, more images than one chunk, a 1-D spatial axis, empty extents
SHAPES = [((5, 3), 4), ((1, 4), 2), ((1, 2, 3, 3), 3), ((5, 3, 4, 4), 10), ((3, 7), 40), ((3, 2, BIG_P), 2),
          ((40, 3, 25, 20), 3), ((6, 3, 33), 4), ((0, 3, 4), 3), ((4, 0, 2), 3), ((4, 3, 0, 5), 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", SHAPES, ids=str)
def test_matches_reference(shape, k, dtype):
    features, classes = make_inputs(shape, k, dtype)
    check(features, classes, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_batch(dtype):
    # the one test with many images: a ConvNet block's feature maps of a synthetic batch
    features, classes = make_inputs((256, 16, 16, 16), 10, dtype, seed=1)
    check(features, classes, 10, dtype)


def test_many_classes_on_the_gpu_tiles(monkeypatch):
    """100 classes split as on a GPU (16 classes a program, 4096-element tiles; run here under the interpreter if
    that is where the tests run), more images than one chunk."""
    monkeypatch.setattr(triton_class_feature_stats, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(triton_class_feature_stats, "TILE", 4096)
    assert triton_class_feature_stats.tiles(1100, 4, 100) == (16, 256, 16)
    features, classes = make_inputs((1100, 3, 2, 2), 100, torch.float32, seed=7)
    check(features, classes, 100, torch.float32)


def test_empty_classes_give_zero():
    features, _ = make_inputs((4, 3, 8, 8), 10, torch.float32)
    classes = torch.tensor([2, 2, 5, 0], device=DEVICE)
    count, total, total_sq = op(features, classes, 8)
    empty = torch.ones(8, dtype=torch.bool, device=DEVICE)
    empty[classes] = False
    assert bool((count[empty] == 0).all()) and bool((total[empty] == 0).all()) and bool((total_sq[empty] == 0).all())
    assert count.tolist() == [64, 0, 128, 0, 0, 64, 0, 0]
    assert bool((total_sq[~empty] > 0).all())


def test_non_contiguous_features():
    features, classes = make_inputs((6, 5, 4, 3), 3, torch.float32, seed=2)
    check(features.transpose(2, 3), classes, 3, torch.float32)
    check(features.permute(0, 2, 1, 3), classes, 3, torch.float32)  # channels from another axis


@pytest.mark.parametrize("shape,k", [((5, 3, 4, 4), 7), ((3, 2, BIG_P), 2), ((300, 9), 5)], ids=str)
def test_deterministic(shape, k):
    features, classes = make_inputs(shape, k, torch.float32, seed=3)
    first, second = op(features, classes, k), op(features, classes, k)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_split_batch_adds_up():
    features, classes = make_inputs((9, 3, 5), 4, torch.float64, seed=5)
    whole = op(features, classes, 4)
    for m in (0, 4, 9):
        for w, a, b in zip(whole, op(features[:m], classes[:m], 4), op(features[m:], classes[m:], 4)):
            torch.testing.assert_close(a + b, w, rtol=1e-12, atol=1e-12)


def test_nan_shows_in_its_class_and_channel_only():
    features, _ = make_inputs((3, 2, 4), 2, torch.float32)
    features[1, 1, 2] = float("nan")
    count, total, total_sq = op(features, torch.tensor([0, 1, 1], device=DEVICE), 2)
    assert bool(torch.isnan(total[1, 1])) and bool(torch.isnan(total_sq[1, 1]))
    assert bool(torch.isfinite(total[0]).all()) and bool(torch.isfinite(total[1, 0]))
    assert bool(torch.isfinite(count).all())


@pytest.mark.parametrize("shape", [(6, 3), (5, 2, 3, 2)], ids=str)
def test_gradients_through_ops(shape):
    g = torch.Generator().manual_seed(6)
    features = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    classes = torch.tensor([0, 2, 2, 1, 0, 2][:shape[0]], device=DEVICE)  # class 3 is empty

    def f(x):
        return ops.class_feature_stats(x, classes, 4, backend="triton")[1:]
    got = f(features)
    for a, b in zip(got, feature_stats.reference(features, classes, 4)[1:]):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(f, (features,))
    assert torch.autograd.gradgradcheck(f, (features,))


def test_opcheck():
    for shape in ((6, 4), (6, 3, 2, 5)):
        features, classes = make_inputs(shape, 5, torch.float32, seed=4)
        torch.library.opcheck(op, (features, classes, 5))
        torch.library.opcheck(op, (features.double().requires_grad_(), classes, 5))


def test_schema_matches_native():
    assert str(op.default._schema) == ("ltdd_triton::class_feature_stats(Tensor features, Tensor classes, "
                                       "int num_classes) -> (Tensor, Tensor, Tensor)")


def test_bad_input_names_the_argument():
    features, classes = make_inputs((3, 4, 2), 3, torch.float32)
    with pytest.raises(ValueError, match="features"):
        op(features.long(), classes, 3)
    with pytest.raises(ValueError, match=r"features must be a floating point \[N, C, ...\]"):
        op(features[:, 0, 0], classes, 3)
    with pytest.raises(ValueError, match="classes"):
        op(features, classes[:2], 3)
    with pytest.raises(ValueError, match="classes"):
        op(features, classes.int(), 3)
    with pytest.raises(ValueError, match="num_classes"):
        op(features, classes, 0)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\)"):
            op(features, torch.tensor([0, -1, 2], device=DEVICE), 3)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 2\)"):
        ops.class_feature_stats(features.cpu(), torch.tensor([0, 1, 2]), 2, backend="reference")

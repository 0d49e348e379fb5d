"""ltdd_triton::dsa (kernels/dsa.py), the DSA chain of one call in one launch, against fused_dsa.reference in fp64: the ops
applied one by one, and the transpose as their vector-Jacobian product.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (one numpy program per image, each tap a
few dozen numpy calls), so the images stay small; on a GPU the same tests run on cuda tensors, bf16 included.
"""
import pytest
import torch

from ltdd_fast import ops
from ltdd_fast.augment import DSA
from ltdd_fast.dsa_chain import FAMILIES, OPS, PACKED_WIDTH, cutout_size

from triton_setup import DEVICE, DTYPES  # noqa: E402 - skips this module without Triton

from ltdd_fast.kernels import dsa as triton_dsa  # noqa: E402
from ltdd_fast.ops import fused_dsa
# Largest error allowed, relative to the largest magnitude of the fp64 reference computed from the same rounded
# inputs and draws: the kernel computes in fp32 (fp64 for fp64) and rounds its output to the dtype once.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

op = torch.ops.ltdd_triton.dsa
MODES = [*FAMILIES, "multiple"]  # each family alone (DSA's "single" mode), and every op in one chain


def _draws(mode, b, h, w, dtype, seed):
    """(values, flags) of one call of DSA in `mode`, packed in dtype on DEVICE."""
    dsa = DSA(mode="multiple") if mode == "multiple" else DSA(mode)
    params = dsa.sample(b, (h, w), torch.Generator().manual_seed(seed))
    return params.packed(dtype, DEVICE)


def _images(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _run(x, values, flags, transpose):
    return op(x, values, flags, *cutout_size(*x.shape[2:]), transpose)


def _check(got, x, values, flags, transpose, dtype, what=""):
    want = fused_dsa.reference(x.double(), values.double(), flags, transpose)
    assert got.shape == x.shape and got.dtype == dtype and got.device == x.device, (got.shape, got.dtype)
    assert got.is_contiguous()
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got.double() - want).abs().max()) / max(scale, 1e-300) if want.numel() else 0.0
    assert err <= TOL[dtype], f"{what} {dtype} transpose={transpose}: max error {err:.3g} (relative) > {TOL[dtype]:.3g}"


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, dtype, transpose):
    b, c, h, w = 3, 3, 7, 10  # H != W: a transposed axis would show
    values, flags = _draws(mode, b, h, w, dtype, seed=MODES.index(mode))
    x = _images((b, c, h, w), dtype, seed=MODES.index(mode))
    _check(_run(x, values, flags, transpose), x, values, flags, transpose, dtype, mode)


# one channel, one image, a 1-pixel-wide or -high image, a single pixel, more channels than a power of two
ODD_SHAPES = [(1, 1, 7, 10), (2, 3, 10, 1), (2, 2, 1, 6), (2, 3, 1, 1), (1, 5, 6, 5), (1, 3, 12, 9)]


# the reference's affine_grid warns about 1-pixel sides (it uses the coordinate 0 there, as the kernel does)
@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed")
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(shape, dtype, transpose):
    b, c, h, w = shape
    for seed in range(2):
        values, flags = _draws("multiple", b, h, w, dtype, seed)
        x = _images(shape, dtype, seed)
        _check(_run(x, values, flags, transpose), x, values, flags, transpose, dtype, f"seed {seed}")


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
def test_image_in_several_blocks(monkeypatch, transpose):
    # tiles of 16 pixels: every pass walks the image in 5 blocks, the last one partly full; contrast's sums span them
    monkeypatch.setattr(triton_dsa, "TILE", 64)
    values, flags = _draws("multiple", 2, 7, 10, torch.float64, seed=3)
    x = _images((2, 3, 7, 10), torch.float64, seed=3)
    _check(_run(x, values, flags, transpose), x, values, flags, transpose, torch.float64)


def _extreme_draws(b, dtype):
    """Every op on, with draws beyond DSA's ranges: shifts and holes at and past the border, half turns, shrinking,
    magnifying and mirroring scales (points far outside the image)."""
    g = torch.Generator().manual_seed(7)
    values = torch.zeros(b, PACKED_WIDTH, dtype=torch.float64)
    values[:, 0] = torch.rand(b, generator=g) - 0.5
    values[:, 1] = torch.rand(b, generator=g) * 3
    values[:, 2] = torch.rand(b, generator=g) * 2
    values[:, 3:5] = torch.randint(-9, 10, (b, 2), generator=g).double()
    values[:, 5:7] = torch.randint(-2, 12, (b, 2), generator=g).double()
    values[:, 7] = torch.arange(b) % 2
    values[:, 8:10] = torch.tensor([[0.2, 3.0], [-1.0, 1.0], [2.5, -0.4], [1.0, 1.0]])[torch.arange(b) % 4]
    values[:, 10] = torch.tensor([180.0, -170.0, 90.0, 33.3])[torch.arange(b) % 4]
    return values.to(dtype).to(DEVICE), torch.ones(len(OPS), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_draws(dtype, transpose):
    values, flags = _extreme_draws(4, dtype)
    x = _images((4, 2, 8, 9), dtype, seed=4)
    _check(_run(x, values, flags, transpose), x, values, flags, transpose, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_transpose_is_adjoint(mode):
    # <A x, y> == <x, A^T y> for the linear part of the chain (brightness adds a constant: A(x) - A(0))
    b, c, h, w = 2, 3, 6, 9
    values, flags = _draws(mode, b, h, w, torch.float64, seed=10 + MODES.index(mode))
    x, y = _images((b, c, h, w), torch.float64, seed=20), _images((b, c, h, w), torch.float64, seed=21)
    ax = _run(x, values, flags, False) - _run(torch.zeros_like(x), values, flags, False)
    aty = _run(y, values, flags, True)
    lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, float(ax.abs().sum() * y.abs().max())), (lhs, rhs)


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
def test_ops_that_are_off_do_not_round(transpose):
    # a disabled op is the identity exactly (one tap of weight 1, no colour step), not (x - m) * 1 + m
    x = _images((2, 3, 5, 7), torch.float32, seed=5)
    values, _ = _draws("multiple", 2, 5, 7, torch.float32, seed=5)
    flags = torch.zeros(len(OPS), dtype=torch.int32, device=DEVICE)
    assert torch.equal(_run(x, values, flags, transpose), x)
    flags[OPS.index("brightness")] = 1
    want = x if transpose else x + values[:, :1, None, None]
    assert torch.equal(_run(x, values, flags, transpose), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_through_ops_with_gradient(dtype):
    # ops.dsa(backend="triton") and its autograd formula (registered by ltdd_fast.ops): the gradient is the transpose
    b, c, h, w = 3, 3, 8, 7
    values, flags = _draws("multiple", b, h, w, dtype, seed=30)
    x = _images((b, c, h, w), dtype, seed=30).requires_grad_()
    dy = _images((b, c, h, w), dtype, seed=31)
    y = ops.dsa(x, values, flags, backend="triton")
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    want = fused_dsa.reference(x64, values.double(), flags)
    (want_dx,) = torch.autograd.grad(want, x64, dy.double())
    for name, got, ref in (("y", y, want), ("dx", dx, want_dx)):
        assert got.dtype == dtype
        got, ref = got.detach().double(), ref.detach()
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err <= TOL[dtype], f"{name}: max error {err:.3g} (relative) > {TOL[dtype]:.3g}"


def test_gradcheck_and_double_backward():
    values, flags = _draws("multiple", 1, 3, 4, torch.float64, seed=40)
    x = _images((1, 2, 3, 4), torch.float64, seed=40).requires_grad_()
    for transpose in (False, True):
        def f(t):
            return ops.dsa(t, values, flags, transpose, backend="triton")
        assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
        # the gradient's gradient with respect to the cotangent is the op itself again (the chain is linear)
        dy = _images(x.shape, torch.float64, seed=41).requires_grad_()
        (dx,) = torch.autograd.grad(f(x), x, dy, create_graph=True)
        v = _images(x.shape, torch.float64, seed=42)
        (ddy,) = torch.autograd.grad(dx, dy, v)
        torch.testing.assert_close(ddy, _run(v, values, flags, transpose) - _run(torch.zeros_like(v), values, flags,
                                                                                   transpose), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="no native build")
@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "transpose"])
def test_matches_native_twin(transpose):
    values, flags = _draws("multiple", 3, 6, 8, torch.float64, seed=50)
    x = _images((3, 3, 6, 8), torch.float64, seed=50)
    if not ops.dispatch.native_supports("dsa", x.device):
        pytest.skip(f"no native dsa kernel for {x.device.type} tensors")
    want = torch.ops.ltdd_fast.dsa(x, values, flags, *cutout_size(6, 8), transpose)
    torch.testing.assert_close(_run(x, values, flags, transpose), want, rtol=1e-12, atol=1e-12)


def test_non_contiguous_images():
    values, flags = _draws("multiple", 2, 6, 5, torch.float32, seed=60)
    x = _images((2, 3, 5, 6), torch.float32, seed=60).transpose(2, 3)
    for transpose in (False, True):
        _check(_run(x, values, flags, transpose), x, values, flags, transpose, torch.float32)


def test_empty_batch():
    x = torch.zeros(0, 3, 4, 4, device=DEVICE)
    values = torch.zeros(0, PACKED_WIDTH, device=DEVICE)
    flags = torch.ones(len(OPS), dtype=torch.int32, device=DEVICE)
    for transpose in (False, True):
        out = op(x, values, flags, 2, 2, transpose)
        assert out.shape == x.shape and out.dtype == x.dtype


def test_opcheck():
    torch.ops.ltdd_triton.dsa  # registers the autograd formula
    values, flags = _draws("multiple", 2, 4, 5, torch.float32, seed=70)
    x = _images((2, 3, 4, 5), torch.float32, seed=70).requires_grad_()
    torch.library.opcheck(op, (x, values, flags, 2, 3, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_schema_matches_native():
    assert str(op.default._schema) == ("ltdd_triton::dsa(Tensor x, Tensor values, Tensor flags, int cutout_h, "
                                       "int cutout_w, bool transpose) -> Tensor")


def test_bad_input_names_the_argument():
    values, flags = _draws("multiple", 2, 4, 4, torch.float32, seed=80)
    x = _images((2, 3, 4, 4), torch.float32, seed=80)
    with pytest.raises(ValueError, match="x must"):
        op(x[0], values, flags, 2, 2, False)
    with pytest.raises(ValueError, match="x must"):
        op(x.long(), values, flags, 2, 2, False)
    with pytest.raises(ValueError, match="values must"):
        op(x, values[:1], flags, 2, 2, False)
    with pytest.raises(ValueError, match="values must"):
        op(x, values.double(), flags, 2, 2, False)
    with pytest.raises(ValueError, match="flags must"):
        op(x, values, flags.long(), 2, 2, False)
    with pytest.raises(ValueError, match="flags must"):
        op(x, values, flags[:5], 2, 2, False)
    with pytest.raises(ValueError, match="cutout_h and cutout_w"):
        op(x, values, flags, -1, 2, False)

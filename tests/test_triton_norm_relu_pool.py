"""The Triton norm -> ReLU -> pool operator against the reference block of ConvNet.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (one numpy program per tile of planes),
so batch x channels stays small; on a GPU machine the same tests run on cuda, bf16 included.
"""
import pytest
import torch

from triton_setup import DEVICE, DTYPES, kernels  # noqa: E402 - skips this module without Triton

from ltdd_fast.kernels import norm_relu_pool as nrp_module  # noqa: E402
from ltdd_fast.ops import norm_pool  # noqa: E402
from ltdd_fast.ops.norm_pool import INSTANCE_NORM_EPS, reference  # noqa: E402


def norm_relu_pool(x, weight, bias):
    """The Triton op's output y, with the kernel's own input checks first (as ops.norm_relu_pool runs it)."""
    nrp_module.check_inputs(x, weight, bias)
    return torch.ops.ltdd_triton.norm_relu_pool(x.contiguous(), weight, bias)[0]


# Largest error allowed, relative to the largest magnitude of the fp64 reference (computed from the same
# rounded inputs): a few units of the dtype's rounding, the kernels accumulating in fp32 (fp64 for fp64).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SHAPES = [
    (1, 1, 2, 2),      # the smallest plane: one pooled value
    (2, 3, 5, 7),      # odd H and W: the last row and column count in the statistics only
    (1, 2, 9, 9),
    (2, 2, 8, 8),      # ConvNet's last block at 32 px
    (2, 2, 32, 32),
    (1, 2, 64, 64),    # the largest ConvNet plane: still one block
    (1, 1, 128, 128),  # larger than one block: the kernels walk the plane in chunks
    (1, 1, 66, 131),   # several chunks, odd width, a last chunk only partly full
    (3, 5, 8, 8),      # 15 planes in a tile of 16 rows: the last row is past B*C, masked
    (4, 16, 4, 4),     # many small planes (digits' last block), packed many to a program
]


def _inputs(shape, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    # an offset and a per-channel scale, as a conv output has, so the normalisation has work to do
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(c, 1, 1, generator=g, dtype=torch.float64))
    x = x + 3.0 * torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)
    weight = 1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(b, c, h // 2, w // 2, generator=g, dtype=torch.float64)
    out = [t.to(device=DEVICE, dtype=dtype) for t in (x, weight, bias, dy)]
    for t in out[:3]:
        t.requires_grad_(requires_grad)
    return out


def _max_rel_err(actual, expected):
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = _max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max error {err:.3g} (relative to the largest reference value) > {tol:.3g}"


def _reference_fp64(x, weight, bias, dy):
    """Output and gradients of the reference in fp64 from the same (rounded) inputs."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = reference(x64, w64, b64)
    return (y, *torch.autograd.grad(y, (x64, w64, b64), dy.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_norm_relu_pool_matches_reference(shape, dtype):
    x, weight, bias, dy = _inputs(shape, dtype)
    y = norm_relu_pool(x, weight, bias)
    assert y.dtype == dtype and y.device == x.device
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy)
    expected = _reference_fp64(x, weight, bias, dy)
    tol = TOLERANCE[dtype]
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), (y, dx, dweight, dbias), expected):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        _assert_close(got, want, tol, name)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
def test_triton_norm_relu_pool_low_precision_no_worse_than_torch(dtype):
    """In fp16/bf16 the kernel errs at most twice as much as PyTorch's own block in that dtype (both against
    the fp64 reference), plus a unit of rounding."""
    x, weight, bias, dy = _inputs((2, 2, 16, 12), dtype, seed=3)
    ours = (norm_relu_pool(x, weight, bias),)
    ours += torch.autograd.grad(ours[0], (x, weight, bias), dy)
    theirs = (reference(x, weight, bias),)
    theirs += torch.autograd.grad(theirs[0], (x, weight, bias), dy)
    expected = _reference_fp64(x, weight, bias, dy)
    unit = torch.finfo(dtype).eps
    for name, a, t, e in zip(("y", "dx", "dweight", "dbias"), ours, theirs, expected):
        assert _max_rel_err(a, e) <= 2 * _max_rel_err(t, e) + unit, name


def test_triton_norm_relu_pool_statistics():
    """The saved per-plane mean and rstd are the biased statistics of the plane, in the accumulation type."""
    for dtype, stats in ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32)):
        x, weight, bias, _ = _inputs((2, 3, 7, 6), dtype, requires_grad=False)
        y, mean, rstd = torch.ops.ltdd_triton.norm_relu_pool(x, weight, bias)
        assert mean.dtype == stats and rstd.dtype == stats and mean.shape == (6,) and rstd.shape == (6,)
        var, mu = torch.var_mean(x.double().flatten(2), dim=2, correction=0)
        _assert_close(mean, mu.flatten(), TOLERANCE[dtype] if dtype != torch.float16 else 2e-6, "mean")
        _assert_close(rstd, (var + INSTANCE_NORM_EPS).rsqrt().flatten(), 1e-11 if dtype == torch.float64 else 1e-5,
                      "rstd")


def test_triton_norm_relu_pool_multi_chunk_shapes_really_are():
    # the chunked paths are only tested if the block is smaller than the plane
    assert nrp_module._launch_config(128 * 128)[0] < 128 * 128
    assert nrp_module._launch_config(64 * 64)[0] == 64 * 64


def test_triton_norm_relu_pool_packs_small_planes():
    # small planes share a program, PLANES rows of a tile; a plane of a full block or more gets its own
    assert nrp_module._launch_config(8 * 8, 15)[1] == 16
    assert nrp_module._launch_config(4 * 4, 64)[1] == 64
    assert nrp_module._launch_config(64 * 64, 8)[1] == 1
    assert nrp_module._launch_config(128 * 128, 8)[1] == 1
    for numel, planes in ((2 * 2, 10 ** 6), (5 * 7, 10 ** 6), (32 * 32, 10 ** 6), (8 * 8, 3)):
        block, per_program, _ = nrp_module._launch_config(numel, planes)
        assert per_program & (per_program - 1) == 0 and block * per_program <= max(nrp_module._TILE, block)


def _launch_padded(x, weight, bias, dy):
    """Both kernels launched directly on outputs that are the heads of longer buffers filled with a sentinel (and
    inputs followed by NaN), each padded by a tile's worth of planes (what unmasked rows past the last plane would
    reach): returns the outputs and whether every output's tail still holds the sentinel after the launches."""
    b, c, h, w = x.shape
    n, ho, wo = b * c, h // 2, w // 2
    block, planes, num_warps = nrp_module._launch_config(h * w, n)
    pad = planes * h * w
    acc = kernels.acc_dtype(x.dtype)
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32

    sentinel = -1234.5  # not NaN: unmasked rows past the last plane would compute NaN from the inputs' tails

    def padded(numel, dtype, head=None):
        buf = torch.full((numel + pad,), float("nan") if head is not None else sentinel, dtype=dtype,
                         device=x.device)
        if head is not None:
            buf[:numel] = head.detach().flatten()
        return buf

    xb, dyb = padded(n * h * w, x.dtype, x), padded(n * ho * wo, x.dtype, dy)
    yb, meanb, rstdb = padded(n * ho * wo, x.dtype), padded(n, stats), padded(n, stats)
    dxb, dwb, dbb = padded(n * h * w, x.dtype), padded(n, stats), padded(n, stats)
    weight, bias = weight.detach(), bias.detach()
    grid = (-(-n // planes),)
    nrp_module._norm_relu_pool_fwd_kernel[grid](xb, weight, bias, yb, meanb, rstdb, n, c, h, w, ho, wo,
                                                EPS=INSTANCE_NORM_EPS, ACC=acc, BLOCK=block, PLANES=planes,
                                                num_warps=num_warps)
    nrp_module._norm_relu_pool_bwd_kernel[grid](dyb, xb, meanb, rstdb, weight, bias, dxb, dwb, dbb, n, c, h, w,
                                                ho, wo, ACC=acc, BLOCK=block, PLANES=planes, num_warps=num_warps)
    tails_untouched = all((t[-pad:] == sentinel).all().item() for t in (yb, meanb, rstdb, dxb, dwb, dbb))
    out = (yb[:n * ho * wo].view(b, c, ho, wo), dxb[:n * h * w].view(b, c, h, w),
           dwb[:n].view(b, c).sum(0), dbb[:n].view(b, c).sum(0))
    return out, tails_untouched


@pytest.mark.parametrize("tile", [None, 256], ids=["default_tile", "tile_256"])
def test_triton_norm_relu_pool_tile_rows_past_the_last_plane(monkeypatch, tile):
    """B*C = 15 planes of 8x8, not a multiple of PLANES: the last program's tile has rows past B*C, which must
    neither write anything nor disturb the live rows. With a 256-element tile (4 planes a program) there are
    several programs, the last with 3 live rows of 4."""
    if tile is not None:
        monkeypatch.setattr(nrp_module, "_TILE", tile)
    shape = (3, 5, 8, 8)
    planes = nrp_module._launch_config(8 * 8, 15)[1]
    assert planes > 1 and 15 % planes != 0
    x, weight, bias, dy = _inputs(shape, torch.float64, seed=6)
    expected = _reference_fp64(x, weight, bias, dy)
    # first on padded buffers: a write past the end of the op's own outputs would corrupt the heap unseen
    out, tails_untouched = _launch_padded(x, weight, bias, dy)
    assert tails_untouched, "a kernel wrote past the last plane"
    for name, g, want in zip(("y", "dx", "dweight", "dbias"), out, expected):
        _assert_close(g, want, 1e-12, f"{name} (padded buffers)")
    y = norm_relu_pool(x, weight, bias)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), dy))
    for name, g, want in zip(("y", "dx", "dweight", "dbias"), got, expected):
        _assert_close(g, want, 1e-12, name)


def test_triton_norm_relu_pool_many_small_planes_several_programs(monkeypatch):
    # 4x16 planes of 4x4, 16 planes a program (a 256-element tile): 4 programs, each reducing 16 rows
    monkeypatch.setattr(nrp_module, "_TILE", 256)
    assert nrp_module._launch_config(4 * 4, 64)[1] == 16
    x, weight, bias, dy = _inputs((4, 16, 4, 4), torch.float32, seed=7)
    y = norm_relu_pool(x, weight, bias)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), dy))
    for name, g, want in zip(("y", "dx", "dweight", "dbias"), got, _reference_fp64(x, weight, bias, dy)):
        _assert_close(g, want, TOLERANCE[torch.float32], name)


def test_triton_norm_relu_pool_non_contiguous_input():
    x, weight, bias, dy = _inputs((2, 3, 6, 10), torch.float64)
    xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # same values, other strides
    assert not xt.is_contiguous()
    y = norm_relu_pool(xt, weight, bias)
    dx, dweight, dbias = torch.autograd.grad(y, (xt, weight, bias), dy)
    expected = _reference_fp64(x, weight, bias, dy)
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), (y, dx, dweight, dbias), expected):
        _assert_close(got, want, 1e-12, name)


def test_triton_norm_relu_pool_backward_is_deterministic():
    x, weight, bias, dy = _inputs((4, 3, 9, 8), torch.float32, seed=5)
    first = torch.autograd.grad(norm_relu_pool(x, weight, bias), (x, weight, bias), dy)
    second = torch.autograd.grad(norm_relu_pool(x, weight, bias), (x, weight, bias), dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_norm_relu_pool_grad_only_of_some_inputs():
    x, weight, bias, dy = _inputs((2, 2, 6, 6), torch.float64)
    x = x.detach()
    y = norm_relu_pool(x, weight, bias)
    dweight, dbias = torch.autograd.grad(y, (weight, bias), dy)
    expected = _reference_fp64(x, weight, bias, dy)
    _assert_close(dweight, expected[2], 1e-12, "dweight")
    _assert_close(dbias, expected[3], 1e-12, "dbias")


def test_triton_norm_relu_pool_first_order_backward_uses_the_kernel(monkeypatch):
    """Plain backward runs the Triton backward op; only create_graph=True falls back to the reference."""
    calls = []
    real = norm_pool._reference_backward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(norm_pool, "_reference_backward", spy)
    x, weight, bias, dy = _inputs((1, 2, 6, 5), torch.float64)
    torch.autograd.grad(norm_relu_pool(x, weight, bias), (x, weight, bias), dy)
    assert calls == []
    torch.autograd.grad(norm_relu_pool(x, weight, bias), (x, weight, bias), dy, create_graph=True)
    assert calls == [1]


def test_triton_norm_relu_pool_double_backward_matches_reference():
    """As in the distillation: differentiate a function of the first-order gradients once more."""
    x, weight, bias, dy = _inputs((2, 2, 7, 6), torch.float64, seed=2)

    def second_order(fn):
        y = fn(x, weight, bias)
        grads = torch.autograd.grad((y * dy).sum(), (x, weight, bias), create_graph=True)
        loss = sum((g * g).sum() for g in grads) + (y * y).sum()
        return torch.autograd.grad(loss, (x, weight, bias))

    for name, got, want in zip(("x", "weight", "bias"), second_order(norm_relu_pool), second_order(reference)):
        _assert_close(got, want, 1e-12, f"d2/d{name}")


def test_triton_norm_relu_pool_gradcheck(monkeypatch):
    # the first-order check must exercise the Triton backward, not the reference
    def forbidden(*args):
        raise AssertionError("the reference backward ran in a first-order gradcheck")

    monkeypatch.setattr(norm_pool, "_reference_backward", forbidden)
    x, weight, bias, _ = _inputs((1, 2, 3, 5), torch.float64, seed=1)
    assert torch.autograd.gradcheck(norm_relu_pool, (x, weight, bias))


def test_triton_norm_relu_pool_gradgradcheck():
    x, weight, bias, _ = _inputs((1, 2, 3, 4), torch.float64, seed=1)
    assert torch.autograd.gradgradcheck(norm_relu_pool, (x, weight, bias))


def test_triton_norm_relu_pool_opcheck():
    x, weight, bias, dy = _inputs((2, 3, 5, 4), torch.float32)
    torch.library.opcheck(torch.ops.ltdd_triton.norm_relu_pool.default, (x, weight, bias))
    x, weight, bias = (t.detach() for t in (x, weight, bias))
    _, mean, rstd = torch.ops.ltdd_triton.norm_relu_pool(x, weight, bias)
    torch.library.opcheck(torch.ops.ltdd_triton.norm_relu_pool_backward.default, (dy, x, mean, rstd, weight, bias))


def test_triton_norm_relu_pool_torch_compile(monkeypatch):
    def forbidden(*args):
        raise AssertionError("the reference backward ran in a first-order compiled backward")

    # the compiled backward must run the Triton backward op too
    monkeypatch.setattr(norm_pool, "_reference_backward", forbidden)
    torch._dynamo.reset()
    x, weight, bias, dy = _inputs((2, 3, 8, 6), torch.float32, seed=4)

    def block(fn, x, weight, bias):
        return (fn(x * 1.5 - 0.25, weight, bias) * dy).sum()

    compiled = torch.compile(lambda *a: block(norm_relu_pool, *a), fullgraph=True)
    got = compiled(x, weight, bias)
    got_grads = torch.autograd.grad(got, (x, weight, bias))
    want = block(reference, x, weight, bias)
    want_grads = torch.autograd.grad(want, (x, weight, bias))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_triton_norm_relu_pool_empty_batch():
    x, weight, bias, _ = _inputs((1, 3, 6, 6), torch.float32)
    x = x.detach()[:0].requires_grad_()
    y = norm_relu_pool(x, weight, bias)
    assert y.shape == (0, 3, 3, 3)
    dx, dweight, dbias = torch.autograd.grad(y.sum(), (x, weight, bias))
    assert dx.shape == x.shape and torch.equal(dweight, torch.zeros_like(weight)) and torch.equal(dbias, torch.zeros_like(bias))


@pytest.mark.parametrize("case, match", [
    ("x_3d", r"^x: expected a 4-D tensor"),
    ("x_int", r"^x: expected a floating-point tensor"),
    ("x_small", r"^x: expected H >= 2 and W >= 2"),
    ("weight_shape", r"^weight: expected shape \(3,\)"),
    ("bias_shape", r"^bias: expected shape \(3,\)"),
    ("weight_dtype", r"^weight: expected dtype torch.float32"),
    ("bias_dtype", r"^bias: expected dtype torch.float32"),
    ("weight_not_tensor", r"^weight: expected a torch.Tensor"),
])
def test_triton_norm_relu_pool_bad_input(case, match):
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    weight, bias = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    args = {
        "x_3d": (x[0], weight, bias),
        "x_int": (x.to(torch.int32), weight, bias),
        "x_small": (x[:, :, :1], weight, bias),
        "weight_shape": (x, torch.ones(4, device=DEVICE), bias),
        "bias_shape": (x, weight, torch.zeros(1, 3, device=DEVICE)),
        "weight_dtype": (x, weight.double(), bias),
        "bias_dtype": (x, weight, bias.half()),
        "weight_not_tensor": (x, [1.0, 1.0, 1.0], bias),
    }[case]
    with pytest.raises(ValueError, match=match):
        norm_relu_pool(*args)


def test_triton_norm_relu_pool_bad_device():
    other = "meta"  # a device the kernels never run on, available everywhere
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"^weight: expected device"):
        norm_relu_pool(x, torch.ones(3, device=other), torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"^x: expected a tensor on a device"):
        norm_relu_pool(x.to(other), torch.ones(3, device=other), torch.zeros(3, device=other))

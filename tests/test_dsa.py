"""The fused DSA chain, ops.dsa (the native CPU kernel, and the CUDA one on a GPU), against fused_dsa.reference: the
augmentation ops applied one by one (dsa_chain.apply_chain) and, for the transpose, their vector-Jacobian product.

Inputs are drawn in float64 and rounded to the dtype under test; the reference runs in float64 on the rounded
images and draws, so each tolerance measures the kernel alone (rtol, and an atol of rtol times the reference's
largest value). The Triton twin has its own tests (test_triton_dsa.py).
"""
import pytest
import torch

from ltdd_fast import ops
from ltdd_fast.augment import DSA
from ltdd_fast.dsa_chain import FAMILIES, OPS, PACKED_WIDTH, AugParams
from ltdd_fast.ops import fused_dsa

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="ltdd_fast._C not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STRATEGIES = [*FAMILIES, "multiple"]
SHAPES = [(4, 3, 12, 12), (3, 1, 7, 10), (1, 3, 9, 1), (2, 2, 1, 6)]


def _dsa(strategy):
    return DSA(mode="multiple") if strategy == "multiple" else DSA(strategy)


def _inputs(strategy, shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    params = _dsa(strategy).sample(shape[0], shape[2:], g)
    values, flags = params.packed(dtype, device)
    return x, values, flags


def _check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    rtol = RTOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=rtol, atol=rtol * max(float(ref.abs().max()), 1.0))


def _reference(x, values, flags, transpose):
    return fused_dsa.reference(x.double().cpu(), values.double().cpu(), flags.cpu(), transpose)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("transpose", [False, True], ids=["chain", "transpose"])
def test_matches_reference(strategy, shape, dtype, device, transpose):
    x, values, flags = _inputs(strategy, shape, dtype, device)
    out = ops.dsa(x, values, flags, transpose, backend="native")
    assert out.device.type == device and out.is_contiguous()
    _check(out, _reference(x, values, flags, transpose), dtype)


@pytest.mark.skipif("cuda" not in DEVICES, reason="bf16 is checked on a GPU")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("transpose", [False, True], ids=["chain", "transpose"])
def test_matches_reference_bf16_on_cuda(strategy, transpose):
    x, values, flags = _inputs(strategy, (8, 3, 16, 16), torch.bfloat16, "cuda")
    _check(ops.dsa(x, values, flags, transpose, backend="native"), _reference(x, values, flags, transpose),
           torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transpose_is_the_adjoint(strategy, device):
    """<A x, y> = <x, A^T y> for the chain's linear part (brightness, its constant, is left out by comparing
    against A applied to 0)."""
    x, values, flags = _inputs(strategy, (3, 3, 10, 8), torch.float64, device)
    y = torch.randn_like(x)
    a_x = ops.dsa(x, values, flags, backend="native") - ops.dsa(torch.zeros_like(x), values, flags, backend="native")
    at_y = ops.dsa(y, values, flags, transpose=True, backend="native")
    torch.testing.assert_close((a_x * y).sum(), (x * at_y).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_and_gradgradcheck(strategy):
    x, values, flags = _inputs(strategy, (2, 3, 6, 5), torch.float64, "cpu")
    x.requires_grad_()
    for transpose in (False, True):
        fn = lambda t: ops.dsa(t, values, flags, transpose, backend="native")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("strategy", ["color", "rotate", "multiple"])
def test_opcheck(strategy):
    x, values, flags = _inputs(strategy, (2, 3, 6, 5), torch.float32, "cpu")
    for transpose in (False, True):
        torch.library.opcheck(torch.ops.ltdd_fast.dsa, (x.requires_grad_(), values, flags, 3, 3, transpose))


@pytest.mark.parametrize("transpose", [False, True])
def test_output_is_row_major_as_the_fake_says(transpose):
    """One channel with the channel stride of a channels-last tensor (contiguous all the same): the output has
    the row-major strides of the fake kernel, which torch.compile's graphs assume for what follows."""
    _, values, flags = _inputs("multiple", (2, 1, 6, 5), torch.float32, "cpu")
    odd = torch.randn(2, 6, 5, 1).permute(0, 3, 1, 2)
    assert odd.is_contiguous() and odd.stride() == (30, 1, 5, 1)
    out = torch.ops.ltdd_fast.dsa(odd, values, flags, 3, 3, transpose)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.ltdd_fast.dsa(mode.from_tensor(odd), mode.from_tensor(values), mode.from_tensor(flags),
                                       3, 3, transpose)
    assert out.stride() == fake.stride() == (30, 30, 5, 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dsa_apply_runs_the_fused_chain(strategy):
    """DSA.apply with a fast backend gives the reference chain's images and image gradients."""
    dsa = _dsa(strategy)
    x = torch.randn(5, 3, 11, 11, requires_grad=True)
    params = dsa.sample(5, (11, 11), torch.Generator().manual_seed(3))
    g = torch.randn(5, 3, 11, 11)
    ref = dsa.apply(x, params)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    fast = dsa.apply(x, params, backend="native")
    (fast_grad,) = torch.autograd.grad(fast, x, g)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_packing_is_cached_and_round_trips():
    params = DSA(mode="multiple").sample(4, (8, 8), torch.Generator().manual_seed(0))
    values, flags = params.packed(torch.float32, "cpu")
    assert values.shape == (4, PACKED_WIDTH) and flags.tolist() == [1] * len(OPS)
    assert params.packed(torch.float32, "cpu")[0] is values  # pass 1 and pass 2 share one packing
    back = AugParams.unpacked(values, flags)
    assert back.ops == params.ops
    for op in params.ops:
        assert torch.equal(back.tensors[op].to(params.tensors[op].dtype), params.tensors[op]), op


def test_an_order_the_kernel_does_not_run_falls_back_to_the_chain():
    """A strategy naming its families in another order, in "multiple" mode, applies them in its order: the fused
    chain (always in dsa_chain.OPS's order) stands aside."""
    dsa = DSA("rotate_color", mode="multiple")
    params = dsa.sample(3, (8, 8), torch.Generator().manual_seed(1))
    assert params.ops[0] == "rotate" and params.packed(torch.float32, "cpu") is None
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(dsa.apply(x, params, backend="native"), dsa.apply(x, params))


def test_one_flags_tensor_per_op_set_and_device():
    a = DSA("crop").sample(2, (8, 8), torch.Generator().manual_seed(0))
    b = DSA("crop").sample(2, (8, 8), torch.Generator().manual_seed(1))
    assert a.packed(torch.float32, "cpu")[1] is b.packed(torch.float64, "cpu")[1]


def test_bad_input_is_rejected_with_the_argument_named():
    x, values, flags = _inputs("multiple", (2, 3, 6, 6), torch.float32, "cpu")
    with pytest.raises(ValueError, match="x must be floating point images"):
        ops.dsa(x[0], values, flags)
    with pytest.raises(ValueError, match=r"values must be torch.float32 \[2, 11\]"):
        ops.dsa(x, values[:1], flags)
    with pytest.raises(ValueError, match="values must be"):
        ops.dsa(x, values.double(), flags)
    with pytest.raises(ValueError, match=r"flags must be int32 \[8\]"):
        ops.dsa(x, values, flags.long())
    bad = values.clone()
    bad[0, 8] = float("nan")
    with pytest.raises(ValueError, match="values must be finite"):
        ops.dsa(x, bad, flags)
    with pytest.raises(RuntimeError, match="values must be"):  # the kernel's own check
        torch.ops.ltdd_fast.dsa(x, values[:, :5], flags, 3, 3, False)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")
def test_cuda_graph_replays_every_family_without_recapture():
    """flags and values are read on the device: one captured graph serves whichever family a step draws."""
    shape = (6, 3, 16, 16)
    x = torch.randn(shape, device="cuda")
    values = torch.zeros(shape[0], PACKED_WIDTH, device="cuda")
    flags = torch.zeros(len(OPS), dtype=torch.int32, device="cuda")
    ops.dsa(x, values, flags, backend="native")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.dsa(x, values, flags, backend="native")
    for strategy in STRATEGIES:
        _, v, f = _inputs(strategy, shape, torch.float32, "cuda", seed=7)
        values.copy_(v)
        flags.copy_(f)
        graph.replay()
        _check(out, _reference(x, values, flags, False), torch.float32)

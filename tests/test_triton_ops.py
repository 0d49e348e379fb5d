"""The Triton operators through ltdd_fast.ops (backend="triton") against reference.py: the SGD step and the
parameter distance here in full, the autograd formulas ltdd_fast/ops/ gives every Triton op, the dispatch, and a
Distiller step on the Triton backend. Without a GPU the kernels run in Triton's interpreter on CPU tensors."""
import pytest
import torch

from ltdd_fast import dam, matching, ops, phases, reference
from ltdd_fast.ops import distance, grad_norms, sgd_step

from triton_setup import DEVICE, DTYPES  # noqa: E402 - skips this module without Triton
# relative error allowed against an fp64 reference computed from the same (rounded) inputs
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _randn(shape, dtype, g, scale=1.0):
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def _close(got, want, dtype):
    """got against an fp64 want, errors measured against want's largest entry (floor: dtype's smallest
    subnormal)."""
    want = want.double()
    tol, info = TOL[dtype], torch.finfo(dtype)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item() + info.tiny * info.eps)


# ---- student SGD step ----------------------------------------------------------------------------------


# 65_537 and 200_003 cross the interpreter's 65,536-element block, 1 and 7 are smaller than any block
@pytest.mark.parametrize("n", [1, 7, 65_537, 200_003])
@pytest.mark.parametrize("frozen", ["none", "head", "middle", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_sgd_step_matches_reference(n, frozen, dtype):
    g = torch.Generator().manual_seed(n)
    theta, grad, gsum = (_randn(n, dtype, g) for _ in range(3))
    alpha = torch.tensor(0.03, dtype=dtype, device=DEVICE)
    rng = {"none": None, "head": (0, n // 2), "middle": (n // 3, n - n // 3), "all": (0, n)}[frozen]
    got = ops.student_sgd_step(theta, grad, gsum, alpha, frozen=rng, backend="triton")
    want = sgd_step.reference(theta.double(), grad.double(), gsum.double(), alpha.double(),
                                      *(rng or (0, 0)))
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == (n,) and a.device.type == DEVICE
        _close(a, b, dtype)
    if rng is not None:  # the frozen slice is untouched, exactly
        assert torch.equal(got[0][rng[0]:rng[1]], theta[rng[0]:rng[1]])
        assert torch.equal(got[1][rng[0]:rng[1]], gsum[rng[0]:rng[1]])


def test_triton_sgd_step_float_alpha_and_gradients():
    g = torch.Generator().manual_seed(1)
    theta, grad, gsum = (_randn(40, torch.float64, g).requires_grad_() for _ in range(3))
    alpha = torch.tensor(0.05, dtype=torch.float64, device=DEVICE, requires_grad=True)
    a = ops.student_sgd_step(theta, grad, gsum, 0.05, backend="triton")
    b = sgd_step.reference(theta, grad, gsum, 0.05)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert torch.autograd.gradcheck(
        lambda *p: ops.student_sgd_step(*p, frozen=(3, 17), backend="triton"), (theta, grad, gsum, alpha))


# ---- normalised parameter distance -------------------------------------------------------------------------


def _distance_inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta_0 = _randn(n, torch.float64, g)
    theta_T = (theta_0 + _randn(n, torch.float64, g, 0.1)).to(dtype)
    return theta_0.to(dtype), theta_T, _randn(n, dtype, g, 2.0), torch.tensor(0.03, dtype=dtype, device=DEVICE)


def _mask(kind, n, dtype):
    split = n * 9 // 10
    return {"none": None,
            "backbone": torch.arange(n, device=DEVICE) < max(1, split),
            "classifier": torch.arange(n, device=DEVICE) >= split,
            # built in fp64: torch.linspace in fp16 gives nan beyond ~130k points
            "float": torch.linspace(0.5, 1.5, n, dtype=torch.float64).to(dtype).to(DEVICE)}[kind]


@pytest.mark.parametrize("n", [1, 7, 65_537, 200_003])
@pytest.mark.parametrize("mask_kind", ["none", "backbone", "classifier", "float"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_param_distance_matches_reference(n, mask_kind, dtype):
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(n, dtype)
    mask = _mask(mask_kind, n, dtype)
    if mask is not None and not mask.any():
        pytest.skip("an empty mask is an error (tested below)")
    got = ops.param_distance(theta_0, theta_T, grad_sum, alpha, mask, backend="triton")
    want = distance.reference(theta_0.double(), theta_T.double(), grad_sum.double(), alpha.double(),
                                          None if mask is None or mask.dtype == torch.bool else mask.double())
    if mask is not None and mask.dtype == torch.bool:
        want = distance.reference(theta_0.double(), theta_T.double(), grad_sum.double(),
                                              alpha.double(), mask)
    for a, b, shape in zip(got, want, [(), (n,), ()]):
        assert a.dtype == dtype and a.shape == shape
        _close(a, b, dtype)


def test_triton_param_distance_gradients_and_errors():
    theta_0, theta_T, grad_sum, alpha = (t.requires_grad_() for t in _distance_inputs(50, torch.float64, seed=3))
    mask = _mask("float", 50, torch.float64)
    loss, v, d_alpha = ops.param_distance(theta_0, theta_T, grad_sum, alpha, mask, backend="triton")
    g_sum, g_alpha = torch.autograd.grad(loss, (grad_sum, alpha), retain_graph=True)
    torch.testing.assert_close(g_sum, v)  # v is dloss/dgrad_sum, d_alpha is dloss/dalpha
    torch.testing.assert_close(g_alpha, d_alpha)
    assert torch.autograd.gradcheck(
        lambda *p: ops.param_distance(*p, mask, backend="triton")[0], (theta_0, theta_T, grad_sum, alpha))
    with pytest.raises(ValueError, match="mask selects no parameter"):
        ops.param_distance(theta_0, theta_T, grad_sum, alpha, torch.zeros(50, dtype=torch.bool, device=DEVICE),
                           backend="triton")
    with pytest.raises(ValueError, match="theta_T must match theta_0"):
        ops.param_distance(theta_0, theta_T[:-1], grad_sum, alpha, backend="triton")


def test_triton_distance_and_step_are_deterministic():
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(200_003, torch.float32, seed=4)
    first = ops.param_distance(theta_0, theta_T, grad_sum, alpha, backend="triton")
    second = ops.param_distance(theta_0, theta_T, grad_sum, alpha, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- opcheck and torch.compile of the Triton ops ------------------------------------------------------------


def test_triton_opcheck_sgd_step_and_distance():
    g = torch.Generator().manual_seed(5)
    theta, grad, gsum = (_randn(33, torch.float32, g) for _ in range(3))
    alpha = torch.tensor(0.1, device=DEVICE)
    op = torch.ops.ltdd_triton.student_sgd_step
    torch.library.opcheck(op, (theta, grad, gsum, alpha, 4, 9))
    torch.library.opcheck(op, (theta.requires_grad_(), grad.requires_grad_(), gsum, alpha.requires_grad_(), 0, 0))
    theta_0, theta_T, grad_sum, alpha = _distance_inputs(33, torch.float32, seed=6)
    dist = torch.ops.ltdd_triton.param_distance
    for mask in (None, _mask("backbone", 33, torch.float32), _mask("float", 33, torch.float32)):
        torch.library.opcheck(dist, (theta_0, theta_T, grad_sum.requires_grad_(), alpha.requires_grad_(), mask))


def test_triton_ops_under_torch_compile():
    g = torch.Generator().manual_seed(7)
    theta, grad, gsum = (_randn(100, torch.float32, g) for _ in range(3))
    theta_T = theta + 0.1

    def fn(theta, grad, gsum):
        t, s = ops.student_sgd_step(theta, grad, gsum, torch.tensor(0.1, device=DEVICE), backend="triton")
        return ops.param_distance(theta, theta_T, s, torch.tensor(0.1, device=DEVICE), backend="triton")[0] + t.sum()

    want = fn(theta, grad, gsum)
    got = torch.compile(fn, fullgraph=True)(theta, grad, gsum)
    torch.testing.assert_close(got, want)


# ---- autograd of the statistics ops (kernels by the soft_ce_stats / class_grad_stats files) ------------------


def _ce_inputs(b, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits, target = _randn((b, c), dtype, g, 2.0), _randn((b, c), dtype, g, 2.0)
    weights = torch.rand(c, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    classes = torch.randint(0, c, (b,), generator=g).to(DEVICE)
    return logits, target, weights, classes


def test_triton_soft_ce_stats_gradients_first_and_second_order():
    z, t, w, classes = _ce_inputs(6, 5, torch.float64, seed=8)
    z.requires_grad_(), t.requires_grad_()
    f = lambda a, b: ops.soft_ce_stats(a, b, w, classes, 5, backend="triton")[0]  # noqa: E731
    want = torch.autograd.grad(dam.soft_cross_entropy(z, t, w), (z, t))
    for a, b in zip(torch.autograd.grad(f(z, t), (z, t)), want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(f, (z, t))
    # the constant-memory second pass differentiates a gradient once more: exact through the reference formula
    assert torch.autograd.gradgradcheck(f, (z, t))
    torch.library.opcheck(torch.ops.ltdd_triton.soft_ce_stats, (z, t, w, classes, 5))


def test_triton_class_grad_stats_through_ops():
    g = torch.Generator().manual_seed(9)
    grads = _randn((9, 2, 3, 3), torch.float32, g)
    classes = torch.tensor([0, 0, 1, 3, 3, 3, 1, 0, 3], device=DEVICE)
    got = ops.class_grad_stats(grads, classes, 5, backend="triton")
    want = grad_norms.reference(grads.double(), classes, 5)
    for a, b in zip(got, want):
        _close(a, b, torch.float32)
    assert got[0][2] == 0 and got[1][4] == 0  # empty classes


# ---- dispatch ------------------------------------------------------------------------------------------------


def test_dispatch_choices_and_settings():
    cpu = torch.device("cpu")
    assert ops.dispatch.pick("auto", "param_distance", cpu) == ("native" if ops.NATIVE_AVAILABLE else "reference")
    assert ops.dispatch.pick("auto", "norm_relu_pool", cpu) == "reference"  # auto never takes the interpreter
    assert ops.dispatch.pick("reference", "param_distance", cpu) == "reference"
    with pytest.raises(RuntimeError, match="no Triton kernel for scatter_add_rows_"):
        ops.dispatch.pick("triton", "scatter_add_rows_", cpu)
    default = ops.dispatch.cuda_backends_from_env("")  # native where there is a CUDA kernel (measured faster on an H100)
    assert default["param_distance"] == "native" and default["norm_relu_pool"] == "triton"
    assert ops.dispatch.cuda_backends_from_env("param_distance=triton, soft_ce_stats=native")["param_distance"] == "triton"
    with pytest.raises(ValueError, match="LTDD_CUDA_BACKENDS entry 'sgd=cuda'"):
        ops.dispatch.cuda_backends_from_env("sgd=cuda")
    before = dict(ops.CUDA_BACKENDS)
    try:
        ops.set_cuda_backend("param_distance", "triton")
        assert ops.CUDA_BACKENDS["param_distance"] == "triton"
        with pytest.raises(ValueError, match="backend 'native' or 'triton'"):
            ops.set_cuda_backend("param_distance", "reference")
    finally:
        ops.CUDA_BACKENDS.clear()
        ops.CUDA_BACKENDS.update(before)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's device rule")
def test_triton_refuses_tensors_it_cannot_run():
    meta = torch.empty(4, device="meta")
    with pytest.raises(RuntimeError, match="interpreter"):
        ops.student_sgd_step(meta, meta, meta, 0.1, backend="triton")


# ---- the matching gradient and a Distiller step on the Triton backend ---------------------------------------


@pytest.mark.parametrize("backbone_phase", [True, False])
def test_triton_two_pass_gradients_equal_reference(backbone_phase):
    from test_matching import _problem

    net, images, labels, alpha, phase, dsa = _problem(3, backbone_phase)
    want = reference.two_pass_gradients(net, images, labels, alpha, phase, dsa)
    # on a GPU the fast path's problem moves to it (float64 throughout; the reference stays on the CPU)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    phase = phases.Phase(theta_0=move(phase.theta_0), theta_T=move(phase.theta_T),
                            batches=[move(b) for b in phase.batches], mask=move(phase.mask), frozen=phase.frozen,
                            class_weights=move(phase.class_weights),
                            aug=[None if a is None else a.to(DEVICE) for a in phase.aug])
    net.set_block_backend("triton")
    got = matching.two_pass_gradients(net, move(images), move(labels), move(alpha), phase, dsa, backend="triton")
    for a, b in zip(got, want):
        assert a.device.type == DEVICE
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    assert want[1].abs().sum() > 0 and want[2].abs().sum() > 0


@pytest.mark.skipif(DEVICE != "cpu", reason="the digits fixture lives on the CPU")
def test_distiller_step_triton_equals_reference(digits, tmp_path_factory):
    from test_matching import distiller_step_matches_reference

    distiller_step_matches_reference(digits, tmp_path_factory.mktemp("match_triton"), "triton")


# ---- every kernel compiles for a GPU -------------------------------------------------------------------------

KERNELS = {"_sgd_step_kernel", "_distance_kernel", "_scale_kernel", "_soft_ce_rows_kernel", "_class_reduce_kernel",
           "_row_norms_kernel", "_dsa_forward_kernel", "_dsa_transpose_kernel", "_norm_relu_pool_fwd_kernel",
           "_norm_relu_pool_bwd_kernel"}


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test here compiles and runs the kernels")
def test_every_triton_kernel_compiles_for_the_h100():
    """The interpreter never compiles a kernel: tests/triton_offline_compile.py runs Triton's compiler, through
    ptxas, for sm_90 on every operator in every dtype and block choice, without a GPU (nothing is launched)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("this Triton has no ptxas to compile for a GPU with")
    script = Path(__file__).parent / "triton_offline_compile.py"
    res = subprocess.run([sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f"a kernel failed to compile for sm_90:\n{res.stderr[-4000:]}"
    built = {line.split(":")[0]: int(line.split()[1]) for line in res.stdout.splitlines() if "binaries" in line}
    assert set(built) == KERNELS and all(n >= 1 for n in built.values()), res.stdout

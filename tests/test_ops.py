"""Native operators against the PyTorch reference: values, gradients, opcheck."""
import pytest
import torch

from ltdd_fast import ops
from ltdd_fast.ops import sgd_step

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="ltdd_fast._C not built")

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n", [1, 7, 4096, 299_520 + 20_490, 16_387])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frozen", [None, "backbone", "all"])
def test_student_sgd_step_matches_reference(n, dtype, frozen):
    theta, grad, gsum = _inputs(n, dtype)
    rng = {None: (0, 0), "backbone": (0, n // 2), "all": (0, n)}[frozen]
    alpha = torch.tensor(0.03, dtype=dtype)
    got = ops.student_sgd_step(theta, grad, gsum, alpha, frozen=rng, backend="native")
    want = sgd_step.reference(theta.double(), grad.double(), gsum.double(), 0.03, *rng)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    # the frozen slice is exactly untouched
    torch.testing.assert_close(got[0][rng[0]:rng[1]], theta[rng[0]:rng[1]], atol=0, rtol=0)


def test_student_sgd_step_gradients_match_reference():
    theta, grad, gsum = (t.requires_grad_() for t in _inputs(33, torch.float64, seed=1))
    alpha = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    w1, w2 = _inputs(33, torch.float64, seed=2)[:2]
    grads = []
    for fn in (lambda: ops.student_sgd_step(theta, grad, gsum, alpha, frozen=(5, 20), backend="native"),
               lambda: sgd_step.reference(theta, grad, gsum, alpha, 5, 20)):
        t_next, s_next = fn()
        loss = (t_next * w1).sum() + (s_next * w2).sum() ** 2
        grads.append(torch.autograd.grad(loss, (theta, grad, gsum, alpha)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_student_sgd_step_gradcheck():
    theta, grad, gsum = (t.requires_grad_() for t in _inputs(9, torch.float64, seed=3))
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    fn = lambda t, g, s, a: torch.ops.ltdd_fast.student_sgd_step(t, g, s, a, 2, 6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (theta, grad, gsum, alpha))


def test_student_sgd_step_opcheck():
    theta, grad, gsum = _inputs(17, torch.float32, seed=4)
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (theta, grad, gsum)]
        alpha = torch.tensor(0.1, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.ltdd_fast.student_sgd_step, (*args, alpha, 3, 10))


def test_student_sgd_step_rejects_bad_input():
    theta, grad, gsum = _inputs(8, torch.float32)
    with pytest.raises(ValueError, match="flat 1-D"):
        ops.student_sgd_step(theta.view(2, 4), grad, gsum, 0.1)
    with pytest.raises(ValueError, match="grad must match theta"):
        ops.student_sgd_step(theta, grad[:7], gsum, 0.1)
    with pytest.raises(ValueError, match="frozen range"):
        ops.student_sgd_step(theta, grad, gsum, 0.1, frozen=(3, 9))
    with pytest.raises(ValueError, match="alpha must hold one value"):
        ops.student_sgd_step(theta, grad, gsum, torch.ones(2))
    with pytest.raises(ValueError, match="backend"):
        ops.student_sgd_step(theta, grad, gsum, 0.1, backend="cuda-magic")

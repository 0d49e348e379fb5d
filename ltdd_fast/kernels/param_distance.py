"""The masked normalised parameter distance of METHOD section 6 with v and dL/dalpha in one reduction pass
(reference: ltdd_fast/ops/distance.py).

With e = theta_0 - theta_T, r = e - alpha G and m2 the squared mask (1 without one):
D = sum m2 e^2, N = sum m2 r^2, S = sum m2 G r; loss = N / D, v = dL/dG = -2 alpha m2 r / D, dL/dalpha = -2 S / D.
Two launches. The first reads theta_0, theta_T, G (and the mask) once, writes u = m2 r and each program's partial
sums of D, N and S; the last program to finish (an atomic arrival count) sums the partials in a fixed order
(deterministic) and writes the loss, dL/dalpha and the scale -2 alpha / D. The second scales u into v, in place.
Traffic: 3 vectors (+ mask) read, u written, u read and v written; no other kernel (one fill of the count).
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_dtype


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK": 1 << 16}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


# the last program sums the partials FINAL rows at a time (under the interpreter few, so the loop is exercised)
FINAL = 2 if INTERPRET else 1024


@triton.autotune(configs=_configs(), key=["n"], reset_to_zero=["arrived_ptr"])
@triton.jit
def _distance_kernel(theta0_ptr, thetaT_ptr, gsum_ptr, alpha_ptr, mask_ptr, u_ptr, partial_ptr, arrived_ptr,
                     scale_ptr, loss_ptr, dalpha_ptr, n, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, FINAL: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(alpha_ptr).to(ACC)
    t0 = tl.load(theta0_ptr + offs, mask=inside, other=0.0).to(ACC)
    tT = tl.load(thetaT_ptr + offs, mask=inside, other=0.0).to(ACC)
    G = tl.load(gsum_ptr + offs, mask=inside, other=0.0).to(ACC)
    e = t0 - tT
    r = e - a * G
    if HAS_MASK:
        m = tl.load(mask_ptr + offs, mask=inside, other=0).to(ACC)
        m2 = m * m
    else:
        m2 = tl.where(inside, 1.0, 0.0).to(ACC)
    u = m2 * r
    tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=inside)
    # this program's share of D, N and S, one row of the [programs, 3] partials
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(m2 * e * e, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(u * r, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(u * G, axis=0))
    # acquire-release: the rows stored above are visible to the program that arrives last, which sees them all
    programs = tl.num_programs(0)
    if tl.atomic_add(arrived_ptr, 1) == programs - 1:
        d = tl.zeros([FINAL], ACC)
        nn = tl.zeros([FINAL], ACC)
        sg = tl.zeros([FINAL], ACC)
        for start in range(0, programs, FINAL):
            rows = start + tl.arange(0, FINAL)
            ok = rows < programs
            d += tl.load(partial_ptr + rows * 3 + 0, mask=ok, other=0.0, cache_modifier=".cg")
            nn += tl.load(partial_ptr + rows * 3 + 1, mask=ok, other=0.0, cache_modifier=".cg")
            sg += tl.load(partial_ptr + rows * 3 + 2, mask=ok, other=0.0, cache_modifier=".cg")
        D = tl.sum(d, axis=0)
        # the scale stays in the accumulation type: in fp16 it can be subnormal
        tl.store(scale_ptr, -2.0 * a / D)
        tl.store(loss_ptr, (tl.sum(nn, axis=0) / D).to(loss_ptr.dtype.element_ty))
        tl.store(dalpha_ptr, (-2.0 * tl.sum(sg, axis=0) / D).to(dalpha_ptr.dtype.element_ty))
        # back to zero for the next launch on this count: autotuning's trials share it (reset_to_zero as well)
        tl.store(arrived_ptr, 0)


# v overwrites u in place, so autotuning's trial launches must each start from u again (restore_value), or the
# first call for each n would return u scaled once per trial
@triton.autotune(configs=_configs(), key=["n"], restore_value=["u_ptr"])
@triton.jit
def _scale_kernel(u_ptr, scale_ptr, v_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(ACC)
    tl.store(v_ptr + offs, (u * tl.load(scale_ptr)).to(v_ptr.dtype.element_ty), mask=inside)


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def param_distance(theta_0: torch.Tensor, theta_T: torch.Tensor, grad_sum: torch.Tensor, alpha: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], v [P], d_alpha []) in theta_0's dtype; mask None, bool [P] or floating [P]."""
    theta_0, theta_T, grad_sum = theta_0.contiguous(), theta_T.contiguous(), grad_sum.contiguous()
    n, dt, dev = theta_0.numel(), theta_0.dtype, theta_0.device
    u = torch.empty_like(theta_0)
    if n == 0:  # 0 / 0, as the reference
        return torch.full((), float("nan"), dtype=dt, device=dev), u, torch.full((), float("nan"), dtype=dt, device=dev)
    acc = _acc_torch(dt)
    # every program writes its own row of the partials, which are sized for the smallest block any config uses
    partials = torch.empty((triton.cdiv(n, 1024), 3), dtype=acc, device=dev)
    arrived = torch.zeros((), dtype=torch.int32, device=dev)
    scale = torch.empty((), dtype=acc, device=dev)
    loss, d_alpha = torch.empty((), dtype=dt, device=dev), torch.empty((), dtype=dt, device=dev)
    has_mask = mask is not None
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _distance_kernel[grid](theta_0, theta_T, grad_sum, alpha.reshape(()), mask.contiguous() if has_mask else theta_0,
                           u, partials, arrived, scale, loss, d_alpha, n, HAS_MASK=has_mask, ACC=acc_dtype(dt),
                           FINAL=FINAL)
    _scale_kernel[grid](u, scale, u, n, ACC=acc_dtype(dt))  # v overwrites u in place
    return loss, u, d_alpha


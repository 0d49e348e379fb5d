"""Soft-label calibration (ADSA, METHOD section 11): one scalar logit adjustment of a distilled set's soft labels.

A teacher trained on long-tailed data gives the tail's images less confidence in their own class than the head's.
The adjusted labels are z - tau * log(prior), prior the long-tailed training set's class frequencies; tau is the
one that minimises the variance, over the classes, of the mean confidence of each class's images in their own
class. It works on any method's set that has soft labels. The search: a grid over [-TAU_RANGE, TAU_RANGE] then a
golden-section refinement around the grid's best point (the variance need not be unimodal over the whole range).
"""
from __future__ import annotations

import math

import torch

from .errors import DataError

TAU_RANGE = 4.0
GRID = 161


def class_confidence_variance(logits, classes, log_prior, tau) -> float:
    """The population variance over the classes present of the mean own-class confidence under tau."""
    p = torch.softmax(logits - tau * log_prior, dim=1)
    own = p.gather(1, classes.view(-1, 1)).squeeze(1)
    k = logits.shape[1]
    sums = torch.zeros(k, dtype=own.dtype).index_add(0, classes, own)
    counts = torch.bincount(classes, minlength=k).to(own.dtype)
    present = counts > 0
    means = sums[present] / counts[present]
    return float(means.var(unbiased=False))


def fit_tau(logits, classes, class_counts, tol=1e-5) -> tuple[float, float]:
    """(tau, variance at tau) for soft-label logits [M, K], each image's class [M] and the training counts [K]."""
    logits = torch.as_tensor(logits).double()
    classes = torch.as_tensor(classes).long()
    counts = torch.as_tensor([float(c) for c in class_counts], dtype=torch.float64)
    if not logits.is_floating_point() or logits.dim() != 2:
        raise DataError(f"calibration needs soft labels [M, K] (logits), got {tuple(logits.shape)} "
                        f"{logits.dtype}: this set has hard labels")
    m, k = logits.shape
    if counts.numel() != k or (counts <= 0).any():
        raise DataError(f"class_counts must hold {k} positive counts, got {list(class_counts)}")
    if classes.shape != (m,) or (m and (int(classes.min()) < 0 or int(classes.max()) >= k)):
        raise DataError(f"classes must be [{m}] in [0, {k}), got {tuple(classes.shape)}")
    log_prior = (counts / counts.sum()).log()
    f = lambda t: class_confidence_variance(logits, classes, log_prior, t)  # noqa: E731
    grid = torch.linspace(-TAU_RANGE, TAU_RANGE, GRID).tolist()
    values = [f(t) for t in grid]
    best = min(range(GRID), key=lambda i: (values[i], abs(grid[i])))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, GRID - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    tau = (lo + hi) / 2
    candidates = [(f(tau), tau), (values[best], grid[best])]
    value, tau = min(candidates)
    return tau, value


def calibrate_logits(logits, class_counts, tau) -> torch.Tensor:
    """z - tau * log(prior), in the logits' dtype."""
    counts = torch.as_tensor([float(c) for c in class_counts], dtype=torch.float64)
    log_prior = (counts / counts.sum()).log().to(logits)
    return logits - tau * log_prior


def calibrate_record(record, classes) -> tuple[dict, dict]:
    """(the synthetic-set record with calibrated labels, a summary): refuses a set without soft labels."""
    labels = record["labels"]
    if not labels.is_floating_point() or labels.dim() != 2:
        raise DataError(f"this synthetic set ({record.get('method', '?')}) has hard labels {tuple(labels.shape)}: "
                        f"calibration adjusts soft labels, so it needs a set with soft labels [M, K]")
    tau, variance = fit_tau(labels, classes, record["class_counts"])
    log_prior = (torch.tensor([float(c) for c in record["class_counts"]], dtype=torch.float64))
    before = class_confidence_variance(labels.double(), classes, (log_prior / log_prior.sum()).log(), 0.0)
    out = dict(record)
    out["labels"] = calibrate_logits(labels, record["class_counts"], tau)
    out["meta"] = {**record.get("meta", {}), "calibration": {"method": "adsa", "tau": tau,
                                                             "variance_before": before, "variance_after": variance}}
    return out, {"tau": tau, "variance_before": before, "variance_after": variance}

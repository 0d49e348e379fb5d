"""Soft-label calibration (ADSA, METHOD section 11): one scalar logit adjustment of a distilled set's soft labels.

A teacher trained on long-tailed data gives the tail's images less confidence in their own class than the head's.
The adjusted labels are z - tau * log(prior), prior the long-tailed training set's class frequencies; tau is the
one that minimises the variance, over the classes, of the mean confidence of each class's images in their own
class. It works on any method's set that has soft labels. The search: a grid over [-TAU_RANGE, TAU_RANGE] then a
golden-section refinement around the grid's best point (the variance need not be unimodal over the whole range).

The objective has a degenerate way down: labels that already name the wrong class for some images reach a lower
variance by taking every class's confidence down together (measured: plain matching's IPC 1 set on
Fashion-MNIST-LT IF 100, half its labels wrong, went to tau 4, the search's bound, and lost 26 points). The summary
therefore says how many labels name their image's class before and after, and warns when tau is at the bound or
that count falls.
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


def label_agreement(logits, classes) -> float:
    """The share of images whose soft label's largest entry is their own class."""
    return float((logits.argmax(1) == classes).double().mean()) if len(classes) else float("nan")


def calibration_warning(summary) -> str | None:
    """One line when the fit looks degenerate (tau at the search's bound, or fewer labels name their class)."""
    problems = []
    if abs(summary["tau"]) >= TAU_RANGE - 1e-6:
        problems.append(f"tau reached the search's bound ({summary['tau']:+g})")
    if summary["agree_after"] < summary["agree_before"]:
        problems.append(f"the labels naming their image's class fell from {100 * summary['agree_before']:.0f}% to "
                        f"{100 * summary['agree_after']:.0f}%")
    if not problems:
        return None
    return ("; ".join(problems) + ": the variance is being lowered by flattening the labels, not by balancing "
            "them; check this set's labels before using the calibrated one")


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
    out = dict(record)
    out["labels"], summary = calibrate_labels(labels, classes, record["class_counts"])
    out["meta"] = {**record.get("meta", {}), "calibration": {"method": "adsa", **summary}}
    return out, summary


def calibrate_labels(labels, classes, class_counts) -> tuple[torch.Tensor, dict]:
    """(the calibrated soft labels, a summary: tau, the variance before and after, the share of labels naming their
    image's class before and after, and the warning or None)."""
    tau, variance = fit_tau(labels, classes, class_counts)
    counts = torch.tensor([float(c) for c in class_counts], dtype=torch.float64)
    before = class_confidence_variance(labels.double(), classes, (counts / counts.sum()).log(), 0.0)
    adjusted = calibrate_logits(labels, class_counts, tau)
    summary = {"tau": tau, "variance_before": before, "variance_after": variance,
               "agree_before": label_agreement(labels, classes), "agree_after": label_agreement(adjusted, classes)}
    summary["warning"] = calibration_warning(summary)
    return adjusted, summary

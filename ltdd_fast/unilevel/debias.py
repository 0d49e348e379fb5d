"""The debiased experts' loss (METHOD section 11, item 1): L = g1 * L_robust + g2 * L_debias.

- L_robust, the mixture-consistency term: two mixed-label augmented views of a batch go through a shared linear
  projection z and a prediction layer p; L_robust = -(cos(z1, sg(p2)) + cos(z2, sg(p1))) / 2, meaned over the
  batch (the paper writes a sum over the batch; the mean keeps g1's scale independent of the batch size: ours).
- L_debias = a * sum_k -w_k y_k log p_k - b * sum_k y_k log p_k, with the rebalancing weights
  w_k = K r_k^-q / sum_j r_j^-q (r_k the class frequency; the factor K, ours, makes the weights average 1 on a
  balanced set, so the two terms have one scale) and the schedule a = (t/T)^2, b = 1 - a: epoch t of T, counted
  from 1, so training starts nearly plain and ends fully rebalanced.

Plain functions of tensors: the training loop is in unilevel/experts.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def rebalance_weights(class_counts, q: float) -> torch.Tensor:
    """w_k = K r_k^-q / sum_j r_j^-q as float64 [K] (q = 0: all ones)."""
    counts = torch.as_tensor([float(c) for c in class_counts], dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0 or (counts <= 0).any():
        raise ConfigError(f"class_counts must be positive, one per class, got {list(class_counts)}")
    if q < 0:
        raise ConfigError(f"q must be non-negative, got {q}")
    r = counts / counts.sum()
    w = r.pow(-float(q))
    return w * (counts.numel() / w.sum())


def debias_schedule(epoch: int, epochs: int) -> tuple[float, float]:
    """(a, b) of epoch `epoch` (1..epochs): a = (epoch / epochs)^2, b = 1 - a."""
    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(epoch, int) and 1 <= epoch <= epochs):
        raise ConfigError(f"epoch must be an int in 1..{epochs}, got {epoch!r}")
    a = (epoch / epochs) ** 2
    return a, 1.0 - a


def debias_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """a * mean_i sum_k -w_k y_ik log p_ik + b * mean_i sum_k -y_ik log p_ik; target [B, K] holds the mixed
    one-hot targets."""
    nll = -target * F.log_softmax(logits, dim=1)
    return (nll * (a * weights.to(nll) + b)).sum(1).mean()


def robust_loss(z1: torch.Tensor, p1: torch.Tensor, z2: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """-(cos(z1, sg(p2)) + cos(z2, sg(p1))) / 2, meaned over the batch."""
    return -(F.cosine_similarity(z1, p2.detach(), dim=1) + F.cosine_similarity(z2, p1.detach(), dim=1)).mean() / 2


def mixed_target(labels: torch.Tensor, perm: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """lam * onehot(y) + (1 - lam) * onehot(y[perm]): the target of a mixup of the batch with its permutation."""
    one_hot = F.one_hot(labels, num_classes).float()
    return lam * one_hot + (1 - lam) * one_hot[perm]

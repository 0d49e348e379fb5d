"""Distribution-agnostic Matching's loss (METHOD section 7): the class-weighted soft-label cross-entropy that the
student trains on, and the class weights that undo the long tail's bias. A leaf: it imports torch only.

ops.soft_ce_stats is this loss fused with its gradients and per-class statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dam_weights(class_counts, f: float = 0.0) -> Tensor:
    """DAM class weights w_c = (n_c + f) / (sum_c n_c + f), float32 [C]."""
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    return ((n + f) / (n.sum() + f)).float()


def soft_cross_entropy(logits, target_logits, class_weights=None) -> Tensor:
    """(1/B) sum_i sum_c w_c * softmax(target_i)_c * (-log_softmax(logits_i)_c); w = 1 when None."""
    per_class = -F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)
    if class_weights is not None:
        per_class = per_class * class_weights.to(per_class)
    return per_class.sum(1).mean()

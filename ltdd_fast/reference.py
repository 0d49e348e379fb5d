"""Plain PyTorch versions of every operator: the ground truth that the fast paths are tested against."""
import torch


def student_sgd_step(theta, grad, grad_sum, alpha, frozen_start=0, frozen_end=0):
    """theta_next = theta - alpha * g', grad_sum_next = grad_sum + g', g' = grad zeroed on [frozen_start, frozen_end)."""
    g = grad.clone()
    g[frozen_start:frozen_end] = 0
    return theta - alpha * g, grad_sum + g

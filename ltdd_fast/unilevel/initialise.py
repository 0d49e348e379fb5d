"""Confidence-guided multi-round initialisation (METHOD section 11, item 3).

Every real image of a class gets `crops` candidate views: itself, then random resized crops (a fraction
`min_scale`..1 of its area, aspect 3/4..4/3, flipped half the time), each scored by the teacher's negative
cross-entropy on the class. The class's ipc slots fill in rounds: in each round every image offers its best view
not yet offered, and the best offers take the remaining slots; so a tail class with fewer images than slots gives
several distinct views of each image, and a large class gives the single best view of its best images. A class
whose images cannot fill its slots with `crops` views each gets as many views per image as it needs.

Ours: the unaugmented image among the candidates, `pool` (a random subset of at most this many images per class
is scored, bounding the cost on a 6,000-image head class), the crop's ranges. The paper pads small classes with
zero placeholders to batch all classes at once; here each class is scored on its own, which gives the same choice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

ASPECT = (3 / 4, 4 / 3)


def random_resized_crops(x: torch.Tensor, count: int, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """count views of each image of x [n, C, H, W] -> [n, count, C, H, W]; view 0 is the image itself."""
    n, c, h, w = x.shape
    views = [x]
    if count > 1:
        m = n * (count - 1)
        area = torch.empty(m).uniform_(min_scale, 1.0, generator=generator)
        log_ratio = torch.empty(m).uniform_(math.log(ASPECT[0]), math.log(ASPECT[1]), generator=generator)
        ratio = log_ratio.exp()
        sx = (area * ratio).sqrt().clamp(max=1.0)   # the crop's width and height as fractions of the image's
        sy = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(m, generator=generator) * 2 - 1) * (1 - sx)  # centres keep the crop inside the image
        cy = (torch.rand(m, generator=generator) * 2 - 1) * (1 - sy)
        flip = torch.where(torch.rand(m, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(m, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = sy, cy
        src = x.repeat_interleave(count - 1, dim=0)
        grid = F.affine_grid(theta.to(x), list(src.shape), align_corners=False)
        crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views.append(crops.view(n, count - 1, c, h, w).transpose(0, 1).reshape(-1, c, h, w))
        return torch.cat(views).view(count, n, c, h, w).transpose(0, 1)
    return x.unsqueeze(1)


def multi_round_pick(scores: torch.Tensor, slots: int) -> list[tuple[int, int]]:
    """(image, view) pairs filling `slots` from scores [n, A] (higher is better) in rounds: each round every image
    offers its best view not offered before, and the best offers take the remaining slots."""
    n, a = scores.shape
    if slots > n * a:
        raise ConfigError(f"{slots} slots cannot be filled with distinct views from {n} image(s) of {a} view(s)")
    order = scores.argsort(dim=1, descending=True, stable=True)
    picked = []
    for r in range(a):
        offers = scores[torch.arange(n), order[:, r]]
        best = offers.argsort(descending=True, stable=True)[:slots - len(picked)]
        picked += [(int(i), int(order[i, r])) for i in best]
        if len(picked) == slots:
            break
    return picked


@torch.no_grad()
def initialise(teacher, images, labels, num_classes, ipc, crops=8, min_scale=0.5, pool=256, generator=None,
               device="cpu", batch_size=512):
    """(images [K*ipc, C, H, W], classes [K*ipc], picks) grouped by class; picks lists, per class, the (real image
    index, view) pairs chosen."""
    if crops < 1 or pool < 1 or ipc < 1:
        raise ConfigError(f"init_crops, init_pool and ipc must be at least 1, got {crops}, {pool}, {ipc}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    teacher = teacher.eval()
    out, picks = [], []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() == 0:
            raise DataError(f"class {c} has no training image to initialise from")
        if idx.numel() > pool:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:pool]]
        n = idx.numel()
        count = max(crops, math.ceil(ipc / n))
        views = random_resized_crops(images[idx], count, min_scale, generator)  # [n, count, C, H, W]
        flat = views.reshape(-1, *views.shape[2:])
        logits = torch.cat([teacher(x.to(device)).float().cpu() for x in flat.split(batch_size)])
        target = torch.full((flat.shape[0],), c, dtype=torch.long)
        scores = -F.cross_entropy(logits, target, reduction="none").view(n, count)
        chosen = multi_round_pick(scores, ipc)
        out.append(torch.stack([views[i, v] for i, v in chosen]))
        picks.append([(int(idx[i]), v) for i, v in chosen])
    return torch.cat(out), torch.arange(num_classes).repeat_interleave(ipc), picks

"""Figures shared by the demo, the benchmarks, `ltdd groups` and `ltdd plot`: image grids of a set, per-class
accuracy bars, a confusion heatmap ordered by class groups and the curves of a run's metrics log. matplotlib (and
torch) are imported when a figure is drawn."""
from pathlib import Path

from .errors import DataError


def grid_mosaic(pixels, classes, rows, ipc, pad=1, blank_shape=None):
    """One array [rows (h + pad) - pad, ipc (w + pad) - pad, C] of images [N, h, w, C] in [0, 1]: row c holds the
    first ipc images of class c in order, with white blanks and white pad lines between cells."""
    import numpy as np

    h, w, channels = pixels.shape[1:] if len(pixels) else blank_shape
    mosaic = np.ones((rows * (h + pad) - pad, ipc * (w + pad) - pad, channels), dtype=np.float32)
    filled = [0] * rows
    for i, c in enumerate(int(c) for c in classes):
        if filled[c] < ipc:
            y, x = c * (h + pad), filled[c] * (w + pad)
            mosaic[y:y + h, x:x + w] = pixels[i]
            filled[c] += 1
    return mosaic


def save_grid(images, dataset, ipc, path, title, classes=None):
    """A grid of the set's images, a row per class (labelled with its training-image count). classes: the class
    of each image (default: ipc images of each class in turn); a class with fewer than ipc images leaves blanks.
    The grid is one mosaic drawn once (an axes per image made a 10 x 50 grid take seconds to draw)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pixels = np.clip(dataset.denormalize(images.detach().cpu()).permute(0, 2, 3, 1).numpy(), 0, 1)
    if classes is None:
        classes = [i // ipc for i in range(len(pixels))]
    rows, pad = dataset.num_classes, 1
    mosaic = grid_mosaic(pixels, classes, rows, ipc, pad, blank_shape=(*dataset.im_size, dataset.channel))
    h, channels = (mosaic.shape[0] + pad) // rows - pad, mosaic.shape[-1]
    fig, ax = plt.subplots(figsize=(max(ipc * 0.6, 2.0), rows * 0.6))
    ax.imshow(mosaic.squeeze(-1) if channels == 1 else mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (h + pad) + (h - 1) / 2 for r in range(rows)],
                  [f"{dataset.class_names[r]}\n({dataset.class_counts[r]})" for r in range(rows)], fontsize=6)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def per_class_panels(panels, path, panel_width, title, title_size=None, ylim=None):
    """One bar panel per entry of panels {key: {label: EvalReport}}: per-class test accuracy of each labelled
    report side by side, classes labelled with their training-image counts; title(key) names each panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 3.5), squeeze=False)
    for ax, (key, reports) in zip(axes.flat, panels.items()):
        width = 0.8 / len(reports)
        for j, (label, report) in enumerate(reports.items()):
            xs = [c + (j - len(reports) / 2 + 0.5) * width for c in range(len(report.per_class))]
            ax.bar(xs, [100 * (a or 0) for a in report.per_class], width, label=label)
        counts = next(iter(reports.values())).class_counts
        ax.set_xticks(range(len(counts)), [f"{c}\n({n})" for c, n in enumerate(counts)], fontsize=7)
        ax.set_xlabel("class (training images)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(title(key), **({"fontsize": title_size} if title_size else {}))
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metrics(records, path, title):
    """The curves of a metrics.jsonl: for a distillation, each phase's matching loss, the learned lr (alpha) and
    every class's mean image-gradient norm against the iteration; for experts, each expert's training loss against
    the epoch. Returns what was drawn ("distill" or "experts")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distill = [r for r in records if isinstance(r.get("iteration"), int)]
    experts = [r for r in records if isinstance(r.get("expert"), int) and "train_loss" in r]
    if not distill and not experts:
        raise DataError(f"nothing to plot for {path}: the log holds no distillation or expert record")
    if distill:
        its = [r["iteration"] for r in distill]
        losses = sorted({k for r in distill for k in r if k.startswith("loss_")})
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for key in losses:
            axes[0].plot(its, [r.get(key, float("nan")) for r in distill], label=key[len("loss_"):])
        axes[0].set(xlabel="iteration", ylabel="matching loss", title="loss per phase")
        axes[0].legend(fontsize=7)
        axes[1].plot(its, [r.get("alpha", float("nan")) for r in distill])
        axes[1].set(xlabel="iteration", ylabel="alpha", title="learned student lr")
        norms = [r.get("class_grad_norm") or [] for r in distill]
        for c in range(max(len(n) for n in norms)):
            axes[2].plot(its, [n[c] if c < len(n) else float("nan") for n in norms], label=str(c), lw=0.8)
        axes[2].set(xlabel="iteration", ylabel="mean image-gradient norm", title="per class (0 = head)")
        axes[2].legend(fontsize=6, ncol=2)
    else:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for e in sorted({r["expert"] for r in experts}):
            mine = [r for r in experts if r["expert"] == e]
            ax.plot([r["epoch"] for r in mine], [r["train_loss"] for r in mine], label=f"expert {e}")
        ax.set(xlabel="epoch", ylabel="training loss", title="experts")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "distill" if distill else "experts"


def save_heatmap(confusion, grouping, path, class_names=None, class_counts=None, title: str = ""):
    """Row-normalised confusion (%) with rows and columns ordered group by group (a hierarchy.Grouping), groups
    outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    conf = torch.as_tensor(confusion, dtype=torch.float64)
    order = grouping.order()
    conf = conf[order][:, order]
    rows = conf.sum(1, keepdim=True)
    pct = torch.where(rows > 0, 100 * conf / rows.clamp(min=1), torch.zeros_like(conf)).numpy()
    c = len(order)
    names = class_names or [str(k) for k in range(c)]
    labels = [f"{names[k]} ({class_counts[k]})" if class_counts is not None else names[k] for k in order]
    side = min(max(4.0, 0.45 * c + 1.5), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(pct, cmap="viridis", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of the true class's test images")
    if c <= 40:
        ax.set_xticks(range(c), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(c), labels, fontsize=7)
        for i in range(c):
            for j in range(c):
                if pct[i, j] >= 0.5:
                    ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if pct[i, j] > 60 else "white")
    start = 0
    for grp in grouping.groups:
        ax.add_patch(matplotlib.patches.Rectangle((start - 0.5, start - 0.5), len(grp), len(grp), fill=False,
                                                  edgecolor="red", linewidth=1.5))
        start += len(grp)
    ax.set_xlabel("predicted class (training images)")
    ax.set_ylabel("true class (training images)")
    ax.set_title(title or f"confusion ordered by {grouping.method} grouping", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

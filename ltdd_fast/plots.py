"""Figures shared by the demo and the benchmarks: image grids of a set and per-class accuracy bars."""
from pathlib import Path


def save_grid(images, dataset, ipc, path, title, classes=None):
    """A grid of the set's images, a row per class (labelled with its training-image count). classes: the class
    of each image (default: ipc images of each class in turn); a class with fewer than ipc images leaves blanks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = dataset.denormalize(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    if classes is None:
        classes = [i // ipc for i in range(len(pixels))]
    rows = dataset.num_classes
    cells = {}
    for i, c in enumerate(int(c) for c in classes):
        column = sum(1 for (r, _) in cells if r == c)
        if column < ipc:
            cells[c, column] = i
    fig, axes = plt.subplots(rows, ipc, figsize=(ipc * 0.6, rows * 0.6), squeeze=False)
    for (r, column), ax in zip(((r, k) for r in range(rows) for k in range(ipc)), axes.flat):
        if (r, column) in cells:
            p = pixels[cells[r, column]]
            ax.imshow(p.squeeze(-1) if p.shape[-1] == 1 else p, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if column == 0:
            ax.set_ylabel(f"{dataset.class_names[r]}\n({dataset.class_counts[r]})", fontsize=6)
    fig.suptitle(title, fontsize=8)
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

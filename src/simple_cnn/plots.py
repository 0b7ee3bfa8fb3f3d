"""The pictures simple_cnn writes under ``images/``: all PNG, all written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works in Docker and over SSH
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_output  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(history: dict, path: Path) -> Path:
    """Loss and accuracy per epoch, training and validation, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[metric], "o-", label=f"training {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1.02)
    fig.suptitle("Training curves")
    return _save(fig, path)


def image_grid(images, titles: list[str], path: Path, title: str, columns: int = 3) -> Path:
    """uint8 images in a grid of ``columns`` columns, each with its title."""
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images[:n], titles[:n]):
        ax.imshow(image)
        ax.set_title(text, fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def sample_grid(images, title_of, path: Path, title: str, seed: int) -> Path:
    """9 images picked at random (by ``seed``) from ``images``, titled ``title_of(index)``."""
    import numpy as np

    pick = np.random.default_rng(seed).choice(len(images), size=min(9, len(images)), replace=False)
    return image_grid(images[pick], [title_of(i) for i in pick], path, title)


def reliability_diagram(bins: list[dict], ece: float, path: Path) -> Path:
    """Accuracy against confidence per bin (metrics.reliability_bins): a calibrated model's
    bars follow the diagonal. Bar widths are the bins; the counts are printed on them."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    used = [b for b in bins if b["count"]]
    ax.bar(
        [b["low"] for b in used],
        [b["accuracy"] for b in used],
        width=[b["high"] - b["low"] for b in used],
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy in the bin",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    for b in used:
        ax.text((b["low"] + b["high"]) / 2, 0.02, str(b["count"]), ha="center", fontsize=7, rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (test split), ECE {ece:.3f}")
    ax.legend(loc="upper left")
    return _save(fig, path)


def confusion_matrix(matrix, class_names: list[str], path: Path) -> Path:
    """scikit-learn's ConfusionMatrixDisplay, true classes down, predictions across."""
    from sklearn.metrics import ConfusionMatrixDisplay  # here: train mode needs no scikit-learn (quiet.py)

    size = max(5.0, 0.6 * len(class_names) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False, values_format="d"
    )
    ax.set_title("Confusion matrix (test split)")
    return _save(fig, path)

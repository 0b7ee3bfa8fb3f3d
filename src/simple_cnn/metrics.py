"""Scoring predictions honestly: intervals, calibration and the worst mistakes.

scikit-learn computes what it has (balanced accuracy, macro-F1, top-k accuracy, the
confusion matrix) and SciPy the Wilson score interval and the softmax; what neither has
is here, each a few lines: the expected calibration error (ECE) with its reliability
bins, and the single temperature that calibrates a network's probabilities (Guo et al.,
2017, "On Calibration of Modern Neural Networks").
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (SciPy's): unlike the normal approximation,
    it stays inside [0, 1] and behaves at small ``n`` and at accuracies near 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    interval = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence
    bins weighted by how many predictions fall in each."""
    return ece_of(reliability_bins(probabilities, y, bins))


def ece_of(bins: list[dict]) -> float:
    """The ECE of :func:`reliability_bins`' bins: one binning pass serves the number and the diagram."""
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])) if total else 0.0


def reliability_bins(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: its range, mean confidence, accuracy and count (for the diagram)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        in_bin = which == b
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(in_bin.sum()),
                "confidence": float(confidence[in_bin].mean()) if in_bin.any() else None,
                "accuracy": float(correct[in_bin].mean()) if in_bin.any() else None,
            }
        )
    return out


def rescale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities (classes on the last axis) as they would be with logits divided by ``temperature``."""
    from scipy.special import softmax

    return softmax(np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature, axis=-1)


def rescale_views(views: np.ndarray, temperature: float) -> np.ndarray:
    """What a network averaging several views outputs with its logits divided by ``temperature``:
    each view's probabilities rescaled, then averaged. ``views``: ``(images, views, classes)``
    (model.view_probabilities)."""
    return rescale(views, temperature).mean(axis=1)


def fit_temperature(views: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 that minimises the cross-entropy of ``rescale_views(views, T)``
    on held-out data (the validation split). ``views``: ``(images, views, classes)``, or
    ``(images, classes)`` for one view. One number: the ranking of classes in each view,
    and so the accuracy, cannot change."""
    from scipy.optimize import minimize_scalar

    views = views[:, None] if views.ndim == 2 else views
    rows = np.arange(len(y))

    def loss(log_t):
        return -np.log(np.clip(rescale_views(views, math.exp(log_t))[rows, y], 1e-12, 1.0)).mean()

    best = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(best.x))


def worst_mistakes(probabilities: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the misclassified examples, the highest loss (lowest probability of the true class) first."""
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y)
    true_p = probabilities[wrong, y[wrong]]
    return wrong[np.argsort(true_p, kind="stable")]

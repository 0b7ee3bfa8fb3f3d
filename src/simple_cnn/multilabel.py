"""Several labels per image: one decision threshold per class, the answer, and the test metrics.

A multi-label network ends in one sigmoid per class (``model.build_model``). Each class's
threshold is the one that maximises that class's F1 on the validation split (a fixed
0.5 favours frequent labels and starves rare ones); it is stored in the model, and every
runtime answers with the labels at or above their thresholds. The metrics are
scikit-learn's: mean average precision (the area under each class's precision-recall
curve, which needs no threshold), micro- and macro-F1, subset accuracy (every label of
an image right) and Hamming loss (the share of wrong label decisions).
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5  # for a class with no positive validation image


def choose_thresholds(probabilities: np.ndarray, y: np.ndarray) -> list[float]:
    """Per class, the threshold on ``probabilities`` ``[N, C]`` that maximises F1 against ``y`` ``[N, C]``."""
    from sklearn.metrics import precision_recall_curve

    chosen = []
    for c in range(y.shape[1]):
        if not y[:, c].any():
            chosen.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, thresholds = precision_recall_curve(y[:, c], probabilities[:, c])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        chosen.append(round(float(thresholds[int(np.argmax(f1[:-1]))]), 4))
    return chosen


def thresholds_of(metadata: dict) -> np.ndarray | None:
    """A multi-label model's thresholds as an array, or None for a single-label model."""
    if not metadata.get("multi_label"):
        return None
    values = metadata.get("thresholds")
    names = metadata["class_names"]
    if not isinstance(values, list) or len(values) != len(names) or not all(isinstance(v, float | int) for v in values):
        return np.full(len(names), DEFAULT_THRESHOLD)
    return np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)


def decide(probabilities: np.ndarray, thresholds: np.ndarray, min_confidence: float = 0.0) -> np.ndarray:
    """Which labels each image is given: probability at or above its class's threshold (and ``min_confidence``)."""
    return probabilities >= np.maximum(thresholds, min_confidence)


def right(probabilities: np.ndarray, y: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Which answers are right: the most likely class (single-label, ``thresholds`` None), or
    exactly the true labels (multi-label)."""
    if thresholds is None:
        return probabilities.argmax(axis=1) == y
    return (decide(probabilities, thresholds) == y.astype(bool)).all(axis=1)


def labels_above(probabilities: np.ndarray, names: list[str], thresholds: np.ndarray, min_confidence: float = 0.0) -> list[dict]:
    """One image's answer: every label at or above its threshold, most likely first."""
    given = np.flatnonzero(decide(probabilities, thresholds, min_confidence))
    given = given[np.argsort(-probabilities[given], kind="stable")]
    return [{"class": names[i], "probability": float(probabilities[i]), "threshold": float(thresholds[i])} for i in given]


def answer_of(probabilities: np.ndarray, metadata: dict, min_confidence: float = 0.0) -> list[dict] | None:
    """A multi-label model's answer for one image (:func:`labels_above`); None for a single-label model."""
    thresholds = thresholds_of(metadata)
    if thresholds is None:
        return None
    return labels_above(probabilities, metadata["class_names"], thresholds, min_confidence)


def score(probabilities: np.ndarray, y: np.ndarray, thresholds: np.ndarray, names: list[str]) -> dict:
    """Every multi-label test metric (scikit-learn's), overall and per class."""
    from sklearn.metrics import average_precision_score, f1_score, hamming_loss, precision_recall_fscore_support

    predicted = decide(probabilities, thresholds).astype(int)
    truth = y.astype(int)
    present = truth.any(axis=0)
    ap = [float(average_precision_score(truth[:, c], probabilities[:, c])) if present[c] else None for c in range(len(names))]
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    frequency = truth.mean(axis=0)
    return {
        "mean_average_precision": float(np.mean([a for a in ap if a is not None])) if present.any() else 0.0,
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "subset_accuracy": float((predicted == truth).all(axis=1).mean()),
        "hamming_loss": float(hamming_loss(truth, predicted)),
        # What predicting each label's frequency (no image seen) scores: the baseline for mAP.
        "chance_mean_average_precision": float(frequency[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "average_precision": ap[c],
                "threshold": float(thresholds[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(names)
        },
    }


def names_of(row: np.ndarray, names: list[str]) -> str:
    """The labels of one row of 0s and 1s (or booleans), '|'-separated, as a labels file writes them."""
    return "|".join(names[i] for i in np.flatnonzero(row)) or "(none)"


def label_text(y, names: list[str]) -> str:
    """An image's label(s) for a caption: a class index, or a multi-label row of 0s and 1s."""
    return names_of(y, names) if np.ndim(y) else names[int(y)]

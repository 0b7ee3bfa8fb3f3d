"""Test mode: measure a trained model on the test split, which training never saw."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import explain, interrupts, metrics, multilabel, plots, report, unknown
from .cache import cache_folder
from .config import DEFAULT_IMAGES_DIR, DEFAULT_MODEL, ClassifyConfig, auto_batch_size
from .dataset import ImageDataset, Split
from .errors import printable
from .files import ensure_writable_dir, write_csv, write_json
from .formats import load_model, read_fingerprints, read_metadata
from .model import view_probabilities
from .pipeline import make_tf_dataset
from .results import MultiLabelTestResult, TestResult

log = logging.getLogger(__name__)


def evaluate(
    dataset_path,
    model_path=DEFAULT_MODEL,
    images_dir=DEFAULT_IMAGES_DIR,
    batch_size: int | None = None,
    cache_dir=None,
    min_confidence: float = ClassifyConfig.min_confidence,
    labels=None,
    unknown_path=None,
) -> TestResult | MultiLabelTestResult:
    """Evaluate ``model_path`` on the test split of ``dataset_path``.

    The split is recomputed from the settings stored in the model file, so it is the
    one training held out, and test images that copy a training image are set aside
    (``dataset.ImageDataset.test_split``). Writes ``confusion_matrix.png``,
    ``examples_test_images.png``, ``reliability_diagram.png``, ``mistakes.png``,
    ``mistakes.csv``, ``metrics.json`` and ``report.html`` to ``images_dir`` and returns
    the metrics. ``cache_dir``: as in ``ImageDataset.decode``. ``min_confidence``: also
    report the share of test images answered at that confidence and the accuracy on
    them (classify answers "unknown" below it). ``labels``: the labels file, when the model
    was trained with one that is not in ``dataset_path`` under its own name. ``unknown_path``: a
    folder of images of none of the classes, to measure the unknown detector on (``unknown.py``).
    """
    from .callbacks import SafePoints

    ClassifyConfig(min_confidence=min_confidence)
    metadata = read_metadata(model_path)
    novel = unknown.unknown_images(unknown_path) if unknown_path else None  # said before any work
    if novel:
        unknown.require(metadata, model_path)
    images_dir = ensure_writable_dir(Path(images_dir), "images")
    cache_dir = cache_folder(cache_dir) if cache_dir is not None else None  # refused before any work
    dataset = ImageDataset.of_model(dataset_path, metadata, model_path, labels)
    test = dataset.test_split(metadata["image_size"], read_fingerprints(model_path), cache_dir)
    with interrupts.deferred():  # TensorFlow works: a signal waits for a safe point
        model, _ = load_model(model_path)
        batch_size = batch_size or auto_batch_size(metadata["image_size"])
        views = view_probabilities(model, make_tf_dataset(test.x, test.y, batch_size), callbacks=[SafePoints()])
        scored_unknown = unknown.score_unknown(model, model_path, metadata, test.x, novel, batch_size) if novel else None
    if dataset.multi_label:
        summary = dataset.summary() | {"unknown": scored_unknown}
        return score_and_write_multi_label(images_dir, metadata, views.mean(axis=1), test, str(model_path), summary)
    result = score(views, test.y, metadata, min_confidence, str(model_path), dataset.summary())
    result.unknown = scored_unknown
    result.images_written = write_outputs(images_dir, metadata, result, model, test, views.mean(axis=1))
    return result


def score_and_write_multi_label(images_dir: Path, metadata: dict, probabilities, test: Split, model_path: str, summary: dict):
    """Test mode for a multi-label model (``multilabel.py``): its metrics, example images, the
    images whose labels it got wrong (``mistakes.csv``), ``metrics.json`` and the report page.
    Calibration and the confusion matrix are single-label measures and are not drawn."""
    names, thresholds = metadata["class_names"], multilabel.thresholds_of(metadata)
    scored = multilabel.score(probabilities, test.y, thresholds, names)
    result = MultiLabelTestResult(**summary, model_file_path=model_path, test_images=len(test), **scored)
    given = multilabel.decide(probabilities, thresholds)
    wrong = np.flatnonzero((given != test.y.astype(bool)).any(axis=1))
    wrong = wrong[np.argsort(-np.abs(probabilities[wrong] - test.y[wrong]).sum(axis=1), kind="stable")]
    examples = plots.sample_grid(
        test.x,
        lambda i: f"true: {multilabel.names_of(test.y[i], names)}\nsaid: {multilabel.names_of(given[i], names)}",
        images_dir / "examples_test_images.png",
        "Test images",
        seed=0,
    )
    rows = [
        [printable(test.files[i]), multilabel.names_of(test.y[i], names), multilabel.names_of(given[i], names)]
        + [f"{p:.4f}" for p in probabilities[i]]
        for i in wrong
    ]
    written = [examples, write_csv(images_dir / "mistakes.csv", ["file", "true_labels", "predicted_labels", *names], rows)]
    write_json(images_dir / "metrics.json", result.as_dict())
    written.append(images_dir / "metrics.json")
    curves = images_dir / "training_curves.png"
    if not curves.is_file() and (history := (metadata.get("training") or {}).get("history")):
        plots.training_curves(history, curves)
    figures = {"Test examples": examples}
    written.append(report.write_report(images_dir, metadata, curves, figures, result.as_dict(), skipped=result.skipped))
    result.images_written = [str(p) for p in written]
    return result


def write_outputs(images_dir: Path, metadata: dict, result: TestResult, model, test: Split, probabilities) -> list[str]:
    """The plots, ``mistakes.csv``, ``metrics.json`` and the report page; their paths."""
    names, x, y = metadata["class_names"], test.x, test.y
    predicted = probabilities.argmax(axis=1)
    worst = metrics.worst_mistakes(probabilities, y)
    written = [
        plots.confusion_matrix(np.array(result.confusion_matrix), names, images_dir / "confusion_matrix.png"),
        plots.sample_grid(
            x,
            lambda i: f"true: {names[y[i]]}\npredicted: {names[predicted[i]]}",
            images_dir / "examples_test_images.png",
            "Test images",
            seed=0,
        ),
        plots.reliability_diagram(result.calibration["bins"], result.calibration["ece"], images_dir / "reliability_diagram.png"),
        write_mistakes(images_dir / "mistakes.csv", worst, test.files, probabilities, y, names),
    ]
    if len(worst):
        titles = [f"true: {names[y[i]]}\npredicted: {names[predicted[i]]} ({probabilities[i].max():.2f})" for i in worst[:16]]
        title = f"The {min(16, len(worst))} worst mistakes of {len(worst)}"
        written.append(plots.image_grid(x[worst[:16]], titles, images_dir / "mistakes.png", title, columns=4))
    write_json(images_dir / "metrics.json", result.as_dict())
    written.append(images_dir / "metrics.json")
    with interrupts.deferred(finishing=True):  # Grad-CAM runs TensorFlow; the page is the last file
        written.append(write_test_report(images_dir, metadata, result, model, x, y, probabilities, test.files, worst))
    return [str(p) for p in written]


def write_test_report(images_dir: Path, metadata: dict, result: TestResult, model, x, y, probabilities, files, worst) -> Path:
    """The report page, completed with the test split (report.py)."""
    curves = images_dir / "training_curves.png"
    history = (metadata.get("training") or {}).get("history")
    if not curves.is_file() and history:  # tested elsewhere than trained: draw them from the model file
        plots.training_curves(history, curves)
    evidence = report.Evidence(x, y, probabilities, files, gradcam_overlays(model, x, y, probabilities, worst))
    figures = {
        "Reliability diagram": images_dir / "reliability_diagram.png",
        "Test examples": images_dir / "examples_test_images.png",
    }
    return report.write_report(
        images_dir, metadata, curves, figures, result.as_dict(), evidence, worst, result.skipped, result.duplicates
    )


def gradcam_overlays(model, x, y, probabilities, worst) -> list[tuple[int, str]]:
    """Grad-CAM overlays (data URIs) of the most confident right answers and the worst wrong ones."""
    predicted = probabilities.argmax(axis=1)
    right = np.flatnonzero(predicted == y)
    right = right[np.argsort(-probabilities[right].max(axis=1), kind="stable")][: report.GRADCAM]
    rows = np.concatenate([right, worst[: report.GRADCAM]]).astype(int)
    if len(rows) == 0:
        return []
    heat = explain.heat_maps(model, x[rows], predicted[rows])
    return [(int(r), report.thumbnail(explain.overlay(x[r], h))) for r, h in zip(rows, heat)]


def score(views: np.ndarray, y: np.ndarray, metadata: dict, min_confidence: float, model_path: str, summary: dict) -> TestResult:
    """Every test metric of the network's output against the labels ``y`` (scikit-learn's where it has them).

    ``views``: the probabilities of each view, ``(images, views, classes)``
    (model.view_probabilities); the network outputs their mean. The calibration error
    without the model's temperature undoes it on each view, as the network applied it.
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        classification_report,
        confusion_matrix,
        f1_score,
        log_loss,
        top_k_accuracy_score,
    )

    class_names = metadata["class_names"]
    probabilities = views.mean(axis=1)
    predicted = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    correct = int((predicted == y).sum())
    k = min(ClassifyConfig.top_k, len(labels) - 1)
    temperature = (metadata.get("calibration") or {}).get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        temperature = None  # none, or not a number: a model file from elsewhere may hold anything
    uncalibrated = metrics.rescale_views(views, 1 / temperature) if temperature else probabilities
    answered = probabilities.max(axis=1) >= min_confidence
    bins = metrics.reliability_bins(probabilities, y)
    return TestResult(
        **summary,
        model_file_path=model_path,
        test_images=int(len(y)),
        accuracy=correct / len(y),
        accuracy_interval=list(metrics.wilson_interval(correct, len(y))),
        balanced_accuracy=float(balanced_accuracy_score(y, predicted)),
        macro_f1=float(f1_score(y, predicted, labels=labels, average="macro", zero_division=0)),
        top_k_accuracy={"k": k, "accuracy": float(top_k_accuracy_score(y, probabilities, k=k, labels=labels))} if k > 1 else None,
        # Cross-entropy from the same predictions: one pass over the test split, not a
        # second one through model.evaluate().
        loss=float(log_loss(y, probabilities, labels=labels)),
        chance_accuracy=float(np.bincount(y, minlength=len(labels)).max() / len(y)),
        calibration={
            "ece": metrics.ece_of(bins),
            "ece_uncalibrated": metrics.expected_calibration_error(uncalibrated, y) if temperature else None,
            "temperature": temperature,
            "bins": bins,
        },
        min_confidence=min_confidence or None,
        coverage=float(answered.mean()) if min_confidence else None,
        accuracy_answered=float((predicted == y)[answered].mean()) if min_confidence and answered.any() else None,
        per_class=classification_report(y, predicted, labels=labels, target_names=class_names, output_dict=True, zero_division=0),
        confusion_matrix=confusion_matrix(y, predicted, labels=labels).tolist(),
        report=classification_report(y, predicted, labels=labels, target_names=class_names, zero_division=0),
    )


def write_mistakes(path: Path, worst: np.ndarray, files: list[str], probabilities: np.ndarray, y: np.ndarray, names) -> Path:
    """Every misclassified test image, the worst (highest loss) first, as CSV."""
    rows = []
    for i in worst:
        p, guess = probabilities[i], int(probabilities[i].argmax())
        loss = -np.log(max(float(p[y[i]]), 1e-12))
        rows.append([printable(files[i]), names[y[i]], names[guess], f"{p[guess]:.4f}", f"{p[y[i]]:.4f}", f"{loss:.4f}"])
    header = ["file", "true_class", "predicted_class", "probability_predicted", "probability_true", "loss"]
    return write_csv(path, header, rows)

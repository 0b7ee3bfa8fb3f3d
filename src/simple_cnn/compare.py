"""Compare mode: is one model really better than another, on the same test images?

Every model is scored on the **same** test images: the test split of the dataset they
were trained on (split as the first model records it), without any image that any of
them trained on or that copies one (``dataset.ImageDataset.test_split`` with every
model's training fingerprints). Each model decodes the images at its own size.

Two models' accuracies on the same images are paired: the question is how often one is
right where the other is wrong. So the difference gets a paired bootstrap interval over
the test images (seeded) and McNemar's exact test on the images where exactly one is
right (SciPy's binomial test); balanced accuracy gets the same bootstrap and its share of
resamples on the other side of zero. Per-class recall differences and the images where
the answers differ complete the picture (``compare.html``, ``compare.json``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import interrupts, report
from .config import DEFAULT_IMAGES_DIR
from .dataset import ImageDataset
from .errors import UsageError, printable
from .files import atomic_output, ensure_writable_dir, write_json
from .formats import read_fingerprints, read_metadata
from .metrics import wilson_interval
from .results import CompareResult
from .runtime import Predictor

log = logging.getLogger(__name__)

BOOTSTRAP = 10_000  # resamples of the test images, seeded: the same interval on every run
ALPHA = 0.05  # a difference is called detectable below this p and with an interval that excludes zero
SHOWN = 48  # disagreements shown on the page
# What must agree for two models to be scored on the same test images.
SPLIT_KEYS = ("val_split", "test_split", "split_salt")


def compare(model_paths: list, dataset_path=None, images_dir=DEFAULT_IMAGES_DIR, seed: int = 0) -> CompareResult:
    """Score ``model_paths`` (the first is the reference) on the same test images and compare
    each other model with the first; writes ``compare.json`` and ``compare.html`` to ``images_dir``."""
    if len(model_paths) < 2:
        raise UsageError("--mode compare needs two models: --model_file_path A --other_model B")
    paths = [Path(p) for p in model_paths]
    metadatas = [read_metadata(p) for p in paths]
    check_comparable(paths, metadatas)
    images_dir = ensure_writable_dir(Path(images_dir), "images")
    root = Path(dataset_path or metadatas[0].get("dataset_path") or "")
    seen = [read_fingerprints(p) for p in paths]
    training = None if any(f is None for f in seen) else sum(seen[1:], seen[0])
    if training is not None:
        check_same_images(paths, [set(f.files) for f in seen])
    if len({str(m.get("dataset_path")) for m in metadatas}) > 1:
        log.warning(f"the models record different dataset folders: comparing on {root}")
    dataset = ImageDataset.of_model(root, metadatas[0], paths[0])
    test = dataset.test_split(metadatas[0]["image_size"], training)
    records = {r.relpath: r for r in dataset.split("test")}
    probabilities = []
    with interrupts.deferred():
        for path, metadata in zip(paths, metadatas):
            x = test.x if metadata["image_size"] == metadatas[0]["image_size"] else None
            if x is None:
                x = dataset.decode([records[f] for f in test.files], metadata["image_size"]).x
            probabilities.append(predict(Predictor(path, metadata), x))
    y, names = test.y, metadatas[0]["class_names"]
    predicted = [p.argmax(axis=1) for p in probabilities]
    models = [model_summary(path, p, y) for path, p in zip(paths, predicted)]
    pairs = [paired(predicted[0], p, y, len(names), seed, paths[0].name, paths[i].name) for i, p in enumerate(predicted[1:], 1)]
    result = CompareResult(str(root), len(y), names, models, pairs, dataset.summary()["duplicates"])
    write_json(images_dir / "compare.json", result.as_dict())
    page = write_page(images_dir / "compare.html", result, test, predicted, paths)
    result.images_written = [str(images_dir / "compare.json"), str(page)]
    return result


def check_comparable(paths: list[Path], metadatas: list[dict]) -> None:
    """Refuse, in one line naming what differs, models that cannot be scored on the same test images."""
    first = metadatas[0]
    for path, metadata in zip(paths[1:], metadatas[1:]):
        if metadata["class_names"] != first["class_names"]:
            raise UsageError(f"{path} and {paths[0]} know different classes: compare models trained on the same dataset")
        for key in SPLIT_KEYS:
            if metadata.get(key) != first.get(key):
                raise UsageError(f"{path} and {paths[0]} were split differently ({key}): their test splits differ")
        for key in ("layout", "labels_file", "multi_label"):
            if (metadata.get(key) or None) != (first.get(key) or None):
                raise UsageError(f"{path} and {paths[0]} were labelled or split differently ({key}): their test splits differ")
    if first.get("multi_label"):
        raise UsageError("--mode compare compares single-label models; compare multi-label ones by --mode test's mAP")


def check_same_images(paths: list[Path], trained_on: list[set[str]]) -> None:
    """Refuse models that share fewer than half of their training images (by path): other datasets."""
    for path, files in zip(paths[1:], trained_on[1:]):
        shared = len(files & trained_on[0])
        if shared < 0.5 * min(len(files), len(trained_on[0])):
            raise UsageError(
                f"{path} and {paths[0]} were trained on different datasets (they share {shared} of their "
                f"{len(files)} and {len(trained_on[0])} training images): compare models of one dataset"
            )


def predict(predictor: Predictor, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([predictor(x[i : i + batch]) for i in range(0, len(x), batch)])


def model_summary(path: Path, predicted: np.ndarray, y: np.ndarray) -> dict:
    right = int((predicted == y).sum())
    return {
        "model": printable(str(path)),
        "accuracy": right / len(y),
        "accuracy_interval": list(wilson_interval(right, len(y))),
        "balanced_accuracy": balanced_accuracy(predicted[None], y)[0],
    }


def balanced_accuracy(predicted: np.ndarray, y: np.ndarray, classes: int | None = None) -> np.ndarray:
    """Balanced accuracy of each row of ``predicted`` (``[R, N]``) against ``y`` (``[N]`` or ``[R, N]``):
    the mean recall over the classes present, as scikit-learn's (vectorised for the bootstrap)."""
    y = np.broadcast_to(y, predicted.shape)
    classes = classes or int(y.max()) + 1
    rows = np.arange(len(predicted))[:, None]
    support = np.zeros((len(predicted), classes))
    hits = np.zeros((len(predicted), classes))
    np.add.at(support, (rows, y), 1)
    np.add.at(hits, (rows, y), predicted == y)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    return recall.sum(axis=1) / (support > 0).sum(axis=1)


def paired(a: np.ndarray, b: np.ndarray, y: np.ndarray, classes: int, seed: int, name_a: str, name_b: str) -> dict:
    """B against A on the same images: the differences with paired bootstrap intervals, McNemar's exact test."""
    from scipy.stats import binomtest

    right_a, right_b = a == y, b == y
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    mcnemar = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    accuracy, balanced = bootstrap(a, b, y, classes, seed)
    balanced_diff = float(balanced_accuracy(b[None], y, classes)[0] - balanced_accuracy(a[None], y, classes)[0])
    per_class = {}
    for c in range(classes):
        of_c = y == c
        if of_c.any():
            per_class[c] = round(float(right_b[of_c].mean() - right_a[of_c].mean()), 4)
    return {
        "a": name_a,
        "b": name_b,
        "accuracy_difference": float(right_b.mean() - right_a.mean()),
        "accuracy_interval": [float(v) for v in np.percentile(accuracy, [2.5, 97.5])],
        "only_a_right": only_a,
        "only_b_right": only_b,
        "mcnemar_p": float(mcnemar),
        "balanced_accuracy_difference": balanced_diff,
        "balanced_accuracy_interval": [float(v) for v in np.percentile(balanced, [2.5, 97.5])],
        "balanced_accuracy_p": float(min(1.0, 2 * min((balanced <= 0).mean(), (balanced >= 0).mean()))),
        "per_class_recall_difference": per_class,
        "disagreements": int((a != b).sum()),
        "verdict": verdict(name_a, name_b, float(right_b.mean() - right_a.mean()), np.percentile(accuracy, [2.5, 97.5]), mcnemar),
    }


def bootstrap(a: np.ndarray, b: np.ndarray, y: np.ndarray, classes: int, seed: int, chunk: int = 500):
    """BOOTSTRAP resamples of the test images (the same for both models): B's accuracy and balanced
    accuracy minus A's in each; drawn in chunks so that memory stays flat on large test splits."""
    rng = np.random.default_rng(seed)
    accuracy, balanced = [], []
    for start in range(0, BOOTSTRAP, chunk):
        draws = rng.integers(0, len(y), size=(min(chunk, BOOTSTRAP - start), len(y)))
        accuracy.append((b[draws] == y[draws]).mean(axis=1) - (a[draws] == y[draws]).mean(axis=1))
        balanced.append(balanced_accuracy(b[draws], y[draws], classes) - balanced_accuracy(a[draws], y[draws], classes))
    return np.concatenate(accuracy), np.concatenate(balanced)


def verdict(name_a: str, name_b: str, difference: float, interval, p: float) -> str:
    """One line: which is better by how much (with the interval and p), or that no difference is detectable."""
    low, high = (100 * v for v in interval)
    if p < ALPHA and (low > 0 or high < 0):
        better, worse = (name_b, name_a) if difference > 0 else (name_a, name_b)
        lo, hi = (low, high) if difference > 0 else (-high, -low)
        return f"{better} is better than {worse} by {100 * abs(difference):.1f} points ({lo:.1f} to {hi:.1f}), p = {p:.2g}"
    return (
        f"no detectable difference between {name_b} and {name_a}: {100 * difference:+.1f} points "
        f"({low:.1f} to {high:.1f}), p = {p:.2g}"
    )


def write_page(path: Path, result: CompareResult, test, predicted: list[np.ndarray], paths: list[Path]) -> Path:
    """The compare page, in the report page's style: the verdicts, the table, the disagreements."""
    names = result.class_names
    rows = "".join(
        f"<tr><td class='name'>{report.esc(m['model'])}</td><td>{m['accuracy']:.3f}</td>"
        f"<td>{m['accuracy_interval'][0]:.3f}-{m['accuracy_interval'][1]:.3f}</td><td>{m['balanced_accuracy']:.3f}</td></tr>"
        for m in result.models
    )
    table = (
        '<div class="scroll"><table class="per-class"><tr><th class="name">model</th><th>accuracy</th>'
        f"<th>95% interval</th><th>balanced accuracy</th></tr>{rows}</table></div>"
    )
    verdicts = "".join(f'<p class="verdict"><b>{report.esc(p["verdict"])}</b></p>' for p in result.pairs)
    differ = np.flatnonzero(np.any([p != predicted[0] for p in predicted[1:]], axis=0))[:SHOWN]
    pictures = "".join(
        report.figure(
            report.thumbnail(test.x[i]),
            f"{report.esc(test.files[i])}<br>true {report.esc(names[test.y[i]])}<br>"
            + "<br>".join(f"{report.esc(p.name)}: {report.esc(names[pred[i]])}" for p, pred in zip(paths, predicted)),
        )
        for i in differ
    )
    gallery = f'<div class="grid">{pictures}</div>' if pictures else "<p>They answer every test image alike.</p>"
    body = (
        f'<div class="headline">{verdicts}</div>{table}'
        f"<h2>Where they disagree ({sum(p['disagreements'] for p in result.pairs)} answers; the first {len(differ)} images)</h2>"
        f"{gallery}"
    )
    page = report.REPORT_TEMPLATE.substitute(
        policy=report.REPORT_POLICY,
        title="compare: " + report.esc(result.dataset_path),
        style=report.STYLE,
        summary=f"{len(result.models)} models on the same {result.test_images} test images of "
        f"<code>{report.esc(result.dataset_path)}</code>, which none of them trained on",
        body=body,
        command=report.esc(report.command_line()),
        versions=report.esc(report.versions()),
    )
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path

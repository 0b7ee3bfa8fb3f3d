"""Test mode: measure a trained model on the test split, which training never saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data, plots
from .config import DEFAULT_IMAGES_DIR, DEFAULT_MODEL, TrainConfig
from .errors import DataError
from .files import ensure_writable_dir, write_json
from .formats import load_model, read_metadata
from .results import TestResult


def evaluate(
    dataset_path,
    model_path=DEFAULT_MODEL,
    images_dir=DEFAULT_IMAGES_DIR,
    batch_size: int = TrainConfig.batch_size,
    cache_dir=None,
) -> TestResult:
    """Evaluate ``model_path`` on the test split of ``dataset_path``.

    The split is recomputed from the settings stored in the model file, so it is the
    one training held out. Writes ``confusion_matrix.png``, ``examples_test_images.png``
    and ``metrics.json`` to ``images_dir`` and returns the metrics. ``cache_dir``: as
    in ``data.load_images``.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, log_loss

    metadata = read_metadata(model_path)
    images_dir = ensure_writable_dir(Path(images_dir), "images")
    class_names = metadata["class_names"]
    dataset = data.scan_dataset(Path(dataset_path), metadata["val_split"], metadata["test_split"])
    if dataset.class_names != class_names:
        raise DataError(
            f"the classes of {dataset.root} ({', '.join(map(data.shown, dataset.class_names))}) differ from "
            f"those the model {model_path} was trained on ({', '.join(class_names)}): "
            "test on the dataset the model was trained on"
        )
    x, y = data.load_images(dataset, dataset.split("test"), metadata["image_size"], cache_dir)
    if len(x) == 0:
        raise DataError(
            f"the test split of {dataset.root} holds no readable images: add images or retrain with a larger --test_split"
        )

    model, _ = load_model(model_path)
    probabilities = model.predict(data.make_tf_dataset(x, y, batch_size), verbose=0)
    predicted = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    matrix = confusion_matrix(y, predicted, labels=labels)

    result = TestResult(
        model_file_path=str(model_path),
        dataset_path=str(dataset.root),
        test_images=int(len(y)),
        skipped=dataset.skipped_list(),
        accuracy=float(accuracy_score(y, predicted)),
        # Cross-entropy from the same predictions: one pass over the test split, not a
        # second one through model.evaluate().
        loss=float(log_loss(y, probabilities, labels=labels)),
        chance_accuracy=float(np.bincount(y, minlength=len(labels)).max() / len(y)),
        class_names=class_names,
        per_class=classification_report(y, predicted, labels=labels, target_names=class_names, output_dict=True, zero_division=0),
        confusion_matrix=matrix.tolist(),
        report=classification_report(y, predicted, labels=labels, target_names=class_names, zero_division=0),
    )
    written = [
        plots.confusion_matrix(matrix, class_names, images_dir / "confusion_matrix.png"),
        plots.sample_grid(
            x,
            lambda i: f"true: {class_names[y[i]]}\npredicted: {class_names[predicted[i]]}",
            images_dir / "examples_test_images.png",
            "Test images",
            seed=0,
        ),
        images_dir / "metrics.json",
    ]
    result.images_written = [str(p) for p in written]
    write_json(images_dir / "metrics.json", result.as_dict())
    return result

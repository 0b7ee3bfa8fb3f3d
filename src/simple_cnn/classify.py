"""Classify mode: name the classes of new images, one file, a folder or a glob.

The model runs on LiteRT when it can, else Keras (``runtime.open_model`` chooses).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from . import interrupts, multilabel, unknown
from .config import DEFAULT_IMAGES_DIR, DEFAULT_MODEL, ClassifyConfig
from .errors import DataError, UsageError, printable
from .files import atomic_output, csv_cell, ensure_writable_dir
from .images import READABLE, decode_images, images_in_folder, read_image
from .results import ClassifyManyResult, ClassifyResult, prediction, top_classes
from .runtime import Predictor, read_model_metadata

log = logging.getLogger(__name__)

CHUNK = 256  # images decoded and predicted at a time: memory stays flat on any folder


def find_inputs(input_path) -> list[Path]:
    """The image files named by ``input_path``: a file, a folder (searched recursively) or a glob."""
    text = str(input_path)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = images_in_folder(path)
        if not found:
            raise DataError(f"no images ({READABLE}) in the folder {path}")
        return sorted(found)
    if glob.has_magic(text):
        found = _glob(text)
        if not found:
            raise DataError(f"no files match {text}")
        return found
    raise DataError(f"no image at {path}: check the path")


def _glob(pattern: str) -> list[Path]:
    """The files a glob matches, hidden ones left out, sorted.

    pathlib's ``Path.glob`` rather than ``glob.glob``: its ``**`` does not descend into
    folder links, so a link that points back up cannot make the search run for ever.
    """
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:first]) if first else Path()
    matches = base.glob(str(Path(*parts[first:])))
    return sorted(p for p in matches if not p.name.startswith(".") and p.is_file())


def write_explanations(predictor: Predictor, x: np.ndarray, probabilities: np.ndarray, paths: list[Path], images_dir) -> list:
    """Write the Grad-CAM overlay of each image's most likely class (``explain.py``); their paths."""
    from . import explain

    with interrupts.deferred():
        heat = explain.heat_maps(predictor.keras_model, x, probabilities.argmax(axis=1))
    ensure_writable_dir(Path(images_dir), "images")
    written, used = [], set()
    for image, h, path in zip(x, heat, paths):
        target = explain.explanation_path(images_dir, path)
        for n in range(2, len(paths) + 2):  # two inputs with one name: photo_gradcam.png, photo_2_gradcam.png
            if target not in used:
                break
            target = explain.explanation_path(images_dir, path.with_name(f"{path.stem}_{n}"))
        used.add(target)
        written.append(str(explain.write_overlay(target, image, h)))
    return written


def classify_many(
    input_path,
    model_path=DEFAULT_MODEL,
    top_k: int = ClassifyConfig.top_k,
    min_confidence: float = ClassifyConfig.min_confidence,
    explain: bool = False,
    images_dir=DEFAULT_IMAGES_DIR,
    unknown_by_distance: bool = ClassifyConfig.unknown,
) -> ClassifyManyResult:
    """Classify every image named by ``input_path`` (file, folder or glob).

    Unreadable files are skipped and reported. Returns the predictions in file order,
    the skipped files, the runtime used and the throughput. ``explain``: also write each
    image's Grad-CAM overlay to ``images_dir`` (``explain.py``). ``unknown_by_distance``:
    answer "unknown" beyond the model's distance threshold (``unknown.py``).
    """
    ClassifyConfig(top_k=top_k, min_confidence=min_confidence, explain=explain, unknown=unknown_by_distance)
    metadata = read_model_metadata(model_path)  # a missing or bad model is said before missing images
    if unknown_by_distance:
        unknown.require(metadata, model_path)
    paths = find_inputs(input_path)
    predictor = Predictor(model_path, metadata, gradients=explain)
    unknown.check_predictor(predictor, unknown_by_distance)
    size, names = metadata["image_size"], metadata["class_names"]
    started = time.monotonic()
    predictions, skipped = [], []
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        x, errors = decode_images(chunk, size)
        skipped += [{"file": printable(str(p)), "reason": e} for p, e in zip(chunk, errors) if e is not None]
        if len(x) == 0:
            continue
        good = [p for p, e in zip(chunk, errors) if e is None]
        probabilities, distances = predictor.predict(x)
        distances = [None] * len(good) if distances is None else distances
        overlays = write_explanations(predictor, x, probabilities, good, images_dir) if explain else [None] * len(good)
        for path, probs, distance, overlay in zip(good, probabilities, distances, overlays):
            top = top_classes(probs, names, top_k)
            labels = multilabel.answer_of(probs, metadata, min_confidence)
            answer = prediction(top, min_confidence, labels, unknown.novelty(distance, metadata), unknown_by_distance)
            explanation = {"explanation": printable(overlay)} if overlay else {}
            predictions.append({"image": printable(str(path))} | answer | explanation)
    seconds = time.monotonic() - started
    return ClassifyManyResult(
        model_file_path=str(model_path),
        runtime=predictor.runtime,
        predictions=predictions,
        skipped=skipped,
        seconds=round(seconds, 3),
        images_per_second=round(len(predictions) / seconds, 1) if seconds > 0 else None,
    )


def classify(
    image_path,
    model_path=DEFAULT_MODEL,
    top_k: int = ClassifyConfig.top_k,
    min_confidence: float = ClassifyConfig.min_confidence,
    explain: bool = False,
    images_dir=DEFAULT_IMAGES_DIR,
    unknown_by_distance: bool = ClassifyConfig.unknown,
) -> ClassifyResult:
    """Predict the class of the one image at ``image_path``: the ``top_k`` most likely classes,
    and the answer ("unknown" when the most likely is below ``min_confidence``, or with
    ``unknown_by_distance`` when the image lies beyond the model's distance threshold, ``unknown.py``).
    ``explain``: also write the Grad-CAM overlay to ``images_dir`` (``explain.py``)."""
    ClassifyConfig(top_k=top_k, min_confidence=min_confidence, explain=explain, unknown=unknown_by_distance)
    image_path = Path(image_path)
    metadata = read_model_metadata(model_path)  # a missing or bad model is said before a missing image
    if unknown_by_distance:
        unknown.require(metadata, model_path)
    if not image_path.exists():
        raise DataError(f"no image at {image_path}: check --single_image_path")
    if image_path.is_dir():  # the wrong flag for a folder: a usage error
        raise UsageError(f"{image_path} is a folder: give --single_image_path one image file, or --input_path a folder")
    predictor = Predictor(model_path, metadata, gradients=explain)  # checks the model before any decoding at its size
    unknown.check_predictor(predictor, unknown_by_distance)
    try:
        pixels = read_image(image_path, metadata["image_size"])
    except ValueError as e:
        raise DataError(f"cannot read the image {image_path}: {e}") from None
    probabilities, distances = predictor.predict(pixels[None])
    top = top_classes(probabilities[0], metadata["class_names"], top_k)
    overlay = write_explanations(predictor, pixels[None], probabilities, [image_path], images_dir)[0] if explain else None
    labels = multilabel.answer_of(probabilities[0], metadata, min_confidence)
    novelty = unknown.novelty(None if distances is None else distances[0], metadata)
    where = (str(image_path), str(model_path), predictor.runtime)
    return ClassifyResult(*where, top, min_confidence, overlay, labels, novelty, unknown_by_distance)


def write_predictions(result: ClassifyManyResult, path: Path) -> None:
    """Write :func:`classify_many`'s predictions to ``path``, atomically: CSV
    (``file,class,probability,top_k`` with top_k as ``class:p;class:p``; a multi-label
    model adds ``labels``, those given, as ``class:p;class:p``) or JSON lines."""
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.predictions)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        multi = any("labels" in r for r in result.predictions)
        writer.writerow(["file", "class", "probability", "top_k"] + (["labels"] if multi else []))
        for r in result.predictions:
            top = ";".join(f"{t['class']}:{t['probability']:.4f}" for t in r["top_k"])
            row = [csv_cell(r["image"]), csv_cell(r["class"]), f"{r['probability']:.4f}", csv_cell(top)]
            if multi:
                row.append(csv_cell(";".join(f"{t['class']}:{t['probability']:.4f}" for t in r.get("labels", []))))
            writer.writerow(row)
        text = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    result.output = str(path)

"""Export mode: the trained model in another format, beside it (see ``formats.py``).

``--quantize float16|int8`` writes a quantized LiteRT copy and measures what it costs
and saves against the float32 model on the test split, the very images ``--mode test``
scores (``dataset.ImageDataset.test_split``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from . import converters, formats, multilabel, unknown
from .dataset import ImageDataset
from .errors import DataError
from .results import ExportResult
from .runtime import LiteRT, verified_litert_copy

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 300  # training images that calibrate int8 activations

WRITERS = {"tflite": converters.write_tflite, "savedmodel": converters.write_savedmodel, "onnx": converters.write_onnx}


def export(model_path, fmt: str, quantize: str | None = None, dataset_path=None, labels=None) -> ExportResult:
    """Export the model at ``model_path`` to ``fmt`` (tflite, savedmodel or onnx), beside it.

    ``quantize`` (tflite only): see :func:`export_quantized`; ``dataset_path`` defaults
    to the dataset recorded in the model file, ``labels`` to its labels file there.
    """
    if fmt not in WRITERS:
        raise DataError(f"unknown export format {fmt}: choose one of {', '.join(WRITERS)}")
    model, metadata = formats.load_model(model_path)
    if quantize:
        if fmt != "tflite" or quantize not in converters.QUANTIZATIONS:
            raise DataError(f"--quantize takes {' or '.join(converters.QUANTIZATIONS)}, with --format tflite")
        return export_quantized(model, metadata, Path(model_path), quantize, dataset_path, labels)
    if fmt == "tflite":  # bind the model file to its new LiteRT copy (see converters.write_tflite)
        plain = {k: v for k, v in metadata.items() if k != formats.LITERT_SHA256}
        network, embedded = unknown.for_litert(model, model_path, plain)
        path, digest = converters.write_tflite(network, model_path, embedded)
        formats.rewrite_metadata(model_path, metadata | {formats.LITERT_SHA256: digest})
        files = [str(path)]
    else:
        files = [str(WRITERS[fmt](model, model_path, metadata))]
    if fmt != "savedmodel":
        files += [str(p) for p in formats.write_labels(model_path, metadata)]
    return ExportResult(format=fmt, model_file_path=str(model_path), written=files)


def export_quantized(model, metadata: dict, model_path: Path, quantize: str, dataset_path=None, labels=None) -> ExportResult:
    """Write ``MODEL.<quantize>.tflite`` and measure it against the float32 model on the test split.

    The test split (and, for int8, the calibration images from the train split) come
    from the dataset the model was trained on: the one recorded in the model file, or
    ``dataset_path``. Measured: file size, test accuracy, one image's latency and
    images per second on LiteRT, for the float32 and the quantized model alike (for a
    multi-label model, the accuracy is the subset accuracy at its thresholds).
    """
    root = Path(dataset_path or metadata.get("dataset_path") or "")
    if not root.is_dir():
        raise DataError(
            f"--quantize needs the dataset the model was trained on (to calibrate and to measure accuracy), "
            f"and {root} is not a folder: give --dataset_path"
        )
    if not dataset_path:
        log.info(f"Measuring on {root}, the dataset recorded in {model_path} (--dataset_path chooses another)")
    dataset = ImageDataset.of_model(root, metadata, model_path, labels)
    size = metadata["image_size"]
    calibration = None
    if quantize == "int8":
        train = dataset.split("train")
        pick = np.random.default_rng(0).choice(len(train), size=min(CALIBRATION_IMAGES, len(train)), replace=False)
        calibration = dataset.decode([train[i] for i in sorted(pick)], size).x
    plain = {k: v for k, v in metadata.items() if k != formats.LITERT_SHA256}
    network, embedded = unknown.for_litert(model, model_path, plain | {"quantization": quantize}, quantize)
    path, _ = converters.write_tflite(network, model_path, embedded, quantize, calibration)
    test = dataset.test_split(size, formats.read_fingerprints(model_path))
    x, y = test.x, test.y
    # The float32 LiteRT model: the copy training wrote, if it is the verified one; else converted in memory.
    reference = verified_litert_copy(model_path, metadata)
    reference = reference or converters.litert_bytes(*unknown.for_litert(model, model_path, plain))
    thresholds = multilabel.thresholds_of(metadata)
    measured = {"float32": measure(LiteRT(reference), len(reference), x, y, thresholds)}
    measured[quantize] = measure(LiteRT(path.read_bytes()), path.stat().st_size, x, y, thresholds)
    files = [str(path), *(str(p) for p in formats.write_labels(model_path, metadata))]
    return ExportResult(format="tflite", model_file_path=str(model_path), written=files, quantization=measured)


def measure(litert, size_bytes: int, x: np.ndarray, y: np.ndarray, thresholds=None, repeats: int = 50) -> dict:
    """Size, test accuracy, one image's median latency and batched images/s of a LiteRT model
    (``thresholds``: a multi-label model's, see ``multilabel.right``)."""
    correct = np.concatenate([multilabel.right(litert(x[i : i + 64]), y[i : i + 64], thresholds) for i in range(0, len(x), 64)])
    litert(x[:1])  # sized for one image
    latencies = []
    for i in range(repeats):
        start = time.perf_counter()
        litert(x[i % len(x) : i % len(x) + 1])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(x), 64):
        litert(x[i : i + 64])
    seconds = time.perf_counter() - start
    return {
        "size_bytes": int(size_bytes),
        "test_accuracy": float(correct.mean()),
        "test_images": int(len(y)),
        "latency_ms": round(1000 * float(np.median(latencies)), 3),
        "images_per_second": round(len(x) / seconds, 1),
    }

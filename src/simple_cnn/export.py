"""Export mode: the trained model in another format, beside it (see ``formats.py``)."""

from __future__ import annotations

from . import formats
from .errors import DataError
from .results import ExportResult

WRITERS = {"tflite": formats.write_tflite, "savedmodel": formats.write_savedmodel, "onnx": formats.write_onnx}


def export(model_path, fmt: str) -> ExportResult:
    """Export the model at ``model_path`` to ``fmt`` (tflite, savedmodel or onnx), beside it."""
    if fmt not in WRITERS:
        raise DataError(f"unknown export format {fmt}: choose one of {', '.join(WRITERS)}")
    model, metadata = formats.load_model(model_path)
    if fmt == "tflite":  # bind the model file to its new LiteRT copy (see formats.write_tflite)
        embedded = {k: v for k, v in metadata.items() if k != formats.LITERT_SHA256}
        path, digest = formats.write_tflite(model, model_path, embedded)
        formats.rewrite_metadata(model_path, embedded | {formats.LITERT_SHA256: digest})
        files = [str(path)]
    else:
        files = [str(WRITERS[fmt](model, model_path, metadata))]
    if fmt != "savedmodel":
        files.append(str(formats.write_labels(model_path, metadata["class_names"])))
    return ExportResult(format=fmt, model_file_path=str(model_path), written=files)

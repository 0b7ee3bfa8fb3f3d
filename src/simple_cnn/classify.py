"""Classify mode: name the classes of new images, one file, a folder or a glob.

Two runtimes give the same answers (a test checks they agree within 1e-3):

- LiteRT, when the model's ``.tflite`` copy lies beside it and comes from the same
  training run (train mode writes it). It needs no TensorFlow import, so one image is
  classified in a fresh process in a fraction of a second.
- Keras otherwise, through a batched tf.data pipeline.
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

from . import data
from .config import DEFAULT_MODEL, ClassifyConfig
from .errors import DataError
from .files import atomic_output
from .formats import load_model, read_metadata, read_tflite_metadata, tflite_path
from .quiet import c_noise_hidden
from .results import ClassifyManyResult, ClassifyResult

log = logging.getLogger(__name__)

CHUNK = 256  # images decoded and predicted at a time: memory stays flat on any folder


def find_inputs(input_path) -> list[Path]:
    """The image files named by ``input_path``: a file, a folder (searched recursively) or a glob."""
    text = str(input_path)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = data.image_files(path)
        if not found:
            raise DataError(f"no images (.jpg, .png, .bmp, .gif, .webp) in the folder {path}")
        return sorted(found)
    if glob.has_magic(text):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"no files match {text}")
        return found
    raise DataError(f"no image at {path}: check the path")


class Predictor:
    """Probabilities for batches of uint8 images, from LiteRT when possible, else Keras."""

    def __init__(self, model_path, metadata: dict):
        self.metadata = metadata
        lite = tflite_path(model_path)
        lite_metadata = read_tflite_metadata(lite) if lite.exists() else None
        if lite_metadata is not None and lite_metadata == metadata:
            from ai_edge_litert.interpreter import Interpreter

            self.runtime = "litert"
            with c_noise_hidden():
                self._interpreter = Interpreter(model_path=str(lite), num_threads=data.usable_cpus())
            self._input = self._interpreter.get_input_details()[0]["index"]
            self._output = self._interpreter.get_output_details()[0]["index"]
            self._batch = None
        else:
            if lite.exists():
                log.warning(f"{lite} is not from the same training run as {model_path}; using the Keras model")
            self.runtime = "keras"
            self._model, _ = load_model(model_path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.runtime == "keras":
            if len(x) == 1:  # one image: a direct call is much faster than predict()
                return np.asarray(self._model(x.astype(np.float32), training=False))
            ds = data.make_tf_dataset(x, np.zeros(len(x), np.int32), batch_size=64)
            return self._model.predict(ds, verbose=0)
        if self._batch != len(x):
            self._interpreter.resize_tensor_input(self._input, [len(x), *x.shape[1:]])
            with c_noise_hidden():
                self._interpreter.allocate_tensors()
            self._batch = len(x)
        self._interpreter.set_tensor(self._input, x.astype(np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


def _top(probabilities: np.ndarray, class_names: list[str], top_k: int) -> list[dict]:
    order = np.argsort(probabilities)[::-1][: max(1, top_k)]
    return [{"class": class_names[i], "probability": float(probabilities[i])} for i in order]


def classify_many(input_path, model_path=DEFAULT_MODEL, top_k: int = ClassifyConfig.top_k) -> ClassifyManyResult:
    """Classify every image named by ``input_path`` (file, folder or glob).

    Unreadable files are skipped and reported. Returns the predictions in file order,
    the skipped files, the runtime used and the throughput.
    """
    ClassifyConfig(top_k=top_k)
    metadata = read_metadata(model_path)
    paths = find_inputs(input_path)
    predictor = Predictor(model_path, metadata)
    size, names = metadata["image_size"], metadata["class_names"]
    started = time.monotonic()
    predictions, skipped = [], []
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        x, errors = data.decode_images(chunk, size)
        skipped += [{"file": data.shown(str(p)), "reason": e} for p, e in zip(chunk, errors) if e is not None]
        if len(x) == 0:
            continue
        good = [p for p, e in zip(chunk, errors) if e is None]
        for path, probs in zip(good, predictor(x)):
            top = _top(probs, names, top_k)
            predictions.append(
                {"image": data.shown(str(path)), "class": top[0]["class"], "probability": top[0]["probability"], "top_k": top}
            )
    seconds = time.monotonic() - started
    return ClassifyManyResult(
        model_file_path=str(model_path),
        runtime=predictor.runtime,
        predictions=predictions,
        skipped=skipped,
        seconds=round(seconds, 3),
        images_per_second=round(len(predictions) / seconds, 1) if seconds > 0 else None,
    )


def classify(image_path, model_path=DEFAULT_MODEL, top_k: int = ClassifyConfig.top_k) -> ClassifyResult:
    """Predict the class of the one image at ``image_path``: the ``top_k`` most likely classes."""
    ClassifyConfig(top_k=top_k)
    image_path = Path(image_path)
    metadata = read_metadata(model_path)
    if not image_path.exists():
        raise DataError(f"no image at {image_path}: check --single_image_path")
    if image_path.is_dir():
        raise DataError(f"{image_path} is a folder: give --single_image_path one image file, or --input_path a folder")
    try:
        pixels = data.read_image(image_path, metadata["image_size"])
    except ValueError as e:
        raise DataError(f"cannot read the image {image_path}: {e}") from None
    predictor = Predictor(model_path, metadata)
    top = _top(predictor(pixels[None])[0], metadata["class_names"], top_k)
    return ClassifyResult(image=str(image_path), model_file_path=str(model_path), runtime=predictor.runtime, top_k=top)


def write_predictions(result: ClassifyManyResult, path: Path) -> None:
    """Write :func:`classify_many`'s predictions to ``path``, atomically: CSV
    (``file,class,probability,top_k`` with top_k as ``class:p;class:p``) or JSON lines."""
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.predictions)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["file", "class", "probability", "top_k"])
        for r in result.predictions:
            top = ";".join(f"{t['class']}:{t['probability']:.4f}" for t in r["top_k"])
            writer.writerow([r["image"], r["class"], f"{r['probability']:.4f}", top])
        text = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    result.output = str(path)

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

from . import data, interrupts
from .config import DEFAULT_IMAGES_DIR, DEFAULT_MODEL, ClassifyConfig
from .errors import DataError
from .files import atomic_output, ensure_writable_dir
from .formats import (
    LITERT_SHA256,
    load_model,
    read_metadata,
    read_regular,
    read_tflite_metadata,
    read_verified,
    tflite_path,
)
from .quiet import c_noise_hidden
from .results import ClassifyManyResult, ClassifyResult, answer

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


class LiteRT:
    """A LiteRT interpreter running model bytes: probabilities for batches of uint8 images."""

    def __init__(self, content: bytes):
        from ai_edge_litert.interpreter import Interpreter

        with c_noise_hidden():
            self._interpreter = Interpreter(model_content=content, num_threads=data.usable_cpus())
        self.input_shape = tuple(self._interpreter.get_input_details()[0]["shape"][1:])
        self.outputs = int(self._interpreter.get_output_details()[0]["shape"][-1])
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._batch != len(x):
            self._interpreter.resize_tensor_input(self._input, [len(x), *x.shape[1:]])
            with c_noise_hidden():
                self._interpreter.allocate_tensors()
            self._batch = len(x)
        self._interpreter.set_tensor(self._input, x.astype(np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


def read_model_metadata(model_path) -> dict:
    """The metadata of a model file: ``.keras``/``.h5``, or a ``.tflite`` named explicitly (e.g. a quantized copy)."""
    path = Path(model_path)
    if path.suffix != ".tflite":
        return read_metadata(path)
    if not path.is_file():
        raise DataError(f"no model file at {path}")
    metadata = read_tflite_metadata(path)
    if not metadata or not isinstance(metadata.get("class_names"), list) or not isinstance(metadata.get("image_size"), int):
        raise DataError(f"{path} was not written by simple_cnn (it holds no class names), or it is corrupt or truncated")
    return metadata


class Predictor:
    """Probabilities for batches of uint8 images, from LiteRT when possible, else Keras.

    A ``.tflite`` model file named explicitly runs on LiteRT, with the checks of any
    model file. ``explain=True`` loads the Keras model (Grad-CAM needs gradients) and
    adds :meth:`explain`.
    """

    def __init__(self, model_path, metadata: dict, explain: bool = False):
        self.metadata = metadata
        model_path = Path(model_path)
        if explain:
            _check_tensorflow()
            if model_path.suffix == ".tflite":
                raise DataError("--explain needs the .keras or .h5 model (Grad-CAM needs gradients), not a .tflite file")
        if model_path.suffix == ".tflite":
            self._litert = _named_litert(model_path, metadata)
        else:
            self._litert = None if explain else _litert_interpreter(model_path, metadata)
        if self._litert is not None:
            self.runtime = "litert"
        else:
            self.runtime = "keras"
            if not has_tensorflow():
                raise DataError(
                    f"{model_path} has no LiteRT copy beside it ({tflite_path(model_path).name}), and without TensorFlow "
                    "(the slim image) only that can run: make it with --mode export --format tflite in the full image"
                )
            with interrupts.deferred():
                self._model, _ = load_model(model_path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with interrupts.deferred():  # a signal waits for a safe point (interrupts.py)
            if self.runtime == "litert":
                return self._litert(x)
            if len(x) == 1:  # one image: a direct call is much faster than predict()
                return np.asarray(self._model(x.astype(np.float32), training=False))
            ds = data.make_tf_dataset(x, np.zeros(len(x), np.int32), batch_size=64)
            return self._model.predict(ds, verbose=0, callbacks=[interrupts.safe_points()])

    def explain(self, x: np.ndarray, probabilities: np.ndarray, paths: list[Path], images_dir: Path) -> list[str]:
        """Write the Grad-CAM overlay of each image's most likely class; their paths."""
        from . import explain

        with interrupts.deferred():
            heat = explain.heat_maps(self._model, x, probabilities.argmax(axis=1))
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


def has_tensorflow() -> bool:
    """Whether TensorFlow is installed (not in the slim classify image), without importing it."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _check_tensorflow() -> None:
    """--explain needs TensorFlow: one line where it is not installed (the slim classify image)."""
    if not has_tensorflow():
        raise DataError("--explain needs TensorFlow, which is not installed here: use the full simple_cnn image")


def _named_litert(path: Path, metadata: dict) -> LiteRT:
    """The LiteRT model the user named: it must run, and take and give what its metadata says."""
    content = read_regular(path)
    try:
        litert = LiteRT(content)
    except Exception as e:  # noqa: BLE001 (LiteRT raises ValueError, RuntimeError, ... on a bad model)
        raise DataError(f"cannot run {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    size, classes = metadata["image_size"], len(metadata["class_names"])
    if litert.input_shape != (size, size, 3) or litert.outputs != classes:
        raise DataError(
            f"{path} is inconsistent: its network takes {litert.input_shape} and gives {litert.outputs} outputs, "
            f"but its metadata says {size}x{size}x3 images and {classes} classes"
        )
    return litert


def _litert_interpreter(model_path: Path, metadata: dict):
    """A LiteRT interpreter for the model's ``.tflite`` copy, or None (then Keras is used).

    The copy is used only when its bytes have the SHA-256 recorded in the model file you
    named (formats.write_tflite); the interpreter runs those very bytes. Anything else
    beside the model (another run's copy, a planted file, a truncated one) is passed over
    with one line.
    """
    lite = tflite_path(model_path)
    if not lite.exists():
        return None
    content = read_verified(lite, metadata.get(LITERT_SHA256))
    if content is None:
        why = (
            "its SHA-256 differs from the one the model file records"
            if metadata.get(LITERT_SHA256)
            else "the model file records no fingerprint of it"
        )
        log.warning(f"{lite} is not from the same training run as {model_path} ({why}); using the Keras model")
        return None
    try:
        return LiteRT(content)
    except Exception as e:  # noqa: BLE001 (LiteRT raises ValueError, RuntimeError, ... on a bad model)
        log.warning(f"cannot run {lite} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); using the Keras model")
        return None


def top_classes(probabilities: np.ndarray, class_names: list[str], top_k: int) -> list[dict]:
    order = np.argsort(probabilities)[::-1][: max(1, top_k)]
    return [{"class": class_names[i], "probability": float(probabilities[i])} for i in order]


def classify_many(
    input_path,
    model_path=DEFAULT_MODEL,
    top_k: int = ClassifyConfig.top_k,
    min_confidence: float = ClassifyConfig.min_confidence,
    explain: bool = False,
    images_dir=DEFAULT_IMAGES_DIR,
) -> ClassifyManyResult:
    """Classify every image named by ``input_path`` (file, folder or glob).

    Unreadable files are skipped and reported. Returns the predictions in file order,
    the skipped files, the runtime used and the throughput. ``explain``: also write each
    image's Grad-CAM overlay to ``images_dir`` (``explain.py``).
    """
    ClassifyConfig(top_k=top_k, min_confidence=min_confidence, explain=explain)
    metadata = read_model_metadata(model_path)
    paths = find_inputs(input_path)
    predictor = Predictor(model_path, metadata, explain)
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
        probabilities = predictor(x)
        overlays = predictor.explain(x, probabilities, good, images_dir) if explain else [None] * len(good)
        for path, probs, overlay in zip(good, probabilities, overlays):
            top = top_classes(probs, names, top_k)
            predictions.append(
                {
                    "image": data.shown(str(path)),
                    "class": answer(top, min_confidence),
                    "probability": top[0]["probability"],
                    "top_k": top,
                }
                | ({"explanation": data.shown(overlay)} if overlay else {})
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


def classify(
    image_path,
    model_path=DEFAULT_MODEL,
    top_k: int = ClassifyConfig.top_k,
    min_confidence: float = ClassifyConfig.min_confidence,
    explain: bool = False,
    images_dir=DEFAULT_IMAGES_DIR,
) -> ClassifyResult:
    """Predict the class of the one image at ``image_path``: the ``top_k`` most likely classes,
    and the answer ("unknown" when the most likely is below ``min_confidence``).
    ``explain``: also write the Grad-CAM overlay to ``images_dir`` (``explain.py``)."""
    ClassifyConfig(top_k=top_k, min_confidence=min_confidence, explain=explain)
    image_path = Path(image_path)
    metadata = read_model_metadata(model_path)
    if not image_path.exists():
        raise DataError(f"no image at {image_path}: check --single_image_path")
    if image_path.is_dir():
        raise DataError(f"{image_path} is a folder: give --single_image_path one image file, or --input_path a folder")
    try:
        pixels = data.read_image(image_path, metadata["image_size"])
    except ValueError as e:
        raise DataError(f"cannot read the image {image_path}: {e}") from None
    predictor = Predictor(model_path, metadata, explain)
    probabilities = predictor(pixels[None])
    top = top_classes(probabilities[0], metadata["class_names"], top_k)
    overlay = predictor.explain(pixels[None], probabilities, [image_path], images_dir)[0] if explain else None
    return ClassifyResult(str(image_path), str(model_path), predictor.runtime, top, min_confidence, overlay)


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
            writer.writerow([data.csv_cell(r["image"]), data.csv_cell(r["class"]), f"{r['probability']:.4f}", data.csv_cell(top)])
        text = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    result.output = str(path)

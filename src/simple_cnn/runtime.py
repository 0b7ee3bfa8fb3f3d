"""Opening a model for inference: one call, whichever runtime can run it.

Two runtimes give the same answers (a test checks they agree within 1e-3):

- LiteRT, when the model's ``.tflite`` copy lies beside it and comes from the same
  training run (train mode writes it and records its SHA-256 in the model file), or when
  a ``.tflite`` file is named explicitly (a quantized copy). It needs no TensorFlow
  import, so one image is classified in a fresh process in a fraction of a second.
- Keras otherwise, through a batched tf.data pipeline.

:func:`open_model` chooses; classify, serve, export and the benchmarks use it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from . import interrupts
from .errors import DataError
from .formats import LITERT_SHA256, check_metadata, load_model, read_metadata, read_tflite_metadata, read_verified, tflite_path
from .images import usable_cpus
from .quiet import native_stderr_hidden

log = logging.getLogger(__name__)


class LiteRT:
    """A LiteRT interpreter running model bytes: probabilities for batches of uint8 images, and with
    :meth:`run` also each image's unknown distance when the network gives one (``unknown.py``)."""

    def __init__(self, content: bytes):
        from ai_edge_litert.interpreter import Interpreter

        with native_stderr_hidden():
            self._interpreter = Interpreter(model_content=content, num_threads=usable_cpus())
        self.input_shape = tuple(self._interpreter.get_input_details()[0]["shape"][1:])
        self._input = self._interpreter.get_input_details()[0]["index"]
        # The probabilities and, as a second output, the distance: the one whose last axis holds one value
        # (a model has at least two classes, formats.check_metadata).
        outputs = sorted(self._interpreter.get_output_details(), key=lambda d: int(d["shape"][-1]) == 1)
        self.outputs = int(outputs[0]["shape"][-1])
        self._output = outputs[0]["index"]
        self._distance = outputs[1]["index"] if len(outputs) > 1 and int(outputs[1]["shape"][-1]) == 1 else None
        self.has_distance = self._distance is not None
        self._batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The probabilities of a batch and its distances (None without a detector)."""
        if self._batch != len(x):
            self._interpreter.resize_tensor_input(self._input, [len(x), *x.shape[1:]])
            with native_stderr_hidden():
                self._interpreter.allocate_tensors()
            self._batch = len(x)
        self._interpreter.set_tensor(self._input, x.astype(np.float32))
        self._interpreter.invoke()
        distance = self._interpreter.get_tensor(self._distance)[:, 0].copy() if self.has_distance else None
        return self._interpreter.get_tensor(self._output).copy(), distance


def has_tensorflow() -> bool:
    """Whether TensorFlow is installed (not in the slim classify image), without importing it."""
    return importlib.util.find_spec("tensorflow") is not None


def read_model_metadata(model_path) -> dict:
    """The metadata of a model file: ``.keras``/``.h5``, or a ``.tflite`` named explicitly (e.g. a quantized copy)."""
    path = Path(model_path)
    if path.suffix != ".tflite":
        return read_metadata(path)
    if not path.is_file():
        raise DataError(f"no model file at {path}")
    metadata = read_tflite_metadata(path)
    if not metadata or "class_names" not in metadata:
        raise DataError(f"{path} was not written by simple_cnn (it holds no class names), or it is corrupt or truncated")
    return check_metadata(metadata, path)


def verified_litert_copy(model_path: Path, metadata: dict) -> bytes | None:
    """The bytes of the model's ``.tflite`` copy if they have the SHA-256 recorded in the model file; else None.

    Anything else beside the model (another run's copy, a planted file, a truncated one)
    is passed over with one line. The bytes returned are the bytes checked.
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
    return content


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_shapes(litert: LiteRT, metadata: dict, path: Path, described_by: Path) -> LiteRT:
    """``litert`` if its network takes and gives what the metadata says; else DataError (one line)."""
    size, classes = metadata["image_size"], len(metadata["class_names"])
    if litert.input_shape != (size, size, 3) or litert.outputs != classes:
        raise DataError(
            f"{path} is inconsistent with {described_by.name}: its network takes {litert.input_shape} and gives "
            f"{litert.outputs} outputs, but the metadata says {size}x{size}x3 images and {classes} classes"
        )
    return litert


def _named_litert(path: Path, metadata: dict) -> LiteRT:
    """The LiteRT model the user named: it must run, and take and give what its metadata says."""
    from .files import read_regular

    content = read_regular(path)
    try:
        litert = LiteRT(content)
    except Exception as e:  # noqa: BLE001 (LiteRT raises ValueError, RuntimeError, ... on a bad model)
        raise DataError(f"cannot run {path}: {_first_line(e)}") from None
    return _check_shapes(litert, metadata, path, path)


def litert_beside(model_path: Path, metadata: dict) -> LiteRT | None:
    """A LiteRT interpreter for the model's verified ``.tflite`` copy, or None (then Keras is used).

    A verified copy whose network contradicts the model file's metadata is refused
    (DataError), as strictly as a ``.tflite`` named explicitly: the metadata was written
    with those very bytes' digest, so one of them was forged.
    """
    content = verified_litert_copy(model_path, metadata)
    if content is None:
        return None
    try:
        litert = LiteRT(content)
    except Exception as e:  # noqa: BLE001 (LiteRT raises ValueError, RuntimeError, ... on a bad model)
        log.warning(f"cannot run {tflite_path(model_path)} ({_first_line(e)}); using the Keras model")
        return None
    return _check_shapes(litert, metadata, tflite_path(model_path), Path(model_path))


class Predictor:
    """Probabilities for batches of uint8 images, from LiteRT when possible, else Keras; with
    :meth:`predict`, also each image's unknown distance when the model has a detector (``unknown.py``).

    ``gradients=True`` loads the Keras model (Grad-CAM needs them): ``keras_model``.
    """

    def __init__(self, model_path, metadata: dict, gradients: bool = False):
        self.path, self.metadata = Path(model_path), metadata
        self.keras_model, self._litert, self._network = None, None, None
        if gradients:
            if not has_tensorflow():
                raise DataError("--explain needs TensorFlow, which is not installed here: use the full simple_cnn image")
            if self.path.suffix == ".tflite":
                raise DataError("--explain needs the .keras or .h5 model (Grad-CAM needs gradients), not a .tflite file")
        elif self.path.suffix == ".tflite":
            self._litert = _named_litert(self.path, metadata)
        else:
            self._litert = litert_beside(self.path, metadata)
        self.runtime = "litert" if self._litert is not None else "keras"
        if self._litert is None:
            self._load_keras()
        self.has_distance = self._litert.has_distance if self._litert is not None else len(self._network.outputs) > 1

    def _load_keras(self) -> None:
        """The Keras model, and the network the predictions run: with the detector's distance when the file has one."""
        if not has_tensorflow():
            raise DataError(
                f"{self.path} has no LiteRT copy beside it ({tflite_path(self.path).name}), and without TensorFlow "
                "(the slim image) only that can run: make it with --mode export --format tflite in the full image"
            )
        from . import unknown

        with interrupts.deferred():
            self.keras_model, _ = load_model(self.path)
            detector = unknown.read_detector(self.path) if unknown.record_of(self.metadata) else None
            self._network = unknown.inference_network(self.keras_model, detector) if detector else self.keras_model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x)[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The probabilities of a batch of images, and their distances (None without a detector)."""
        with interrupts.deferred():  # a signal waits for a safe point (interrupts.py)
            if self._litert is not None:
                return self._litert.run(x)
            if len(x) == 1:  # one image: a direct call is much faster than predict()
                out = self._network(x.astype(np.float32), training=False)
            else:
                from .callbacks import SafePoints
                from .pipeline import make_tf_dataset

                ds = make_tf_dataset(x, np.zeros(len(x), np.int32), batch_size=64)
                out = self._network.predict(ds, verbose=0, callbacks=[SafePoints()])
        if isinstance(out, list | tuple):
            return np.asarray(out[0]), np.asarray(out[1])[:, 0]
        return np.asarray(out), None


def open_model(model_path, gradients: bool = False) -> Predictor:
    """The model at ``model_path`` (``.keras``, ``.h5`` or ``.tflite``), ready to predict; its metadata is ``.metadata``."""
    return Predictor(model_path, read_model_metadata(model_path), gradients)

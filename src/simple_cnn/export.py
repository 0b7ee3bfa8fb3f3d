"""Export mode, and the LiteRT copy that makes classify start fast.

Every export lands next to the model file and carries the class names the way users of
its format expect them:

- LiteRT (``cnn_model.tflite``): simple_cnn's metadata JSON inside the flatbuffer's
  ``metadata`` list (name ``simple_cnn``), plus ``cnn_model.labels.txt``.
- SavedModel (``cnn_model_savedmodel/``): the ``serving_default`` signature takes encoded
  images (JPEG, PNG, ...; TensorFlow Serving's REST API accepts them as
  ``{"instances": [{"b64": "..."}]}``) and returns ``probabilities``, ``classes`` and
  ``scores``; a ``pixels`` signature takes raw 0-255 RGB arrays. Labels are in the graph
  and in ``assets/labels.txt``.
- ONNX (``cnn_model.onnx``): converted by tf2onnx; the metadata JSON is in the model's
  ``metadata_props`` (key ``simple_cnn``), plus ``cnn_model.labels.txt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

from .errors import DataError
from .files import atomic_output
from .quiet import import_tensorflow

TFLITE_METADATA_NAME = "simple_cnn"
FORMATS = ("tflite", "savedmodel", "onnx")


def tflite_path(model_path) -> Path:
    return Path(model_path).with_suffix(".tflite")


def labels_path(model_path) -> Path:
    return Path(model_path).with_suffix(".labels.txt")


@contextlib.contextmanager
def _converter_quiet():
    """TensorFlow's converters print pages of graph details to stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def write_tflite(model, model_path, metadata: dict) -> Path:
    """Convert ``model`` to LiteRT beside ``model_path``, with ``metadata`` inside."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tf = import_tensorflow()
    with _converter_quiet():
        flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = [*(tree.metadata or []), entry]
    path = tflite_path(model_path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)))
    return path


def read_tflite_metadata(path) -> dict | None:
    """simple_cnn's metadata inside a .tflite file, or None (no file, or none inside)."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        buf = Path(path).read_bytes()
        model = schema.Model.GetRootAs(buf, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() and entry.Name().decode() == TFLITE_METADATA_NAME:
                return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return None


def _write_labels(model_path, class_names) -> Path:
    path = labels_path(model_path)
    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    return path


def _write_savedmodel(model, model_path, metadata: dict) -> Path:
    tf = import_tensorflow()
    import keras

    size, names = metadata["image_size"], metadata["class_names"]
    labels = tf.constant(names)

    def outputs(pixels):
        p = model(pixels, training=False)
        return {"probabilities": p, "classes": tf.gather(labels, tf.argmax(p, axis=1)), "scores": tf.reduce_max(p, axis=1)}

    def decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size), method="bilinear", antialias=True)

    def serve_bytes(image_bytes):
        return outputs(tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("pixels", outputs, [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    target = Path(model_path).with_name(Path(model_path).stem + "_savedmodel")
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _converter_quiet():
        archive.write_out(str(tmp), verbose=False)
    (tmp / "assets").mkdir(exist_ok=True)
    (tmp / "assets" / "labels.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    (tmp / "assets" / "simple_cnn.json").write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
    # Swap folders: the old export stays whole until the new one is complete.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_onnx(model, model_path, metadata: dict) -> Path:
    tf = import_tensorflow()
    import tf2onnx

    size = metadata["image_size"]
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)
    with _converter_quiet():
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "simple_cnn", json.dumps(metadata, ensure_ascii=False)
    path = Path(model_path).with_suffix(".onnx")
    with atomic_output(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


def export(model_path, fmt: str) -> dict:
    """Export the model at ``model_path`` to ``fmt`` (tflite, savedmodel or onnx), beside it."""
    from .model import load_model

    if fmt not in FORMATS:
        raise DataError(f"unknown export format {fmt}: choose one of {', '.join(FORMATS)}")
    model, metadata = load_model(model_path)
    written = {"tflite": write_tflite, "savedmodel": _write_savedmodel, "onnx": _write_onnx}[fmt](model, model_path, metadata)
    files = [str(written)]
    if fmt != "savedmodel":
        files.append(str(_write_labels(model_path, metadata["class_names"])))
    return {"mode": "export", "format": fmt, "model_file_path": str(model_path), "written": files}

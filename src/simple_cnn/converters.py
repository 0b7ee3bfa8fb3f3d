"""Converting a trained model for other runtimes, each file written atomically.

- LiteRT (``.tflite``): train mode's copy beside the model, and export's, float32 or
  quantized (:func:`litert_bytes`, :func:`write_tflite`).
- SavedModel and ONNX: export mode (:func:`write_savedmodel`, :func:`write_onnx`).

What each file holds, and how it is read back, is in ``formats.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path

from .files import atomic_dir, atomic_output
from .formats import TFLITE_METADATA_NAME, tflite_path
from .images import MAX_PIXELS
from .quiet import import_tensorflow, native_stderr_hidden


@contextlib.contextmanager
def _converter_quiet():
    """TensorFlow's converters print pages of graph details to stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


QUANTIZATIONS = ("float16", "int8")


def quantized_path(model_path, quantize: str) -> Path:
    """``models/cnn_model.keras`` -> ``models/cnn_model.int8.tflite``."""
    return Path(model_path).with_suffix(f".{quantize}.tflite")


def litert_bytes(model, metadata: dict, quantize: str | None = None, calibration=None) -> bytes:
    """``model`` converted to LiteRT with ``metadata`` inside; optionally quantized.

    ``quantize``: ``float16`` stores the weights as float16 (half the size, computed in
    float32); ``int8`` quantizes weights and activations to 8-bit integers, calibrated
    on ``calibration`` (uint8 images, a few hundred training images), with float32
    input and output so that every caller feeds pixels and reads probabilities as usual.
    """
    tf = import_tensorflow()
    converter = _litert_converter(tf, model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.representative_dataset = lambda: ([calibration[i : i + 1].astype("float32")] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with _converter_quiet(), native_stderr_hidden():  # the int8 calibrator also writes to fd 2 from C++
        flat = converter.convert()
    return _described(flat, model, metadata)


def _litert_converter(tf, model):
    """A LiteRT converter of ``model``'s inference call, traced here once.

    Not ``TFLiteConverter.from_keras_model``: it writes the model to a SavedModel on disk and
    reads it back, which was most of the conversion's time and memory. The traced function
    converts to the same operations and outputs in a fraction of both (bench/README.md, "The
    LiteRT copy"). TensorFlow calls this path (a function without its ``trackable_obj``)
    deprecated, so the warning it logs is dropped here; it writes no signature, so
    :func:`_described` adds the one ``from_keras_model`` writes (``tests/test_classify_export.py``
    runs it, and compares the outputs with Keras').
    """
    tensor = model.inputs[0]
    spec = tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name)
    traced = tf.function(lambda image: model(image, training=False)).get_concrete_function(spec)
    absl = logging.getLogger("absl")

    def not_the_deprecation(record: logging.LogRecord) -> bool:
        return "trackable_obj" not in record.getMessage()

    absl.addFilter(not_the_deprecation)
    try:
        return tf.lite.TFLiteConverter.from_concrete_functions([traced])
    finally:
        absl.removeFilter(not_the_deprecation)


def write_tflite(model, model_path, metadata: dict, quantize: str | None = None, calibration=None) -> tuple[Path, str]:
    """Convert ``model`` to LiteRT beside ``model_path``, with ``metadata`` inside (see :func:`litert_bytes`).

    Returns the path and the file's SHA-256, which the caller stores in the model
    file's metadata (``LITERT_SHA256``): classify runs a LiteRT copy only when its bytes
    have exactly that digest, so a ``.tflite`` planted beside a model is never used.
    A quantized copy goes to :func:`quantized_path`, used only when named explicitly.
    """
    content = litert_bytes(model, metadata, quantize, calibration)
    path = quantized_path(model_path, quantize) if quantize else tflite_path(model_path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def _described(flat: bytes, model, metadata: dict) -> bytes:
    """The flatbuffer with ``metadata`` (JSON) appended to its ``metadata`` list, and the signature
    a device's signature runner calls, as ``from_keras_model`` writes it: ``serving_default``, the
    input by its Keras name, the outputs ``output_0``, ``output_1``, ... in the model's order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    def tensor_map(name: str, index: int):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = name.encode(), int(index)
        return entry

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    graph = tree.subgraphs[0]
    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = b"serving_default", 0
    signature.inputs = [tensor_map(model.inputs[0].name, graph.inputs[0])]
    signature.outputs = [tensor_map(f"output_{i}", index) for i, index in enumerate(graph.outputs)]
    tree.signatureDefs = [signature]
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = [*(tree.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _declared_pixels(tf, data):
    """Width x height as an encoded image's header declares it, read before decoding (TF ops).

    JPEG (from its frame header), PNG, GIF and BMP; any other bytes count as too many, so
    that ``decode_image`` never allocates for a decompression bomb or an unknown format.
    """
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(tf.strings.join([data, b"\0" * 32]), 0, 32), tf.uint8), tf.int64)

    def big_endian32(i):
        return head[i] * 2**24 + head[i + 1] * 2**16 + head[i + 2] * 2**8 + head[i + 3]

    def little_endian(i, n):
        value = sum(head[i + k] * 256**k for k in range(n))
        return tf.abs(tf.where(value >= 2 ** (8 * n - 1), value - 2 ** (8 * n), value)) if n == 4 else value

    def starts(prefix):
        return tf.equal(tf.strings.substr(data, 0, len(prefix)), prefix)

    too_many = tf.constant(MAX_PIXELS + 1, tf.int64)
    jpeg = tf.cond(
        starts(b"\xff\xd8"), lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)), lambda: too_many
    )
    return tf.case(
        [
            (starts(b"\x89PNG\r\n\x1a\n"), lambda: big_endian32(16) * big_endian32(20)),
            (starts(b"GIF8"), lambda: little_endian(6, 2) * little_endian(8, 2)),
            (starts(b"BM"), lambda: little_endian(18, 4) * little_endian(22, 4)),
        ],
        default=lambda: jpeg,
    )


def write_savedmodel(model, model_path, metadata: dict) -> Path:
    tf = import_tensorflow()
    import keras

    size, names = metadata["image_size"], metadata["class_names"]
    labels = tf.constant(names)

    def outputs(pixels):
        p = model(pixels, training=False)
        return {"probabilities": p, "classes": tf.gather(labels, tf.argmax(p, axis=1)), "scores": tf.reduce_max(p, axis=1)}

    def decode(data):
        pixels = _declared_pixels(tf, data)
        check = tf.debugging.assert_less_equal(
            pixels,
            tf.constant(MAX_PIXELS, tf.int64),
            message=f"refused: not a JPEG, PNG, GIF or BMP, or over {MAX_PIXELS:,} pixels",
        )
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size), method="bilinear", antialias=True)

    def serve_bytes(image_bytes):
        return outputs(tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("pixels", outputs, [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    target = Path(model_path).with_name(Path(model_path).stem + "_savedmodel")
    with atomic_dir(target) as tmp:  # the old export stays whole until the new one is complete
        with _converter_quiet():
            archive.write_out(str(tmp), verbose=False)
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / "labels.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        (tmp / "assets" / "simple_cnn.json").write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
    return target


def write_onnx(model, model_path, metadata: dict) -> Path:
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

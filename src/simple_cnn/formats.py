"""Model files, in every format simple_cnn reads or writes, each describing itself.

The class names, input size and split settings travel inside every file (the
"metadata"), so classifying needs nothing but the file and an image:

- ``.keras`` (recommended) and ``.h5``: what train mode writes and every mode reads.
  Keras has no API for user metadata in a model file, so we add it ourselves: a JSON
  member (``simple_cnn.json``) in the ``.keras`` zip archive, or a root attribute of the
  ``.h5`` file. ``keras.models.load_model`` ignores both. Beside it, the training
  images' fingerprints (``duplicates.py``; for test mode, which sets aside test images
  that copy them): a member ``simple_cnn_fingerprints.json`` or a root dataset of
  that JSON's bytes (HDF5 attributes stop at 64 KB). Classify never reads them. And the
  "unknown" detector's means and whitening (``unknown.py``): ``simple_cnn_unknown.npz``.
- LiteRT (``cnn_model.tflite``, written beside the model by train mode): the metadata JSON
  inside the flatbuffer's ``metadata`` list (name ``simple_cnn``), plus
  ``cnn_model.labels.txt``. Classify uses it to start without TensorFlow.
- SavedModel (``cnn_model_savedmodel/``): the ``serving_default`` signature takes encoded
  images (JPEG, PNG, ...; TensorFlow Serving's REST API accepts them as
  ``{"instances": [{"b64": "..."}]}``) and returns ``probabilities``, ``classes`` and
  ``scores``; a ``pixels`` signature takes raw 0-255 RGB arrays. Labels are in the graph
  and in ``assets/labels.txt``.
- ONNX (``cnn_model.onnx``): converted by tf2onnx; the metadata JSON is in the model's
  ``metadata_props`` (key ``simple_cnn``), plus ``cnn_model.labels.txt``.

Every file is written atomically (``files.atomic_output``, ``files.atomic_dir``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

from .duplicates import Fingerprints
from .errors import DataError, UsageError
from .files import atomic_dir, atomic_output, read_regular
from .images import MAX_PIXELS
from .quiet import import_keras, import_tensorflow, native_stderr_hidden

MODEL_SUFFIXES = (".keras", ".h5")
METADATA_MEMBER = "simple_cnn.json"  # an extra member of the .keras zip archive
METADATA_ATTR = "simple_cnn_metadata"  # a root attribute of the .h5 file
FINGERPRINTS_MEMBER = "simple_cnn_fingerprints.json"  # .keras: a zip member; .h5: a root dataset named without .json
TFLITE_METADATA_NAME = "simple_cnn"
LITERT_SHA256 = "litert_sha256"  # the metadata key binding a model file to its LiteRT copy
TRAIN_HINT = "train one first: simple-cnn --mode train --dataset_path DATASET --model_file_path {path}"
# What a model file's own members may declare before they are read: a handed-over file is
# refused rather than decompressed whole (a few KB of zip can declare gigabytes).
MAX_METADATA_BYTES = 16 << 20
MAX_FINGERPRINT_BYTES = 512 << 20
MAX_IMAGE_SIZE = 1024  # as TrainConfig.image_size allows


def check_metadata(metadata, path) -> dict:
    """``metadata`` if it has the shape simple_cnn writes (class names, an image size in range,
    numbers that are numbers); else DataError naming ``path``. Nothing is decoded at a size it claims before this."""

    def refuse(what: str):
        raise DataError(f"{path} is not a usable simple_cnn model: its metadata {what}")

    if not isinstance(metadata, dict):
        refuse("is not a JSON object")
    names, size = metadata.get("class_names"), metadata.get("image_size")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        refuse("holds no list of two or more class names")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIZE:
        refuse(f"gives an image size of {str(size)[:20]!r}, not a whole number from 1 to {MAX_IMAGE_SIZE}")
    for key in ("val_split", "test_split"):
        if key in metadata and not (isinstance(metadata[key], float | int) and 0 <= metadata[key] < 1):
            refuse(f"gives {key} {str(metadata[key])[:20]!r}, not a fraction")
    return metadata


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member of a zip archive, refused (ValueError) when it declares more than ``limit`` bytes,
    and never read past them whatever it declares."""
    if archive.getinfo(name).file_size > limit:
        raise ValueError(f"its {name} member declares more than {limit:,} bytes")
    with archive.open(name) as member:
        content = member.read(limit + 1)
    if len(content) > limit:
        raise ValueError(f"its {name} member holds more than {limit:,} bytes")
    return content


def check_model_path(path) -> Path:
    """Refuse a model path whose suffix Keras cannot save to (a usage error)."""
    path = Path(path)
    if path.suffix not in MODEL_SUFFIXES:
        raise UsageError(f"--model_file_path {path} must end in .keras (recommended) or .h5")
    return path


# ---------------------------------------------------------------- .keras and .h5


def save_model(model, path, metadata: dict, members: dict[str, bytes] | None = None) -> None:
    """Save ``model`` with ``metadata`` inside the file, atomically, and ``members`` beside the network:
    file name -> bytes, e.g. the training fingerprints (:data:`FINGERPRINTS_MEMBER`); :func:`read_member` reads one."""
    path = check_model_path(path)
    text = json.dumps(metadata, ensure_ascii=False)
    with atomic_output(path) as tmp:
        model.save(tmp)
        if path.suffix == ".keras":
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(METADATA_MEMBER, text)
                for name, content in (members or {}).items():
                    archive.writestr(name, content, compress_type=zipfile.ZIP_DEFLATED)
        else:
            import h5py
            import numpy as np

            with h5py.File(tmp, "a") as f:
                f.attrs[METADATA_ATTR] = text
                for name, content in (members or {}).items():  # a root dataset named without the suffix
                    f.create_dataset(Path(name).stem, data=np.frombuffer(content, dtype=np.uint8), compression="gzip")


def read_member(path, name: str, limit: int) -> bytes | None:
    """A member that :func:`save_model` stored beside the network, or None (none there, more than
    ``limit`` bytes, or an unreadable file)."""
    path = check_model_path(path)
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return _read_member(archive, name, limit)
        import h5py

        with h5py.File(path, "r") as f:
            data = f[Path(name).stem]
            return None if data.size > limit else data[()].tobytes()
    except (KeyError, OSError, ValueError, TypeError, zipfile.BadZipFile):
        return None


def fingerprints_member(fingerprints: Fingerprints) -> dict[str, bytes]:
    """The training images' fingerprints as a member for :func:`save_model` (ASCII JSON: file names
    that are not valid UTF-8, surrogate escapes, survive as \\udcXX)."""
    return {FINGERPRINTS_MEMBER: json.dumps(fingerprints.as_dict()).encode()}


def read_fingerprints(path) -> Fingerprints | None:
    """The training images' fingerprints saved with the model, or None (older files)."""
    content = read_member(path, FINGERPRINTS_MEMBER, MAX_FINGERPRINT_BYTES)
    try:
        return Fingerprints.from_dict(json.loads(content)) if content else None
    except (KeyError, ValueError, TypeError, RecursionError):
        return None


def rewrite_metadata(path, metadata: dict) -> None:
    """Replace the metadata inside an existing model file, atomically (the network is copied as it is)."""
    path = check_model_path(path)
    text = json.dumps(metadata, ensure_ascii=False)
    with atomic_output(path) as tmp:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    if info.filename != METADATA_MEMBER:
                        dst.writestr(info, src.read(info))
                dst.writestr(METADATA_MEMBER, text)
        else:
            import h5py

            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as f:
                f.attrs[METADATA_ATTR] = text


def read_metadata(path) -> dict:
    """The metadata inside a model file, read without importing TensorFlow."""
    path = check_model_path(path)
    if not path.is_file():
        raise DataError(f"no model file at {path}: {TRAIN_HINT.format(path=path)}")
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                if METADATA_MEMBER not in archive.namelist():
                    raise KeyError
                text = _read_member(archive, METADATA_MEMBER, MAX_METADATA_BYTES).decode("utf-8")
        else:
            import h5py

            with h5py.File(path, "r") as f:
                text = f.attrs[METADATA_ATTR]
                if len(text) > MAX_METADATA_BYTES:
                    raise ValueError(f"its metadata holds more than {MAX_METADATA_BYTES:,} bytes")
        metadata = json.loads(text)
        if not isinstance(metadata, dict) or "class_names" not in metadata:
            raise KeyError
    except KeyError:
        raise DataError(f"{path} was not saved by simple_cnn (it holds no class names): {TRAIN_HINT.format(path=path)}") from None
    except RecursionError:  # JSON nested deeper than Python's stack
        raise DataError(f"{path} is not a usable simple_cnn model: its metadata is nested too deeply") from None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        kind = "Keras zip archive" if path.suffix == ".keras" else "HDF5 file"
        raise DataError(f"{path} is not a readable {kind} ({str(e).splitlines()[0]}): is it corrupt or truncated?") from None
    return check_metadata(metadata, path)


def load_model(path):
    """Load a simple_cnn model file; return ``(keras_model, metadata)``.

    Keras' safe mode stays on: a file that would run arbitrary code (a Lambda layer
    holding Python bytecode) is refused, never executed.
    """
    metadata = read_metadata(path)
    keras = import_keras()
    from . import layers  # noqa: F401 (registers the network's own layers with Keras)

    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many kinds; all mean "this file is not usable"
        text = str(e).strip()
        if "arbitrary code execution" in text:
            raise DataError(
                f"refused to load {path}: it contains Python code (a Lambda layer), which could do anything "
                "when loaded; simple_cnn loads only models without code"
            ) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise DataError(f"cannot load the model {path}: {first}") from None
    size, classes = metadata["image_size"], len(metadata["class_names"])
    if tuple(model.input_shape[1:]) != (size, size, 3) or model.output_shape[-1] != classes:
        raise DataError(
            f"{path} is inconsistent: its network takes {model.input_shape[1:]} and gives {model.output_shape[-1]} "
            f"outputs, but its metadata says {size}x{size}x3 images and {classes} classes"
        )
    return model, metadata


# ---------------------------------------------------------------- LiteRT, SavedModel, ONNX


def tflite_path(model_path) -> Path:
    return Path(model_path).with_suffix(".tflite")


def labels_path(model_path) -> Path:
    return Path(model_path).with_suffix(".labels.txt")


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
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.representative_dataset = lambda: ([calibration[i : i + 1].astype("float32")] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with _converter_quiet(), native_stderr_hidden():  # the int8 calibrator also writes to fd 2 from C++
        flat = converter.convert()
    return _with_metadata(flat, metadata)


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


def _with_metadata(flat: bytes, metadata: dict) -> bytes:
    """A LiteRT flatbuffer with ``metadata`` (JSON) appended to its ``metadata`` list."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = [*(tree.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def read_verified(path: Path, sha256: str | None, limit: int = 1 << 30) -> bytes | None:
    """The bytes of ``path`` if they have the SHA-256 ``sha256``; else None.

    The bytes returned are the bytes checked (read once, no second open between the
    check and their use). Anything but a regular file of at most ``limit`` bytes is None.
    """
    if not sha256:
        return None
    try:
        content = read_regular(path, limit)
    except DataError:
        return None
    return content if hashlib.sha256(content).hexdigest() == sha256 else None


def read_tflite_metadata(path) -> dict | None:
    """simple_cnn's metadata inside a .tflite file, or None (no file, none inside, or a
    file the flatbuffer reader cannot parse: truncated or corrupt)."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        buf = Path(path).read_bytes()
        model = schema.Model.GetRootAs(buf, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() and entry.Name().decode() == TFLITE_METADATA_NAME:
                metadata = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
                return metadata if isinstance(metadata, dict) else None
    except Exception:  # noqa: BLE001 (flatbuffers raises struct.error, TypeError, IndexError, ... on bad bytes)
        return None
    return None


def write_labels(model_path, metadata: dict) -> list[Path]:
    """The class names beside an export, one per line; for a multi-label model also
    ``MODEL.thresholds.json``, each class's threshold (an export outputs one sigmoid
    probability per class, and a label is given at or above its threshold)."""
    path = labels_path(model_path)
    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in metadata["class_names"]), encoding="utf-8")
    if not metadata.get("multi_label"):
        return [path]
    from .multilabel import thresholds_of

    thresholds = Path(model_path).with_suffix(".thresholds.json")
    content = {"multi_label": True, "class_names": metadata["class_names"], "thresholds": thresholds_of(metadata).tolist()}
    with atomic_output(thresholds) as tmp:
        tmp.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [path, thresholds]


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

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

Every file is written atomically (``files.atomic_output``, ``files.atomic_dir``); the LiteRT,
SavedModel and ONNX files are converted and written by ``converters.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

from .duplicates import Fingerprints
from .errors import DataError, UsageError
from .files import atomic_output, read_regular
from .quiet import import_keras

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

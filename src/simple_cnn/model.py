"""The CNN, and saving and loading a model file that describes itself.

A saved model takes raw 0-255 RGB images of its input size: rescaling is a layer of
the model, and augmentation layers act only in training. The class names, input size
and split settings travel inside the model file (:func:`save_model`), so classifying
needs nothing but the file and an image.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .errors import DataError, UsageError
from .files import atomic_output
from .quiet import import_keras

MODEL_SUFFIXES = (".keras", ".h5")
METADATA_MEMBER = "simple_cnn.json"  # an extra member of the .keras zip archive
METADATA_ATTR = "simple_cnn_metadata"  # a root attribute of the .h5 file
TRAIN_HINT = "train one first: simple-cnn --mode train --dataset_path DATASET --model_file_path {path}"


def check_model_path(path) -> Path:
    """Refuse a model path whose suffix Keras cannot save to (a usage error)."""
    path = Path(path)
    if path.suffix not in MODEL_SUFFIXES:
        raise UsageError(f"--model_file_path {path} must end in .keras (recommended) or .h5")
    return path


def build_model(num_classes: int, image_size: int, augment: bool = True, dropout: float = 0.25):
    """A small Xception-style CNN: accuracy per CPU-second over depth.

    The shape follows keras.io's "Image classification from scratch": a strided stem,
    then blocks of two depthwise-separable convolutions with batch norm and a strided
    residual shortcut, and global average pooling instead of a large dense layer.
    Separable convolutions cost about a ninth of full 3x3 ones for the same width.

    Batch norm uses momentum 0.9, not Keras' 0.99: small datasets give few steps per
    epoch, and with 0.99 the moving statistics used at inference lag so far behind the
    training batches that validation accuracy stays at chance for many epochs.
    """
    keras = import_keras()
    layers = keras.layers

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if augment:  # random layers are identity at inference time
        x = layers.RandomFlip("horizontal", name="aug_flip")(x)
        x = layers.RandomRotation(0.05, fill_mode="reflect", name="aug_rotate")(x)
        x = layers.RandomZoom(0.1, fill_mode="reflect", name="aug_zoom")(x)
        x = layers.RandomContrast(0.1, name="aug_contrast")(x)

    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for filters in (64, 128, 256):
        shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", name=f"b{filters}_short")(x)
        for i in (1, 2):
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"b{filters}_sep{i}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"b{filters}_bn{i}")(x)
            x = layers.Activation("relu", name=f"b{filters}_relu{i}")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"b{filters}_pool")(x)
        x = layers.add([x, shortcut], name=f"b{filters}_add")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="simple_cnn")


def save_model(model, path, metadata: dict) -> None:
    """Save ``model`` with ``metadata`` inside the file, atomically.

    Keras has no API for user metadata in a model file, so we add it ourselves: a JSON
    member in the ``.keras`` zip archive, or a root attribute of the ``.h5`` file. Both
    are ignored by ``keras.models.load_model``. The file is complete before it replaces
    the previous one.
    """
    path = check_model_path(path)
    text = json.dumps(metadata, ensure_ascii=False)
    with atomic_output(path) as tmp:
        model.save(tmp)
        if path.suffix == ".keras":
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(METADATA_MEMBER, text)
        else:
            import h5py

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
                text = archive.read(METADATA_MEMBER).decode("utf-8")
        else:
            import h5py

            with h5py.File(path, "r") as f:
                text = f.attrs[METADATA_ATTR]
        metadata = json.loads(text)
        metadata["class_names"], metadata["image_size"]  # noqa: B018 (both must be there)
    except KeyError:
        raise DataError(f"{path} was not saved by simple_cnn (it holds no class names): {TRAIN_HINT.format(path=path)}") from None
    except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        kind = "Keras zip archive" if path.suffix == ".keras" else "HDF5 file"
        raise DataError(f"{path} is not a readable {kind} ({str(e).splitlines()[0]}): is it corrupt or truncated?") from None
    return metadata


def load_model(path):
    """Load a simple_cnn model file; return ``(keras_model, metadata)``.

    Keras' safe mode stays on: a file that would run arbitrary code (a Lambda layer
    holding Python bytecode) is refused, never executed.
    """
    metadata = read_metadata(path)
    keras = import_keras()

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

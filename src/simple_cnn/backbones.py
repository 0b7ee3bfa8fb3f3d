"""The Keras Applications backbones simple_cnn can train on, and their ImageNet weights.

A backbone is built inside simple_cnn's own graph (``model.build_model``), with its own
preprocessing layers, so that it takes the same 0-255 pixels as simple_cnn's network and
classify, serve, every export, quantization and Grad-CAM need no special case.

ImageNet weights come through Keras' own downloader (``keras.utils.get_file``) with the
hash Keras pins for each file, into Keras' cache (``$KERAS_HOME/models``, ``~/.keras`` by
default). ``SIMPLE_CNN_WEIGHTS_URL`` replaces the folder they are downloaded from (a mirror
inside a network without internet); the file names and hashes stay Keras'.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, SimpleCNNError, UsageError, printable
from .files import file_digest
from .quiet import import_keras

SIMPLE = "simple"  # simple_cnn's own network (model.py)
MIRROR_VARIABLE = "SIMPLE_CNN_WEIGHTS_URL"
DOWNLOAD_TIMEOUT = 60  # seconds without a byte before a download is given up


@dataclass(frozen=True)
class Backbone:
    """A Keras Applications network and where Keras keeps its ImageNet weights without the top."""

    name: str  # the keras.applications function
    module: str  # the keras.src.applications module that pins its weights
    weights_file: str
    hash_key: str  # the module's WEIGHTS_HASHES key; the second hash is the no-top file's
    # The share of the default batch (config.auto_batch_size) it trains on without --batch_size:
    # below 1 where the network's training command at the default batch comes too near the
    # 1.2 GB goal and a smaller batch keeps it under, with the recipe's epochs as fast
    # (bench/README.md, "Memory: MobileNetV3Small's batch" and "Memory: a hard limit").
    batch_share: float = 1.0

    def build(self, image_size: int, weights=None, input_tensor=None):
        """The backbone without its classifier; ``weights``: None or a weights file Keras reads."""
        keras = import_keras()
        application = getattr(keras.applications, self.name)
        shape = (image_size, image_size, 3)
        return application(input_shape=shape, input_tensor=input_tensor, include_top=False, weights=weights)

    def pinned(self) -> tuple[str, str]:
        """The URL Keras downloads the ImageNet weights from and the hash it checks them against.

        Read from Keras' own module: Keras has no public call that gives them, and reading
        them keeps the hash the one Keras pins, for whatever Keras version is installed.
        """
        import_keras()  # the module imports Keras, and with it TensorFlow: through quiet.py's gate
        module = importlib.import_module(f"keras.src.applications.{self.module}")
        base = getattr(module, "BASE_WEIGHT_PATH", None) or module.BASE_WEIGHTS_PATH
        base = os.environ.get(MIRROR_VARIABLE) or base
        return f"{base.rstrip('/')}/{self.weights_file}", module.WEIGHTS_HASHES[self.hash_key][1]


_MOBILENET_V3 = "weights_mobilenet_v3_{}_224_1.0_float_no_top_v2.h5"  # Keras' file names, at width 1.0
BACKBONES = {
    b.name: b
    for b in (
        Backbone("MobileNetV3Small", "mobilenet_v3", _MOBILENET_V3.format("small"), "small_224_1.0_float", 0.75),
        Backbone("MobileNetV3Large", "mobilenet_v3", _MOBILENET_V3.format("large"), "large_224_1.0_float", 0.75),
        Backbone("EfficientNetV2B0", "efficientnet_v2", "efficientnetv2-b0_notop.h5", "b0"),
    )
}
NAMES = (SIMPLE, *BACKBONES)


def keras_cache() -> Path:
    """Keras' cache folder, as ``keras.utils.get_file`` finds it: ``$KERAS_HOME``, else ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()


def _hash_algorithm(pinned: str) -> str:
    return "sha256" if len(pinned) == 64 else "md5"  # as keras.utils.get_file tells them apart


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """urllib's urlretrieve, which get_file uses, waits forever for a silent server unless
    the default socket timeout says otherwise."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def imagenet_weights(backbone: Backbone) -> Path:
    """The backbone's ImageNet weights in Keras' cache, downloaded once.

    Downloaded into a staging folder beside the cache and moved in only once Keras has
    checked its hash, so that a failed or interrupted download leaves nothing behind.
    """
    url, pinned = backbone.pinned()
    target = keras_cache() / "models" / backbone.weights_file
    if target.is_file() and file_digest(target, _hash_algorithm(pinned)) == pinned:
        return target
    keras = import_keras()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    except OSError as e:
        raise SimpleCNNError(
            f"cannot write Keras' cache {target.parent} ({e.strerror}): set KERAS_HOME to a writable folder"
        ) from None
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            downloaded = keras.utils.get_file(
                backbone.weights_file, url, cache_dir=str(staging), cache_subdir=".", file_hash=pinned
            )
        os.replace(downloaded, target)
    except Exception as e:  # noqa: BLE001 (urllib and Keras raise many kinds: no route, a proxy, a refused hash)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not download the ImageNet weights of {backbone.name} from {url} ({reason}); on a machine without "
            f"internet, download {backbone.weights_file} elsewhere and pass --weights PATH (or set {MIRROR_VARIABLE} "
            "to a mirror), or train from random weights with --weights none"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def weights_source(backbone: Backbone, weights: str) -> Path:
    """The weights file ``--weights`` names: ImageNet's (downloaded) or the user's own."""
    if weights == "imagenet":
        return imagenet_weights(backbone)
    path = Path(weights)
    if not path.is_file():
        raise UsageError(
            f"--weights {printable(weights)}: no such file (give imagenet, none, or a weights file of {backbone.name})"
        )
    return path


def load_backbone_weights(backbone: Backbone, image_size: int, path: Path) -> dict[str, list]:
    """Each weighted layer's weights, by layer name, read from ``path`` by a backbone Keras builds
    on its own (so Keras' own checks refuse a file of another network)."""
    try:
        reference = backbone.build(image_size, weights=str(path))
    except Exception as e:  # noqa: BLE001 (h5py and Keras raise many kinds for a file that does not fit)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--weights {printable(str(path))} does not fit {backbone.name} ({reason}): give that backbone's own "
            "weights file (without its top), imagenet, or none"
        ) from None
    return {layer.name: layer.get_weights() for layer in reference.layers if layer.weights}

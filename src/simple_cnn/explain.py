"""Why did it say that: Grad-CAM heat maps (Selvaraju et al., 2017) and their overlays.

As in keras.io's "Grad-CAM class activation visualization": the gradient of the
class's score with respect to the feature maps of the last convolutional layer,
averaged over each map, weights the maps; their positive sum, scaled to [0, 1], is
where the network looked. The score is the log-probability (our last layer includes
the softmax; its log is the logit minus a constant shared by all classes, and its
gradient does not vanish when the network is sure). It needs gradients, so the Keras
model, never the LiteRT copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .files import atomic_output
from .quiet import import_keras, import_tensorflow

# model.build_model's last feature map (before pooling): simple_cnn's own network's last
# layer, a Keras backbone's output, and in models trained before the network had its 1x1
# head, the last block's sum.
LAST_LAYERS = ("head_relu", "features", "b256_add")


def heat_maps(model, x: np.ndarray, classes: np.ndarray, batch: int = 64) -> np.ndarray:
    """Grad-CAM of ``classes[i]`` on image ``x[i]`` (uint8 ``[N, S, S, 3]``): ``[N, h, w]`` in [0, 1].

    ``h x w`` is the last layer's grid (S / 16 for our network): coarse, by design.
    """
    keras, tf = import_keras(), import_tensorflow()
    by_name = {layer.name: layer for layer in model.layers}
    block = next((by_name[name] for name in LAST_LAYERS if name in by_name), None)
    if block is None:
        raise DataError(f"this model has no layer {LAST_LAYERS[0]!r}: --explain works on networks trained by simple_cnn")
    probe = keras.Model(model.inputs, [block.output, model.output])
    maps = []
    for start in range(0, len(x), batch):
        images = tf.convert_to_tensor(x[start : start + batch].astype(np.float32))
        chosen = tf.convert_to_tensor(np.asarray(classes[start : start + batch], dtype=np.int32))
        with tf.GradientTape() as tape:
            features, probabilities = probe(images, training=False)
            score = tf.math.log(tf.gather(probabilities, chosen, axis=1, batch_dims=1) + 1e-12)
        gradients = tape.gradient(score, features)
        # A network that averages over mirror images (layers.py) ran the batch
        # and its mirrors: the maps are those of the images themselves, the first half.
        features, gradients = features[: len(images)], gradients[: len(images)]
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
        maps.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` (uint8 RGB) with ``heat`` upsampled smoothly over it in matplotlib's "jet" colours."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    smooth = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)) / 255.0
    colours = colormaps["jet"](smooth)[..., :3] * 255
    return (image * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def write_overlay(path: Path, image: np.ndarray, heat: np.ndarray, scale: int = 4) -> Path:
    """Save :func:`overlay` as a PNG, ``scale`` times the model's input size (nearest pixels stay visible)."""
    picture = Image.fromarray(overlay(image, heat))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    with atomic_output(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def explanation_path(images_dir: Path, image_path: Path) -> Path:
    """Where ``--explain`` writes the overlay of ``image_path``: ``IMAGES_DIR/<name>_gradcam.png``.

    A name too long for a file name once ``_gradcam.png`` is added (most file systems stop
    at 255 bytes) keeps its first 180 bytes and a digest of the whole, so that two long
    names stay apart.
    """
    stem = Path(image_path).stem
    if len(os.fsencode(stem)) > 200:
        digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:12]
        while len(os.fsencode(stem)) > 180:  # by characters, so that none is cut in half
            stem = stem[:-1]
        stem = f"{stem}-{digest}"
    return Path(images_dir) / f"{stem}_gradcam.png"

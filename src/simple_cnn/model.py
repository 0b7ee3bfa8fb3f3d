"""The CNN. Saving and loading it, with its metadata, is ``formats.py``'s job.

The network takes raw 0-255 RGB images of its input size: rescaling is a layer of the
model, and augmentation layers act only in training.
"""

from __future__ import annotations

import numpy as np

from .backbones import BACKBONES, SIMPLE
from .quiet import import_keras

# The 1x1 convolution before pooling (MobileNet's last layer) widens the last block's 256
# channels, which underfit when pooled directly; 512 did best of the widths tried
# (bench/README.md, "A wider head").
HEAD_FILTERS = 512
BATCH_NORM_MOMENTUM = 0.9  # why not Keras' 0.99: build_model's docstring


def build_model(
    num_classes: int,
    image_size: int,
    augment: bool = True,
    dropout: float = 0.25,
    multi_label: bool = False,
    backbone: str = SIMPLE,
):
    """A small Xception-style CNN (or a Keras Applications ``backbone``) and its classifier head.

    simple_cnn's own network favours accuracy per CPU-second over depth.

    ``backbone``: ``"simple"`` (simple_cnn's own, :func:`_simple_features`) or a name of
    ``backbones.BACKBONES``, built with random weights (``transfer.py`` gives it others).

    With ``augment``, which flips images left-right in training, the network also averages
    its prediction over each image and its mirror at inference (``layers.py``).

    ``multi_label``: one sigmoid per class (several labels per image) instead of the softmax.

    Batch norm uses momentum 0.9, not Keras' 0.99: small datasets give few steps per
    epoch, and with 0.99 the moving statistics used at inference lag so far behind the
    training batches that validation accuracy stays at chance for many epochs (a Keras
    backbone's batch norm layers get the same momentum).
    """
    keras = import_keras()
    layers = keras.layers

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    from .layers import MirrorBatch, MirrorMean

    x = MirrorBatch(name="mirror")(inputs) if augment else inputs
    if backbone == SIMPLE:
        x = _simple_features(augmented(layers.Rescaling(1.0 / 255, name="rescale")(x), augment))
    else:  # a backbone rescales inside itself, from the same 0-255 pixels
        x = _backbone_features(BACKBONES[backbone], augmented(x, augment), image_size)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    activation = "sigmoid" if multi_label else "softmax"
    outputs = layers.Dense(num_classes, activation=activation, dtype="float32", name="probabilities")(x)
    if augment:
        outputs = MirrorMean(dtype="float32", name="mirror_mean")(outputs)
    return keras.Model(inputs, outputs, name="simple_cnn")


def augmented(x, augment: bool):
    """Random flips, rotations, zooms and contrast in training (random layers are identity at inference time)."""
    if not augment:
        return x
    layers = import_keras().layers
    x = layers.RandomFlip("horizontal", name="aug_flip")(x)
    x = layers.RandomRotation(0.05, fill_mode="reflect", name="aug_rotate")(x)
    x = layers.RandomZoom(0.1, fill_mode="reflect", name="aug_zoom")(x)
    return layers.RandomContrast(0.1, name="aug_contrast")(x)


def _backbone_features(backbone, x, image_size: int):
    """The backbone's last feature map, built into this graph (not nested as one layer), so that
    Grad-CAM and the exports see its layers; ``features`` names it for Grad-CAM."""
    layers = import_keras().layers
    network = backbone.build(image_size, input_tensor=x)
    for layer in network.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = BATCH_NORM_MOMENTUM
    return layers.Identity(name="features")(network.output)


def _simple_features(x):
    """simple_cnn's own network: a strided stem, three residual blocks and a 1x1 widening layer.

    The shape follows keras.io's "Image classification from scratch": a strided stem,
    then blocks of two depthwise-separable convolutions with batch norm and a strided
    residual shortcut, a 1x1 convolution that widens the last block's features before
    global average pooling (keras.io's example widens with a 3x3 separable one; a 1x1 one
    keeps each cell's features its own, so Grad-CAM stays sharp), and no large dense layer.
    Separable convolutions cost about a ninth of full 3x3 ones for the same width.
    """
    layers = import_keras().layers
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for filters in (64, 128, 256):
        shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", name=f"b{filters}_short")(x)
        for i in (1, 2):
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"b{filters}_sep{i}")(x)
            x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"b{filters}_bn{i}")(x)
            x = layers.Activation("relu", name=f"b{filters}_relu{i}")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"b{filters}_pool")(x)
        x = layers.add([x, shortcut], name=f"b{filters}_add")
    x = layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="head_conv")(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name="head_bn")(x)
    return layers.Activation("relu", name="head_relu")(x)


def view_probabilities(model, images, **predict_options) -> np.ndarray:
    """The output layer's probabilities for each view of each image: ``(images, views, classes)``.

    A network with the mirror averaging outputs the mean over its two views (the image and
    its mirror); one without has a single view. ``images`` and ``predict_options`` go to
    ``model.predict``. Calibration needs the views: a temperature divides each view's
    logits before the two are averaged, which is not the same as rescaling their mean
    (metrics.rescale_views).
    """
    keras = import_keras()
    ops = keras.ops
    per_view = model.get_layer("probabilities").output
    try:
        model.get_layer("mirror_mean")
    except ValueError:  # no mirror averaging: one view
        views = ops.expand_dims(per_view, 1)
    else:  # MirrorBatch put the images first and their mirrors after them
        views = ops.stack(ops.split(per_view, 2, axis=0), axis=1)
    return keras.Model(model.inputs, views).predict(images, verbose=0, **predict_options)


def build_training_variables(model, multi_label: bool = False) -> None:
    """Create the compiled model's optimizer and metric variables now, before ``fit``.

    Under a distribution strategy Keras does this itself before training; without one it
    leaves them to the first trace of the training step, and a ``tf.function`` that creates
    variables while it traces is traced a second time: the slowest part of a short run's
    start, twice (bench/README.md, "Tracing the training step once"). Keras has no public
    call for it; ``_symbolic_build`` is the one its own strategy path makes, from symbolic
    shapes, so no image is read.
    """
    keras = import_keras()
    labels = keras.KerasTensor((None, model.output_shape[-1]), "float32") if multi_label else keras.KerasTensor((None,), "int64")
    model._symbolic_build(data_batch=(keras.KerasTensor(model.inputs[0].shape, "float32"), labels))

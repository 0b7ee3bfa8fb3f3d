"""The network's own layers: the test-time mirror averaging.

Test-time augmentation, inside the network so that every runtime and export (Keras,
LiteRT, SavedModel, ONNX) does it with no extra step: at inference, :class:`MirrorBatch`
appends each image's left-right mirror to the batch and :class:`MirrorMean` averages the
two halves' probabilities. In training both pass their input through: the random flip
augmentation already shows the network mirror images. Registered with Keras, so that
saved models load in safe mode. Importing this module imports Keras: ``model.py`` and
``formats.load_model`` import it when they need it.
"""

from __future__ import annotations

from .quiet import import_keras

keras = import_keras()
ops = keras.ops


@keras.saving.register_keras_serializable(package="simple_cnn")
class MirrorBatch(keras.layers.Layer):
    def call(self, images, training=None):
        return images if training else ops.concatenate([images, ops.flip(images, axis=2)], axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])


@keras.saving.register_keras_serializable(package="simple_cnn")
class MirrorMean(keras.layers.Layer):
    def call(self, probabilities, training=None):
        if training:
            return probabilities
        images, mirrors = ops.split(probabilities, 2, axis=0)
        return (images + mirrors) / 2

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

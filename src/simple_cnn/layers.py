"""The network's own layers: the test-time mirror averaging, and the "unknown" detector's distance.

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


@keras.saving.register_keras_serializable(package="simple_cnn")
class NearestMeanDistance(keras.layers.Layer):
    """Each feature vector's Mahalanobis distance to the nearest of the detector's means (``unknown.py``).

    With the whitening ``W`` (``W Wᵀ`` is the inverse of the shared covariance) the distance
    to a mean ``m`` is ``|(f - m) W|``; the means are stored whitened, and the features are
    centred first so that the expansion ``|z|² - 2 z·m + |m|²`` keeps float32's precision
    without a (batch, means, features) difference in memory.
    """

    def __init__(self, features: int, means: int, **kwargs):
        super().__init__(**kwargs)
        self.features, self.means = features, means
        self.centre = self.add_weight(shape=(features,), initializer="zeros", trainable=False, name="centre")
        self.whitening = self.add_weight(shape=(features, features), initializer="zeros", trainable=False, name="whitening")
        self.whitened_means = self.add_weight(shape=(means, features), initializer="zeros", trainable=False, name="means")

    def call(self, features):
        z = ops.matmul(features - self.centre, self.whitening)
        m = self.whitened_means
        squared = ops.sum(z * z, axis=1, keepdims=True) - 2 * ops.matmul(z, ops.transpose(m)) + ops.sum(m * m, axis=1)[None]
        return ops.sqrt(ops.maximum(ops.min(squared, axis=1, keepdims=True), 0.0))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def get_config(self):
        return super().get_config() | {"features": self.features, "means": self.means}

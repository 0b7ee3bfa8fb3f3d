"""What the model has never seen: an "unknown" answer from where an image lies, not only from its softmax.

A softmax stays confident on images of things a model never saw, so a low probability
(``--min_confidence``) misses many of them. The detector looks at the network's
penultimate features instead (the ``pool`` layer, averaged over the image and its
mirror as the output is): the Mahalanobis distance to the nearest class mean, with one
covariance shared by the classes (Lee et al., 2018, "A simple unified framework for
detecting out-of-distribution samples"). The Ledoit-Wolf estimate shrinks the
covariance, which a few hundred images cannot estimate in hundreds of dimensions on
their own. A multi-label model has one mean, that of all its training images. The features are
scaled to unit length first.

Train mode fits it on the training images and chooses the threshold on the validation
split, the distance within which :data:`KEEP` of those images lie (beside it, for
comparison, the softmax threshold that keeps as many). The means and the whitening are
a member of the model file (:data:`MEMBER`); the distance is computed by a layer
(``layers.NearestMeanDistance``) on a second output of the same network, so the Keras
runtime and the LiteRT copy give it alike. Classify and serve answer "unknown" beyond the
threshold with ``--unknown``, and report the distance always; test mode's
``--unknown_path`` measures how well it separates images of no class from the test images.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from .config import UNKNOWN_KEEP as KEEP
from .errors import DataError

log = logging.getLogger(__name__)

MEMBER = "simple_cnn_unknown.npz"  # the detector's arrays in the model file (formats.save_model)
MAX_MEMBER_BYTES = 256 << 20
METHOD = "mahalanobis"
# At most this many images of each split go through the network again after training: the pass
# costs an inference per image, which on a large dataset would rival training, and the means and
# the shrunk covariance settle long before (bench/README.md, "Unknown by distance").
FIT_IMAGES = 2000
# That pass predicts in batches this small: at training's batch (twice its images, with the mirrors)
# its activations came on top of the memory training left behind and set the run's peak (bench/README.md).
PASS_BATCH = 8


@dataclass
class Detector:
    """The fitted detector: features are centred, whitened, then compared with the whitened means."""

    centre: np.ndarray  # (features,)
    whitening: np.ndarray  # (features, features)
    whitened_means: np.ndarray  # (means, features)

    def as_member(self) -> dict[str, bytes]:
        """The arrays as a model file member (``formats.save_model``); numpy's own format, read without pickle."""
        buffer = io.BytesIO()
        np.savez(buffer, centre=self.centre, whitening=self.whitening, whitened_means=self.whitened_means)
        return {MEMBER: buffer.getvalue()}

    @classmethod
    def from_member(cls, content: bytes) -> Detector:
        with np.load(io.BytesIO(content), allow_pickle=False) as arrays:
            return cls(*(arrays[k].astype(np.float32) for k in ("centre", "whitening", "whitened_means")))

    def distances(self, features: np.ndarray) -> np.ndarray:
        """The distance of each feature vector to the nearest mean (what the layer computes, in float64)."""
        z = (features.astype(np.float64) - self.centre) @ self.whitening
        m = self.whitened_means.astype(np.float64)
        squared = (z * z).sum(axis=1, keepdims=True) - 2 * z @ m.T + (m * m).sum(axis=1)  # as the layer, without (N, means, D)
        return np.sqrt(np.maximum(squared.min(axis=1), 0))


def fit_detector(features: np.ndarray, groups: np.ndarray) -> Detector:
    """Class means (one per value of ``groups``) and the whitening of their shared, shrunk covariance."""
    features = features.astype(np.float64)
    centre = features.mean(axis=0)
    present = np.unique(groups)
    means = np.stack([features[groups == g].mean(axis=0) for g in present])
    residuals = features - means[np.searchsorted(present, groups)]
    covariance = ledoit_wolf(residuals)
    # W with W Wᵀ = Σ⁻¹: the Cholesky factor of the precision, so |(f - m) W| is the Mahalanobis distance.
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))
    return Detector(centre.astype(np.float32), whitening.astype(np.float32), ((means - centre) @ whitening).astype(np.float32))


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """The covariance of the centred rows ``x``, shrunk towards a multiple of the identity by
    Ledoit and Wolf's estimate (2004), as scikit-learn's ``LedoitWolf(assume_centered=True)``
    computes it (a test holds the two together). Not scikit-learn's own: importing its
    covariance module cost every training run about a second (bench/README.md, "The test
    suite"), for a dozen lines of arithmetic."""
    n, p = x.shape
    empirical = x.T @ x / n
    mu = np.trace(empirical) / p
    squared = np.sum(empirical * empirical)
    delta = squared / p - mu * mu  # |Σ - μI|² / p (the trace is pμ): how far Σ is from the target
    beta = (np.sum(np.sum(x * x, axis=1) ** 2) / n - squared) / (p * n)  # how noisy Σ is
    shrinkage = 0.0 if beta == 0 or delta == 0 else min(beta, delta) / delta
    shrunk = (1 - shrinkage) * empirical
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk


def feature_network(model):
    """``model`` with a second output, its penultimate features: the mirror halves averaged as the output is,
    then scaled to unit length (the direction, not the strength, of the activations: smooth and flat images of
    no class were told apart far better so, bench/README.md, "Unknown by distance")."""
    from .layers import MirrorMean
    from .quiet import import_keras

    keras = import_keras()
    features = model.get_layer("pool").output
    try:
        model.get_layer("mirror_mean")
    except ValueError:
        pass
    else:
        features = MirrorMean(name="features_mirror_mean")(features)
    features = keras.layers.UnitNormalization(name="features_unit", dtype="float32")(features)
    return keras.Model(model.input, [model.output, features], name="simple_cnn_features")


def inference_network(model, detector: Detector):
    """``model`` with a second output, each image's distance (``layers.NearestMeanDistance``): what the runtimes run."""
    from .layers import NearestMeanDistance
    from .quiet import import_keras

    keras = import_keras()
    probabilities, features = feature_network(model).outputs
    layer = NearestMeanDistance(len(detector.centre), len(detector.whitened_means), name="unknown_distance", dtype="float32")
    distance = layer(features)
    layer.set_weights([detector.centre, detector.whitening, detector.whitened_means])
    return keras.Model(model.input, [probabilities, distance], name="simple_cnn_unknown")


def predict_features(network, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and features of the uint8 images ``x`` (``network``: :func:`feature_network`)."""
    from .callbacks import SafePoints
    from .pipeline import make_tf_dataset

    ds = make_tf_dataset(x, np.zeros(len(x), np.int32), batch_size)
    probabilities, features = network.predict(ds, verbose=0, callbacks=[SafePoints()])
    ds.release_arrays()
    return probabilities, features


def fit_on_splits(model, train, val) -> tuple[Detector, dict] | tuple[None, None]:
    """Fit the detector on the training images and choose its threshold on the validation split.

    Returns the detector and its record for the model's metadata (:func:`record_of` reads
    it), or ``(None, None)`` when the validation split is empty or the training images give
    no covariance to invert.
    """
    if len(val) == 0 or len(train) < 2:
        return None, None
    network = feature_network(model)
    (x, y), (val_x, _) = _at_most(train, FIT_IMAGES), _at_most(val, FIT_IMAGES)
    _, features = predict_features(network, x, PASS_BATCH)
    groups = y if y.ndim == 1 else np.zeros(len(y), np.int64)  # multi-label: one mean
    try:
        detector = fit_detector(features, groups)
    except np.linalg.LinAlgError:  # e.g. one training image a class: no spread around the means to measure
        log.warning("No unknown detector: the training images vary too little around their class means to fit one")
        return None, None
    val_probabilities, val_features = predict_features(network, val_x, PASS_BATCH)
    threshold = float(np.quantile(detector.distances(val_features), KEEP))
    record = {
        "method": METHOD,
        "threshold": threshold,
        "keep": KEEP,
        "softmax_threshold": float(np.quantile(val_probabilities.max(axis=1), 1 - KEEP)),
        "features": int(features.shape[1]),
        "means": int(len(detector.whitened_means)),
    }
    log.info(
        f"Unknown detector: the Mahalanobis distance to the nearest class mean in the network's {record['features']} "
        f"features; {KEEP:.0%} of the validation images lie within {threshold:.1f} (classify --unknown answers 'unknown' beyond)"
    )
    return detector, record


def _at_most(split, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A split's images and labels, or every k-th of them, at most ``n``: a view (no copy of the images),
    spread over the whole split."""
    step = -(-len(split) // n)
    return split.x[::step], split.y[::step]


def record_of(metadata: dict) -> dict | None:
    """The detector's record in a model's metadata if it has a usable one (a file from elsewhere may hold anything)."""
    record = metadata.get("unknown")
    if not isinstance(record, dict) or record.get("method") != METHOD:
        return None
    threshold = record.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not np.isfinite(threshold):
        return None
    return record


def require(metadata: dict, path) -> dict:
    """The detector's record, or DataError: ``--unknown`` needs a model trained with one."""
    record = record_of(metadata)
    if record is None:
        raise DataError(
            f"{path} has no unknown detector (an int8 copy carries none, nor does a model trained by an older simple_cnn "
            "or on too few images to fit one): give the .keras or .h5 model (or its float16 copy), or train it again"
        )
    return record


def read_detector(model_path) -> Detector | None:
    """The detector stored in a ``.keras`` or ``.h5`` model file, or None."""
    from .formats import read_member

    content = read_member(model_path, MEMBER, MAX_MEMBER_BYTES)
    if content is None:
        return None
    try:
        return Detector.from_member(content)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def novelty(distance: float | None, metadata: dict) -> dict | None:
    """What every output shows of one image's distance (results.prediction), or None without a detector."""
    record = record_of(metadata)
    if distance is None or record is None:
        return None
    threshold = float(record["threshold"])
    beyond = bool(distance > threshold)
    return {"distance": round(float(distance), 3), "distance_threshold": round(threshold, 3), "beyond_threshold": beyond}


def check_predictor(predictor, unknown: bool) -> None:
    """``--unknown`` needs a detector the runtime can run: DataError in one line otherwise."""
    if unknown:
        require(predictor.metadata, predictor.path)
        if not predictor.has_distance:
            raise DataError(
                f"{predictor.path}'s network gives no distance ({predictor.runtime}): its unknown detector is missing or "
                "unreadable; train it again to use --unknown"
            )


def unknown_images(folder) -> list:
    """The images of ``--unknown_path`` (a folder, searched recursively), or DataError naming it."""
    from pathlib import Path

    from .images import READABLE, images_in_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--unknown_path {folder} is not a folder: give a folder of images that belong to none of the classes")
    found = sorted(images_in_folder(folder))
    if not found:
        raise DataError(f"--unknown_path {folder} holds no images ({READABLE})")
    return found


def score_unknown(model, model_path, metadata: dict, known: np.ndarray, files: list, batch_size: int) -> dict:
    """How well the distance, and beside it the softmax, tell the images ``files`` (of no class) from
    the test images ``known``: each one's AUROC, and the shares caught and kept at the thresholds
    chosen in training (both keep the same share of the validation images)."""
    from sklearn.metrics import roc_auc_score

    from .errors import printable
    from .images import decode_images

    record = require(metadata, model_path)
    detector = read_detector(model_path)
    if detector is None:
        raise DataError(f"{model_path}'s unknown detector ({MEMBER}) is missing or unreadable: train it again")
    x, errors = decode_images(files, metadata["image_size"])
    skipped = [{"file": printable(str(f)), "reason": e} for f, e in zip(files, errors) if e is not None]
    if len(x) == 0:
        raise DataError(f"no image under --unknown_path could be read ({skipped[0]['file']}: {skipped[0]['reason']})")
    network = feature_network(model)
    known_p, known_f = predict_features(network, known, batch_size)
    novel_p, novel_f = predict_features(network, x, batch_size)
    known_d, novel_d = detector.distances(known_f), detector.distances(novel_f)
    truth = np.r_[np.zeros(len(known)), np.ones(len(x))]
    threshold, softmax = float(record["threshold"]), float(record["softmax_threshold"])
    return {
        "unknown_images": int(len(x)),
        "skipped": skipped,
        "distance": {
            "auroc": float(roc_auc_score(truth, np.r_[known_d, novel_d])),
            "threshold": threshold,
            "caught": float((novel_d > threshold).mean()),
            "test_kept": float((known_d <= threshold).mean()),
        },
        "softmax": {
            "auroc": float(roc_auc_score(truth, -np.r_[known_p.max(axis=1), novel_p.max(axis=1)])),
            "threshold": softmax,
            "caught": float((novel_p.max(axis=1) < softmax).mean()),
            "test_kept": float((known_p.max(axis=1) >= softmax).mean()),
        },
    }


def for_litert(model, model_path, metadata: dict, quantize: str | None = None) -> tuple:
    """The network and metadata a LiteRT copy is converted from: with the distance as a second output when
    the model has a detector. Not in an int8 copy: 8-bit activations would move the distances off the
    threshold chosen in float32, so its metadata loses the detector's record."""
    if quantize == "int8" or record_of(metadata) is None:
        return model, {k: v for k, v in metadata.items() if k != "unknown"}
    detector = read_detector(model_path)
    if detector is None:
        log.warning(f"{model_path}'s unknown detector ({MEMBER}) is missing or unreadable: the LiteRT copy gives no distance")
        return model, {k: v for k, v in metadata.items() if k != "unknown"}
    return inference_network(model, detector), metadata

"""After training, on the validation split: the softmax temperature, or a multi-label model's thresholds.

Both are chosen on images that training did not fit, and both act inside the network or
its metadata, so that every runtime and export answers the same.
"""

from __future__ import annotations

import logging

import numpy as np

from . import interrupts, metrics, multilabel
from .config import TrainConfig
from .dataset import Split
from .model import view_probabilities
from .pipeline import make_tf_dataset

log = logging.getLogger(__name__)


def choose_thresholds(model, val: Split, batch_size: int, config_calibrate: bool | None = None) -> list[float]:
    """Multi-label: each class's threshold, the one that maximises its F1 on the validation split
    (``multilabel.py``). A temperature is not fitted: it would not change which labels pass."""
    from .callbacks import SafePoints

    interrupts.check()
    if config_calibrate:
        log.warning("--calibrate fits one softmax temperature; a multi-label model's thresholds are chosen instead")
    val_ds = make_tf_dataset(val.x, val.y, batch_size)
    probabilities = view_probabilities(model, val_ds, callbacks=[SafePoints()]).mean(axis=1)
    val_ds.release_arrays()
    thresholds = multilabel.choose_thresholds(probabilities, val.y)
    log.info(f"Thresholds chosen on the validation split (the best F1 per class): {', '.join(f'{t:.2f}' for t in thresholds)}")
    return thresholds


def calibrate_if_wanted(model, val: Split, config: TrainConfig, recorded: dict) -> dict | None:
    """Calibrate when --calibrate says so or the validation split can carry it; the decision goes into ``recorded``."""
    recorded["calibrate"] = config.calibrates(len(val))  # as decided, when not given
    if recorded["calibrate"]:
        interrupts.check()
        return calibrate(model, val.x, val.y, config.batch_size)
    if config.calibrate is None:
        log.info(f"Not calibrated: {len(val)} validation images are too few to fit a temperature (--calibrate fits one)")
    return None


def calibrate(model, x_val: np.ndarray, y_val: np.ndarray, batch_size: int) -> dict:
    """Fit one temperature on the validation split and bake it into the network.

    The output layer computes softmax(W x + b); dividing W and b by the temperature T
    gives softmax((W x + b) / T), so every runtime and every export (LiteRT, SavedModel,
    ONNX) gives the calibrated probabilities with no extra step. T cannot change which
    class is most likely, so accuracy is unchanged.

    The temperature is fitted on each view's probabilities (the image and its mirror), as
    the network applies it, not on their average. The validation images go through
    ``predict`` in training-sized batches, as test mode's do: eager calls on large
    batches (and their mirror images) held far more memory than training itself
    (bench/README.md, "Memory").
    """
    from .callbacks import SafePoints

    val_ds = make_tf_dataset(x_val, y_val, batch_size)
    views = view_probabilities(model, val_ds, callbacks=[SafePoints()])
    val_ds.release_arrays()
    fitted = metrics.fit_temperature(views, y_val)
    before = metrics.expected_calibration_error(views.mean(axis=1), y_val)  # the network's output
    after = metrics.expected_calibration_error(metrics.rescale_views(views, fitted), y_val)  # and with T baked in
    if after >= before:  # a small validation split can fit a temperature that does no good: keep 1
        log.info(f"Not calibrated: a temperature of {fitted:.2f} would not lower the validation calibration error ({before:.3f})")
        return {"temperature": 1.0, "fitted_temperature": fitted, "val_ece_before": before, "val_ece_after": before}
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / fitted, bias / fitted])
    log.info(f"Calibrated on the validation split: temperature {fitted:.2f}, calibration error {before:.3f} -> {after:.3f}")
    return {"temperature": fitted, "fitted_temperature": fitted, "val_ece_before": before, "val_ece_after": after}

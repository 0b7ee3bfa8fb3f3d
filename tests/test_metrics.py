"""Honest numbers: intervals, calibration, class weights, the worst mistakes, --min_confidence."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, make_shapes_dataset, run_cli, shape_image
from simple_cnn import metrics
from simple_cnn.results import ClassifyResult


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17, table I: 81/263 -> 0.2553 to 0.3662.
    low, high = metrics.wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert metrics.wilson_interval(10, 10)[1] == pytest.approx(1.0) and metrics.wilson_interval(0, 10)[0] == pytest.approx(0.0)


def _overconfident(n=4000, seed=0, temperature=2.5):
    """Predictions whose logits are ``temperature`` times too large: over-confident by construction."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, 4)) * 1.5
    true_p = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(4, p=p) for p in true_p])
    shown = np.exp(true_logits * temperature)
    return shown / shown.sum(axis=1, keepdims=True), y


def test_temperature_fitted_on_held_out_data_lowers_calibration_error_not_accuracy():
    fit_p, fit_y = _overconfident(seed=1)
    test_p, test_y = _overconfident(seed=2)
    t = metrics.fit_temperature(fit_p, fit_y)
    assert 2.0 < t < 3.0  # recovers the 2.5 it was built with
    calibrated = metrics.rescale(test_p, t)
    assert metrics.expected_calibration_error(calibrated, test_y) < metrics.expected_calibration_error(test_p, test_y) / 3
    assert (calibrated.argmax(axis=1) == test_p.argmax(axis=1)).all()
    bins = metrics.reliability_bins(calibrated, test_y)
    assert len(bins) == metrics.ECE_BINS and sum(b["count"] for b in bins) == len(test_y)


def test_worst_mistakes_come_first():
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    y = np.array([0, 0, 0, 1])  # rows 1, 2 and 3 are wrong; row 2 gave its true class the least
    assert metrics.worst_mistakes(p, y).tolist() == [2, 3, 1]


def test_test_mode_reports_uncertainty_calibration_and_mistakes(tiny_model, tmp_path):
    from simple_cnn.formats import read_metadata

    work, images = tiny_model.parent.parent, tmp_path / "images"  # a barely trained model: it makes mistakes
    args = ("--mode", "test", "--model_file_path", tiny_model, "--dataset_path", "ds", "--images_dir", images)
    result = run_cli(*args, "--min_confidence", "0.6", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout)
    low, high = m["accuracy_interval"]
    assert 0 <= low <= m["accuracy"] <= high <= 1 and low < high
    assert 0 <= m["balanced_accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert m["top_k_accuracy"]["k"] == 2 and m["top_k_accuracy"]["accuracy"] >= m["accuracy"]
    assert 0 <= m["calibration"]["ece"] <= 1
    # 45 images leave too few for validation to fit a temperature: the network was not calibrated
    assert m["calibration"]["temperature"] is None and m["calibration"]["ece_uncalibrated"] is None
    assert read_metadata(tiny_model)["training"]["config"]["calibrate"] is False
    assert 0 <= m["coverage"] <= 1 and m["min_confidence"] == 0.6
    on_disk = json.loads((images / "metrics.json").read_text())
    assert on_disk["accuracy_interval"] == m["accuracy_interval"]
    with Image.open(images / "reliability_diagram.png") as im:
        assert im.format == "PNG" and min(im.size) > 300
    with open(images / "mistakes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = sum(m["confusion_matrix"][i][j] for i in range(3) for j in range(3) if i != j)
    assert len(rows) == wrong
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    assert all(r["true_class"] != r["predicted_class"] and (work / "ds" / r["file"]).is_file() for r in rows)
    if wrong:
        with Image.open(images / "mistakes.png") as im:
            assert im.format == "PNG"
    human = run_cli(*args, cwd=work)
    assert "95% interval" in human.stdout and "Balanced accuracy" in human.stdout and "calibration error" in human.stdout


def test_min_confidence_answers_unknown_below_it(tiny_model, tmp_path):
    image = tmp_path / "x.png"
    shape_image("circle", np.random.default_rng(9)).save(image)
    args = ("--mode", "classify", "--model_file_path", tiny_model, "--single_image_path", image, "--json")
    first = json.loads(run_cli(*args, cwd=tmp_path).stdout)
    p = first["probability"]
    assert first["class"] in CLASSES and p < 0.99  # a barely trained model is unsure
    unsure = run_cli(*args, "--min_confidence", str(round((p + 1) / 2, 4)), cwd=tmp_path)
    answer = json.loads(unsure.stdout)
    assert answer["class"] == "unknown" and answer["top_k"][0]["class"] == first["class"]
    human = run_cli(*args[:-1], "--min_confidence", str(round((p + 1) / 2, 4)), cwd=tmp_path)
    assert "unknown" in human.stdout.splitlines()[0]
    assert ClassifyResult("a", "m", "keras", [{"class": "x", "probability": 0.7}], 0.7).answer == "x"


def test_class_weight_auto_and_the_imbalance_warning(tmp_path, caplog):
    from simple_cnn.dataset import ImageDataset
    from simple_cnn.train import class_weights

    assert class_weights(np.array([0, 0, 0, 1]), 3) == {0: pytest.approx(2 / 3), 1: 2.0, 2: 1.0}
    root = make_shapes_dataset(tmp_path / "ds", per_class=40)
    for extra in sorted((root / "triangle").iterdir())[6:]:
        extra.unlink()  # 6 triangles against 40 circles and 40 squares
    with caplog.at_level(logging.WARNING, logger="simple_cnn"):
        ImageDataset.scan(root).training_image_size()  # the train output's first step
    assert "--class_weight auto" in caplog.text and ImageDataset.scan(root).imbalance() > 3
    caplog.clear()
    weighted = run_cli(
        "--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--class_weight", "auto", "--json", cwd=tmp_path
    )
    assert weighted.returncode == 0, weighted.stderr
    assert "--class_weight auto" not in weighted.stderr and json.loads(weighted.stdout)["imbalance"] > 3
    assert json.loads(weighted.stdout)["config"]["class_weight"] == "auto"


@pytest.mark.parametrize("mirror", [False, True], ids=["one-view", "mirror-averaging"])
def test_temperature_baked_into_the_network_equals_rescaled_views(mirror):
    """What train mode does to the output layer gives what metrics.rescale_views computes
    from each view's probabilities; with the mirror averaging, not what rescaling the
    network's averaged output would give."""
    from simple_cnn.model import build_model, view_probabilities
    from simple_cnn.quiet import import_keras

    # Seeded: unseeded weights depended on what the worker ran before, and with some the
    # two views agreed so closely that the last check could not see them differ.
    import_keras().utils.set_random_seed(0)
    model = build_model(3, 16, augment=mirror)
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * 30, bias])  # confident views, so that where they disagree it shows
    x = np.random.default_rng(0).integers(0, 255, size=(8, 16, 16, 3)).astype(np.float32)
    views = view_probabilities(model, x)
    assert views.shape == (8, 2 if mirror else 1, 3)
    before = model.predict(x, verbose=0)
    np.testing.assert_allclose(views.mean(axis=1), before, atol=1e-6)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / 0.5, bias / 0.5])
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(after, metrics.rescale_views(views, 0.5), atol=1e-5)
    if mirror:
        assert np.abs(after - metrics.rescale(before, 0.5)).max() > 1e-3


def test_calibrate_is_decided_by_the_validation_split_unless_a_flag_says():
    from simple_cnn.cli import build_parser
    from simple_cnn.config import CALIBRATION_MIN_IMAGES, TrainConfig

    def parsed(*flags):
        return build_parser().parse_args(["--mode", "train", *flags]).calibrate

    assert (parsed(), parsed("--calibrate"), parsed("--no-calibrate")) == (None, True, False)
    assert TrainConfig().calibrates(CALIBRATION_MIN_IMAGES) and not TrainConfig().calibrates(CALIBRATION_MIN_IMAGES - 1)
    assert TrainConfig(calibrate=True).calibrates(5) and not TrainConfig(calibrate=False).calibrates(10**6)


def test_a_large_enough_validation_split_is_calibrated_by_default_and_test_mode_reports_both_errors(tmp_path):
    from simple_cnn.config import CALIBRATION_MIN_IMAGES
    from simple_cnn.formats import read_metadata

    make_shapes_dataset(tmp_path / "ds", per_class=70, size=24)
    splits = ("--val_split", "0.6", "--test_split", "0.15")  # over 100 validation images from 210
    train = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "3", *splits, "--json", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    trained = json.loads(train.stdout)
    assert trained["images_used"]["val"] >= CALIBRATION_MIN_IMAGES and trained["config"]["calibrate"] is True
    calibration = trained["calibration"]
    assert calibration["val_ece_after"] <= calibration["val_ece_before"] and calibration["fitted_temperature"] > 0
    assert read_metadata(tmp_path / "models" / "cnn_model.keras")["calibration"] == calibration
    test = run_cli("--mode", "test", "--json", cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    reported = json.loads(test.stdout)["calibration"]
    assert reported["temperature"] == calibration["temperature"] and reported["ece_uncalibrated"] is not None

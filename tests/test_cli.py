"""End to end, as a user runs it: ``python -m simple_cnn`` in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, assert_one_line_error, make_shapes_dataset, run_cli, shape_image
from simple_cnn import formats
from simple_cnn.dataset import ImageDataset


def test_help_lists_every_flag_with_examples(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in (
        "--mode",
        "--dataset_path",
        "--model_file_path",
        "--batch_size",
        "--epochs",
        "--single_image_path",
        "--images_dir",
        "--image_size",
        "--seed",
        "--val_split",
        "--test_split",
        "--top_k",
        "--cache_dir",
        "--json",
        "--verbose",
    ):
        assert flag in result.stdout
    assert "(default: 42)" in result.stdout and "models/cnn_model.keras" in result.stdout
    for mode in ("--mode train", "--mode test", "--mode classify"):
        assert mode in result.stdout.split("examples:")[1]


def test_train_learns_and_writes_model_and_pictures(trained):
    work, summary = trained
    assert summary["images"]["train"] + summary["images"]["val"] + summary["images"]["test"] == 180
    assert summary["best_val_accuracy"] > 0.8, summary  # chance is 1/3
    assert (work / "models" / "cnn_model.keras").is_file()
    with Image.open(work / "images" / "training_curves.png") as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 250
    with Image.open(work / "images" / "examples_train_images.png") as im:
        assert im.width > 400 and im.height > 400


def test_test_mode_reports_accuracy_well_above_chance(trained):
    work, train_summary = trained
    result = run_cli("--mode", "test", "--dataset_path", "datasets/shapes", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["test_images"] == train_summary["images"]["test"] > 0
    assert metrics["accuracy"] > 0.8, metrics["confusion_matrix"]
    assert metrics["class_names"] == list(CLASSES)
    assert set(metrics["per_class"]) >= set(CLASSES) | {"macro avg"}
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["test_images"]
    on_disk = json.loads((work / "images" / "metrics.json").read_text())
    assert on_disk["accuracy"] == metrics["accuracy"] and on_disk["loss"] == metrics["loss"]
    with Image.open(work / "images" / "confusion_matrix.png") as im:
        assert im.format == "PNG" and min(im.size) > 300
    with Image.open(work / "images" / "examples_test_images.png") as im:
        assert min(im.size) > 400


def test_test_mode_human_output_and_default_dataset(trained):
    work, _ = trained
    result = run_cli("--mode", "test", cwd=work)  # no --dataset_path: the model's own dataset
    assert result.returncode == 0, result.stderr
    assert "Accuracy" in result.stdout and "precision" in result.stdout
    assert "datasets/shapes" in result.stdout


@pytest.mark.parametrize("kind", CLASSES)
def test_classify_names_the_right_class(trained, kind):
    work, _ = trained
    image = work / f"new_{kind}.png"
    shape_image(kind, np.random.default_rng(1234)).save(image)
    result = run_cli("--mode", "classify", "--single_image_path", image.name, "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["class"] == kind, answer
    assert len(answer["top_k"]) == 3
    probs = [t["probability"] for t in answer["top_k"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3


def test_classify_human_output(trained):
    work, _ = trained
    image = work / "plain.jpg"
    shape_image("square", np.random.default_rng(5), size=64).save(image)
    result = run_cli("--mode", "classify", "--single_image_path", "plain.jpg", "--top_k", "2", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("plain.jpg: square (probability")
    assert "Top 2:" in result.stdout


def test_h5_model_file_works_end_to_end(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=15)
    model = "models/shapes.h5"
    train = run_cli("--mode", "train", "--dataset_path", "ds", "--model_file_path", model, "--epochs", "1", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "Model saved to models/shapes.h5" in train.stdout
    image = tmp_path / "ds" / "circle" / "circle_000.png"
    classify = ("--mode", "classify", "--model_file_path", model, "--single_image_path", image, "--explain", "--json")
    result = run_cli(*classify, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["class"] in CLASSES and answer["runtime"] == "keras"  # Grad-CAM needs the Keras model
    with Image.open(tmp_path / answer["explanation"]) as overlay:  # images/circle_000_gradcam.png
        assert overlay.format == "PNG" and overlay.size == (4 * 32, 4 * 32)  # 4x the input size, 32 (automatic)
    saved = formats.read_fingerprints(tmp_path / model)  # for test mode, in an HDF5 dataset beside the network
    assert set(saved.files) == {r.relpath for r in ImageDataset.scan(tmp_path / "ds").images if r.split != "test"}


def test_disk_cache_serves_train_and_test_modes(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=15)
    common = ("--dataset_path", "ds", "--cache_dir", "cache", "--json")
    train = run_cli("--mode", "train", "--epochs", "2", *common, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2  # the train and validation splits
    assert json.loads(train.stdout)["config"]["batch_size"] == 32  # no --batch_size: the default for 32 pixels, recorded
    first = run_cli("--mode", "test", *common, cwd=tmp_path)
    second = run_cli("--mode", "test", *common, cwd=tmp_path)  # from the cache
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 3  # and the test split
    assert json.loads(first.stdout)["confusion_matrix"] == json.loads(second.stdout)["confusion_matrix"]
    assert json.loads(first.stdout)["test_images"] > 0


USAGE_ERRORS = [
    (["--mode", "train", "--model_file_path", "models/m.pt"], "--model_file_path"),
    (["--mode", "train", "--epochs", "0"], "--epochs"),
    (["--mode", "train", "--epochs", "-3"], "--epochs"),
    (["--mode", "train", "--batch_size", "0"], "--batch_size"),
    (["--mode", "train", "--val_split", "1.5"], "--val_split"),
    (["--mode", "train", "--test_split", "0"], "--test_split must be a fraction above 0 and below 1"),
    (["--mode", "train", "--val_split", "0.5", "--test_split", "0.5"], "below 1"),
    (["--mode", "classify"], "--single_image_path"),
    (["--mode", "train", "--max_minutes", "0"], "--max_minutes"),
    (["--mode", "train", "--hold", "1"], "--hold must be a fraction at least 0 and below 1"),  # --hold 0 is allowed
    (["--mode", "predict"], "--mode"),
    (["--epochs", "3"], "--mode"),
]


@pytest.mark.parametrize("args, word", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, word):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), 2, word)


def test_runtime_errors_exit_1_with_one_line(tmp_path, trained):
    work, _ = trained
    assert_one_line_error(run_cli("--mode", "train", "--dataset_path", "nowhere", cwd=tmp_path), 1, "nowhere", "does not exist")
    (tmp_path / "one" / "only").mkdir(parents=True)
    shape_image("circle", np.random.default_rng(0)).save(tmp_path / "one" / "only" / "a.png")
    assert_one_line_error(run_cli("--mode", "train", "--dataset_path", "one", cwd=tmp_path), 1, "two class")
    # No model yet: test and classify say how to train one.
    for mode_args in (["--mode", "test"], ["--mode", "classify", "--single_image_path", "x.jpg"]):
        assert_one_line_error(run_cli(*mode_args, cwd=tmp_path), 1, "models/cnn_model.keras", "--mode train")
    # Classify: missing image, a text file, a corrupt image.
    assert_one_line_error(run_cli("--mode", "classify", "--single_image_path", "missing.jpg", cwd=work), 1, "missing.jpg")
    folder = run_cli("--mode", "classify", "--single_image_path", tmp_path / "one", cwd=work)  # the wrong flag: usage
    assert_one_line_error(folder, 2, "one is a folder", "--input_path")
    (tmp_path / "notes.jpg").write_text("not an image")
    bad = run_cli("--mode", "classify", "--single_image_path", tmp_path / "notes.jpg", cwd=work)
    assert_one_line_error(bad, 1, "notes.jpg", "not an image")
    # Test mode on a dataset with other classes than the model's.
    other = make_shapes_dataset(tmp_path / "other", per_class=3)
    shutil.move(other / "square", other / "box")
    assert_one_line_error(run_cli("--mode", "test", "--dataset_path", other, cwd=work), 1, "differ")


def test_main_freezes_the_collector_on_its_way_out_and_once_tensorflow_is_imported(tmp_path):
    """Full collections would walk all of TensorFlow's objects for nothing (quiet.freeze_collector_after_import)."""
    script = (
        "import gc\n"
        "from simple_cnn.cli import main\n"
        "from simple_cnn.quiet import import_tensorflow\n"
        "code = main(['--mode', 'train', '--dataset_path', 'nowhere'])\n"  # fails before TensorFlow is needed
        "on_its_way_out = gc.get_freeze_count()\n"
        "import_tensorflow()\n"  # as a mode that needs it would, later in the same command
        "print(code, on_its_way_out, gc.get_freeze_count())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    code, on_its_way_out, after_import = result.stdout.split()
    assert code == "1" and int(on_its_way_out) > 1000, result.stdout + result.stderr
    assert int(after_import) > int(on_its_way_out) + 100_000, result.stdout  # TensorFlow's and Keras' objects


@pytest.mark.parametrize(
    "settings, word",
    [({"epochs": 0}, "epochs"), ({"val_split": 0.6, "test_split": 0.5}, "below 1"), ({"learning_rate": -1}, "learning_rate")],
)
def test_python_api_checks_settings_as_the_cli_does(settings, word):
    """One source of settings: the dataclasses refuse what the flags refuse."""
    from simple_cnn.config import SettingError, TrainConfig
    from simple_cnn.dataset import load_data

    with pytest.raises(SettingError, match=word):
        TrainConfig(**settings)
    with pytest.raises(SettingError, match="val_split"):
        load_data("anywhere", val_split=1.5)


def test_default_batch_holds_the_pixels_of_32_images_of_96(trained):
    """32 images a step up to 96 pixels, fewer above (training's peak memory grows with a step's pixels);
    fewer for the MobileNetV3 backbones."""
    from simple_cnn.config import TrainConfig, auto_batch_size

    assert [auto_batch_size(s) for s in (32, 96, 104, 112, 128, 160, 1024)] == [32, 32, 24, 16, 16, 8, 8]
    assert TrainConfig().batch_for(112) == 16 and TrainConfig(batch_size=64).batch_for(112) == 64
    # The MobileNetV3 backbones train on a share of it (backbones.Backbone.batch_share), never under 8.
    for backbone in ("MobileNetV3Small", "MobileNetV3Large"):
        assert [auto_batch_size(s, backbone) for s in (32, 112, 128, 160)] == [24, 12, 12, 8]
    assert auto_batch_size(128, "EfficientNetV2B0") == 16
    assert TrainConfig(backbone="MobileNetV3Small").batch_for(128) == 12
    assert TrainConfig().batch_for(128, "MobileNetV3Small") == 12  # the network an --init_from model has
    _, summary = trained  # --batch_size given: used and recorded (the default's case: the disk-cache test)
    assert summary["config"]["batch_size"] == 16 and summary["distribute"]["global_batch"] == 16


def test_quiet_keeps_warnings_and_results_only(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=8)
    quiet = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--quiet", "--mixed_precision", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "Dataset ds" not in quiet.stderr and "Training at" not in quiet.stderr  # info lines are gone
    assert "Warning: --mixed_precision has no effect without a GPU" in quiet.stderr  # warnings stay
    assert "Model saved to" in quiet.stdout
    assert_one_line_error(run_cli("--mode", "train", "--quiet", "--verbose", cwd=tmp_path), 2, "--quiet")


@pytest.mark.parametrize("mode", ["train", "audit"])
def test_a_training_mode_without_tensorflow_says_to_use_the_full_image_first(tmp_path, mode):
    """The slim classify image has no TensorFlow: a training mode says so before it checks a folder or scans
    images (here a dataset that does not exist, which it would otherwise report first)."""
    hide = "import sys; sys.modules['tensorflow'] = None; from simple_cnn.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", hide, "--mode", mode, "--dataset_path", "absent", "--images_dir", "images"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_one_line_error(result, 1, f"--mode {mode} needs tensorflow", "use the full simple_cnn image")
    assert not (tmp_path / "images").exists()

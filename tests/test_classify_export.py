"""Classifying folders, the LiteRT fast path, and exports that load back and agree (serve: test_serve.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil

import numpy as np
import pytest

from conftest import CLASSES, add_copies, assert_one_line_error, bomb_png, run_cli
from simple_cnn.formats import load_model, read_metadata, save_model, tflite_path
from simple_cnn.images import read_image
from simple_cnn.runtime import Predictor


def _accuracy(rows, truth) -> float:
    return np.mean([truth[r["image"].split("/")[-1]] == r["class"] for r in rows])


def test_classify_folder_to_csv(trained, new_images):
    work, _ = trained
    folder, truth = new_images
    result = run_cli("--mode", "classify", "--input_path", folder, "--output", "out/predictions.csv", cwd=work)
    assert result.returncode == 0, result.stderr
    with open(work / "out" / "predictions.csv", newline="") as f:
        rows = [{"image": r["file"], "class": r["class"], "top_k": r["top_k"]} for r in csv.DictReader(f)]
    assert len(rows) == len(truth)
    assert _accuracy(rows, truth) >= 0.9
    assert all(len(r["top_k"].split(";")) == 3 for r in rows)
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "ignored 1 file in" in result.stderr and "(.txt 1)" in result.stderr  # notes.txt; .hidden.png is not counted
    assert "images/s" in result.stderr and "litert" in result.stderr


def test_classify_glob_to_jsonl_and_table(trained, new_images):
    work, _ = trained
    folder, truth = new_images
    result = run_cli("--mode", "classify", "--input_path", f"{folder}/**/circle_*.png", "--output", "p.jsonl", cwd=work)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (work / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and _accuracy(rows, truth) >= 0.8
    table = run_cli("--mode", "classify", "--input_path", folder / "sub", "--top_k", "2", cwd=work)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 9 and all(len(line.split("\t")) == 4 for line in lines)


def test_classify_json_names_the_runtime(trained):
    work, _ = trained
    image = work / "datasets" / "shapes" / "square" / "square_000.png"
    result = run_cli("--mode", "classify", "--single_image_path", image, "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtime"] == "litert"
    assert result.stderr == ""  # no TensorFlow or LiteRT start-up noise


def _images(folder, size):
    paths = sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))
    return np.stack([read_image(p, size) for p in paths])


def test_litert_and_keras_agree(trained, new_images):
    work, _ = trained
    model_path = work / "models" / "cnn_model.keras"
    metadata = read_metadata(model_path)
    x = _images(new_images[0], metadata["image_size"])
    lite = Predictor(model_path, metadata)
    assert lite.runtime == "litert"
    keras_model, _ = load_model(model_path)
    expected = np.asarray(keras_model(x.astype(np.float32), training=False))
    got = lite(x)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # The copy's signature, as a device's signature runner calls it (converters._described writes it)
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tflite_path(model_path))).get_signature_runner("serving_default")
    outputs = runner(image=x.astype(np.float32))
    assert sorted(outputs) == ["output_0", "output_1"]  # the probabilities, then the unknown distance
    np.testing.assert_allclose(outputs["output_0"], expected, atol=1e-3)
    assert outputs["output_1"].shape == (len(x), 1) and (outputs["output_1"] > 0).all()


def test_stale_litert_copy_falls_back_to_keras(trained, tmp_path, caplog):
    work, _ = trained
    shutil.copy(work / "models" / "cnn_model.keras", tmp_path / "m.keras")
    shutil.copy(work / "models" / "cnn_model.tflite", tmp_path / "m.tflite")
    other = tmp_path / "other.keras"  # same network, another training run's metadata
    model, metadata = load_model(tmp_path / "m.keras")
    other_copy = hashlib.sha256(b"another run's LiteRT copy").hexdigest()
    save_model(model, other, {**metadata, "trained_at": "another run", "litert_sha256": other_copy})
    shutil.copy(tmp_path / "m.tflite", tmp_path / "other.tflite")
    with caplog.at_level(logging.WARNING, logger="simple_cnn"):
        predictor = Predictor(other, read_metadata(other))
    assert predictor.runtime == "keras"
    assert "not from the same training run" in caplog.text


def test_export_tflite_loads_back_with_labels(trained, new_images):
    from ai_edge_litert.interpreter import Interpreter

    from simple_cnn.formats import read_tflite_metadata

    work, _ = trained
    result = run_cli("--mode", "export", "--format", "tflite", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)["written"]
    assert written == ["models/cnn_model.tflite", "models/cnn_model.labels.txt"]
    assert (work / written[1]).read_text().split() == list(CLASSES)
    assert read_tflite_metadata(work / written[0])["class_names"] == list(CLASSES)
    interpreter = Interpreter(model_path=str(work / written[0]))
    interpreter.allocate_tensors()
    assert list(interpreter.get_input_details()[0]["shape"][1:]) == [32, 32, 3]


def test_export_savedmodel_serves_raw_image_bytes(trained, new_images):
    import tensorflow as tf

    work, _ = trained
    result = run_cli("--mode", "export", "--format", "savedmodel", cwd=work)
    assert result.returncode == 0, result.stderr
    folder, truth = new_images
    paths = sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))
    served = tf.saved_model.load(str(work / "models" / "cnn_model_savedmodel"))
    out = served.signatures["serving_default"](image_bytes=tf.constant([p.read_bytes() for p in paths]))
    classes = [c.decode() for c in out["classes"].numpy()]
    assert np.mean([truth[p.name] == c for p, c in zip(paths, classes)]) >= 0.9
    keras_model, metadata = load_model(work / "models" / "cnn_model.keras")
    x = _images(folder, metadata["image_size"])
    pixels = served.signatures["pixels"](pixels=tf.constant(x, tf.float32))
    np.testing.assert_allclose(pixels["probabilities"].numpy(), keras_model(x.astype(np.float32), training=False), atol=1e-4)
    labels = (work / "models" / "cnn_model_savedmodel" / "assets" / "labels.txt").read_text().split()
    assert labels == list(CLASSES)
    # A decompression bomb, or bytes of no format it reads, is refused from its header,
    # before anything is decoded.
    for bad in (bomb_png(50_000, 50_000), b"GIF89a\xff\xff\xff\xff" + bytes(20), b"not an image"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="refused"):
            served.signatures["serving_default"](image_bytes=tf.constant([bad]))


def test_export_onnx_predicts_the_same_classes(trained, new_images):
    import onnx
    import onnxruntime

    work, _ = trained
    result = run_cli("--mode", "export", "--format", "onnx", cwd=work)
    assert result.returncode == 0, result.stderr
    path = work / "models" / "cnn_model.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["simple_cnn"])["class_names"] == list(CLASSES)
    keras_model, metadata = load_model(work / "models" / "cnn_model.keras")
    x = _images(new_images[0], metadata["image_size"]).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, keras_model(x, training=False), atol=1e-4)


def test_quantized_int8_copy_is_smaller_as_accurate_and_classifies(trained, new_images, tmp_path):
    work, _ = trained
    result = run_cli("--mode", "export", "--format", "tflite", "--quantize", "int8", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") < 5, result.stderr  # the converter's own output stays hidden
    exported = json.loads(result.stdout)
    assert exported["written"][0] == "models/cnn_model.int8.tflite"
    float32, int8 = exported["quantization"]["float32"], exported["quantization"]["int8"]
    assert int8["size_bytes"] < 0.4 * float32["size_bytes"] and int8["test_images"] == float32["test_images"] > 20
    assert int8["test_accuracy"] >= float32["test_accuracy"] - 0.05
    assert int8["latency_ms"] > 0 and int8["images_per_second"] > 0

    folder, truth = new_images
    quantized = "models/cnn_model.int8.tflite"
    rows = run_cli("--mode", "classify", "--input_path", folder, "--model_file_path", quantized, "--json", cwd=work)
    assert rows.returncode == 0, rows.stderr
    answers = json.loads(rows.stdout)
    assert answers["runtime"] == "litert" and _accuracy(answers["predictions"], truth) >= 0.8

    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"TFL3" + bytes(range(256)) * 8)
    image = folder / "circle_0.png"
    assert_one_line_error(
        run_cli("--mode", "classify", "--model_file_path", fake, "--single_image_path", image, cwd=work), 1, "fake.tflite"
    )


def test_quantize_measures_the_very_test_images_test_mode_scores(tiny_model, tmp_path):
    """Near copies of training images that land in the test split are set aside by both
    (the one copy rule, dataset.ImageDataset.test_split), so the two accuracies are of the same images;
    a dataset of other classes is refused, as test mode refuses it."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model.parent.parent, work, ignore=shutil.ignore_patterns("images"))
    copies = add_copies(work / "ds", "circle", "square")
    tested = run_cli("--mode", "test", "--dataset_path", "ds", "--json", cwd=work)
    assert tested.returncode == 0, tested.stderr
    scored = json.loads(tested.stdout)
    assert copies["mirrored"] in {c["file"] for c in scored["duplicates"]["set_aside"]}  # a test image that copies a training one
    exported = run_cli("--mode", "export", "--format", "tflite", "--quantize", "float16", "--json", cwd=work)
    assert exported.returncode == 0, exported.stderr
    float32 = json.loads(exported.stdout)["quantization"]["float32"]
    assert float32["test_images"] == scored["test_images"]
    assert abs(float32["test_accuracy"] - scored["accuracy"]) <= 1 / scored["test_images"]  # LiteRT and Keras agree

    (work / "ds" / "circle").rename(work / "ds" / "oval")  # another dataset: other classes
    other = run_cli("--mode", "export", "--format", "tflite", "--quantize", "float16", "--dataset_path", "ds", cwd=work)
    assert_one_line_error(other, 1, "classes of ds", "differ", "oval")


@pytest.mark.parametrize(
    "args, word",
    [
        (["--mode", "classify", "--input_path", "x", "--output", "p.txt"], ".csv or .jsonl"),
        (["--mode", "classify", "--input_path", "x", "--single_image_path", "y"], "not both"),
        (["--mode", "export"], "--format"),
        (["--mode", "export", "--format", "pb"], "--format"),
        (["--mode", "train", "--output", "p.csv"], "--output"),
        (["--mode", "export", "--format", "onnx", "--quantize", "int8"], "--quantize"),
        (["--mode", "export", "--format", "tflite", "--quantize", "int4"], "--quantize"),
    ],
)
def test_classify_and_export_usage_errors(tmp_path, args, word):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), 2, word)


def test_classify_empty_folder_or_glob_is_one_clear_line(trained, tmp_path):
    work, _ = trained
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("--mode", "classify", "--input_path", tmp_path / "empty", cwd=work), 1, "no images")
    assert_one_line_error(run_cli("--mode", "classify", "--input_path", f"{tmp_path}/*.jpg", cwd=work), 1, "no files match")

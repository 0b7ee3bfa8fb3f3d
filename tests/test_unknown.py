"""The unknown detector (unknown.py): a distance in the network's features, through train, test, classify and serve."""

from __future__ import annotations

import json
import shutil
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, ServeProcess, assert_one_line_error, run_cli, shape_image, start_cli


def make_images_of_no_class(folder, count: int = 24, seed: int = 5):
    """Images that are none of the shapes: noise, stripes and smooth colour fields; and one broken file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, 48)
    for i in range(count):
        if i % 3 == 0:
            pixels = rng.integers(0, 256, (48, 48, 3))
        elif i % 3 == 1:
            angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 12)
            wave = np.sin(2 * np.pi * frequency * (np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]))
            pixels = (wave[..., None] * 0.5 + 0.5) * rng.integers(60, 256, 3)
        else:
            corners = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
            pixels = np.asarray(Image.fromarray(corners).resize((48, 48), Image.BILINEAR))
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(folder / f"none_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.fixture(scope="module")
def no_class(tmp_path_factory):
    return make_images_of_no_class(tmp_path_factory.mktemp("unknown") / "none")


def test_training_stores_a_detector_and_test_mode_measures_it_against_the_softmax(trained, no_class, tmp_path):
    work, summary = trained
    record = summary["unknown"]
    assert record["method"] == "mahalanobis" and record["keep"] == 0.95 and record["threshold"] > 0
    result = run_cli("--mode", "test", "--unknown_path", no_class, "--images_dir", tmp_path, "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)["unknown"]
    assert scored["unknown_images"] == 24 and len(scored["skipped"]) == 1  # the broken file, counted
    distance, softmax = scored["distance"], scored["softmax"]
    assert distance["auroc"] >= 0.9, scored  # chance is 0.5
    assert distance["caught"] >= 0.75, scored
    # The threshold keeps 95 % of 27 validation images; the 27 test images may keep fewer by chance alone.
    assert distance["test_kept"] >= 0.7, scored
    assert 0 <= softmax["auroc"] <= 1 and softmax["threshold"] == record["softmax_threshold"]
    assert json.loads((tmp_path / "metrics.json").read_text())["unknown"] == scored
    human = run_cli("--mode", "test", "--unknown_path", no_class, "--images_dir", tmp_path, cwd=work)
    assert "Images of no class (--unknown_path): 24, 1 skipped" in human.stdout


def test_classify_answers_unknown_beyond_the_distance_on_litert_and_keras(trained, no_class, tmp_path):
    work, _ = trained
    rng = np.random.default_rng(11)
    (tmp_path / "shapes").mkdir()
    for i in range(30):  # new images like the training images (a shape on a noisy background, 32 pixels)
        shape_image(CLASSES[i % 3], rng).save(tmp_path / "shapes" / f"{i}.png")
    model = work / "models" / "cnn_model.keras"

    def classify(model_path, folder, *flags):
        args = ("--mode", "classify", "--model_file_path", model_path, "--input_path", folder, "--json", *flags)
        result = run_cli(*args, cwd=work)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    novel = classify(model, no_class, "--unknown")
    assert novel["runtime"] == "litert"
    assert np.mean([p["class"] == "unknown" for p in novel["predictions"]]) >= 0.75
    assert all(p["beyond_threshold"] == (p["distance"] > p["distance_threshold"]) for p in novel["predictions"])
    known = classify(model, tmp_path / "shapes", "--unknown")
    assert np.mean([p["class"] in CLASSES for p in known["predictions"]]) >= 0.8
    plain = classify(model, no_class)  # without --unknown: the distance is reported, the answer is the softmax's
    assert all(p["class"] in CLASSES and "distance" in p for p in plain["predictions"])

    shutil.copy(model, tmp_path / "alone.keras")  # no LiteRT copy beside it: Keras computes the same distances
    keras = classify(tmp_path / "alone.keras", no_class, "--unknown")
    assert keras["runtime"] == "keras"
    np.testing.assert_allclose(
        [p["distance"] for p in keras["predictions"]], [p["distance"] for p in novel["predictions"]], rtol=1e-3, atol=1e-2
    )

    one = run_cli("--mode", "classify", "--single_image_path", no_class / "none_0.png", "--unknown", cwd=work)
    assert one.returncode == 0 and "unknown (at a distance of" in one.stdout, one.stdout


def test_serve_reports_the_distance_and_answers_unknown_with_the_flag(trained, no_class):
    work, _ = trained
    running = ServeProcess(start_cli("--mode", "serve", "--port", "0", "--unknown", cwd=work))
    try:

        def post(path, body):
            request = urllib.request.Request(running.url + path, data=body, headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        noise = post("/classify", (no_class / "none_0.png").read_bytes())
        assert noise["class"] == "unknown" and noise["beyond_threshold"] and noise["distance"] > noise["distance_threshold"]
        rng = np.random.default_rng(7)
        shape = tmp_png(shape_image("circle", rng))
        answer = post("/classify", shape)
        assert answer["class"] == "circle" and not answer["beyond_threshold"], answer
        import base64

        body = json.dumps({"instances": [{"b64": base64.b64encode(shape).decode()}]}).encode()
        row = post("/v1/models/cnn_model:predict", body)["predictions"][0]
        assert row["classes"] == "circle" and row["distance"] == pytest.approx(answer["distance"], abs=1e-2)
    finally:
        running.proc.kill()


def tmp_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_unknown_without_a_detector_or_images_is_one_line(trained, tmp_path):
    from simple_cnn.formats import read_metadata, rewrite_metadata

    work, _ = trained
    model = work / "models" / "cnn_model.keras"
    old = tmp_path / "old.keras"  # as a model from before the detector: no record of one
    shutil.copy(model, old)
    rewrite_metadata(old, {k: v for k, v in read_metadata(old).items() if k not in ("unknown", "litert_sha256")})
    image = sorted((work / "datasets" / "shapes" / "circle").iterdir())[0]
    result = run_cli("--mode", "classify", "--model_file_path", old, "--single_image_path", image, "--unknown", cwd=work)
    assert_one_line_error(result, 1, "old.keras", "no unknown detector", "train it again")
    assert run_cli("--mode", "classify", "--model_file_path", old, "--single_image_path", image, cwd=work).returncode == 0

    test = ("--mode", "test", "--dataset_path", "datasets/shapes", "--unknown_path")
    assert_one_line_error(run_cli(*test, tmp_path / "nowhere", cwd=work), 1, "--unknown_path", "nowhere", "not a folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(*test, tmp_path / "empty", cwd=work), 1, "--unknown_path", "holds no images")
    assert_one_line_error(run_cli("--mode", "classify", "--input_path", ".", "--unknown_path", ".", cwd=work), 2, "--mode test")
    assert_one_line_error(run_cli("--mode", "test", "--unknown", cwd=work), 2, "--unknown")


def test_the_distance_layer_computes_the_detectors_distance_and_the_files_keep_it(tmp_path):
    """The layer every runtime runs agrees with the float64 reference, and both model formats store the detector."""
    from simple_cnn import unknown
    from simple_cnn.formats import read_member, save_model
    from simple_cnn.layers import NearestMeanDistance
    from simple_cnn.quiet import import_keras

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, 300)
    features = rng.normal(size=(300, 16)) + groups[:, None] * 2.0
    detector = unknown.fit_detector(features, groups)
    layer = NearestMeanDistance(16, 3)
    layer.build((None, 16))
    layer.set_weights([detector.centre, detector.whitening, detector.whitened_means])
    probe = np.concatenate([features[:50], rng.normal(size=(20, 16)) * 10]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(probe))[:, 0], detector.distances(probe), rtol=1e-3, atol=1e-3)
    assert detector.distances(probe[50:]).min() > np.quantile(detector.distances(probe[:50]), 0.95)  # far ones are far

    keras = import_keras()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"m{suffix}"
        save_model(model, path, {"class_names": ["a", "b"], "image_size": 4}, detector.as_member())
        again = unknown.Detector.from_member(read_member(path, unknown.MEMBER, unknown.MAX_MEMBER_BYTES))
        np.testing.assert_array_equal(again.whitening, detector.whitening)
        assert unknown.read_detector(path) is not None


@pytest.mark.parametrize("n, p", [(40, 512), (300, 64), (2000, 1280), (6, 3)])
def test_the_shrunk_covariance_is_scikit_learns_ledoit_wolf(n, p):
    """Our Ledoit-Wolf (unknown.ledoit_wolf, which spares training scikit-learn's import) against scikit-learn's:
    fewer images than features, more, and features of very different scales."""
    from sklearn.covariance import LedoitWolf

    from simple_cnn.unknown import ledoit_wolf

    rng = np.random.default_rng(p)
    x = rng.normal(size=(n, p)) * rng.uniform(0.1, 3, size=p)
    x -= x.mean(axis=0)
    expected = LedoitWolf(assume_centered=True).fit(x)
    assert 0 < expected.shrinkage_ < 1  # a case where shrinking does something
    np.testing.assert_allclose(ledoit_wolf(x), expected.covariance_, rtol=1e-10, atol=1e-12)


def test_one_training_image_a_class_trains_a_model_without_a_detector(tmp_path):
    """With no spread around the class means the covariance cannot be inverted: the run still ends with its
    model (it used to end in "unexpected LinAlgError", the model unsaved), and --unknown says why there is none."""
    rng = np.random.default_rng(7)
    rows = ["path,label,split"]
    for kind in CLASSES[:2]:
        for split, n in (("train", 1), ("val", 2), ("test", 1)):
            for i in range(n):
                shape_image(kind, rng).save(tmp_path / f"{kind}_{split}_{i}.png")
                rows.append(f"{kind}_{split}_{i}.png,{kind},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    trained = run_cli("--mode", "train", "--dataset_path", ".", "--labels", "labels.csv", "--epochs", "1", "--json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["unknown"] is None and "No unknown detector" in trained.stderr
    image = tmp_path / "circle_test_0.png"
    answer = run_cli("--mode", "classify", "--single_image_path", image, "--json", cwd=tmp_path)
    assert answer.returncode == 0 and json.loads(answer.stdout)["class"] in CLASSES[:2], answer.stderr
    refused = run_cli("--mode", "classify", "--single_image_path", image, "--unknown", cwd=tmp_path)
    assert_one_line_error(refused, 1, "no unknown detector", "too few images")

"""The report page in a real browser, Grad-CAM where the evidence is, TensorBoard logs,
and copies set aside through the CLI (duplicates.py).

One training run serves them all (a training run is the suite's costliest step): a
dataset where the class is decided by a white disc in the top-left quadrant (the other
class has none; both have a random coloured shape anywhere), one class named with HTML
characters, and copies of one training image placed to straddle the splits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import CLASSES, add_copies, chromium, run_cli, shape_image
from simple_cnn.dataset import ImageDataset
from simple_cnn.images import read_image

MARKED = "<blob> & co"  # a class name that would be markup if it were not escaped
SIZE = 64  # the last block's grid is SIZE / 16 = 4 x 4: a quadrant is 2 x 2 cells


def corner_image(marked: bool, rng: np.random.Generator) -> Image.Image:
    im = shape_image(CLASSES[int(rng.integers(3))], rng, SIZE)  # a distractor anywhere
    if marked:
        r = SIZE // 10
        cx, cy = (int(v) for v in rng.integers(r + 1, SIZE // 2 - r, size=2))
        ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255))
    return im


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("corner")
    rng = np.random.default_rng(0)
    for name, marked in ((MARKED, True), ("plain", False)):
        (work / "ds" / name).mkdir(parents=True)
        for i in range(60):
            corner_image(marked, rng).save(work / "ds" / name / f"{i:03d}.png")
    copies = add_copies(work / "ds", MARKED, "plain")
    train = run_cli(
        "--mode", "train", "--dataset_path", "ds", "--epochs", "8", "--batch_size", "8", "--image_size", SIZE,
        "--tensorboard_dir", "tb", "--json", cwd=work,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    shutil.copyfile(work / "images" / "report.html", work / "train_report.html")
    test = run_cli("--mode", "test", "--dataset_path", "ds", cwd=work)
    assert test.returncode == 0, test.stderr
    return work, {"train": train, "test": test, "copies": copies}


@pytest.fixture(scope="module")
def corner(corner_run) -> Path:
    return corner_run[0]


def test_train_mode_writes_the_training_part(corner):
    page = (corner / "train_report.html").read_text()
    assert "best validation accuracy" in page and "Training curves" in page
    assert "Confusion matrix" not in page and "--mode test" in page
    assert "&lt;blob&gt; &amp; co" in page and MARKED not in page


def test_the_model_learned_and_grad_cam_looks_at_the_disc(corner):
    from simple_cnn import explain, formats

    assert json.loads((corner / "images" / "metrics.json").read_text())["accuracy"] >= 0.9
    model, metadata = formats.load_model(corner / "models" / "cnn_model.keras")
    marked = sorted((corner / "ds" / MARKED).iterdir())[:16]
    x = np.stack([read_image(f, SIZE) for f in marked])
    heat = explain.heat_maps(model, x, np.full(len(x), metadata["class_names"].index(MARKED)))
    assert heat.shape == (16, 4, 4)
    top_left = heat[:, :2, :2].sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    assert np.median(top_left) > 0.6, top_left  # a uniform map would put 0.25 there


def test_explain_writes_an_overlay_named_after_the_input(corner):
    image = corner / "ds" / MARKED / "000.png"
    result = run_cli("--mode", "classify", "--single_image_path", image, "--explain", "--json", cwd=corner)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["class"] == MARKED and answer["explanation"] == "images/000_gradcam.png"
    with Image.open(corner / answer["explanation"]) as overlay:
        assert overlay.size == (4 * SIZE, 4 * SIZE)
        pixels = np.asarray(overlay.convert("RGB"), dtype=float)
    red = pixels[..., 0] - pixels[..., 2]  # "jet": red where the heat is, blue where it is not
    half = 2 * SIZE
    assert red[:half, :half].mean() > red[half:, half:].mean() + 20


def test_explain_without_tensorflow_is_one_clear_line(corner, monkeypatch):
    import importlib.util

    from simple_cnn import classify
    from simple_cnn.errors import DataError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(DataError, match="--explain needs TensorFlow.*full simple_cnn image"):
        classify.classify(corner / "ds" / "plain" / "000.png", corner / "models" / "cnn_model.keras", explain=True)


def test_tensorboard_logs_hold_the_curves_and_the_learning_rate(corner):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run: str) -> dict[str, list[float]]:
        events = EventAccumulator(str(corner / "tb" / run))
        events.Reload()
        tags = events.Tags()["tensors"]
        return {tag: [float(np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0]) if e.tensor_proto.tensor_content
                      else e.tensor_proto.float_val[0] for e in events.Tensors(tag)] for tag in tags}  # fmt: skip

    train, validation = scalars("train"), scalars("validation")
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(train)
    assert len(train["epoch_loss"]) == len(validation["epoch_accuracy"]) == 8
    history = json.loads((corner / "images" / "metrics.json").read_text())
    assert train["epoch_learning_rate"][-1] < train["epoch_learning_rate"][0]  # the cosine decay
    assert history["test_images"] > 0


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    with chromium() as session:
        yield session


def test_report_page_in_a_browser(corner, browser, tmp_path):
    page = corner / "images" / "report.html"
    browser.set_window_size(1200, 900)
    browser.get(page.as_uri())
    run = browser.execute_script

    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    requests = run("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [r for r in requests if not r.startswith("data:")] == []  # nothing fetched: self-contained
    metrics = json.loads((corner / "images" / "metrics.json").read_text())
    assert browser.find_element("id", "accuracy").text == f"{metrics['accuracy']:.3f}"
    images = run("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(images) == page.read_text().count("<img ") >= 7  # curves, 4+ Grad-CAM overlays, 2 diagrams
    assert all(done and width > 0 for done, width in images)  # every one decoded
    assert len(browser.find_elements("css selector", "table.confusion td.cell")) == 2**2
    assert run("return document.getElementsByTagName('blob').length") == 0
    headers = [th.text for th in browser.find_elements("css selector", "table.confusion th")]
    assert MARKED in headers  # the class name, shown as text

    browser.set_window_size(390, 844)  # a phone: nothing wider than the screen but the tables' own scrollers
    assert run("return document.documentElement.scrollWidth") <= 390 + 1
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] > 300 and im.getextrema()[0][1] > 0


# ---------------------------------------------------------------- copies (duplicates.py)


def test_train_and_test_report_and_set_aside_copies(corner_run):
    work, runs = corner_run
    files = runs["copies"]
    trained = json.loads(runs["train"].stdout)["duplicates"]
    assert trained["groups"] == 1 and trained["images"] == 3  # original, identical, smaller: train mode decodes no test image
    assert {c["file"] for c in trained["set_aside"]} == {files["identical"], files["smaller"]}
    assert "filed under different classes" in runs["train"].stderr and files["identical"] in runs["train"].stderr

    assert f"{files['recoded']} (copy of {files['original']})" in runs["test"].stdout
    result = json.loads((work / "images" / "metrics.json").read_text())
    tested = result["duplicates"]
    assert {c["file"] for c in tested["set_aside"]} == {files["identical"], files["recoded"], files["mirrored"]}
    assert all(c["copy_of"] == files["original"] for c in tested["set_aside"])
    assert result["test_images"] == ImageDataset.scan(work / "ds").counts()["test"] - 2
    assert "a copy of" in (work / "images" / "report.html").read_text()

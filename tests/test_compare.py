"""--mode compare: the same test images for every model, a paired test, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_one_line_error, chromium, run_cli
from simple_cnn.compare import balanced_accuracy, verdict


@pytest.fixture(scope="module")
def weak_and_strong(trained):
    """The shared trained model (10 epochs) and a one-epoch model of the same dataset; a copy of the weak one."""
    work, _ = trained
    args = ("--mode", "train", "--dataset_path", "datasets/shapes", "--epochs", "1", "--image_size", "24")
    result = run_cli(*args, "--model_file_path", "models/weak.keras", cwd=work)
    assert result.returncode == 0, result.stderr
    for suffix in (".keras", ".tflite"):
        shutil.copyfile(work / "models" / f"weak{suffix}", work / "models" / f"same{suffix}")
    return work


def test_compare_names_the_clearly_better_model_and_finds_no_difference_between_equal_ones(weak_and_strong):
    work = weak_and_strong
    result = run_cli("--mode", "compare", "--model_file_path", "models/weak.keras", "--other_model", "models/cnn_model.keras",
                     "--other_model", "models/same.keras", "--json", cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    compared = json.loads(result.stdout)
    strong, same = compared["pairs"]
    assert compared["test_images"] >= 20 and len(compared["models"]) == 3
    assert strong["verdict"].startswith("cnn_model.keras is better than weak.keras by")
    assert strong["mcnemar_p"] < 0.05 and strong["accuracy_interval"][0] > 0 and strong["only_b_right"] > strong["only_a_right"]
    assert strong["balanced_accuracy_interval"][0] > 0
    assert same["verdict"].startswith("no detectable difference") and same["mcnemar_p"] == 1 and same["disagreements"] == 0
    accuracies = {m["model"]: m["accuracy"] for m in compared["models"]}
    assert accuracies["models/cnn_model.keras"] - accuracies["models/weak.keras"] == pytest.approx(strong["accuracy_difference"])
    assert (work / "images" / "compare.json").is_file()

    with chromium() as browser:
        browser.get((work / "images" / "compare.html").as_uri())
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
        requests = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [r for r in requests if not r.startswith("data:")] == []
        assert "cnn_model.keras is better than weak.keras" in browser.find_element("css selector", "p.verdict").text
        images = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
        assert 0 < len(images) <= strong["disagreements"] and all(done and width > 0 for done, width in images)


def test_models_that_cannot_be_compared_are_refused_in_one_line(weak_and_strong):
    work = weak_and_strong
    base = ("--mode", "compare", "--model_file_path", "models/weak.keras")
    assert_one_line_error(run_cli("--mode", "compare", cwd=work), 2, "--other_model")
    assert_one_line_error(run_cli(*base, "--other_model", "models/nothing.keras", cwd=work), 1, "nothing.keras")
    other_split = run_cli("--mode", "train", "--dataset_path", "datasets/shapes", "--epochs", "1", "--image_size", "24",
                          "--val_split", "0.2", "--model_file_path", "models/other_split.keras", cwd=work)  # fmt: skip
    assert other_split.returncode == 0, other_split.stderr
    assert_one_line_error(run_cli(*base, "--other_model", "models/other_split.keras", cwd=work), 2, "val_split")
    renamed = work / "renamed"
    for image in (work / "datasets" / "shapes").rglob("*.png"):
        (renamed / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, renamed / image.parent.name / f"other_{image.name}")
    elsewhere = run_cli("--mode", "train", "--dataset_path", "renamed", "--epochs", "1", "--image_size", "24",
                        "--model_file_path", "models/elsewhere.keras", cwd=work)  # fmt: skip
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert_one_line_error(run_cli(*base, "--other_model", "models/elsewhere.keras", cwd=work), 2, "different datasets")


def test_balanced_accuracy_and_the_verdict_line():
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    predicted = np.where(rng.random((5, 200)) < 0.6, y, rng.integers(0, 4, size=(5, 200)))
    ours = balanced_accuracy(predicted, y)
    assert ours == pytest.approx([balanced_accuracy_score(y, p) for p in predicted])
    assert verdict("a", "b", 0.021, (0.004, 0.038), 0.01) == "b is better than a by 2.1 points (0.4 to 3.8), p = 0.01"
    assert verdict("a", "b", -0.03, (-0.05, -0.01), 0.002).startswith("a is better than b by 3.0 points (1.0 to 5.0)")
    assert verdict("a", "b", 0.01, (-0.01, 0.03), 0.3).startswith("no detectable difference")

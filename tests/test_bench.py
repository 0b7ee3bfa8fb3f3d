"""The benchmark scripts run end to end on a small dataset and report sane figures.

Speed itself is never asserted here (the machine is shared and noisy): the figures are
for people, printed by ``python bench/train_bench.py``. This only keeps the script working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CLASSES, add_copies, make_shapes_dataset
from simple_cnn.dataset import ImageDataset

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"


def test_train_bench_compares_both_recipes_and_the_input_pipeline(tmp_path):
    dataset = make_shapes_dataset(tmp_path / "shapes", per_class=20)
    add_copies(dataset, CLASSES[0], CLASSES[1])  # copies of a training image: two near copies land in the test split
    test_split = len(ImageDataset.scan(dataset).split("test"))
    output = tmp_path / "results" / "train.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--dataset", str(dataset), "--minutes", "0.1", "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"simple_cnn", "tutorial"}
    for row in report["results"].values():
        assert 0 <= row["test_accuracy"] <= 1 and row["test_images"] > 0
        assert row["epochs"] >= 1 and row["train_images_per_second"] > 0
        assert 0 < row["fraction_of_matmul_ceiling"] < 1
        # A training image costs its forward pass and about twice that backward; ours classifies two views.
        assert 2 * row["inference_mflops_per_image"] / (2 if row["recipe"] == "simple_cnn" else 1) < row["train_mflops_per_image"]
        assert row["peak_rss_mib"] > 100 and row["classify_cold_start_seconds"] > 0
    # Both are tested on the images --mode test scores: the near copies of a training image set aside.
    assert report["results"]["simple_cnn"]["test_images"] == report["results"]["tutorial"]["test_images"] < test_split
    assert report["results"]["simple_cnn"]["classify_runtime"] == "litert"
    assert report["results"]["tutorial"]["classify_runtime"] == "keras"
    feeds = report["input_pipeline"]
    assert feeds["train_images"] == report["results"]["simple_cnn"]["train_images"]
    assert feeds["memory_images_per_second"] > 0 and feeds["pipeline_over_memory"] > 0
    low, high = feeds["pipeline_over_memory_quartiles"]
    assert 0 < low <= feeds["pipeline_over_memory"] <= high and feeds["rounds"] == 2  # the median, inside its spread
    table = result.stdout
    assert "simple_cnn" in table and "tutorial" in table and "input pipeline" in table

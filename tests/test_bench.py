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
from simple_cnn.formats import read_metadata

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"


def test_train_bench_compares_ours_with_the_keras_peers_and_the_input_pipeline(tmp_path):
    dataset = make_shapes_dataset(tmp_path / "shapes", per_class=20)
    add_copies(dataset, CLASSES[0], CLASSES[1])  # copies of a training image: two near copies land in the test split
    test_split = len(ImageDataset.scan(dataset).split("test"))
    output = tmp_path / "results" / "train.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--dataset", str(dataset), "--minutes", "0.1", "--quick", "--output", str(output)]
        + ["--peers", "tutorial", "keras_io", "--seed", "3"],  # Ultralytics needs its own environment (bench/peers/install.sh)
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"simple_cnn", "tutorial", "keras_io"} and report["seed"] == 3
    ours = read_metadata(output.parent / "train_bench_models" / "simple_cnn.keras")
    assert ours["training"]["config"]["seed"] == 3  # --seed reached our training, not only the report
    for row in report["results"].values():
        assert 0 <= row["test_accuracy"] <= 1 and row["test_images"] > 0
        low, high = row["test_interval"]
        assert low <= row["test_accuracy"] <= high and row["test_correct"] == round(row["test_accuracy"] * row["test_images"])
        assert row["epochs"] >= 1 and row["train_images_per_second"] > 0
        assert 0 < row["fraction_of_matmul_ceiling"] < 1
        # A training image costs its forward pass and about twice that backward; ours classifies two views.
        assert 2 * row["inference_mflops_per_image"] / (2 if row["recipe"] == "simple_cnn" else 1) < row["train_mflops_per_image"]
        assert row["peak_rss_mib"] > 100 and row["classify_cold_start_seconds"] > 0
    # Both are tested on the images --mode test scores: the near copies of a training image set aside.
    assert len({row["test_images"] for row in report["results"].values()}) == 1
    assert report["results"]["simple_cnn"]["test_images"] < test_split
    assert report["results"]["simple_cnn"]["classify_runtime"] == "litert"
    assert report["results"]["tutorial"]["classify_runtime"] == report["results"]["keras_io"]["classify_runtime"] == "keras"
    assert set(report["points_ahead_of_each_peer"]) == {"tutorial", "keras_io"}
    feeds = report["input_pipeline"]
    assert feeds["train_images"] == report["results"]["simple_cnn"]["train_images"]
    assert feeds["memory_images_per_second"] > 0 and feeds["pipeline_over_memory"] > 0
    low, high = feeds["pipeline_over_memory_quartiles"]
    assert 0 < low <= feeds["pipeline_over_memory"] <= high and feeds["rounds"] == 2  # the median, inside its spread
    table = result.stdout
    assert all(name in table for name in ("simple_cnn", "tutorial", "keras_io", "input pipeline"))


def test_the_split_exported_for_ultralytics_is_ours_with_only_the_scored_test_images(tmp_path):
    """Ultralytics (bench/peers.py) trains on our split in ImageFolder's layout, and is tested
    on the images --mode test scores: a test image left out of them is not exported."""
    sys.path.insert(0, str(BENCH.parent))
    from peers import export_split

    ds = ImageDataset.scan(make_shapes_dataset(tmp_path / "shapes", per_class=12))
    test = ds.split("test")
    root = export_split(ds, [r.relpath for r in test[1:]], tmp_path / "exported")

    def exported(split: str) -> list[str]:
        return sorted(f"{p.parent.name}/{p.name}" for p in (root / split).rglob("*.png"))

    for split in ("train", "val"):
        records = ds.split(split)
        assert exported(split) == sorted(f"{ds.class_names[r.label]}/{r.relpath.replace('/', '__')}" for r in records)
    assert len(exported("test")) == len(test) - 1 and not any(test[0].relpath.replace("/", "__") in f for f in exported("test"))
    copied = next((root / "train").rglob("*.png"))
    assert not copied.is_symlink() and copied.read_bytes() == (ds.root / copied.name.replace("__", "/")).read_bytes()

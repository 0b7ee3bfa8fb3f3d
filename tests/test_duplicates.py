"""Copies of one picture never straddle the splits (duplicates.py), on files the tests make."""

from __future__ import annotations

import json
import shutil
from itertools import count
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from conftest import make_shapes_dataset, run_cli
from simple_cnn import data, duplicates
from simple_cnn.config import TrainConfig


def name_in_split(folder: str, stem: str, suffix: str, split: str) -> str:
    """A file name under ``folder`` whose stable split is ``split``."""
    for k in count():
        relpath = f"{folder}/{stem}_{k}{suffix}"
        if data.split_of(relpath, TrainConfig.val_split, TrainConfig.test_split) == split:
            return relpath
    raise AssertionError  # unreachable


def dataset_with_copies(root: Path) -> dict[str, str]:
    """A shapes dataset plus copies of one training image, placed so that they would straddle the splits."""
    make_shapes_dataset(root, per_class=20, size=48)
    original = next(r.relpath for r in data.scan_dataset(root).images if r.split == "train" and r.relpath.startswith("circle/"))
    image = Image.open(root / original).convert("RGB")
    copies = {
        "recoded": name_in_split("circle", "recoded", ".jpg", "test"),  # JPEG at quality 40
        "smaller": name_in_split("circle", "smaller", ".png", "val"),  # resized to 36x36
        "mirrored": name_in_split("circle", "mirrored", ".png", "test"),
        "identical": name_in_split("square", "identical", ".png", "test"),  # the same bytes, another class
    }
    image.save(root / copies["recoded"], quality=40)
    image.resize((36, 36), Image.Resampling.LANCZOS).save(root / copies["smaller"])
    ImageOps.mirror(image).save(root / copies["mirrored"])
    shutil.copyfile(root / original, root / copies["identical"])
    return {"original": original, **copies}


def test_near_pairs_index_finds_what_brute_force_finds():
    rng = np.random.default_rng(1)
    n = 600
    hashes = rng.integers(0, 2**62, size=(n, 2), dtype=np.int64).astype(np.uint64)
    thumbnails = rng.integers(0, 256, size=(n, duplicates.THUMBNAIL_BYTES), dtype=np.uint8)
    for i in range(1, n, 7):  # plant copies 0 to 10 bits away, some of them mirror images
        flips = rng.choice(64, size=rng.integers(0, 11), replace=False)
        noise = np.uint64(sum(1 << int(b) for b in flips))
        hashes[i, 0] = hashes[i - 1, i % 2] ^ noise
        grey, colours = thumbnails[i - 1, :256].reshape(16, 16), thumbnails[i - 1, 256:].reshape(3, 4, 4)
        step = 1 - 2 * (i % 2)  # mirrored for odd i
        thumbnails[i] = np.concatenate([grey[:, ::step].ravel(), colours[..., ::step].ravel()])
    found = {tuple(p) for p in duplicates.near_pairs(hashes, thumbnails).tolist()}

    distance = np.minimum(
        np.bitwise_count(hashes[:, None, 0] ^ hashes[None, :, 0]), np.bitwise_count(hashes[:, None, 1] ^ hashes[None, :, 0])
    )
    candidates = [(i, j) for i in range(n) for j in range(i + 1, n) if min(distance[i, j], distance[j, i]) <= duplicates.NEAR]
    similar = duplicates._similar(thumbnails, *np.array(candidates).T)
    expected = {pair for pair, ok in zip(candidates, similar) if ok}
    assert found == expected
    assert 30 < len(found) < n // 7  # planted copies within NEAR bits are found, those beyond it are not


def test_copies_join_the_earliest_split_and_load_data_agrees(tmp_path):
    root = tmp_path / "ds"
    files = dataset_with_copies(root)
    dataset = data.scan_dataset(root)

    # The byte-identical copy is set aside by the scan; nothing else moves.
    assert dataset.copies.set_aside == [(files["identical"], files["original"])]
    kept = {r.relpath: r.split for r in dataset.images}
    assert files["identical"] not in kept
    assert all(split == data.split_of(f, TrainConfig.val_split, TrainConfig.test_split) for f, split in kept.items())
    report = dataset.copies.report(dataset.class_names)
    assert report["mixed_labels"] == [[f"{files['original']} (circle)", f"{files['identical']} (square)"]]

    counts = dataset.counts()
    (x_train, _), (x_test, _) = data.load_data(root, image_size=24)
    assert len(x_train) == counts["train"] + counts["val"] - 1  # the smaller copy left validation
    assert len(x_test) == counts["test"] - 2  # the re-encoded and the mirrored copies left test


def test_distinct_images_are_not_copies(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=60, size=48)
    dataset = data.scan_dataset(root)
    x, y = data.load_images(dataset, dataset.images, 24)
    fingerprints = data.Fingerprints.of(dataset, dataset.images, x, y)
    assert len(duplicates.near_pairs(fingerprints.hashes, fingerprints.thumbnails)) == 0
    assert not dataset.copies.links


def test_train_and_test_report_and_set_aside_copies(tmp_path):
    """Through the CLI, with an .h5 model file (its fingerprints live in an HDF5 dataset)."""
    files = dataset_with_copies(tmp_path / "ds")
    model = ["--model_file_path", "models/m.h5"]
    train = run_cli(
        "--mode", "train", "--dataset_path", "ds", *model, "--epochs", "1", "--image_size", "24", "--json", cwd=tmp_path
    )
    assert train.returncode == 0, train.stderr
    trained = json.loads(train.stdout)["duplicates"]
    assert trained["groups"] == 1 and trained["images"] == 3  # original, identical, smaller: train mode decodes no test image
    assert {c["file"] for c in trained["set_aside"]} == {files["identical"], files["smaller"]}
    assert "filed under different classes" in train.stderr and files["identical"] in train.stderr

    test = run_cli("--mode", "test", "--dataset_path", "ds", *model, cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    assert f"{files['recoded']} (copy of {files['original']})" in test.stdout
    result = json.loads((tmp_path / "images" / "metrics.json").read_text())
    tested = result["duplicates"]
    assert {c["file"] for c in tested["set_aside"]} == {files["identical"], files["recoded"], files["mirrored"]}
    assert all(c["copy_of"] == files["original"] for c in tested["set_aside"])
    assert result["test_images"] == data.scan_dataset(tmp_path / "ds").counts()["test"] - 2


def test_model_files_carry_the_training_fingerprints(tiny_model):
    from simple_cnn import formats

    saved = formats.read_fingerprints(tiny_model)
    dataset = data.scan_dataset(tiny_model.parent.parent / "ds")
    assert saved["files"] == [r.relpath for r in dataset.split("train") + dataset.split("val")]
    restored = data.Fingerprints.from_dict(saved)
    assert restored.thumbnails.shape == (len(saved["files"]), duplicates.THUMBNAIL_BYTES)
    assert data.Fingerprints.from_dict(restored.as_dict()).as_dict() == saved
    assert "phash" not in json.dumps(formats.read_metadata(tiny_model))  # classify reads the metadata only

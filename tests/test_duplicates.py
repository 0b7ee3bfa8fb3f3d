"""Copies of one picture never straddle the splits (duplicates.py), on files the tests make."""

from __future__ import annotations

import json

import numpy as np

from conftest import add_copies, make_shapes_dataset
from simple_cnn import duplicates
from simple_cnn.dataset import ImageDataset, load_data
from simple_cnn.duplicates import Fingerprints
from simple_cnn.splits import Layout, assign


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
    root = make_shapes_dataset(tmp_path / "ds", per_class=20, size=48)
    files = add_copies(root, "circle", "square")
    dataset = ImageDataset.scan(root)

    # The byte-identical copy is set aside by the scan; nothing else moves.
    assert dataset.copies.set_aside == [(files["identical"], files["original"])]
    kept = {r.relpath: r.split for r in dataset.images}
    assert files["identical"] not in kept
    every = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))
    given = dict(zip(every, assign(every, [f.split("/")[0] for f in every], Layout())))
    assert all(split == given[f] for f, split in kept.items())
    report = dataset.copies.report(dataset.class_names)
    assert report["mixed_labels"] == [[f"{files['original']} (circle)", f"{files['identical']} (square)"]]

    counts = dataset.counts()
    (x_train, _), (x_test, _) = load_data(root, image_size=24)
    assert len(x_train) == counts["train"] + counts["val"] - 1  # the smaller copy left validation
    assert len(x_test) == counts["test"] - 2  # the re-encoded and the mirrored copies left test


def test_distinct_images_are_not_copies(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=60, size=48)
    dataset = ImageDataset.scan(root)
    fingerprints = dataset.decode(dataset.images, 24).fingerprints
    assert len(duplicates.near_pairs(fingerprints.hashes, fingerprints.thumbnails)) == 0
    assert not dataset.copies.links


def test_model_files_carry_the_training_fingerprints(tiny_model):
    from simple_cnn import formats

    restored = formats.read_fingerprints(tiny_model)
    dataset = ImageDataset.scan(tiny_model.parent.parent / "ds")
    assert restored.files == [r.relpath for r in dataset.split("train") + dataset.split("val")]
    assert restored.thumbnails.shape == (len(restored.files), duplicates.THUMBNAIL_BYTES)
    assert Fingerprints.from_dict(restored.as_dict()).as_dict() == restored.as_dict()
    assert "phash" not in json.dumps(formats.read_metadata(tiny_model))  # classify reads the metadata only

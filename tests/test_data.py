"""Finding, checking, splitting and decoding images (no TensorFlow needed)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, assert_one_line_error, bomb_png, make_shapes_dataset, run_cli, shape_image
from simple_cnn import images
from simple_cnn.dataset import AUTO_SIZE_MAX, SPLITS, ImageDataset, load_data, split_of
from simple_cnn.errors import DataError
from simple_cnn.images import read_image
from simple_cnn.sources import ensure_digits_dataset, find
from simple_cnn.splits import Layout


def test_discovery_sorts_classes_and_ignores_hidden_and_non_images(tmp_path, caplog):
    root = make_shapes_dataset(tmp_path / "ds", per_class=3)
    (root / ".hidden_class").mkdir()
    shape_image("circle", np.random.default_rng(1)).save(root / ".hidden_class" / "x.png")
    shape_image("circle", np.random.default_rng(1)).save(root / "circle" / ".hidden.png")
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "circle" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "README.md").write_text("files beside the class folders are ignored")
    nested = root / "square" / "more" / "deeper"
    nested.mkdir(parents=True)
    shape_image("square", np.random.default_rng(2)).save(nested / "n.PNG")

    ds = ImageDataset.scan(root)

    assert ds.class_names == ["circle", "square", "triangle"]
    assert ds.skipped == []
    names = sorted(r.relpath for r in ds.images)
    assert len(names) == 10
    assert "square/more/deeper/n.PNG" in names
    assert all(ds.class_names[r.label] == r.relpath.split("/")[0] for r in ds.images)
    # The files left out for their suffix are said, once for the dataset; hidden ones are not counted.
    said = [r.getMessage() for r in caplog.records if "without an image suffix" in r.getMessage()]
    assert len(said) == 1, said
    assert f"ignored 2 files in {root}" in said[0] and ".txt 1" in said[0] and ".db 1" in said[0]


def test_split_folders_of_class_folders_are_followed(tmp_path, caplog):
    """train/ and test/ (any case), each of class folders, as ImageNet, Ultralytics and many Kaggle datasets
    come: their splits are followed, and validation is drawn from train/ alone; with a val folder, nothing
    is drawn. They used to be taken for two classes named train and test."""
    root = tmp_path / "ds"
    make_shapes_dataset(root / "train", per_class=20, seed=1)
    make_shapes_dataset(root / "Test", per_class=4, seed=2)
    with caplog.at_level("INFO", logger="simple_cnn.sources"):
        ds = ImageDataset.scan(root)
    assert ds.class_names == ["circle", "square", "triangle"]
    assert all(ds.class_names[r.label] == r.relpath.split("/")[1] for r in ds.images)
    set_aside = {relpath for relpath, _ in ds.copies.set_aside}
    test_files = {f"Test/{p.parent.name}/{p.name}" for p in (root / "Test").rglob("*.png")}
    assert {r.relpath for r in ds.split("test")} | set_aside == test_files and len(ds.split("test")) >= 10
    assert all(r.relpath.startswith("train/") for r in ds.split("train") + ds.split("val"))
    assert ds.per_class_counts()["val"] == {"circle": 3, "square": 3, "triangle": 3}  # 15 % of train/'s 20
    said = "holds the split folders Test, train: followed; test images from Test/ (so --test_split is not used)"
    assert f"{said}; val images drawn from train/" in caplog.text
    metadata = {"class_names": ds.class_names, "val_split": 0.15, "test_split": 0.15, "layout": ds.layout.as_metadata()}
    again = ImageDataset.of_model(root, metadata, "model.keras")  # what test mode scans: the same splits
    assert [(r.relpath, r.split) for r in again.images] == [(r.relpath, r.split) for r in ds.images]
    make_shapes_dataset(root / "valid", per_class=2, seed=3)
    ds = ImageDataset.scan(root)
    assert {r.relpath.split("/")[0] for r in ds.split("val")} == {"valid"}
    assert {r.relpath.split("/")[0] for r in ds.split("train")} == {"train"}


def test_split_folders_as_kaggle_archives_unpack_them(tmp_path, caplog):
    """Intel's scenes (seg_train/seg_train, seg_test/seg_test, seg_pred/seg_pred of unlabelled images), a
    Mac's __MACOSX beside them and a NAS's @eaDir in a class folder; the brain MRI set's Training/ and Testing/;
    a competition's flat test/ beside train/'s class folders. Each used to be taken for classes named after its
    folders (seg_pred, seg_test, seg_train), a model that learns which folder a photo came from."""
    root = tmp_path / "intel"
    make_shapes_dataset(root / "seg_train" / "seg_train", per_class=10, seed=1)
    make_shapes_dataset(root / "seg_test" / "seg_test", per_class=3, seed=2)
    (root / "seg_pred" / "seg_pred").mkdir(parents=True)
    shape_image("circle", np.random.default_rng(3)).save(root / "seg_pred" / "seg_pred" / "1.png")
    (root / "__MACOSX" / "seg_train").mkdir(parents=True)
    (root / "__MACOSX" / "seg_train" / "._1.png").write_bytes(b"\0\5\x16\7 resource fork")
    (root / "seg_train" / "seg_train" / "circle" / "@eaDir").mkdir()
    shape_image("circle", np.random.default_rng(4)).save(root / "seg_train" / "seg_train" / "circle" / "@eaDir" / "THUMB.png")
    with caplog.at_level("INFO", logger="simple_cnn.sources"):
        ds = ImageDataset.scan(root)
    assert ds.class_names == ["circle", "square", "triangle"] and len(ds.images) + len(ds.copies.set_aside) == 39
    assert {r.relpath for r in ds.split("test")} | {f for f, _ in ds.copies.set_aside} == {
        f"seg_test/seg_test/{p.parent.name}/{p.name}" for p in (root / "seg_test").rglob("*.png")
    }
    assert all(r.relpath.startswith("seg_train/seg_train/") for r in ds.split("train") + ds.split("val"))
    assert (
        "holds the split folders seg_test/seg_test, seg_train/seg_train: followed; test images from seg_test/seg_test/ "
        "(so --test_split is not used); val images drawn from seg_train/seg_train/; seg_pred/seg_pred/ left out: images "
        f"without class folders (--mode classify --input_path {root}/seg_pred/seg_pred)" in caplog.text
    )
    mri = tmp_path / "mri"
    make_shapes_dataset(mri / "Training", per_class=10, seed=1)
    make_shapes_dataset(mri / "Testing", per_class=3, seed=2)
    make_shapes_dataset(mri / "TestSet", per_class=1, seed=2)  # two test folders: not a split layout
    assert ImageDataset.scan(mri).class_names == ["TestSet", "Testing", "Training"]
    assert f"{mri} has class folders named as a split or as images to predict (TestSet, Testing, Training)" in caplog.text
    make_shapes_dataset(mri / "seg_pred", per_class=1, seed=2)
    (mri / "TestSet").rename(mri / "val2017")
    assert ImageDataset.scan(mri).class_names == ["circle", "square", "triangle"]
    competition = tmp_path / "competition"
    make_shapes_dataset(competition / "train", per_class=10, seed=1)
    (competition / "test").mkdir()
    shape_image("circle", np.random.default_rng(5)).save(competition / "test" / "0001.png")
    ds = ImageDataset.scan(competition)
    assert ds.class_names == ["circle", "square", "triangle"] and len(ds.split("test")) == 6  # drawn from train/
    assert all(r.relpath.startswith("train/") for r in ds.images)


def test_split_folders_inside_the_class_folders_are_followed(tmp_path, caplog):
    """cat/train/, cat/test/, dog/train/, dog/test/: the split inside the classes, where each class's images used
    to be pooled and split by the rule, the given test images mixed into training."""
    root = tmp_path / "ds"
    for split, per_class, seed in (("train", 12, 1), ("test", 4, 2)):
        make_shapes_dataset(tmp_path / split, per_class=per_class, seed=seed)
        for cls in CLASSES:
            (root / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / split / cls).rename(root / cls / split)
    with caplog.at_level("INFO", logger="simple_cnn.sources"):
        ds = ImageDataset.scan(root)
    assert ds.class_names == list(CLASSES) and all(ds.class_names[r.label] == r.relpath.split("/")[0] for r in ds.images)
    assert {r.relpath.split("/")[1] for r in ds.split("test")} == {"test"} and len(ds.split("test")) == 12
    assert {r.relpath.split("/")[1] for r in ds.split("train") + ds.split("val")} == {"train"}
    assert f"the class folders of {root} hold split folders (test, train): followed; val images drawn" in caplog.text
    shape_image("circle", np.random.default_rng(9)).save(root / "circle" / "loose.png")  # an image beside them
    caplog.clear()
    with caplog.at_level("INFO", logger="simple_cnn.sources"):
        ds = ImageDataset.scan(root)  # not that layout: every image of a class, split by the rule
    assert "hold split folders" not in caplog.text and "circle/loose.png" in {r.relpath for r in ds.images}


def test_a_split_folder_wrapped_in_a_link_to_itself_is_not_followed_round(tmp_path):
    """train/train -> .. (a link back up, named as the wrapper Kaggle's archives have): not descended into."""
    root = tmp_path / "ds"
    make_shapes_dataset(root / "test", per_class=3)
    (root / "train").mkdir()
    (root / "train" / "train").symlink_to("..", target_is_directory=True)
    source = find(root)
    assert source.class_names == ["circle", "square", "triangle"]
    assert {c.relpath.split("/")[0] for c in source.candidates} == {"test"}


def test_split_folders_without_class_folders_are_refused(tmp_path):
    """Kaggle's dogs vs cats: train/cat.0.jpg and test1/1.jpg, the labels in the file names."""
    root = tmp_path / "dogs-vs-cats"
    for folder, name in (("train", "cat.0.png"), ("train", "dog.0.png"), ("test1", "1.png")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        shape_image("circle", np.random.default_rng(0)).save(root / folder / name)
    with pytest.raises(DataError, match="holds split folders \\(test1, train\\), but its train folder holds no class folders"):
        ImageDataset.scan(root)


def test_class_names_that_differ_only_in_case_or_punctuation_are_said(tmp_path, caplog):
    """Daisy/ beside daisy/ (datasets merged), or Cat and cat typed by hand in a labels file: one class written
    two ways, which the model would be taught to tell apart. Said with each one's images, not merged."""
    root = make_shapes_dataset(tmp_path / "ds", per_class=3)
    (root / "circle").rename(root / "Sun Flower")
    (root / "square").rename(root / "sun_flower")
    (root / "😀").mkdir()
    (root / "triangle" / "triangle_000.png").rename(root / "😀" / "face.png")
    (root / "😃").mkdir()
    (root / "triangle" / "triangle_001.png").rename(root / "😃" / "face.png")
    with caplog.at_level("WARNING", logger="simple_cnn.sources"):
        ImageDataset.scan(root)
    said = [r.getMessage() for r in caplog.records if "differ only in case" in r.getMessage()]
    assert said == [
        f"the classes 'Sun Flower' (3 images), 'sun_flower' (3 images) of {root} differ only in case, spaces or "
        "punctuation: if they are one class, give them one name"
    ]
    caplog.clear()
    (tmp_path / "labels.csv").write_text(
        "path,label\n"
        + "".join(f"{p.relative_to(root)},{'Cat' if i % 3 else 'cat'}\n" for i, p in enumerate(sorted(root.rglob("*.png"))))
    )
    with caplog.at_level("WARNING", logger="simple_cnn.sources"):
        ImageDataset.scan(root, Layout(labels=tmp_path / "labels.csv"))
    assert [r.getMessage() for r in caplog.records if "differ only in case" in r.getMessage()] == [
        f"the classes 'Cat' (6 images), 'cat' (3 images) of {tmp_path / 'labels.csv'} differ only in case, spaces or "
        "punctuation: if they are one class, give them one name"
    ]


def test_every_supported_format_and_mode_decodes_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    base = shape_image("circle", rng, size=40)
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    base.save(root / "a" / "rgb.jpg")
    base.convert("L").save(root / "a" / "grey.jpg")
    base.convert("CMYK").save(root / "a" / "cmyk.jpg")
    base.convert("RGBA").save(root / "a" / "alpha.png")
    base.convert("P").save(root / "a" / "palette.gif")
    base.save(root / "a" / "bitmap.bmp")
    Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).save(root / "b" / "sixteen.png")
    base.save(root / "b" / "photo.webp")
    base.save(root / "b" / "photo.avif")

    ds = ImageDataset.scan(root)
    assert ds.skipped == []
    x = ds.decode(ds.images, 24).x
    assert x.shape == (9, 24, 24, 3) and x.dtype == np.uint8
    assert ds.skipped == []
    # 16-bit grey keeps its range (top 8 bits), instead of clipping to white.
    sixteen = x[[r.relpath for r in ds.images].index("b/sixteen.png")]
    assert sixteen.min() < 50 and sixteen.max() > 200
    # AVIF, as browsers save images from the web, decodes to the picture the PNG-like BMP holds.
    avif, bmp = (x[[r.relpath for r in ds.images].index(name)].astype(int) for name in ("b/photo.avif", "a/bitmap.bmp"))
    assert np.abs(avif - bmp).mean() < 10


def test_animated_gif_reads_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = read_image(path, 8)
    assert pixels.shape == (8, 8, 3)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50  # red, the first frame


def _jpeg_bytes(rng) -> bytes:
    buf = io.BytesIO()
    shape_image("square", rng, size=64).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_corrupt_files_are_skipped_and_counted_not_fatal(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=5)
    rng = np.random.default_rng(3)
    (root / "circle" / "empty.jpg").write_bytes(b"")
    (root / "circle" / "text.jpg").write_text("this is not a JPEG")
    (root / "square" / "truncated.jpg").write_bytes(_jpeg_bytes(rng)[:300])
    good_png = io.BytesIO()
    shape_image("triangle", rng).save(good_png, "PNG")
    (root / "triangle" / "truncated.png").write_bytes(good_png.getvalue()[:-40])

    ds = ImageDataset.scan(root, Layout(val_split=0.01, test_split=0.01))
    decoded = ds.decode(ds.images, 16)
    x, y = decoded.x, decoded.y

    skipped = dict(ds.skipped)
    assert set(skipped) == {"circle/empty.jpg", "circle/text.jpg", "square/truncated.jpg", "triangle/truncated.png"}
    assert len(x) == len(y) == 15
    assert "4 unreadable files skipped" in ds.skipped_summary()


def test_disk_cache_holds_the_same_pixels_and_is_reused(tmp_path, monkeypatch):
    root = make_shapes_dataset(tmp_path / "ds", per_class=6)
    (root / "square" / "truncated.jpg").write_bytes(_jpeg_bytes(np.random.default_rng(4))[:300])
    cache = tmp_path / "cache"
    in_memory = ImageDataset.scan(root)
    decoded = in_memory.decode(in_memory.images, 24)
    x_mem, y_mem = decoded.x, decoded.y

    on_disk = ImageDataset.scan(root)
    decoded = on_disk.decode(on_disk.images, 24, cache)
    x_disk, y_disk = decoded.x, decoded.y
    assert isinstance(x_disk, np.memmap) and not x_disk.flags.writeable
    np.testing.assert_array_equal(x_disk, x_mem)
    np.testing.assert_array_equal(y_disk, y_mem)
    assert dict(on_disk.skipped) == dict(in_memory.skipped) and "square/truncated.jpg" in dict(on_disk.skipped)
    pixel_files = list(cache.glob("*.u8"))
    assert len(pixel_files) == 1 and pixel_files[0].stat().st_size == len(x_mem) * 24 * 24 * 3
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".u8"]  # no partial files left

    def no_decoding(*args):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(images, "read_image", no_decoding)
    again = ImageDataset.scan(root)
    decoded = again.decode(again.images, 24, cache)
    x_again, _ = decoded.x, decoded.y
    np.testing.assert_array_equal(x_again, x_mem)
    assert "square/truncated.jpg" in dict(again.skipped)  # still reported, from the cache's index
    monkeypatch.undo()

    shape_image("circle", np.random.default_rng(5)).save(root / "circle" / "circle_000.png")  # a changed file
    changed = ImageDataset.scan(root)
    decoded = changed.decode(changed.images, 24, cache)
    x_new, _ = decoded.x, decoded.y
    assert len(list(cache.glob("*.u8"))) == 2  # a new entry: the old one no longer matches
    assert not np.array_equal(x_new, x_mem)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(20_000, 20_000))  # 400 megapixels declared, 100 bytes on disk
    with pytest.raises(ValueError, match="pixels"):
        read_image(path, 32)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("one_class", "at least two class"),
        ("empty_class", "no readable images"),
    ],
)
def test_unusable_dataset_folders_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "ds"
    if layout == "file":
        root.write_text("x")
    elif layout == "one_class":
        make_shapes_dataset(root, per_class=2)
        for cls in ("square", "triangle"):
            for f in (root / cls).iterdir():
                f.unlink()
            (root / cls).rmdir()
    elif layout == "empty_class":
        make_shapes_dataset(root, per_class=2)
        (root / "empty").mkdir()
    with pytest.raises(DataError, match=message):
        ImageDataset.scan(root)


def test_a_dataset_left_without_a_split_by_its_copies_says_so(tmp_path):
    """Byte-identical files that would straddle the splits are set aside: a class of copies of one image
    ends in a single split, and the refusal says that the copies are why."""
    for name, colour in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
        (tmp_path / "ds" / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (32, 32), colour).save(tmp_path / "ds" / name / f"{i}.png")
    result = run_cli("--mode", "train", "--dataset_path", "ds", cwd=tmp_path)
    assert_one_line_error(result, 1, "ds has", "byte-identical copies of them were set aside", "too few for a train")


def test_added_images_move_only_images_of_their_own_class_and_hash_splits_never_move(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=30)
    hashed = Layout(split_method="hash")
    before = {r.relpath: r.split for r in ImageDataset.scan(root).images}
    before_hashed = {r.relpath: r.split for r in ImageDataset.scan(root, hashed).images}
    rng = np.random.default_rng(9)
    for i in range(25):
        shape_image("circle", rng).save(root / "circle" / f"added_{i}.png")
    after = {r.relpath: r.split for r in ImageDataset.scan(root).images}
    assert len(after) == len(before) + 25
    assert all(after[p] == s for p, s in before.items() if not p.startswith("circle/"))
    circles = Counter(s for p, s in after.items() if p.startswith("circle/"))
    assert circles == {"train": 39, "val": 8, "test": 8}  # 55 circles: 15% of them is 8.25, rounded to 8
    after_hashed = {r.relpath: r.split for r in ImageDataset.scan(root, hashed).images}
    assert all(after_hashed[p] == s for p, s in before_hashed.items())


def test_split_fractions_are_roughly_as_asked_and_deterministic():
    paths = [f"c{i % 3}/img_{i}.jpg" for i in range(6000)]
    splits = [split_of(p, 0.15, 0.15) for p in paths]
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert abs(share["train"] - 0.70) < 0.03 and abs(share["test"] - 0.15) < 0.02
    assert splits == [split_of(p, 0.15, 0.15) for p in paths]
    # A non-UTF-8 name still has a split.
    assert split_of("c0/caf\udce9.jpg", 0.15, 0.15) in SPLITS


def test_load_data_returns_arrays_like_keras_datasets(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=20)
    (x_train, y_train), (x_test, y_test) = load_data(root, image_size=24)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert x_train.shape[1:] == (24, 24, 3) and x_train.shape[0] == y_train.shape[0]
    assert x_test.shape[0] == y_test.shape[0] > 0
    assert x_train.shape[0] + x_test.shape[0] == 60
    assert set(np.unique(y_train)) == {0, 1, 2}
    # The test part is exactly the split that --mode test uses.
    ds = ImageDataset.scan(root)
    assert x_test.shape[0] == len(ds.split("test"))


def test_auto_image_size_is_the_median_short_side_within_bounds(tmp_path):
    root = make_shapes_dataset(tmp_path / "small", per_class=3, size=40)
    assert ImageDataset.scan(root).auto_image_size() == 40
    big = make_shapes_dataset(tmp_path / "big", per_class=3, size=300)
    assert ImageDataset.scan(big).auto_image_size() == AUTO_SIZE_MAX


def test_digits_dataset_is_written_once_as_png_class_folders(tmp_path):
    root = ensure_digits_dataset(tmp_path / "datasets" / "digits")
    ds = ImageDataset.scan(root)
    assert ds.class_names == [str(d) for d in range(10)]
    assert len(ds.images) == 1797 and ds.skipped == []
    with Image.open(root / "3" / next(p.name for p in (root / "3").iterdir())) as im:
        assert im.size == (32, 32)
    stamp = (root / "0").stat().st_mtime_ns
    ensure_digits_dataset(root)
    assert (root / "0").stat().st_mtime_ns == stamp
    assert not list(root.parent.glob(".digits.partial-*"))

"""Labels and splits the way real datasets come: a labels file, several labels per image,
groups that stay in one split, and every class in every split."""

from __future__ import annotations

import base64
import csv
import io
import json
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, ServeProcess, assert_one_line_error, make_shapes_dataset, run_cli, shape_image, start_cli
from simple_cnn import formats
from simple_cnn.dataset import ImageDataset, load_data
from simple_cnn.errors import UsageError
from simple_cnn.labels import read_labels_file
from simple_cnn.splits import MIN_STRATIFIED, Layout


def write_labels(path: Path, rows, header=("path", "label"), delimiter=",", encoding="utf-8", newline="\n") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator=newline)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def flat_dataset(root: Path, per_class: int = 20, seed: int = 0) -> list[list[str]]:
    """Class folders turned into one folder of images and (path, label) rows, Kaggle style."""
    make_shapes_dataset(root / "by_class", per_class=per_class, seed=seed)
    (root / "images").mkdir()
    rows = []
    for image in sorted((root / "by_class").rglob("*.png")):
        target = root / "images" / image.name
        image.rename(target)
        rows.append([f"images/{image.name}", image.parent.name])
    return rows


def make_multi_label_dataset(root: Path, n: int, seed: int = 0, size: int = 32) -> Path:
    """Images holding one or two of the shapes side by side, labelled with each shape they hold."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        kinds = sorted(rng.choice(CLASSES, size=1 + int(rng.integers(0, 2)), replace=False).tolist())
        canvas = Image.fromarray(rng.integers(0, 90, (size, size * 2, 3), dtype=np.uint8))
        for slot, kind in zip(rng.permutation(2), kinds):
            canvas.paste(shape_image(kind, rng, size), (int(slot) * size, 0))
        canvas.save(root / "images" / f"img_{i:03d}.png")
        rows.append([f"images/img_{i:03d}.png", "|".join(kinds)])
    write_labels(root / "labels.csv", rows)
    return root


# ---------------------------------------------------------------- the labels file


def test_labels_file_quirks_are_read_and_bad_rows_skipped_with_their_reasons(tmp_path):
    rows = flat_dataset(tmp_path, per_class=6)
    for name in ("a, b.png", "unlabelled.png"):
        (tmp_path / "images" / name).write_bytes((tmp_path / rows[0][0]).read_bytes())
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    bad = [
        ["images/missing.png", "circle"],  # no such file
        ["images/gone|too.png", "circle"],  # no such file: the | in its reason makes no multi-label file
        ["../outside.png", "circle"],  # outside the dataset
        ["images/unlabelled.png", " "],  # empty label
        [rows[2][0], "square"],  # listed again with another label (rows[2] is a circle)
        [rows[3][0], rows[3][1]],  # listed again, the same: one of them counts
        ["images/a, b.png", "circle"],  # a quoted field with a comma
    ]
    split_rows = [[p, label, "train"] for p, label in rows + bad]
    split_rows[4][2] = "holdout"  # an unknown split
    split_rows[5][2] = " Training"  # as a folder would name it
    split_rows[6][0] = "./" + rows[6][0].replace("/", "//")  # the same image as class folders would name it
    path = write_labels(
        tmp_path / "labels.csv", split_rows, header=("Filename", "Class", "split"), encoding="utf-8-sig", newline="\r\n"
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in path.read_bytes()
    table = read_labels_file(path, tmp_path)
    kept = {r.relpath: r.labels for r in table.rows}
    assert kept["images/a, b.png"] == ("circle",) and table.class_names == list(CLASSES)
    assert {r.split for r in table.rows} == {"train"} and rows[6][0] in kept
    assert rows[2][0] not in kept and rows[4][0] not in kept and "images/unlabelled.png" not in kept
    assert len(kept) == len(rows) - 2 + 1
    reasons = table.skipped.reasons
    assert reasons["no such file"] == 2 and reasons["a path outside the dataset"] == 1 and reasons["an empty label"] == 1
    assert reasons["listed with conflicting labels or splits"] == 2 and reasons["listed twice"] == 1
    assert reasons["unknown split 'holdout'"] == 1 and table.skipped.count == 8 and not table.multi_label
    tsv = write_labels(tmp_path / "labels.tsv", rows, delimiter="\t")
    assert len(read_labels_file(tsv, tmp_path).rows) == len(rows)
    # As spreadsheets save them: semicolons where the comma is the decimal mark, and "Unicode text" (UTF-16, tabs).
    semicolons = write_labels(tmp_path / "semicolons.csv", rows, delimiter=";")
    unicode_text = write_labels(tmp_path / "unicode.txt", rows, delimiter="\t", encoding="utf-16", newline="\r\n")
    assert unicode_text.read_bytes().startswith(b"\xff\xfe")
    for path in (semicolons, unicode_text):
        read = read_labels_file(path, tmp_path)
        assert [(r.relpath, r.labels) for r in read.rows] == [(p, (label,)) for p, label in rows], path


def test_a_million_row_labels_file_is_counted_not_listed(tmp_path):
    rows = flat_dataset(tmp_path, per_class=5)
    missing = ([f"images/gone_{i}.png", "circle"] for i in range(1_000_000))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
        writer.writerows(missing)
    table = read_labels_file(tmp_path / "labels.csv", tmp_path)
    assert len(table.rows) == len(rows) and table.skipped.count == 1_000_000
    assert len(table.skipped.as_dict()["examples"]) == 20 and table.skipped.as_dict()["reasons"] == {"no such file": 1_000_000}


def test_a_quote_that_is_never_closed_is_named_with_its_line(tmp_path):
    """A quote left open swallows the rest of the file into one field. In a small file that row is skipped and
    counted with its line; past the csv module's field limit (128 KB) reading stops with one line naming it,
    where it used to end in "unexpected Error: field larger than field limit"."""
    rows = flat_dataset(tmp_path, per_class=6)
    lines = ["path,label", *(f"{p},{label}" for p, label in rows)]
    opened = len(lines) - 3  # the row after it is line len(lines) - 2 of the file
    (tmp_path / "labels.csv").write_text("\n".join([*lines[:opened], '"' + lines[opened], *lines[opened + 1 :]]) + "\n")
    table = read_labels_file(tmp_path / "labels.csv", tmp_path)
    assert len(table.rows) == len(rows) - 3 and table.skipped.reasons == {"a row over several lines": 1}
    assert table.skipped.examples[0].startswith(f"line {opened + 1}: ") and "never closed" in table.skipped.examples[0]
    padding = [f"images/later_{i:06d}.png,circle" for i in range(6_000)]  # 180 KB after the quote
    text = "\n".join([*lines[:opened], '"' + lines[opened], *padding, *lines[opened + 1 :]]) + "\n"
    (tmp_path / "labels.csv").write_text(text)
    result = run_cli("--mode", "train", "--dataset_path", ".", "--labels", "labels.csv", cwd=tmp_path)
    assert_one_line_error(result, 2, "labels.csv", f"from line {opened + 1} on", "never closed")


def test_a_path_cell_without_its_folder_or_suffix_is_found_by_name(tmp_path, caplog):
    """Kaggle's id columns (``0001`` for ``train/0001.jpg``): the one image whose path ends with the cell."""
    rows = flat_dataset(tmp_path, per_class=6)
    ids = [[Path(p).stem, label] for p, label in rows]  # neither folder nor suffix
    (tmp_path / "other").mkdir()
    for twin in ("images/twin.png", "other/twin.jpg"):
        shape_image("circle", np.random.default_rng(len(twin))).save(tmp_path / twin)
    extra = [["twin", "circle"], ["other/twin", "square"], ["gone", "circle"]]
    path = write_labels(tmp_path / "labels.csv", ids + extra, header=("id", "breed"))
    with caplog.at_level("INFO", logger="simple_cnn.labels"):
        table = read_labels_file(path, tmp_path)
    assert [(r.relpath, r.labels) for r in table.rows] == [(p, (label,)) for p, label in rows] + [("other/twin.jpg", ("square",))]
    assert table.skipped.reasons == {"a name several images share": 1, "no such file": 1}, table.skipped.as_dict()
    said = [r.getMessage() for r in caplog.records if "found by name" in r.getMessage()]
    assert said == [f"{len(rows) + 1} rows of {path} name an image without its folder or suffix, found by name "
                    f"({ids[0][0]}: {rows[0][0]})"]  # fmt: skip


def test_a_path_cell_from_elsewhere_is_found_by_its_end(tmp_path, caplog):
    """A labels file written on another machine (Windows, Colab, the host of a Docker volume) names each image by
    an absolute path, one written from the project's folder by a path through the dataset's, one in a folder of
    its own by ``../``: the image whose path inside the dataset the cell ends with, the longest. These used to be
    skipped as "a path outside the dataset" or "no such file", every row of them."""
    root = tmp_path / "ds"
    rows = flat_dataset(root, per_class=6)
    shape_image("circle", np.random.default_rng(7)).save(root / "circle_000.png")  # images/circle_000.png's name, higher up
    (tmp_path / "secret.png").write_bytes((root / rows[0][0]).read_bytes())
    windows = [["C:\\Users\\ana\\ds\\" + p.replace("/", "\\"), label] for p, label in rows[:4]]
    colab = [[f"/content/drive/MyDrive/ds/{p}", label] for p, label in rows[4:8]]
    here = [[str(root / p), label] for p, label in rows[8:12]]
    here += [[f"ds/{p}", label] for p, label in rows[12:15]] + [[f"../ds/{p}", label] for p, label in rows[15:]]
    outside = [[str(tmp_path / "secret.png"), "circle"], ["/etc/passwd", "circle"], ["C:/ds/other/circle_001.png", "circle"]]
    path = write_labels(tmp_path / "labels.csv", windows + colab + here + outside)
    with caplog.at_level("INFO", logger="simple_cnn.labels"):
        table = read_labels_file(path, root)
    assert [(r.relpath, r.labels) for r in table.rows] == [(p, (label,)) for p, label in rows]
    assert table.skipped.reasons == {"a path outside the dataset": 2, "no such file": 1}, table.skipped.as_dict()
    said = [r.getMessage() for r in caplog.records if "found by its end" in r.getMessage()]
    assert said == [f"{len(rows)} rows of {path} name an image by a path from elsewhere, found by its end "
                    f"(C:/Users/ana/ds/{rows[0][0]}: {rows[0][0]})"]  # fmt: skip


def test_one_hot_label_columns_are_read_as_classes(tmp_path, caplog):
    """Kaggle's one-hot layout (image_id,healthy,rust,scab with a 1 under the class), where column 1 used to be
    taken for the label: a 0/1 classifier of the first class alone, without a word."""
    rows = flat_dataset(tmp_path, per_class=6)
    names = sorted(CLASSES)
    one_hot = [[p, *("1" if label == c else "0" for c in names)] for p, label in rows]
    with caplog.at_level("INFO", logger="simple_cnn.labels"):
        table = read_labels_file(write_labels(tmp_path / "train.csv", one_hot, header=("image_id", *names)), tmp_path)
    assert not table.multi_label and table.class_names == names
    assert [(r.relpath, r.labels) for r in table.rows] == [(p, (label,)) for p, label in rows]
    assert f"are its one-hot columns {', '.join(names)}" in caplog.text
    # Several 1s make a multi-label file; a cell that is neither 0 nor 1, or no 1 at all, is skipped and counted.
    mixed = [[rows[0][0], "1", "1", "0"], [rows[1][0], "0", "2", "0"], [rows[2][0], "0", "0.0", "0"], *one_hot[3:]]
    table = read_labels_file(write_labels(tmp_path / "mixed.csv", mixed, header=("image_id", *names)), tmp_path)
    assert table.multi_label and table.rows[0].labels == (names[0], names[1])
    assert table.skipped.reasons == {"a one-hot cell that is neither 0 nor 1": 1, "an empty label": 1}
    # One column of 0s and 1s is a binary label, not one-hot (Kaggle's id,has_cactus).
    binary = [[p, "1" if label == names[0] else "0"] for p, label in rows]
    table = read_labels_file(write_labels(tmp_path / "binary.csv", binary, header=("id", "has_cactus")), tmp_path)
    assert table.class_names == ["0", "1"] and not table.multi_label


def test_a_tags_column_separated_by_spaces_is_multi_label_and_a_label_column_keeps_its_spaces(tmp_path, caplog):
    """Planet's image_name,tags (``haze primary``), where each combination of tags used to be one class."""
    rows = flat_dataset(tmp_path, per_class=4)
    tags = [[Path(p).stem, f"{label} shape" if i % 2 else label] for i, (p, label) in enumerate(rows)]
    with caplog.at_level("INFO", logger="simple_cnn.labels"):
        table = read_labels_file(write_labels(tmp_path / "tags.csv", tags, header=("image_name", "tags")), tmp_path)
    assert table.multi_label and table.class_names == ["circle", "shape", "square", "triangle"]
    assert [r.labels for r in table.rows][:2] == [("circle",), ("circle", "shape")]
    assert "the tags of" in caplog.text and "are separated by spaces" in caplog.text
    spaced = [[p, f"{label} shape"] for p, label in rows]  # one class may be called "circle shape"
    table = read_labels_file(write_labels(tmp_path / "labels.csv", spaced, header=("path", "label")), tmp_path)
    assert not table.multi_label and table.class_names == ["circle shape", "square shape", "triangle shape"]
    # --no-multi_label: spaces are kept, and a | cell is refused as documented (it used to become a class "circle|square").
    kept = read_labels_file(tmp_path / "tags.csv", tmp_path, multi_label=False)
    assert "circle shape" in kept.class_names and not kept.multi_label
    piped = write_labels(tmp_path / "piped.csv", [[rows[0][0], "circle|square"], *rows[1:]])
    refused = read_labels_file(piped, tmp_path, multi_label=False)
    assert refused.skipped.reasons == {"several labels for one image": 1}
    assert refused.class_names == ["circle", "square", "triangle"]


def test_the_label_column_is_found_by_name_or_said(tmp_path, caplog):
    """SIIM's image_name,patient_id,sex,target used to train a classifier of patient ids (the second column)."""
    rows = flat_dataset(tmp_path, per_class=4)
    siim = [[Path(p).stem, f"patient{i % 3}", "female", label] for i, (p, label) in enumerate(rows)]
    header = ("image_name", "patient_id", "sex", "target")
    with caplog.at_level("INFO", logger="simple_cnn.labels"):
        table = read_labels_file(write_labels(tmp_path / "siim.csv", siim, header=header), tmp_path)
    assert table.class_names == sorted(CLASSES) and [r.relpath for r in table.rows] == [p for p, _ in rows]
    # One patient's images are one unit of the split (they used to be split apart, and test scored the patient).
    assert table.has_group and [r.group for r in table.rows] == [f"patient{i % 3}" for i in range(len(rows))]
    assert "grouped by its column 'patient_id'" in caplog.text
    flipped = [[label, p] for p, label in rows]  # the path named, though not first
    table = read_labels_file(write_labels(tmp_path / "flipped.csv", flipped, header=("breed", "id")), tmp_path)
    assert [(r.relpath, r.labels) for r in table.rows] == [(p, (label,)) for p, label in rows]
    unnamed = [[p, label, "a note"] for p, label in rows]
    with caplog.at_level("WARNING", logger="simple_cnn.labels"):
        table = read_labels_file(write_labels(tmp_path / "unnamed.csv", unnamed, header=("file", "species", "notes")), tmp_path)
    assert table.class_names == sorted(CLASSES) and "its column 'species' is taken as the label" in caplog.text


def test_fastais_is_valid_column_is_the_split_and_the_test_split_is_drawn_from_its_train_rows(tmp_path, caplog):
    """fastai's labels files (fname,labels,is_valid) mark validation rows True and name no test rows: the test
    split is drawn from the train rows by the usual rule, as from split folders' train/, where test mode used to
    find no test image at all. A split column without test rows is drawn from the same way."""
    rows = flat_dataset(tmp_path, per_class=20)
    flagged = [[p, label, "True" if i % 5 == 0 else "False"] for i, (p, label) in enumerate(rows)]
    path = write_labels(tmp_path / "train.csv", flagged, header=("fname", "labels", "is_valid"))
    with caplog.at_level("INFO", logger="simple_cnn.sources"):
        dataset = ImageDataset.scan(tmp_path, Layout(labels=path))
    val = {p for p, _, flag in flagged if flag == "True"}
    assert {r.relpath for r in dataset.split("val")} == val
    test = dataset.per_class_counts()["test"]
    assert all(r.relpath not in val for r in dataset.split("test")) and test == {c: 2 for c in CLASSES}  # 15 % of 16
    assert f"{path} names no test rows: test images drawn from its train rows" in caplog.text
    worded = [[p, label, {"True": "valid", "False": "Training"}[flag]] for p, label, flag in flagged]
    again = ImageDataset.scan(
        tmp_path, Layout(labels=write_labels(tmp_path / "split.csv", worded, header=("path", "label", "split")))
    )
    assert [(r.relpath, r.split) for r in again.images] == [(r.relpath, r.split) for r in dataset.images]


def test_a_labels_file_not_found_as_given_is_looked_for_in_the_dataset(tmp_path, monkeypatch, caplog):
    """``--labels labels.csv`` with ``--dataset_path /app/datasets/xrays``, run from /app as the Docker image does."""
    root = tmp_path / "xrays"
    rows = flat_dataset(root, per_class=4)
    write_labels(root / "labels.csv", rows)
    (tmp_path / "app").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    with caplog.at_level("INFO", logger="simple_cnn.sources"):
        dataset = ImageDataset.scan(root, Layout(labels="labels.csv"))
    assert sorted(r.relpath for r in dataset.images) == sorted(p for p, _ in rows)
    assert f"--labels labels.csv: no such file here, so {root / 'labels.csv'} is read" in caplog.text
    with pytest.raises(UsageError, match="--labels other.csv: no such file"):
        ImageDataset.scan(root, Layout(labels="other.csv"))


def _zipped(name: str, content: bytes) -> bytes:
    with io.BytesIO() as buffer:
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(name, content)
        return buffer.getvalue()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "header row"),
        (b"path\nimages/x.png\n", "header row"),
        (b"path,label\nimages/nothing.png,circle\n", "no usable row"),
        (b"path,label\xff\n", "not UTF-8"),
        (b"\xff\xfep\x00a\x00\x00\xd8", "not UTF-16"),  # a byte-order mark, then half a surrogate pair
        (_zipped("xl/workbook.xml", b"<workbook/>"), "a spreadsheet workbook, not text: save it as CSV"),  # .xlsx, .ods
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), "a spreadsheet workbook"),  # .xls: an OLE2 file's header
    ],
)
def test_unusable_labels_files_are_usage_errors(tmp_path, content, words):
    flat_dataset(tmp_path, per_class=2)
    (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(UsageError, match=words):
        read_labels_file(tmp_path / "labels.csv", tmp_path)


# ---------------------------------------------------------------- splits


def test_every_class_with_a_handful_of_images_is_in_every_split_in_its_share(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=60)
    rng = np.random.default_rng(1)
    (root / "rare").mkdir()
    for i in range(MIN_STRATIFIED):
        shape_image("circle", rng).save(root / "rare" / f"rare_{i}.png")
    dataset = ImageDataset.scan(root)
    counts = dataset.per_class_counts()
    assert {s: counts[s]["rare"] for s in counts} == {"train": 3, "val": 1, "test": 1}
    assert all(counts["test"][c] == counts["val"][c] == 9 for c in CLASSES)  # 15% of 60
    hashed = ImageDataset.scan(root, Layout(split_method="hash")).per_class_counts()
    assert sum(hashed[s]["rare"] for s in ("val", "test")) <= 5  # left to chance


def test_groups_land_whole_in_one_split_and_large_ones_are_warned_about(tmp_path, caplog):
    root = make_shapes_dataset(tmp_path / "ds", per_class=4)
    rng = np.random.default_rng(2)
    for kind in CLASSES:
        for patient in range(12):
            for shot in range(3):
                shape_image(kind, rng).save(root / kind / f"p{patient:02d}_{shot}.png")
    dataset = ImageDataset.scan(root, Layout(group_by=r"/(p\d+)_"))
    where = {}
    for r in dataset.images:
        if r.group is not None:
            where.setdefault(r.group, set()).add(r.split)
    assert len(where) == 12 and all(len(splits) == 1 for splits in where.values())
    assert {s for splits in where.values() for s in splits} == {"train", "val", "test"}
    groups = dataset.groups()
    assert groups["ungrouped_images"] == 12 and sum(groups["per_split"].values()) == 12 + 12
    big = ImageDataset.scan(root, Layout(group_by=r"(p0[0-3])_"))
    with caplog.at_level("WARNING"):
        big.training_image_size()
    assert "of the train split" in caplog.text or "of the test split" in caplog.text or "of the val split" in caplog.text


def test_a_labels_files_group_column_keeps_each_group_in_one_split(tmp_path):
    rows = flat_dataset(tmp_path, per_class=30)
    write_labels(
        tmp_path / "labels.csv", [[p, label, f"plant{i // 3}"] for i, (p, label) in enumerate(rows)], ("path", "label", "group")
    )
    dataset = ImageDataset.scan(tmp_path, Layout(labels=tmp_path / "labels.csv"))
    where = {}
    for r in dataset.images:
        where.setdefault(r.group, set()).add(r.split)
    assert len(where) == 30 and all(len(s) == 1 for s in where.values())
    assert dataset.groups()["per_split"]["test"] >= 3 and dataset.summary()["groups"]["by"] == "the labels file's group column"


def test_bad_group_patterns_and_splits_that_cannot_train_are_one_line_usage_errors(tmp_path):
    rows = flat_dataset(tmp_path, per_class=6)
    cli = ("--mode", "train", "--dataset_path", ".", "--epochs", "1")
    assert_one_line_error(run_cli(*cli, "--labels", "nothing.csv", cwd=tmp_path), 2, "nothing.csv", "no such file")
    write_labels(tmp_path / "labels.csv", rows)
    assert_one_line_error(run_cli(*cli, "--labels", "labels.csv", "--group_by", "(", cwd=tmp_path), 2, "--group_by")
    result = run_cli(*cli, "--labels", "labels.csv", "--group_by", "^patient", cwd=tmp_path)
    assert_one_line_error(result, 2, "matches none", "images/")
    split = [[p, label, "test" if label == "square" else ("val", "train")[i % 2]] for i, (p, label) in enumerate(rows)]
    write_labels(tmp_path / "official.csv", split, header=("path", "label", "split"))
    assert_one_line_error(run_cli(*cli, "--labels", "official.csv", cwd=tmp_path), 2, "no training image", "square")


# ---------------------------------------------------------------- end to end


def test_labels_file_with_its_own_split_through_train_test_classify_and_load_data(tmp_path):
    rows = flat_dataset(tmp_path, per_class=40)
    official = [[p, label, "test" if i % 5 == 0 else "val" if i % 5 == 1 else "train"] for i, (p, label) in enumerate(rows)]
    write_labels(tmp_path / "labels.csv", official, header=("path", "label", "split"))
    args = ("--dataset_path", ".", "--labels", "labels.csv", "--image_size", "24")
    result = run_cli("--mode", "train", *args, "--epochs", "6", "--batch_size", "16", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trained = json.loads(result.stdout)
    assert trained["images"] == {"train": 72, "val": 24, "test": 24} and trained["class_counts"]["test"]["circle"] == 8
    metadata = formats.read_metadata(tmp_path / "models" / "cnn_model.keras")
    assert metadata["labels_file"]["name"] == "labels.csv" and len(metadata["labels_file"]["sha256"]) == 64
    assert "Images per class and split" in (tmp_path / "images" / "report.html").read_text()

    result = run_cli("--mode", "test", "--dataset_path", ".", "--json", cwd=tmp_path)  # finds labels.csv itself
    assert result.returncode == 0, result.stderr
    tested = json.loads(result.stdout)
    assert tested["test_images"] == 24 and tested["accuracy"] > 0.5
    (x_train, y_train), (x_test, y_test) = load_data(tmp_path, image_size=24, labels=tmp_path / "labels.csv")
    assert len(x_test) == 24 and len(x_train) == 96 and set(y_test) == {0, 1, 2}

    # A changed file with its own split is followed; without one it is refused.
    write_labels(tmp_path / "labels.csv", official[:-3], header=("path", "label", "split"))
    result = run_cli("--mode", "test", "--dataset_path", ".", "--json", cwd=tmp_path)
    assert result.returncode == 0 and "changed since" in result.stderr
    no_test = [[p, label, "val" if split == "test" else split] for p, label, split in official]
    write_labels(tmp_path / "labels.csv", no_test, header=("path", "label", "split"))
    no_test_run = run_cli("--mode", "test", "--dataset_path", ".", cwd=tmp_path)  # warns of the change, then refuses
    error = no_test_run.stderr.strip().splitlines()[-1]
    assert no_test_run.returncode == 1 and "Traceback" not in no_test_run.stderr, no_test_run.stderr
    assert error.startswith("simple-cnn: error: the test split") and "mark some rows of labels.csv as test" in error
    write_labels(tmp_path / "labels.csv", rows)
    assert_one_line_error(run_cli("--mode", "test", "--dataset_path", ".", cwd=tmp_path), 1, "labels.csv", "changed since")
    (tmp_path / "labels.csv").unlink()
    assert_one_line_error(run_cli("--mode", "test", "--dataset_path", ".", cwd=tmp_path), 2, "labels.csv", "--labels")


def test_test_mode_never_scores_an_image_the_model_trained_on_however_the_folder_changed(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=20)
    result = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--image_size", "24", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trained = set(formats.read_fingerprints(tmp_path / "models" / "cnn_model.keras").files)
    # Removing test images moves the class's boundary: validation images it trained on become test images.
    for r in ImageDataset.scan(root).split("test"):
        if r.relpath.startswith("circle/"):
            (root / r.relpath).unlink()
    now_test = {r.relpath for r in ImageDataset.scan(root).split("test")}
    assert now_test & trained  # the situation the promise is about
    result = run_cli("--mode", "test", "--dataset_path", "ds", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tested = json.loads(result.stdout)
    assert tested["trained_on_not_scored"] == len(now_test & trained) and "not scored" in result.stderr
    assert tested["test_images"] == len(now_test - trained)


@pytest.fixture(scope="module")
def multi_label_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("multi")
    make_multi_label_dataset(work / "ds", n=240)
    args = ("--mode", "train", "--dataset_path", "ds", "--labels", "ds/labels.csv", "--epochs", "12", "--batch_size", "16")
    result = run_cli(*args, "--image_size", "32", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, json.loads(result.stdout)


def test_multi_label_trains_tests_and_beats_each_labels_frequency(multi_label_model):
    work, trained = multi_label_model
    assert trained["multi_label"] and len(trained["thresholds"]) == 3 and trained["calibration"] is None
    metadata = formats.read_metadata(work / "models" / "cnn_model.keras")
    assert metadata["multi_label"] is True and metadata["thresholds"] == trained["thresholds"]
    result = run_cli("--mode", "test", "--dataset_path", "ds", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    tested = json.loads(result.stdout)
    assert tested["mean_average_precision"] > tested["chance_mean_average_precision"] + 0.2
    assert tested["micro_f1"] > 0.6 and 0 <= tested["hamming_loss"] < 0.3
    assert set(tested["per_class"]["circle"]) >= {"precision", "recall", "f1", "average_precision", "threshold", "support"}
    page = (work / "images" / "report.html").read_text()
    assert "Per label" in page and "mean average precision" in page
    with open(work / "images" / "mistakes.csv", newline="") as f:
        assert next(csv.reader(f))[:3] == ["file", "true_labels", "predicted_labels"]
    (x_train, y_train), (x_test, y_test) = load_data(work / "ds", image_size=32, labels=work / "ds" / "labels.csv")
    assert y_test.shape == (len(x_test), 3) and set(np.unique(y_train)) == {0, 1} and (y_train.sum(axis=1) >= 1).all()


def test_multi_label_answers_in_classify_serve_and_exports(multi_label_model):
    work, _ = multi_label_model
    truth = {row[0]: set(row[1].split("|")) for row in csv.reader(open(work / "ds" / "labels.csv")) if row[0] != "path"}
    test_files = [r.relpath for r in ImageDataset.scan(work / "ds", Layout(labels=work / "ds" / "labels.csv")).split("test")]
    result = run_cli("--mode", "classify", "--input_path", "ds/images", "--output", "out.jsonl", cwd=work)
    assert result.returncode == 0, result.stderr
    answers = {Path(r["image"]).name: r for r in map(json.loads, (work / "out.jsonl").read_text().splitlines())}
    exact = [{t["class"] for t in answers[Path(f).name]["labels"]} == truth[f] for f in test_files]
    assert np.mean(exact) > 0.4  # every label of the image, and no other (three shapes: chance is far lower)
    one = run_cli("--mode", "classify", "--single_image_path", f"ds/{test_files[0]}", "--json", cwd=work)
    assert one.returncode == 0 and "labels" in json.loads(one.stdout)

    running = ServeProcess(start_cli("--mode", "serve", "--port", "0", cwd=work))
    try:
        content = (work / "ds" / test_files[0]).read_bytes()
        body = json.dumps({"instances": [{"b64": base64.b64encode(content).decode()}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(running.url + "/v1/models/cnn_model:predict", data=body)) as r:
            row = json.loads(r.read())["predictions"][0]
        assert [t["class"] for t in row["labels"]] == [t["class"] for t in answers[Path(test_files[0]).name]["labels"]]
        request = urllib.request.Request(running.url + "/classify", data=content, headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request) as r:
            assert json.loads(r.read())["labels"] == row["labels"]
    finally:
        running.proc.kill()

    result = run_cli("--mode", "export", "--format", "tflite", "--quantize", "float16", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    thresholds = json.loads((work / "models" / "cnn_model.thresholds.json").read_text())
    assert thresholds["thresholds"] == formats.read_metadata(work / "models" / "cnn_model.keras")["thresholds"]
    assert abs(exported["quantization"]["float16"]["test_accuracy"] - exported["quantization"]["float32"]["test_accuracy"]) < 0.1
    counts = Counter(len(truth[f]) for f in test_files)
    assert counts[1] and counts[2]  # both kinds of image are in the test split

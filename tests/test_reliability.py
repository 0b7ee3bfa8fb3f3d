"""Bad input, interrupted runs and unsafe files, each run as a user would.

The Reliability table of docs/reliability.md lists every test here; test_reliability_table_is_in_step
keeps the two in step.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import (
    assert_one_line_error,
    bomb_png,
    make_shapes_dataset,
    run_cli,
    shape_image,
)
from simple_cnn.dataset import ImageDataset
from simple_cnn.images import read_image
from simple_cnn.splits import Layout

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


# ---------------------------------------------------------------- bad images in a dataset


def _jpeg(rng, size=48, **kw) -> bytes:
    buf = io.BytesIO()
    shape_image("circle", rng, size).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _write_odd_files(cls: Path, rng) -> None:
    """Every odd input of the battery, in one class folder. Names say what each is.

    Each image is a different picture (``base()``): copies would be grouped (duplicates.py).
    """

    def base():
        return shape_image("circle", rng, 48)

    (cls / "zero_byte.jpg").write_bytes(b"")
    (cls / "text_named.jpg").write_text("this is a text file, not a JPEG")
    (cls / "truncated.jpg").write_bytes(_jpeg(rng)[:400])
    body = bytearray(_jpeg(rng))
    sos = body.find(b"\xff\xda")
    for i in range(sos + 20, len(body) - 10):
        if body[i] != 0xFF:
            body[i] = (body[i] * 7 + 13) % 256
    (cls / "corrupt_body.jpg").write_bytes(bytes(body))
    (cls / "bomb.png").write_bytes(bomb_png(50_000, 50_000))
    (cls / "near_bomb.png").write_bytes(bomb_png(12_000, 12_000))  # over our limit, under twice it: Pillow only warns
    base().convert("RGBA").save(cls / "alpha.png")
    Image.fromarray(np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 25).save(cls / "sixteen_bit.png")
    base().convert("L").save(cls / "grey.jpg")
    base().convert("CMYK").save(cls / "cmyk.jpg")
    frames = [base(), base()]
    frames[0].save(cls / "animated.gif", save_all=True, append_images=frames[1:], loop=0)
    base().save(cls / "photo.webp")
    base().save(cls / "saved_from_a_browser.avif")
    base().save(cls / "browser.jfif", "JPEG")
    Image.new("RGB", (1, 1), (200, 0, 0)).save(cls / "one_pixel.png")
    base().save(cls / "with space.png")
    base().save(cls / "ünïcödé 名前.png")
    base().save(os.fsencode(cls) + b"/latin1_caf\xe9.png")  # not valid UTF-8
    (cls / "nested" / "deeper").mkdir(parents=True)
    base().save(cls / "nested" / "deeper" / "nested.png")
    (cls / "link_to_image.png").symlink_to(cls / "alpha.png")
    (cls / "loop_a.png").symlink_to(cls / "loop_b.png")
    (cls / "loop_b.png").symlink_to(cls / "loop_a.png")
    (cls / "dangling.png").symlink_to(cls / "does_not_exist.png")
    (cls / "folder_loop").symlink_to(cls, target_is_directory=True)
    base().save(cls / "unreadable.png")
    (cls / "unreadable.png").chmod(0)
    base().save(cls / "microscope.tiff")  # a real image in a format not read: ignored, and said so
    (cls / "notes.txt").write_text("not an image")


SKIPPED = {  # file -> words of the reason
    "zero_byte.jpg": "not an image",
    "text_named.jpg": "not an image",
    "truncated.jpg": "truncated",
    "corrupt_body.jpg": "broken data stream",
    "bomb.png": "pixels",
    "near_bomb.png": "more than 100,000,000 pixels",
    "loop_a.png": "symbolic links",
    "loop_b.png": "symbolic links",
    "dangling.png": "not found",
}
USED = [
    "alpha.png",
    "sixteen_bit.png",
    "grey.jpg",
    "cmyk.jpg",
    "animated.gif",
    "photo.webp",
    "saved_from_a_browser.avif",
    "browser.jfif",
    "one_pixel.png",
    "with space.png",
    "ünïcödé 名前.png",
    "latin1_caf\\xe9.png",
    "nested/deeper/nested.png",
    "link_to_image.png",
]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """One training run (1 epoch) on a dataset holding every odd input; its JSON summary."""
    work = tmp_path_factory.mktemp("odd")
    root = make_shapes_dataset(work / "ds", per_class=30)
    os.rename(root / "triangle", root / "tri angle é")  # a class name with a space and non-ASCII
    odd = root / "circle"
    _write_odd_files(odd, np.random.default_rng(7))
    all_splits = {"--val_split": "0.2", "--test_split": "0.001"}  # every odd file is read by train mode
    args = [a for kv in all_splits.items() for a in kv]
    result = run_cli("--mode", "train", "--dataset_path", root, "--epochs", "1", "--image_size", "32", *args, "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    summary["stderr"] = result.stderr
    summary["set_aside"] = {c["file"].removeprefix("circle/") for c in summary["duplicates"]["set_aside"]}
    summary["train_files"] = {
        r.relpath.removeprefix("circle/"): r.split
        for r in ImageDataset.scan(root, Layout(0.2, 0.001)).images
        if r.relpath.startswith("circle/")
    }
    return summary


@pytest.mark.parametrize("name, reason", SKIPPED.items(), ids=list(SKIPPED))
def test_bad_image_is_skipped_and_counted(odd_run, name, reason):
    skipped = {s["file"].removeprefix("circle/"): s["reason"] for s in odd_run["skipped"]}
    assert name in skipped, skipped
    assert reason in skipped[name], skipped[name]
    assert f"{len(odd_run['skipped'])} unreadable files skipped" in odd_run["stderr"]


@pytest.mark.parametrize("name", USED)
def test_odd_but_valid_image_is_used(odd_run, name):
    skipped = {s["file"].removeprefix("circle/") for s in odd_run["skipped"]}
    assert name not in skipped
    # A link to another image of the dataset is a copy of it: used, or set aside as a copy.
    assert name.replace("\\xe9", "\udce9") in odd_run["train_files"] or name in odd_run["set_aside"]


def test_no_decoder_writes_to_stderr_itself(odd_run):
    """Every unusable image is a line of simple_cnn's, not a library's warning (Pillow's DecompressionBombWarning)."""
    assert not any("Warning:" in line.removeprefix("Warning: ") for line in odd_run["stderr"].splitlines()), odd_run["stderr"]


def test_files_without_an_image_suffix_are_ignored_and_said(odd_run):
    said = [line for line in odd_run["stderr"].splitlines() if "without an image suffix" in line]
    assert len(said) == 1, odd_run["stderr"]
    assert "ignored 2 files" in said[0] and ".tiff 1" in said[0] and ".txt 1" in said[0], said[0]
    assert "only .avif, .bmp, .gif, .jfif, .jpe, .jpeg, .jpg, .png, .webp files are read" in said[0]
    assert not any("microscope" in f for f in [*odd_run["train_files"], *(s["file"] for s in odd_run["skipped"])])


def test_unreadable_file_is_skipped(odd_run):
    skipped = {s["file"].removeprefix("circle/"): s["reason"] for s in odd_run["skipped"]}
    if IS_ROOT:  # root reads any file: nothing to skip
        assert "unreadable.png" not in skipped
    else:
        assert "permission denied" in skipped["unreadable.png"]


def test_folder_symlink_loop_is_not_followed(odd_run):
    assert not any("folder_loop" in f for f in odd_run["train_files"])


def test_class_names_with_spaces_and_non_ascii_work(odd_run):
    assert odd_run["class_names"] == ["circle", "square", "tri angle é"]


@pytest.mark.parametrize(
    "layout, words",
    [
        ("empty_class", "no readable images"),
        ("single_class", "at least two"),
        ("file", "is a file"),
        ("archive", "is an archive: unpack it first"),
        ("wrapped", "holds one folder, photos, which holds 3 folders: give --dataset_path"),  # as an archive unpacks
        ("flat_train", "its train folder holds no class folders: sort its images"),  # labels in the file names
    ],
)
def test_unusable_dataset_is_one_clear_line(tmp_path, layout, words):
    root = tmp_path / "ds"
    if layout == "file":
        root.write_text("not a folder")
    elif layout == "archive":
        root = tmp_path / "flower_photos.tar.gz"
        root.write_bytes(b"\x1f\x8b")
    elif layout == "wrapped":
        make_shapes_dataset(root / "photos", per_class=3)
    elif layout == "flat_train":
        for folder in ("train", "test"):
            (root / folder).mkdir(parents=True)
            shape_image("circle", np.random.default_rng(0)).save(root / folder / "cat.0.png")
    else:
        make_shapes_dataset(root, per_class=3)
        if layout == "empty_class":
            (root / "empty").mkdir()
        else:
            for cls in ("square", "triangle"):
                for f in (root / cls).iterdir():
                    f.unlink()
                (root / cls).rmdir()
    assert_one_line_error(run_cli("--mode", "train", "--dataset_path", root, cwd=tmp_path), 1, str(root.name), words)


# ---------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def tiny_model_folder(tiny_model):
    """A model trained for one epoch at 24x24 pixels, and its folder (with its dataset, "ds")."""
    return tiny_model.parent.parent, tiny_model


def _classify(work, model, image="ds/circle/circle_000.png"):
    return run_cli("--mode", "classify", "--model_file_path", model, "--single_image_path", image, cwd=work)


def test_truncated_or_corrupt_model_is_one_clear_line(tiny_model_folder, tmp_path):
    work, model = tiny_model_folder
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    assert_one_line_error(_classify(work, truncated), 1, "truncated.keras", "corrupt or truncated")
    flipped = bytearray(model.read_bytes())
    flipped[len(flipped) // 2 : len(flipped) // 2 + 2000] = os.urandom(2000)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(bytes(flipped))
    result = _classify(work, corrupt)
    assert_one_line_error(result, 1, "corrupt.keras")


def test_file_that_is_not_a_model_is_one_clear_line(tiny_model_folder, tmp_path):
    work, _ = tiny_model_folder
    fake = tmp_path / "notes.keras"
    fake.write_text("just text")
    assert_one_line_error(_classify(work, fake), 1, "notes.keras", "not a readable Keras zip archive")


def test_h5_without_keras_metadata_is_one_clear_line(tiny_model_folder, tmp_path):
    work, _ = tiny_model_folder
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f["weights"] = np.zeros(10)
    assert_one_line_error(_classify(work, bare), 1, "bare.h5", "not saved by simple_cnn")


def test_model_with_code_is_refused_not_run(tiny_model_folder, tmp_path):
    work, _ = tiny_model_folder
    marker = tmp_path / "code_ran"
    script = f"""
import keras
from simple_cnn.formats import save_model
i = keras.Input((24, 24, 3))
x = keras.layers.Lambda(lambda t: (open({str(marker)!r}, "w").close(), t)[1])(i)
o = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
save_model(keras.Model(i, o), {str(tmp_path / "lambda.keras")!r},
           {{"class_names": ["circle", "square", "triangle"], "image_size": 24, "val_split": 0.15, "test_split": 0.15}})
"""
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    marker.unlink(missing_ok=True)  # building the model ran the lambda once; loading must not
    assert_one_line_error(_classify(work, tmp_path / "lambda.keras"), 1, "refused", "Python code")
    assert not marker.exists()


def test_model_for_other_classes_is_refused_in_test_mode(tiny_model_folder, tmp_path):
    work, model = tiny_model_folder
    other = make_shapes_dataset(tmp_path / "other", per_class=3)
    os.rename(other / "square", other / "box")
    result = run_cli("--mode", "test", "--model_file_path", model, "--dataset_path", other, cwd=work)
    assert_one_line_error(result, 1, "differ")


def test_model_for_another_input_size_resizes_new_images(tiny_model_folder, tmp_path):
    work, model = tiny_model_folder
    big = tmp_path / "big.jpg"
    shape_image("square", np.random.default_rng(3), size=300).save(big)
    result = _classify(work, model, big)
    assert result.returncode == 0, result.stderr
    # A file whose metadata disagrees with its network is refused.
    tampered = tmp_path / "tampered.keras"
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            if item.filename == "simple_cnn.json":
                payload = json.dumps({**json.loads(payload), "image_size": 64}).encode()
            dst.writestr(item, payload)
    assert_one_line_error(_classify(work, tampered), 1, "inconsistent")


# ---------------------------------------------------------------- flags


def test_batch_size_larger_than_dataset_trains(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=10)
    result = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--batch_size", "4096", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "cnn_model.keras").is_file()


def test_images_folder_that_cannot_be_written_is_one_clear_line(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=5)
    (tmp_path / "blocked").write_text("a file where the images folder should be")
    result = run_cli("--mode", "train", "--dataset_path", "ds", "--images_dir", "blocked/images", cwd=tmp_path)
    assert_one_line_error(result, 1, "images folder", "blocked")
    if not IS_ROOT:
        (tmp_path / "readonly").mkdir(mode=0o555)
        result = run_cli("--mode", "train", "--dataset_path", "ds", "--images_dir", "readonly", cwd=tmp_path)
        assert_one_line_error(result, 1, "cannot write", "readonly")


# ---------------------------------------------------------------- fuzzing the image reader


def _valid_images() -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "AVIF"):
        buf = io.BytesIO()
        shape_image("square", rng, 24).save(buf, fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_images()


def _read_or_skip(tmp_path_factory, payload: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "x.img"
    path.write_bytes(payload)
    try:
        pixels = read_image(path, 16)
    except ValueError as e:
        assert str(e)  # a reason to report
        return
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_fuzz_random_bytes_are_read_or_skipped(tmp_path_factory, payload):
    _read_or_skip(tmp_path_factory, payload)


@FUZZ
@given(
    which=st.integers(0, len(VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.integers(0, 10**6),
)
def test_fuzz_mutated_images_are_read_or_skipped(tmp_path_factory, which, edits, cut):
    payload = bytearray(VALID[which])
    for pos, value in edits:
        payload[pos % len(payload)] = value
    payload = payload[: max(8, cut % (len(payload) + 1))]
    _read_or_skip(tmp_path_factory, bytes(payload))


# ---------------------------------------------------------------- the table in docs/reliability.md


LABELS_TESTS_IN_THE_TABLE = {  # test_labels.py's tests of hostile or broken input
    "test_labels_file_quirks_are_read_and_bad_rows_skipped_with_their_reasons",
    "test_a_million_row_labels_file_is_counted_not_listed",
    "test_unusable_labels_files_are_usage_errors",
    "test_a_quote_that_is_never_closed_is_named_with_its_line",
    "test_bad_group_patterns_and_splits_that_cannot_train_are_one_line_usage_errors",
    "test_labels_file_with_its_own_split_through_train_test_classify_and_load_data",
    "test_test_mode_never_scores_an_image_the_model_trained_on_however_the_folder_changed",
}
TRANSFER_TESTS_IN_THE_TABLE = {  # test_transfer.py's tests of bad starts and failed downloads
    "test_bad_starts_get_one_line",
    "test_a_weights_file_trains_and_one_of_another_backbone_is_refused",
    "test_a_download_that_fails_says_how_to_pass_a_file_and_leaves_nothing",
    "test_a_silent_server_is_given_up_on",
}
UNKNOWN_TESTS_IN_THE_TABLE = {"test_unknown_without_a_detector_or_images_is_one_line"}  # test_unknown.py's bad input


def test_reliability_table_is_in_step():
    """Every test in this file, test_hostile.py, test_hostile_serve.py, test_interrupts.py and the bad-input tests of
    test_labels.py, test_transfer.py and test_unknown.py appears in the Reliability table of docs/reliability.md,
    and the other way round."""
    text = (REPO / "docs" / "reliability.md").read_text()
    section = text.split("# Reliability", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    others = "".join((REPO / "tests" / f).read_text() for f in ("test_hostile.py", "test_hostile_serve.py", "test_interrupts.py"))
    here = {name for name in globals() if name.startswith("test_")} | set(re.findall(r"^def (test_\w+)", others, re.M))
    listed_in = (
        (LABELS_TESTS_IN_THE_TABLE, "test_labels.py"),
        (TRANSFER_TESTS_IN_THE_TABLE, "test_transfer.py"),
        (UNKNOWN_TESTS_IN_THE_TABLE, "test_unknown.py"),
    )
    for listed, file in listed_in:
        assert listed <= set(re.findall(r"^def (test_\w+)", (REPO / "tests" / file).read_text(), re.M))
    here |= LABELS_TESTS_IN_THE_TABLE | TRANSFER_TESTS_IN_THE_TABLE | UNKNOWN_TESTS_IN_THE_TABLE
    assert named == here, {"missing from docs/reliability.md": here - named, "not a test": named - here}

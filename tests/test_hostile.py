"""Hostile files: nothing beside a model or inside a dataset can take over, hang or crash a run.

Each test builds the hostile file itself and runs the CLI as a user would. docs/reliability.md's
"Reliability" table lists every test here too (tests/test_reliability.py keeps it in step).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conftest
from conftest import assert_one_line_error, make_shapes_dataset, run_cli, shape_image, start_cli
from simple_cnn import converters, formats, images
from simple_cnn.dataset import ImageDataset
from simple_cnn.images import PixelBudget, decode_images

IS_ROOT = os.geteuid() == 0
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(tiny_model):
    """The folder of a model trained for one epoch at 24x24 pixels, with its LiteRT copy and its dataset ("ds")."""
    return tiny_model.parent.parent


def _copy_model(work: Path, tmp_path: Path) -> Path:
    """The trained model and its LiteRT copy, in a folder of the test's own."""
    for suffix in (".keras", ".tflite"):
        (tmp_path / f"m{suffix}").write_bytes((work / "models" / f"cnn_model{suffix}").read_bytes())
    return tmp_path / "m.keras"


def _classify_json(work: Path, model_path: Path) -> tuple[dict, str]:
    result = run_cli(
        "--mode",
        "classify",
        "--model_file_path",
        model_path,
        "--single_image_path",
        "ds/circle/circle_000.png",
        "--json",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout), result.stderr


# ---------------------------------------------------------------- 1, 2: the LiteRT copy beside a model


def test_planted_litert_copy_is_not_used(model, tmp_path):
    """A .tflite of another network, carrying the model's own metadata, is passed over."""
    from simple_cnn.model import build_model

    model_path = _copy_model(model, tmp_path)
    answer, _ = _classify_json(model, model_path)
    assert answer["runtime"] == "litert"  # the genuine copy is used
    metadata = formats.read_metadata(model_path)
    embedded = {k: v for k, v in metadata.items() if k != formats.LITERT_SHA256}
    attacker = build_model(3, 24)  # another network; its metadata copied from the real one
    converters.write_tflite(attacker, tmp_path / "planted.keras", embedded)
    os.replace(tmp_path / "planted.tflite", tmp_path / "m.tflite")
    assert formats.read_tflite_metadata(tmp_path / "m.tflite") == embedded
    answer, stderr = _classify_json(model, model_path)
    assert answer["runtime"] == "keras"
    notes = [line for line in stderr.splitlines() if "m.tflite" in line]
    assert len(notes) == 1 and "not from the same training run" in notes[0], stderr


def test_corrupt_or_truncated_litert_copy_falls_back_to_keras(model, tmp_path):
    from simple_cnn.runtime import litert_beside

    model_path = _copy_model(model, tmp_path)
    genuine, _ = _classify_json(model, model_path)
    assert genuine["runtime"] == "litert"
    content = (tmp_path / "m.tflite").read_bytes()
    metadata = formats.read_metadata(model_path)
    for broken in (content[:7], os.urandom(5000), b""):
        (tmp_path / "m.tflite").write_bytes(broken)
        assert litert_beside(model_path, metadata) is None
    (tmp_path / "m.tflite").write_bytes(content[: len(content) // 3])  # truncated: through the CLI
    answer, stderr = _classify_json(model, model_path)
    assert answer["runtime"] == "keras" and answer["class"] == genuine["class"], stderr
    (tmp_path / "m.tflite").unlink()
    os.mkfifo(tmp_path / "m.tflite")  # never opened for a blocking read
    answer, _ = _classify_json(model, model_path)
    assert answer["runtime"] == "keras" and answer["class"] == genuine["class"]


@pytest.fixture(scope="module")
def genuine_litert(model):
    return (model / "models" / "cnn_model.tflite").read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1, max_size=20), cut=st.integers(0, 10**7))
def test_fuzz_mutated_litert_copies_are_ignored(model, genuine_litert, tmp_path_factory, edits, cut):
    """Mutated .tflite files: the metadata reader never raises, and the copy is never run."""
    from simple_cnn.runtime import litert_beside

    folder = tmp_path_factory.mktemp("lite", numbered=True)
    payload = bytearray(genuine_litert)
    for pos, value in edits:
        payload[pos % len(payload)] = value
    payload = bytes(payload[: max(0, cut % (len(payload) + 1))])
    (folder / "m.tflite").write_bytes(payload)
    found = formats.read_tflite_metadata(folder / "m.tflite")
    assert found is None or isinstance(found, dict)
    metadata = formats.read_metadata(model / "models" / "cnn_model.keras")
    interpreter = litert_beside(folder / "m.keras", metadata)
    assert (interpreter is not None) == (payload == genuine_litert)


# ---------------------------------------------------------------- 3: the --cache_dir cache


def _cache_entry(cache: Path, marker: str) -> tuple[Path, Path]:
    """The entry (pixels, index) whose index names ``marker`` among its files."""
    for index in cache.glob("*.json"):
        if any(marker in f for f in json.loads(index.read_text())["files"]):
            return index.with_suffix(".u8"), index
    raise AssertionError(f"no cache entry holds {marker}")


def test_cache_entries_are_verified_not_trusted(model, tmp_path, caplog):
    model_path, dataset = model / "models" / "cnn_model.keras", model / "ds"
    test_args = ("--mode", "test", "--model_file_path", model_path, "--dataset_path", dataset, "--cache_dir", "cache", "--json")
    first = run_cli(*test_args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    expected = json.loads(first.stdout)
    cache = tmp_path / "cache"
    assert cache.stat().st_mode & 0o777 == 0o700  # created private
    ds = ImageDataset.scan(dataset)
    records = ds.split("test")
    pixels, index = _cache_entry(cache, records[0].relpath)
    fresh = ds.decode(records, 24).x  # decoded, no cache

    # Pixels changed in place, at the same size: through the CLI.
    raw = bytearray(pixels.read_bytes())
    raw[: len(raw) // 2] = bytes(len(raw) // 2)
    pixels.write_bytes(bytes(raw))
    again = run_cli(*test_args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "does not match its images" in again.stderr
    assert json.loads(again.stdout)["confusion_matrix"] == expected["confusion_matrix"]
    assert json.loads(again.stdout)["test_images"] == expected["test_images"] == len(records)

    def forge_errors():  # a forged error list that would drop an image
        entry = json.loads(index.read_text())
        entry["errors"][0] = "forged"
        index.write_text(json.dumps(entry))

    def link_pixels():  # the pixels replaced by a link to a file elsewhere
        victim = tmp_path / "victim.bin"
        victim.write_bytes(pixels.read_bytes())
        pixels.unlink()
        pixels.symlink_to(victim)

    for tamper in (forge_errors, link_pixels):
        tamper()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="simple_cnn"):
            decoded = ImageDataset.scan(dataset).decode(records, 24, cache)
            x, _ = decoded.x, decoded.y
        assert "does not match its images" in caplog.text
        np.testing.assert_array_equal(np.asarray(x), fresh)
    assert not pixels.is_symlink()  # the rewritten entry replaced the link, not its target
    assert (tmp_path / "victim.bin").read_bytes() == pixels.read_bytes()


@pytest.mark.skipif(not IS_ROOT, reason="giving a folder to another user needs root")
def test_cache_folder_of_another_user_or_open_to_all_is_refused(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=5)
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", 12345, 12345)
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    for folder, words in (("theirs", "another user"), ("open", "everyone may write")):
        result = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--cache_dir", folder, cwd=tmp_path)
        assert_one_line_error(result, 1, folder, words)


def _entry_for(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=4)
    dataset = ImageDataset.scan(root)
    decoded = dataset.decode(dataset.images, 16, tmp_path / "cache")
    x, _ = decoded.x, decoded.y
    return dataset, np.array(x)


@FUZZ
@given(
    which=st.sampled_from([".json", ".u8"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_mutated_cache_entries_are_rebuilt(tmp_path_factory, which, edits):
    """A mutated cache entry is never used and never a traceback: the images come back as decoded."""
    tmp_path = tmp_path_factory.mktemp("cache", numbered=True)
    dataset, fresh = _entry_for(tmp_path)
    target = next((tmp_path / "cache").glob(f"*{which}"))
    payload = bytearray(target.read_bytes())
    for pos, value in edits:
        payload[pos % len(payload)] = value
    target.write_bytes(bytes(payload))
    decoded = dataset.decode(dataset.images, 16, tmp_path / "cache")
    x, _ = decoded.x, decoded.y
    np.testing.assert_array_equal(np.array(x), fresh)


# ---------------------------------------------------------------- 4: FIFOs and stuck threads


def test_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=10)
    os.mkfifo(root / "circle" / "pipe.png")
    train = run_cli(
        "--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--val_split", "0.3", "--json", cwd=tmp_path, timeout=300
    )
    assert train.returncode == 0, train.stderr
    skipped = {s["file"]: s["reason"] for s in json.loads(train.stdout)["skipped"]}
    assert "regular file" in skipped["circle/pipe.png"]
    folder = run_cli("--mode", "classify", "--input_path", "ds/circle", "--json", cwd=tmp_path, timeout=300)
    assert folder.returncode == 0, folder.stderr
    assert [s["file"] for s in json.loads(folder.stdout)["skipped"]] == ["ds/circle/pipe.png"]


STUCK = """
import sys, threading, time
import simple_cnn.images as images
def stuck(path, size):  # a read that never returns (a hung network file system, a device)
    sys.stdout.write("stuck\\n")  # one write: print() writes the newline apart, and two decoding threads interleaved
    sys.stdout.flush()
    threading.Event().wait()
images.read_image = stuck
from simple_cnn.cli import main
sys.argv[0] = "simple-cnn"
raise SystemExit(main())
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_the_process_whatever_a_thread_is_stuck_on(model, tmp_path, sig, code):
    make_shapes_dataset(tmp_path / "ds", per_class=3)
    model_path = model / "models" / "cnn_model.keras"
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, "--mode", "classify", "--model_file_path", str(model_path), "--input_path", "ds"],
        cwd=tmp_path,
        env=conftest._cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "stuck"
    proc.send_signal(sig)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - started < 10
    assert err.strip().splitlines()[-1] == "simple-cnn: interrupted" and "Traceback" not in err


# ---------------------------------------------------------------- 5: links out of the dataset, glob loops


def test_links_out_of_the_dataset_are_not_followed(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", per_class=10)
    outside = make_shapes_dataset(tmp_path / "elsewhere", per_class=3)
    (root / "zz").symlink_to(outside / "circle", target_is_directory=True)
    (root / "zroot").symlink_to("/", target_is_directory=True)
    (root / "square" / "stolen.png").symlink_to(outside / "square" / "square_000.png")
    (root / "square" / "inside.png").symlink_to(root / "square" / "square_001.png")
    result = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--json", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["class_names"] == ["circle", "square", "triangle"]
    warnings = [line for line in result.stderr.splitlines() if "not following" in line]
    assert len(warnings) == 1 and "zz" in warnings[0] and "zroot" in warnings[0]
    skipped = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert "outside the dataset" in skipped["square/stolen.png"] and "square/inside.png" not in skipped


def test_glob_through_looping_folder_links_finishes(model, tmp_path):
    folder = tmp_path / "photos" / "a" / "b"
    folder.mkdir(parents=True)
    (folder / "up").symlink_to(tmp_path / "photos", target_is_directory=True)
    (folder / "self").symlink_to(folder, target_is_directory=True)
    shape_image("circle", np.random.default_rng(0)).save(folder / "one.png")
    pattern = str(tmp_path / "photos" / "**" / "*.png")
    model_path = model / "models" / "cnn_model.keras"
    result = run_cli(
        "--mode", "classify", "--model_file_path", model_path, "--input_path", pattern, "--json", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert [Path(p["image"]).name for p in json.loads(result.stdout)["predictions"]] == ["one.png"]


# ---------------------------------------------------------------- 6: a partial history row


def test_partial_last_history_row_still_resumes(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=60)
    args = ("--mode", "train", "--dataset_path", "ds", "--epochs", "6", "--batch_size", "6", "--json")
    proc = start_cli(*args, cwd=tmp_path)
    conftest.wait_for_epochs(proc, 2)
    proc.kill()
    proc.communicate(timeout=60)
    history = tmp_path / "models" / ".cnn_model.keras.training" / "history.csv"
    with open(history, "a") as f:
        f.write("5,0.9,0.")  # a row cut short by a kill or a full disk
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Resuming the unfinished run" in again.stderr and "Traceback" not in again.stderr
    assert json.loads(again.stdout)["epochs_run"] == 6


# ---------------------------------------------------------------- 8: memory under large images


def test_decoded_pixels_in_flight_are_bounded(tmp_path, monkeypatch):
    """Many threads, large images: the pixels decoded at once never exceed the budget."""
    from PIL import Image

    budget = PixelBudget(3_000_000)  # three 1000x1000 images at a time
    held, peak, lock = [0], [0], threading.Lock()
    real_hold = budget.hold

    def counting_hold(pixels):
        inner = real_hold(pixels)

        class Counted:
            def __enter__(self):
                inner.__enter__()
                with lock:
                    held[0] += pixels
                    peak[0] = max(peak[0], held[0])

            def __exit__(self, *exc):
                with lock:
                    held[0] -= pixels
                return inner.__exit__(*exc)

        return Counted()

    monkeypatch.setattr(budget, "hold", counting_hold)
    monkeypatch.setattr(images, "DECODING", budget)
    monkeypatch.setattr(images, "usable_cpus", lambda: 16)
    paths = []
    for i in range(24):
        paths.append(tmp_path / f"big_{i}.png")
        Image.new("RGB", (1000, 1000), (i * 10, 0, 0)).save(paths[-1])
    x, errors = decode_images(paths, 32)
    assert errors == [None] * 24 and len(x) == 24
    assert 1_000_000 <= peak[0] <= 3_000_000


def test_pool_size_follows_the_cpus_this_process_may_use():
    one = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", "from simple_cnn.images import usable_cpus; print(usable_cpus())"],
        capture_output=True,
        text=True,
    )
    if one.returncode != 0:
        pytest.skip("taskset is not available")
    assert one.stdout.strip() == "1"


# ---------------------------------------------------------------- 9: names


def test_class_names_that_cannot_travel_are_refused(tmp_path):
    for bad in (b"new\nline", b"caf\xe9", b"esc\x1b[31mred"):
        root = tmp_path / f"ds{len(os.listdir(tmp_path))}"
        make_shapes_dataset(root, per_class=3)
        os.rename(root / "square", os.fsencode(root) + b"/" + bad)
        result = run_cli("--mode", "train", "--dataset_path", root, "--epochs", "1", cwd=tmp_path)
        assert_one_line_error(result, 1, "rename the folder")
        assert "\x1b" not in result.stderr


def test_file_names_arrive_safe_in_messages_tables_and_csv(model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(4)
    names = ["line\nbreak.png", "esc\x1b[2Jclear.png", "tab\there.png", "=HYPERLINK(1).png", "+1.png", "@cmd.png", "-2.png"]
    for name in names:
        shape_image("circle", rng).save(folder / name)
    (folder / "bad\nbytes.png").write_bytes(b"not an image")
    table = run_cli(
        "--mode", "classify", "--model_file_path", model / "models" / "cnn_model.keras", "--input_path", folder, cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr
    rows = table.stdout.strip().splitlines()
    assert len(rows) == len(names) and all(len(row.split("\t")) == 4 for row in rows)
    assert "\x1b" not in table.stdout + table.stderr
    skipped = [line for line in table.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "bad\\nbytes.png" in skipped[0]
    out = tmp_path / "out.csv"
    model_path = model / "models" / "cnn_model.keras"
    # Relative names, as a user classifying the current folder gets them.
    written = run_cli("--mode", "classify", "--model_file_path", model_path, "--input_path", "*.png", "--output", out, cwd=folder)
    assert written.returncode == 0, written.stderr
    with open(out, newline="", encoding="utf-8") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert len(cells) == len(names)
    assert all(cell[0] not in "=+-@" for cell in cells), cells
    assert any(cell.startswith("'=HYPERLINK") for cell in cells)


# ---------------------------------------------------------------- 10: the last resort


BROKEN = """
import sys
from simple_cnn.dataset import ImageDataset
def broken(*args, **kwargs):
    raise RuntimeError("something nobody foresaw\\nsecond line")
ImageDataset.scan = broken
from simple_cnn.cli import main
sys.argv[0] = "simple-cnn"
raise SystemExit(main())
"""


def test_anything_unforeseen_is_one_line_not_a_traceback(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=3)
    args = [sys.executable, "-c", BROKEN, "--mode", "train", "--dataset_path", "ds"]
    plain = subprocess.run(args, cwd=tmp_path, env=conftest._cli_env(), capture_output=True, text=True, timeout=300)
    assert_one_line_error(plain, 1, "RuntimeError", "something nobody foresaw", "--verbose")
    verbose = subprocess.run(
        [*args, "--verbose"], cwd=tmp_path, env=conftest._cli_env(), capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


# ---------------------------------------------------------------- 11: test mode's recorded dataset


def test_test_mode_names_the_recorded_dataset_and_refuses_a_missing_one(model, tmp_path):
    model_path = model / "models" / "cnn_model.keras"
    here = run_cli("--mode", "test", "--model_file_path", model_path, "--images_dir", tmp_path / "images", cwd=model)
    assert here.returncode == 0, here.stderr
    assert "Testing on ds, the dataset recorded in" in here.stderr
    elsewhere = run_cli("--mode", "test", "--model_file_path", model_path, cwd=tmp_path)  # "ds" is not here
    assert_one_line_error(elsewhere, 1, "'ds'", "not a folder here", "--dataset_path")
    assert not (tmp_path / "datasets").exists()  # no quiet fall-back to the digits


# ---------------------------------------------------------------- round three: model files from elsewhere


def _rewritten_copy(model: Path, tmp_path: Path, **changes) -> Path:
    """The trained model and its LiteRT copy in ``tmp_path``, its metadata changed (the LiteRT digest kept)."""
    model_path = _copy_model(model, tmp_path)
    metadata = formats.read_metadata(model_path)
    for key, value in changes.items():
        if key in ("best_epoch", "epochs_run", "best_val_accuracy"):
            metadata["training"][key] = value
        else:
            metadata[key] = value
    formats.rewrite_metadata(model_path, metadata)
    return model_path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"image_size": 48}, ["m.tflite", "inconsistent", "48x48x3"]),
        ({"class_names": ["circle", "square", "triangle", "ghost"]}, ["inconsistent", "4 classes"]),
        ({"class_names": ["circle", "square"]}, ["inconsistent", "2 classes"]),
        ({"image_size": 1_000_000}, ["image size", "1000000"]),
        ({"image_size": "24"}, ["image size"]),
        ({"class_names": "circle"}, ["class names"]),
    ],
    ids=["larger-input", "more-classes", "fewer-classes", "huge-input", "size-not-a-number", "names-not-a-list"],
)
def test_a_model_whose_metadata_contradicts_its_network_is_refused(model, tmp_path, changes, words):
    """The verified LiteRT copy beside a .keras is checked against the metadata as strictly as a .tflite
    named explicitly, before any image is decoded at the size the metadata claims."""
    model_path = _rewritten_copy(model, tmp_path, **changes)
    result = run_cli(
        "--mode", "classify", "--model_file_path", model_path, "--single_image_path", "ds/circle/circle_000.png", cwd=model
    )
    assert_one_line_error(result, 1, *words)


def test_the_report_page_shows_a_model_s_metadata_as_text_never_as_markup(model, tmp_path):
    refresh = '<meta http-equiv="refresh" content="0;url=https://example.com/">'
    model_path = _rewritten_copy(
        model,
        tmp_path,
        best_epoch=refresh,
        epochs_run='<form action="https://example.com/"><input></form>',
        best_val_accuracy="<b>",
    )
    result = run_cli(
        "--mode", "test", "--dataset_path", "ds", "--model_file_path", model_path, "--images_dir", tmp_path / "images", cwd=model
    )
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "images" / "report.html").read_text()
    assert 'http-equiv="refresh"' not in page and "<form" not in page and "<input" not in page
    assert "form-action 'none'" in page and "base-uri 'none'" in page  # the CSP stops navigation and forms too


def _keras_with_member(tmp_path: Path, text: str) -> Path:
    """A .keras zip archive whose metadata member is ``text`` (and nothing else of use)."""
    import zipfile

    path = tmp_path / "handed_over.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("simple_cnn.json", text)
    return path


def test_metadata_nested_too_deeply_or_too_large_is_one_line(model, tmp_path):
    """A few KB of model file that unpack to 64 MB of metadata, or JSON nested past Python's stack:
    refused in one line, without reading it whole."""
    for text, words in (("[" * 100_000 + "]" * 100_000, "nested too deeply"), (" " * (64 << 20) + "{}", "more than")):
        path = _keras_with_member(tmp_path, text)
        assert path.stat().st_size < 1 << 20
        result = run_cli(
            "--mode", "classify", "--model_file_path", path, "--single_image_path", "ds/circle/circle_000.png", cwd=model
        )
        assert_one_line_error(result, 1, "handed_over.keras", words)


# ---------------------------------------------------------------- round three: disks, folders, names


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_a_full_disk_during_training_is_one_line_not_a_crash(tmp_path):
    """A models folder on a 4 MiB tmpfs fills during the first epoch's state: HDF5 used to end the
    process with a segmentation fault (exit 139); now one line says so, exit 1, and nothing is lost."""
    make_shapes_dataset(tmp_path / "ds", per_class=15)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = ["--mode", "train", "--dataset_path", "ds", "--epochs", "2", "--image_size", "24", "--quiet"]
        result = run_cli(*args, "--model_file_path", small / "m.keras", cwd=tmp_path)
        errors = [line for line in result.stderr.splitlines() if line.startswith("simple-cnn: error:")]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # not 139
        assert len(errors) == 1 and all(w in errors[0] for w in ("is full", "bytes free", "run the same command again"))
    finally:
        subprocess.run(["umount", small], check=True)


def test_an_unreadable_best_checkpoint_still_ends_with_a_model(tmp_path, caplog):
    """A best-weights file cut short (by a full disk or a kill) is passed over with a warning:
    the run ends with the last epoch's weights instead of failing at its very end."""
    from simple_cnn import model as model_lib
    from simple_cnn.runstate import RunState

    run = RunState(tmp_path / "m.keras")
    run.folder.mkdir()
    net = model_lib.build_model(3, 24)
    net.save_weights(run.folder / run.BEST_WEIGHTS)
    content = (run.folder / run.BEST_WEIGHTS).read_bytes()
    (run.folder / run.BEST_WEIGHTS).write_bytes(content[: len(content) // 3])
    before = [w.copy() for w in net.get_weights()]
    with caplog.at_level(logging.WARNING, logger="simple_cnn"):
        run.restore_best(net)
    assert "could not be read back" in caplog.text
    assert all((a == b).all() for a, b in zip(before, net.get_weights()))  # the last epoch's weights, untouched


def test_an_unusable_tensorboard_folder_is_refused_before_any_work(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=3)
    (tmp_path / "logs").write_text("a file, not a folder")
    result = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--tensorboard_dir", "logs", cwd=tmp_path)
    assert_one_line_error(result, 1, "TensorBoard", "logs")
    assert "Dataset ds" not in result.stderr  # refused before the dataset was even scanned


def test_explain_on_an_image_with_a_long_legal_name_writes_every_prediction(model, tmp_path):
    """A 240-character name made the overlay's temporary name too long and ended the run: no CSV."""
    folder = tmp_path / "photos"
    folder.mkdir()
    long_name = "p" * 236 + ".png"
    shape_image("circle", np.random.default_rng(0), size=24).save(folder / long_name)
    shape_image("square", np.random.default_rng(1), size=24).save(folder / "short.png")
    args = (
        "--mode",
        "classify",
        "--input_path",
        folder,
        "--explain",
        "--images_dir",
        tmp_path / "images",
        "--output",
        tmp_path / "p.csv",
    )
    result = run_cli(*args, "--model_file_path", model / "models" / "cnn_model.keras", cwd=model)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 2
    overlays = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(overlays) == 2 and all(len(name.encode()) <= 255 for name in overlays)

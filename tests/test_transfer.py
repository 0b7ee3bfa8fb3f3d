"""Starting from more than zero: --init_from, --backbone and --weights (issue 36), through the CLI."""

import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import ServeProcess, assert_one_line_error, run_cli, start_cli

KINDS = ("circle", "square", "triangle", "cross", "diamond")


def drawn(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A shape in a random colour on noise: only the outline tells the class."""
    im = Image.fromarray(rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    r = int(rng.integers(size // 4, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        w = max(2, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return im


def split_dataset(root, kinds, counts: dict[str, int], seed: int):
    """Images of ``kinds`` and a labels file with an explicit split: ``counts`` images per class and split."""
    rng = np.random.default_rng(seed)
    rows = ["path,label,split"]
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for split, n in counts.items():
            for i in range(n):
                name = f"{kind}/{split}_{i:03d}.png"
                drawn(kind, rng).save(root / name)
                rows.append(f"{name},{kind},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _accuracy(work, model: str) -> float:
    result = run_cli("--mode", "test", "--model_file_path", model, "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["accuracy"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A model trained on circles, squares and triangles: the start for new classes."""
    work = tmp_path_factory.mktemp("pretrain")
    split_dataset(work / "old", KINDS[:3], {"train": 80, "val": 20}, seed=1)
    args = ("--dataset_path", "old", "--labels", "old/labels.csv", "--epochs", "15", "--model_file_path", "models/old.keras")
    result = run_cli("--mode", "train", *args, cwd=work)
    assert result.returncode == 0, result.stderr
    return work


def test_init_from_beats_training_from_scratch_on_few_images_of_new_classes(pretrained):
    work = pretrained
    split_dataset(work / "new", KINDS[3:], {"train": 8, "val": 8, "test": 40}, seed=2)
    common = ("--mode", "train", "--dataset_path", "new", "--labels", "new/labels.csv", "--epochs", "10", "--json")
    scratch = run_cli(*common, "--model_file_path", "models/scratch.keras", cwd=work)
    assert scratch.returncode == 0, scratch.stderr
    tuned = run_cli(*common, "--model_file_path", "models/tuned.keras", "--init_from", "models/old.keras", cwd=work)
    assert tuned.returncode == 0, tuned.stderr
    assert "Training the new head alone" in tuned.stderr
    assert not re.search(r"\w+Warning: ", tuned.stderr), tuned.stderr  # no Python warning (Keras' on shuffle was one)
    from simple_cnn.formats import read_metadata

    start = read_metadata(work / "models" / "tuned.keras")["start"]
    digest = hashlib.sha256((work / "models" / "old.keras").read_bytes()).hexdigest()
    assert start == {"kind": "model", "file": "old.keras", "sha256": digest}
    assert read_metadata(work / "models" / "tuned.keras")["class_names"] == ["cross", "diamond"]
    from_scratch, from_old = _accuracy(work, "models/scratch.keras"), _accuracy(work, "models/tuned.keras")
    assert from_old >= 0.8, (from_old, from_scratch)
    assert from_old > from_scratch + 0.05, (from_old, from_scratch)


BACKBONE_IMAGE = "ds/circle/test_000.png"  # one of the backbone tests' images, classified and served


def _train_backbone(tmp_path, backbone: str, model: str) -> None:
    """Train ``backbone`` from random weights for one epoch on two classes, and check what it wrote."""
    split_dataset(tmp_path / "ds", KINDS[:2], {"train": 12, "val": 4, "test": 4}, seed=3)
    args = ("--dataset_path", "ds", "--labels", "ds/labels.csv", "--model_file_path", model)
    trained = run_cli("--mode", "train", *args, "--backbone", backbone, "--weights", "none", "--epochs", "1", "--json",
                      cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["image_size"] == 32  # the images' own size: random weights keep the default
    # the backbone's share of the default batch (config.auto_batch_size), for memory
    assert summary["config"]["batch_size"] == {"MobileNetV3Small": 24, "MobileNetV3Large": 24, "EfficientNetV2B0": 32}[backbone]
    assert (tmp_path / "models" / "b.tflite").is_file()  # the LiteRT copy
    from simple_cnn.formats import read_metadata

    assert read_metadata(tmp_path / model)["backbone"] == backbone


def _classify_with_litert(tmp_path, model: str) -> None:
    image = tmp_path / BACKBONE_IMAGE
    classified = run_cli("--mode", "classify", "--model_file_path", model, "--single_image_path", image, "--json", cwd=tmp_path)
    assert classified.returncode == 0, classified.stderr
    answer = json.loads(classified.stdout)
    assert answer["class"] in KINDS[:2] and answer["runtime"] == "litert"  # the LiteRT copy, no TensorFlow


# One network of each family (MobileNetV3, EfficientNetV2) through every mode; MobileNetV3Large
# below only through what differs from MobileNetV3Small: its own graph, trained and converted.
@pytest.mark.parametrize("backbone", ["MobileNetV3Small", "EfficientNetV2B0"])
def test_each_backbone_trains_tests_classifies_exports_and_serves(tmp_path, backbone):
    model = "models/b.keras"
    _train_backbone(tmp_path, backbone, model)
    assert 0 <= _accuracy(tmp_path, model) <= 1
    # Test mode's page shows Grad-CAM on the backbone's last block (explain.heat_maps, as classify --explain
    # runs it; the overlay file classify writes is the same for every network: tests/test_report.py).
    page = (tmp_path / "images" / "report.html").read_text()
    looked = page.split("<h2>Where it looked</h2>")[1].split("<h2>")[0]
    assert looked.count('<img src="data:image/') >= 4  # the 8 test images: right ones and mistakes, 4 of either at most
    _classify_with_litert(tmp_path, model)
    # Every format for the smallest backbone; the SavedModel, the one export that rebuilds the
    # graph, for the other family too.
    exports = {
        "MobileNetV3Small": [["--format", "savedmodel"], ["--format", "onnx"], ["--format", "tflite", "--quantize", "int8"]],
        "EfficientNetV2B0": [["--format", "savedmodel"]],
    }[backbone]
    for export in exports:
        exported = run_cli("--mode", "export", "--model_file_path", model, *export, cwd=tmp_path)
        assert exported.returncode == 0, (export, exported.stderr)
    if backbone != "MobileNetV3Small":
        return  # the server answers from the LiteRT copy, the same runner whatever network it holds
    image = tmp_path / BACKBONE_IMAGE
    running = ServeProcess(start_cli("--mode", "serve", "--port", "0", "--model_file_path", model, cwd=tmp_path))
    try:
        request = urllib.request.Request(running.url + "/classify", image.read_bytes(), {"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and json.loads(response.read())["class"] in KINDS[:2]
    finally:
        running.proc.kill()


def test_mobilenetv3large_trains_and_classifies_through_its_litert_copy(tmp_path):
    model = "models/b.keras"
    _train_backbone(tmp_path, "MobileNetV3Large", model)
    _classify_with_litert(tmp_path, model)


def _legacy_weights(backbone: str, path, image_size: int = 32) -> str:
    """A no-top weights file in the legacy HDF5 layout Keras publishes its ImageNet weights in; its MD5."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    network = getattr(keras.applications, backbone)(input_shape=(image_size, image_size, 3), include_top=False, weights=None)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, network)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def weights_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the files of a folder: ``(base URL, folder)``."""
    folder = tmp_path / "mirror"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", folder
    server.shutdown()


def test_imagenet_weights_download_through_keras_into_its_cache(tmp_path, weights_server, monkeypatch):
    from keras.src.applications import mobilenet_v3

    from simple_cnn import backbones

    url, folder = weights_server
    small = backbones.BACKBONES["MobileNetV3Small"]
    md5 = _legacy_weights("MobileNetV3Small", folder / small.weights_file)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(backbones.MIRROR_VARIABLE, url)
    # The test's file is not ImageNet's: the hash Keras pins for it is made to be the file's.
    monkeypatch.setitem(mobilenet_v3.WEIGHTS_HASHES, small.hash_key, ("unused", md5))
    path = backbones.imagenet_weights(small)
    assert path == tmp_path / "keras" / "models" / small.weights_file
    assert path.read_bytes() == (folder / small.weights_file).read_bytes()
    (folder / small.weights_file).unlink()  # downloaded once: the cache answers now
    assert backbones.imagenet_weights(small) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [small.weights_file]  # no staging folder left


def test_a_download_that_fails_says_how_to_pass_a_file_and_leaves_nothing(tmp_path, weights_server):
    url, folder = weights_server
    ds = split_dataset(tmp_path / "ds", KINDS[:2], {"train": 6, "val": 2}, seed=4)
    _legacy_weights("MobileNetV3Small", folder / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")
    cache = tmp_path / "keras"
    env = {"KERAS_HOME": str(cache), "SIMPLE_CNN_WEIGHTS_URL": url}  # a file that is not the one Keras pins
    wrong = run_cli("--mode", "train", "--dataset_path", ds, "--backbone", "MobileNetV3Small", cwd=tmp_path, env=env)
    assert_one_line_error(wrong, 1, "could not download", "hash", "--weights PATH")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env["SIMPLE_CNN_WEIGHTS_URL"] = f"http://127.0.0.1:{port}/"  # nothing listens there
    refused = run_cli("--mode", "train", "--dataset_path", ds, "--backbone", "MobileNetV3Small", cwd=tmp_path, env=env)
    assert_one_line_error(refused, 1, "could not download", "--weights PATH")
    assert not any((cache / "models").iterdir()), list((cache / "models").iterdir())  # nothing half-written
    assert not list(tmp_path.glob("models/*.keras")) and not list(tmp_path.glob("models/*.tflite"))


def test_a_silent_server_is_given_up_on(tmp_path, monkeypatch):
    from simple_cnn import backbones
    from simple_cnn.errors import DataError

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(backbones.MIRROR_VARIABLE, f"http://127.0.0.1:{listener.getsockname()[1]}/")
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT", 1)
    with listener, pytest.raises(DataError, match="could not download.*timed out"):
        backbones.imagenet_weights(backbones.BACKBONES["MobileNetV3Small"])


def test_a_weights_file_trains_and_one_of_another_backbone_is_refused(tmp_path):
    ds = split_dataset(tmp_path / "ds", KINDS[:2], {"train": 8, "val": 4}, seed=5)
    _legacy_weights("MobileNetV3Small", tmp_path / "small.h5")
    _legacy_weights("EfficientNetV2B0", tmp_path / "effnet.h5")
    args = ("--mode", "train", "--dataset_path", ds, "--backbone", "MobileNetV3Small", "--epochs", "1", "--image_size", "32")
    ok = run_cli(*args, "--weights", "small.h5", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "Starting from small.h5" in ok.stderr and "Training the new head alone" in ok.stderr
    wrong = run_cli(*args, "--weights", "effnet.h5", cwd=tmp_path)
    assert_one_line_error(wrong, 2, "--weights effnet.h5 does not fit MobileNetV3Small")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--backbone", "ResNet9000"], ["--backbone", "ResNet9000"]),
        (["--weights", "imagenet"], ["--weights", "--init_from"]),
        (["--init_from", "m.keras", "--backbone", "MobileNetV3Small"], ["--init_from", "without --backbone"]),
        (["--init_from", "notes.txt"], ["--init_from", ".keras or .h5"]),
        (["--init_from", "fake.keras"], ["--init_from", "fake.keras"]),
        (["--init_from", "absent.keras"], ["--init_from", "absent.keras"]),
        (["--backbone", "MobileNetV3Small", "--weights", "absent.h5"], ["--weights absent.h5", "no such file"]),
    ],
)
def test_bad_starts_get_one_line(tmp_path, flags, words):
    ds = split_dataset(tmp_path / "ds", KINDS[:2], {"train": 6, "val": 2}, seed=6)
    (tmp_path / "fake.keras").write_text("not a model")
    result = run_cli("--mode", "train", "--dataset_path", ds, *flags, cwd=tmp_path)
    assert_one_line_error(result, 2, *words)

"""Shared fixtures: small synthetic datasets the tests make themselves, and a CLI runner."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

# pytest-xdist hands each worker whole files (--dist loadfile), in collection order, and
# --no-loadscope-reorder keeps that order; so the slowest files (from --durations) go first,
# and a slow file collected last does not run alone at the end. Files not named come after.
SLOWEST_FIRST = (
    "test_transfer.py",
    "test_hostile.py",
    "test_distribute.py",
    "test_interrupts.py",
    "test_cli.py",
    "test_reliability.py",
    "test_bench.py",
    "test_classify_export.py",
    "test_unknown.py",
    "test_serve.py",
    "test_docker.py",
    "test_metrics.py",
    "test_report.py",
    "test_labels.py",
    "test_audit.py",
    "test_compare.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


CLASSES = ("circle", "square", "triangle")
COLOURS = {"circle": (220, 40, 40), "square": (40, 180, 40), "triangle": (40, 70, 220)}


def shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One noisy image of a coloured shape at a random place and size: learnable in seconds."""
    background = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    im = Image.fromarray(background)
    draw = ImageDraw.Draw(im)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in COLOURS[kind])
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_shapes_dataset(root: Path, per_class: int = 40, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(kind, rng, size).save(root / kind / f"{kind}_{i:03d}.png")
    return root


def name_in_split(root: Path, placed: dict[str, str], folder: str, stem: str, suffix: str, split: str) -> str:
    """A file name under ``folder`` that the dataset at ``root`` (default fractions, stratified)
    would put in ``split`` once added, without moving the files ``placed`` (name: split).
    A test image is given the lowest rank of its class, so that later test images leave it in test."""
    from simple_cnn.dataset import ImageDataset
    from simple_cnn.splits import Layout, assign, hash_fraction

    scanned = ImageDataset.scan(root)  # the images a scan gives splits to: unreadable files take no rank
    present = sorted([r.relpath for r in scanned.images] + [f for f, _ in scanned.copies.set_aside])
    for k in range(100_000):
        relpath = f"{folder}/{stem}_{k}{suffix}"
        files = [*present, relpath]
        given = dict(zip(files, assign(files, [f.split("/")[0] for f in files], Layout())))
        lowest = min(hash_fraction(f) for f in files if f.startswith(f"{folder}/")) == hash_fraction(relpath)
        if given[relpath] == split and all(given[f] == s for f, s in placed.items()) and (lowest or split != "test"):
            return relpath
    raise AssertionError(f"no name under {folder} lands in {split} without moving {placed}")


def add_copies(root: Path, folder: str, other: str) -> dict[str, str]:
    """Copies of one training image of ``folder``, named so that they would straddle the splits.

    Returns the files by role: ``original`` (train), ``recoded`` (JPEG quality 40, test),
    ``smaller`` (three quarters the size, validation), ``mirrored`` (test) and
    ``identical`` (the same bytes in the ``other`` class folder, test). Each is named so
    that adding it moves no file placed before it (splits are stratified by class).
    """
    from simple_cnn.dataset import ImageDataset

    images = ImageDataset.scan(root).images
    training = [r.relpath for r in images if r.split == "train" and r.relpath.startswith(f"{folder}/")]
    original = next(f for f in training if _copies_are_found(root / f))
    image = Image.open(root / original).convert("RGB")
    placed = {original: "train"}
    smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    writers = {  # the validation copy last: a test image added after it could push it out of its band
        "recoded": (folder, ".jpg", "test", lambda path: image.save(path, quality=40)),
        "mirrored": (folder, ".png", "test", lambda path: ImageOps.mirror(image).save(path)),
        "identical": (other, ".png", "test", lambda path: shutil.copyfile(root / original, path)),
        "smaller": (folder, ".png", "val", smaller.save),
    }
    copies = {}
    for role, (where, suffix, split, write) in writers.items():
        copies[role] = name_in_split(root, placed, where, role, suffix, split)
        write(root / copies[role])
        placed[copies[role]] = split
    return {"original": original, **copies}


def _copies_are_found(path: Path) -> bool:
    """Does the copy finder link this image with its smaller, mirrored and re-encoded copies (at 24 and 64 pixels)?

    It misses a few percent of three-quarter-size copies of the synthetic images (bench/README.md,
    "Finding copies"); the copy rule's tests need an image whose copies it finds.
    """
    from simple_cnn import duplicates
    from simple_cnn.images import decode_images

    image = Image.open(path).convert("RGB")
    folder = path.parent.parent / ".probe"
    folder.mkdir(exist_ok=True)
    try:
        image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS).save(folder / "smaller.png")
        ImageOps.mirror(image).save(folder / "mirrored.png")
        image.save(folder / "recoded.jpg", quality=40)
        files = [path, folder / "smaller.png", folder / "mirrored.png", folder / "recoded.jpg"]
        for size in (24, 64):
            x, _ = decode_images(files, size)
            found = duplicates.Fingerprints.of([str(f) for f in files], np.zeros(len(files)), x)
            if len(duplicates.near_pairs(found.hashes, found.thumbnails)) < 3:
                return False
        return True
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def shapes(tmp_path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes", per_class=12)


def _cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("TF_CONFIG", None)
    return {**env, **(extra or {})}


def run_cli(*args, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m simple_cnn ARGS`` as a user would, in ``cwd`` (``env``: variables to add)."""
    return subprocess.run(
        [sys.executable, "-m", "simple_cnn", *map(str, args)],
        cwd=cwd,
        env=_cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args, cwd: Path, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    """Start ``python -m simple_cnn ARGS`` in the background, its output piped (for signals, clusters)."""
    return subprocess.Popen(
        [sys.executable, "-m", "simple_cnn", *map(str, args)],
        cwd=cwd,
        env=_cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


class ServeProcess:
    """A ``--mode serve`` process and its log, read as it comes (a full pipe would stall the served)."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while not (found := re.search(r"http://[\d.]+:\d+", "".join(self.lines))):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)  # it died or hangs
            time.sleep(0.1)
        self.url = found.group(0)

    def log(self) -> str:
        self._reader.join(timeout=30)
        return "".join(self.lines)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """A failed run: the expected exit code, one line on stderr naming what is wrong, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("simple-cnn: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def train_tiny_model(work: Path) -> Path:
    """A model trained for one epoch at 24x24 pixels on a small shapes dataset in ``work``; its path."""
    make_shapes_dataset(work / "ds", per_class=15)
    result = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", "--image_size", "24", cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "models" / "cnn_model.keras"


def built_once(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills, built once per test run and copied for each xdist worker.

    pytest-xdist's recipe for session fixtures that should run only once: the workers of
    one run share the parent of their temporary folders; the first to come builds under
    a lock, and each worker then works on its own copy (tests write into it: exports,
    test-mode outputs), so no worker sees another's changes.
    """
    local = tmp_path_factory.mktemp(name)
    if worker_id == "master":  # not under xdist
        build(local)
        return local
    root = tmp_path_factory.getbasetemp().parent
    shared = root / f"shared-{name}"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()
    shutil.copytree(shared, local, dirs_exist_ok=True, symlinks=True)
    return local


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id):
    """One real training run through the CLI, shared by the end-to-end tests.

    Returns the working folder (with datasets/, models/, images/) and the train summary.
    """

    def build(work: Path) -> None:
        make_shapes_dataset(work / "datasets" / "shapes", per_class=60)
        args = ("--mode", "train", "--dataset_path", "datasets/shapes", "--epochs", "10", "--batch_size", "16", "--json")
        result = run_cli(*args, cwd=work)
        assert result.returncode == 0, result.stderr
        (work / "train.json").write_text(result.stdout)

    work = built_once(tmp_path_factory, worker_id, "e2e", build)
    return work, json.loads((work / "train.json").read_text())


@pytest.fixture(scope="module")
def new_images(trained, tmp_path_factory):
    """A folder of new images with known classes (in their names), plus files to skip."""
    folder = tmp_path_factory.mktemp("new") / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(2024)
    truth = {}
    for kind in CLASSES:
        for i in range(6):
            path = folder / ("sub" if i % 2 else ".") / f"{kind}_{i}.png"
            shape_image(kind, rng, size=int(rng.integers(24, 80))).save(path)
            truth[path.name] = kind
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / ".hidden.png").write_bytes(b"ignored")
    (folder / "notes.txt").write_text("ignored")
    return folder, truth


def wait_for_epochs(proc: subprocess.Popen, n: int) -> list[str]:
    """Read stderr until ``n`` epochs have ended (Keras prints one line per epoch)."""
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if sum("val_loss" in ln for ln in lines) >= n:
            return lines
    raise AssertionError(f"training did not reach epoch {n}: {''.join(lines)}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, worker_id) -> Path:
    """A barely trained model (1 epoch at 24x24 pixels): its answers are far from certain."""
    return built_once(tmp_path_factory, worker_id, "tiny", train_tiny_model) / "models" / "cnn_model.keras"


@contextlib.contextmanager
def chromium():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver; .ci/run installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "install Debian's chromium and chromium-driver (apt-get; .ci/run does it)"
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()

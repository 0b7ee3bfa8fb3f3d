"""Finding, checking, splitting and streaming the images of a dataset.

A dataset is a folder whose sub-folders are the classes, sorted by name::

    flower_photos/
        daisy/      100080576_f52e8ee070_n.jpg ...
        dandelion/  ...

Images are found and checked (:func:`scan_dataset`), assigned to a split that never
moves (:func:`split_of`; copies of one picture stay together, see ``duplicates.py``),
decoded once into a uint8 cache at the training size
(:func:`load_images`) and streamed to Keras by tf.data (:func:`make_tf_dataset`).
Nothing here imports TensorFlow at module level, so classify and ``--help`` stay fast.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import duplicates
from .config import TrainConfig, check_splits
from .errors import DataError, shown
from .files import atomic_dir, atomic_output, ensure_writable_dir, write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP"}  # MPO: JPEG from some cameras
# Images are refused above this many pixels before anything is decoded (a 40-megapixel
# photo is fine; a "decompression bomb" declaring 50,000 x 50,000 pixels is not).
MAX_PIXELS = 100_000_000
SPLIT_SALT = b"simple_cnn split v1"
SPLITS = ("train", "val", "test")  # also the order in which a group of copies claims a split
# The automatic training size: the median short side of the images, within these bounds.
AUTO_SIZE_MIN, AUTO_SIZE_MAX = 32, 112  # 112: why, in bench/README.md ("Tried after the 1x1 layer")

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check, at our limit


class PixelBudget:
    """At most ``capacity`` decoded pixels in flight across all decoding threads.

    One image may hold up to MAX_PIXELS; without a shared bound, every thread could hold
    one at once, and a folder of large, small-on-disk PNGs would exhaust memory. A thread
    waits until the pixels it needs are free (an image larger than the budget waits for
    the whole of it).
    """

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self.free += pixels
                self._changed.notify_all()


# One 100-megapixel image (about 300 MB as RGB, twice that while converting) or many
# smaller ones at a time. JPEGs count at their reduced decoding scale (Image.draft).
DECODING = PixelBudget(MAX_PIXELS)


def csv_cell(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: one starting with =, +, -, @ (or a tab or
    carriage return) would be run as a formula, so it gets a leading apostrophe (OWASP's
    advice against CSV injection)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def check_class_name(name: str, root: Path) -> None:
    """Refuse a class folder name that could not travel safely into labels, CSV and JSON."""
    if shown(name) != name:
        raise DataError(
            f"the class folder {shown(name)!r} in {shown(str(root))} has a name that is not valid UTF-8 or holds a "
            "control character (newline, tab, escape): rename the folder"
        )


def split_of(relpath: str, val_split: float, test_split: float) -> str:
    """The split ("train", "val" or "test") of an image, from its path in the dataset.

    A salted SHA-256 of the path gives a number in [0, 1) that depends on nothing
    else, so an image keeps its split on every run, in every mode, and when other
    images are added or removed.
    """
    digest = hashlib.sha256(SPLIT_SALT + b"\0" + os.fsencode(relpath)).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_split:
        return "test"
    if u < test_split + val_split:
        return "val"
    return "train"


@dataclass
class ImageRecord:
    relpath: str  # e.g. "daisy/123.jpg", always with "/" separators
    label: int
    split: str
    size: tuple[int, int]  # (width, height) from the header
    nbytes: int = 0  # the file's size in bytes


@dataclass
class Copies:
    """The copies found in a dataset (see ``duplicates.py``): links between files, and what was set aside."""

    links: list[tuple[str, str]] = field(default_factory=list)  # (relpath, relpath) of two copies
    labels: dict[str, int] = field(default_factory=dict)  # the class of every linked file
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # (relpath, the copy that kept its split)

    def link(self, a: str, label_a: int, b: str, label_b: int) -> None:
        self.links.append((a, b))
        self.labels[a], self.labels[b] = label_a, label_b

    def groups(self) -> list[list[str]]:
        names = sorted(self.labels)
        index = {name: i for i, name in enumerate(names)}
        pairs = [(index[a], index[b]) for a, b in self.links]
        return [sorted(names[i] for i in g) for g in duplicates.groups(len(names), pairs)]

    def report(self, class_names: list[str]) -> dict:
        """For the outputs: how many groups and images, what was set aside, and mislabelled groups."""
        found = self.groups()
        mixed = [g for g in found if len({self.labels[f] for f in g}) > 1]
        return {
            "groups": len(found),
            "images": sum(map(len, found)),
            "set_aside": [{"file": shown(f), "copy_of": shown(kept)} for f, kept in self.set_aside],
            "mixed_labels": [[f"{shown(f)} ({class_names[self.labels[f]]})" for f in g] for g in mixed],
        }


@dataclass
class Dataset:
    root: Path
    class_names: list[str]
    images: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    copies: Copies = field(default_factory=Copies)

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.images if r.split == name]

    def counts(self) -> dict[str, int]:
        c = Counter(r.split for r in self.images)
        return {s: c.get(s, 0) for s in SPLITS}

    def skipped_list(self) -> list[dict]:
        """The skipped files as ``[{"file": ..., "reason": ...}]``, names safe to print."""
        return [{"file": shown(p), "reason": why} for p, why in self.skipped]

    def skipped_summary(self, limit: int = 3) -> str:
        """e.g. '2 files skipped (cats/a.jpg: truncated image; ...)', or ''."""
        if not self.skipped:
            return ""
        some = "; ".join(f"{shown(p)}: {why}" for p, why in self.skipped[:limit])
        more = ", ..." if len(self.skipped) > limit else ""
        n = len(self.skipped)
        return f"{n} unreadable file{'s' if n != 1 else ''} skipped ({some}{more})"


def open_regular_file(path: Path):
    """Open ``path`` for reading in binary mode, if it is a regular file.

    Anything else (a FIFO, a device, a socket) raises ValueError without blocking: the
    file is opened non-blocking and checked on the descriptor itself (no check-then-open
    race), so a FIFO named like an image can never hang a run.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ValueError(_reason(e)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file (a FIFO, device or socket)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _checked_size(im: Image.Image) -> tuple[int, int]:
    """An opened image's size, if its format and size are acceptable; else ValueError."""
    if im.format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported format {im.format}")
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} is more than {MAX_PIXELS:,} pixels")
    if w < 1 or h < 1:
        raise ValueError("empty image")
    return w, h


def _check_header(path: Path) -> tuple[tuple[int, int], int]:
    """Open an image's header only; return its size and the file's bytes, or raise ValueError with the reason."""
    with open_regular_file(path) as f:
        try:
            with Image.open(f) as im:
                return _checked_size(im), os.fstat(f.fileno()).st_size
        except Exception as e:  # Pillow's parsers raise many kinds (OSError, SyntaxError, struct.error, ...) on bad bytes
            raise ValueError(_reason(e)) from None


def _reason(e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"more than {MAX_PIXELS:,} pixels"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "file not found (broken link?)"
    if isinstance(e, OSError) and e.strerror and e.filename:  # e.g. a symbolic link loop
        return e.strerror
    text = str(e).split("\n")[0] or type(e).__name__
    if text.startswith("cannot identify image file"):
        return "not an image"
    return "truncated file" if "truncated" in text.lower() else text


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in a stable order.

    The one rule for what counts as an image file, for datasets and for classify:
    hidden files and folders are ignored, and so are files without an image suffix.
    Links to folders are not followed, so a link that loops never hangs the walk.
    """
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(parent) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def try_each(fn, items: list, threads: int | None = None) -> tuple[list, list[str | None]]:
    """``fn(item)`` for every item on a thread pool: ``(results, errors)``.

    A ValueError (our readers' "cannot use this file, because ...") becomes that item's
    error and its result is None; anything else propagates. Pillow decodes without the
    GIL, so threads use every core.
    """

    def attempt(item):
        try:
            return fn(item), None
        except ValueError as e:
            return None, str(e)

    # Not `with ThreadPoolExecutor(...)`: its exit waits for every thread, and on Ctrl-C
    # a thread stuck in a read would keep the process alive. The CLI ends the process.
    pool = ThreadPoolExecutor(max_workers=threads or usable_cpus())
    try:
        pairs = list(pool.map(attempt, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [r for r, _ in pairs], [e for _, e in pairs]


def _inside(root: Path):
    """A test: does a path, its links resolved, lie inside ``root`` (links resolved too)?"""
    real_root = os.path.realpath(root)

    def inside(path: Path) -> bool:
        real = os.path.realpath(path)
        return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)

    return inside


def scan_dataset(root: Path, val_split: float = TrainConfig.val_split, test_split: float = TrainConfig.test_split) -> Dataset:
    """Find the classes and images under ``root`` and check each image's header.

    Hidden files and folders and files without an image suffix are ignored; images
    in nested sub-folders of a class belong to that class. Files that cannot be
    read are recorded in ``Dataset.skipped``, never raised. Links that lead outside
    the dataset (a class folder or an image) are not followed.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist: give --dataset_path a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(
            f"dataset path {root} is a file, not a folder: give --dataset_path a folder with one sub-folder per class"
        )
    inside = _inside(root)
    try:
        folders = sorted((e.name, e.is_symlink()) for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise DataError(f"cannot read the dataset folder {root}: permission denied") from None
    outside = [name for name, link in folders if link and not inside(root / name)]
    if outside:
        log.warning(
            f"not following {len(outside)} class folder link(s) that lead outside {root}: {', '.join(map(shown, outside))}"
        )
    class_names = [name for name, _ in folders if name not in outside]
    for name in class_names:
        check_class_name(name, root)
    if len(class_names) < 2:
        found = f"only {shown(class_names[0])!r}" if class_names else "none"
        raise DataError(f"dataset folder {root} needs at least two class sub-folders (found {found})")

    dataset = Dataset(root=root, class_names=class_names, images=[])
    candidates = []
    for label, name in enumerate(class_names):
        for path in image_files(root / name):
            relpath = path.relative_to(root).as_posix()
            if path.is_symlink() and not inside(path):
                dataset.skipped.append((relpath, "a link to a file outside the dataset (not followed)"))
            else:
                candidates.append((relpath, label))
    # Header checks wait on the disk more than on the CPU: twice the threads.
    headers, errors = try_each(lambda item: _check_header(root / item[0]), candidates, threads=min(8, 2 * usable_cpus()))

    for (relpath, label), header, error in zip(candidates, headers, errors):
        if error is not None:
            dataset.skipped.append((relpath, error))
        else:
            size, nbytes = header
            dataset.images.append(ImageRecord(relpath, label, split_of(relpath, val_split, test_split), size, nbytes))
    set_aside_identical_files(dataset)
    per_class = Counter(r.label for r in dataset.images)
    empty = [shown(n) for i, n in enumerate(class_names) if per_class[i] == 0]
    if empty:
        raise DataError(
            f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {root} "
            "hold no readable images (.jpg, .png, .bmp, .gif, .webp): add images or remove the folder"
        )
    return dataset


def set_aside_identical_files(dataset: Dataset) -> None:
    """Link byte-identical files; set aside those whose group already has an earlier split."""
    paths = [dataset.root / r.relpath for r in dataset.images]
    for group in duplicates.identical_files(paths, [r.nbytes for r in dataset.images]):
        members = sorted((dataset.images[i] for i in group), key=lambda r: (SPLITS.index(r.split), r.relpath))
        first = members[0]
        for r in members[1:]:
            dataset.copies.link(first.relpath, first.label, r.relpath, r.label)
            if r.split != first.split:
                dataset.copies.set_aside.append((r.relpath, first.relpath))
    gone = {relpath for relpath, _ in dataset.copies.set_aside}
    dataset.images = [r for r in dataset.images if r.relpath not in gone]


@dataclass
class Fingerprints:
    """Decoded rows' files, labels and signatures (``duplicates.signatures``)."""

    files: list[str]
    labels: np.ndarray
    hashes: np.ndarray  # uint64 [N, 2]: the pHash of the image and of its mirror image
    thumbnails: np.ndarray  # uint8 [N, 304]: 16x16 grey, 4x4 RGB

    @classmethod
    def of(cls, dataset: Dataset, records: list[ImageRecord], x: np.ndarray, y: np.ndarray) -> Fingerprints:
        return cls(decoded_files(dataset, records), np.asarray(y), *duplicates.signatures(x))

    @classmethod
    def none(cls) -> Fingerprints:
        return cls([], np.zeros(0, np.int64), *duplicates.signatures(np.zeros((0, 8, 8, 3), np.uint8)))

    def take(self, keep: np.ndarray) -> Fingerprints:
        files = [f for f, k in zip(self.files, keep) if k]
        return Fingerprints(files, self.labels[keep], self.hashes[keep], self.thumbnails[keep])

    def __add__(self, other: Fingerprints) -> Fingerprints:
        arrays = [(self.labels, other.labels), (self.hashes, other.hashes), (self.thumbnails, other.thumbnails)]
        return Fingerprints(self.files + other.files, *(np.concatenate(pair) for pair in arrays))

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "labels": self.labels.tolist(),
            "phash": [f"{a:016x}{b:016x}" for a, b in self.hashes],
            "thumbnails": base64.b64encode(self.thumbnails.tobytes()).decode(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprints:
        hashes = np.array([(int(h[:16], 16), int(h[16:], 16)) for h in d["phash"]], dtype=np.uint64).reshape(-1, 2)
        thumbnails = np.frombuffer(base64.b64decode(d["thumbnails"]), dtype=np.uint8).reshape(len(hashes), -1)
        return cls(list(d["files"]), np.array(d["labels"], dtype=np.int64), hashes, thumbnails)


def set_aside_near_copies(dataset: Dataset, earlier: Fingerprints, later: Fingerprints) -> np.ndarray:
    """Link near copies among ``earlier`` and ``later`` rows; return which ``later`` rows keep their split.

    A group of copies that reaches an ``earlier`` row (an earlier split) belongs there:
    its ``later`` members are set aside (recorded in ``dataset.copies``).
    """
    both = earlier + later
    pairs = duplicates.near_pairs(both.hashes, both.thumbnails)
    for i, j in pairs:
        dataset.copies.link(both.files[i], int(both.labels[i]), both.files[j], int(both.labels[j]))
    keep = np.ones(len(later.files), dtype=bool)
    n = len(earlier.files)
    for group in duplicates.groups(len(both.files), pairs):
        first = min(group)
        if first < n:
            for j in (j for j in group if j >= n):
                keep[j - n] = False
                dataset.copies.set_aside.append((both.files[j], both.files[first]))
    return keep


def decoded_files(dataset: Dataset, records: list[ImageRecord]) -> list[str]:
    """The files of ``load_images(dataset, records, ...)``'s rows, in order (the readable ones)."""
    unreadable = {relpath for relpath, _ in dataset.skipped}
    return [r.relpath for r in records if r.relpath not in unreadable]


def auto_image_size(dataset: Dataset) -> int:
    """The median short side of the images, within [AUTO_SIZE_MIN, AUTO_SIZE_MAX], a multiple of 8."""
    short = int(np.median([min(r.size) for r in dataset.images]))
    return int(np.clip(short // 8 * 8, AUTO_SIZE_MIN, AUTO_SIZE_MAX))


def read_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one image file to a ``(image_size, image_size, 3)`` uint8 RGB array.

    The one decoder used for training, testing and classifying, so that all three see
    the same pixels. Pillow rather than ``tf.io.decode_image``: it names the file that
    fails before training starts, honours EXIF orientation, reads CMYK and 16-bit
    images, composites transparency on white, and needs no TensorFlow import.
    Raises ValueError with a short reason for anything it cannot read.
    """
    with open_regular_file(path) as f:
        return decode_stream(f, image_size)


def decode_stream(f, image_size: int) -> np.ndarray:
    """:func:`read_image` for an open binary file or a ``BytesIO`` (an upload, say)."""
    try:
        with Image.open(f) as im:
            _checked_size(im)  # from the header: a decompression bomb is refused before any decoding
            im.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale
            with DECODING.hold(im.size[0] * im.size[1]):
                return _decode(im, image_size)
    except Exception as e:  # as in _check_header: any failure to decode means "skip this file"
        raise ValueError(_reason(e)) from None


def _decode(im: Image.Image, image_size: int) -> np.ndarray:
    """Pixels of an opened image: EXIF orientation, 16-bit grey, transparency on white, RGB."""
    im = ImageOps.exif_transpose(im)  # also loads the pixels: truncation fails here
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit) grey: keep the top 8 bits; convert("L") would clip.
        bits = 16 if im.mode.startswith("I;16") else 32
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> (bits - 8)).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def load_images(
    dataset: Dataset, records: list[ImageRecord], image_size: int, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``records`` in parallel into ``(x uint8 [N, S, S, 3], y int32 [N])``.

    This array is the training cache: uint8 at the training size, 1/4 of the memory
    of float32 and decoded once. Files that fail to decode are added to
    ``dataset.skipped`` and left out.

    With ``cache_dir``, ``x`` is a read-only ``np.memmap`` of a file in that folder
    instead of an array in RAM (see :func:`_cache_key`), for datasets larger than
    memory: the operating system pages images in as batches need them. A later call
    with the same files and size reuses the file and decodes nothing.
    """
    paths = [dataset.root / r.relpath for r in records]
    if cache_dir is None:
        x, errors = decode_images(paths, image_size)
    else:
        x, errors = _load_cached(Path(cache_dir), dataset.root, records, image_size)
    keep = [i for i, error in enumerate(errors) if error is None]
    for record, error in zip(records, errors):
        if error is not None:
            dataset.skipped.append((record.relpath, error))
    y = np.array([records[i].label for i in keep], dtype=np.int32)
    return x, y


def decode_images(paths: list[Path], image_size: int, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``paths`` in parallel: ``(x, errors)``, the readable images packed in order.

    ``x`` is ``out`` (a preallocated ``(len(paths), S, S, 3)`` uint8 array, e.g. a memory
    map) or a new array; it holds only the readable images, in order, so it is a view of
    its first rows when files fail. ``errors[i]`` is why ``paths[i]`` failed, or None.
    """
    x = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8) if out is None else out

    def decode_row(i):
        x[i] = read_image(paths[i], image_size)

    _, errors = try_each(decode_row, list(range(len(paths))))
    count = 0
    for i, error in enumerate(errors):  # pack the readable images together (rows only move up)
        if error is None:
            if count != i:
                x[count] = x[i]
            count += 1
    return x[:count], errors


CACHE_VERSION = 2  # bump when read_image's output or the entry format changes, so old entries are not reused


def _cache_key(root: Path, records: list[ImageRecord], image_size: int) -> str:
    """A name for the decoded cache of ``records``: it changes when any file, label or size does."""
    h = hashlib.sha256(f"simple_cnn cache v{CACHE_VERSION}\0{root.resolve()}\0{image_size}".encode())
    for r in records:
        try:
            st = os.stat(root / r.relpath)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(os.fsencode(r.relpath) + f"\0{r.label}\0{stamp}\n".encode())
    return h.hexdigest()[:24]


def cache_folder(cache_dir: Path) -> Path:
    """The ``--cache_dir`` folder, created private, and refused when someone else could
    plant entries in it: it must belong to this user and not be writable by others."""
    cache_dir = Path(cache_dir)
    with contextlib.suppress(OSError):  # ensure_writable_dir says what went wrong
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_writable_dir(cache_dir, "cache")
    st = os.stat(cache_dir)
    if st.st_uid != os.geteuid():
        raise DataError(
            f"refusing the cache folder {cache_dir}: it belongs to another user (uid {st.st_uid}), who could "
            "change the images it holds; give --cache_dir a folder of your own"
        )
    if st.st_mode & stat.S_IWOTH:
        raise DataError(
            f"refusing the cache folder {cache_dir}: everyone may write to it, so anyone could change the images it "
            f"holds; `chmod o-w {cache_dir}`, or give --cache_dir a folder of your own"
        )
    return cache_dir


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _valid_entry(index: dict, records: list[ImageRecord], image_size: int, pixels: Path) -> list | None:
    """An entry's error list if the entry is whole and its pixels are the ones it recorded; else None.

    Nothing in the folder is trusted: the index must have the expected shape, and the
    pixel file must be a regular file of the recorded size and SHA-256 (about 0.1 s per
    100 MB, far less than decoding again).
    """
    errors = index.get("errors") if isinstance(index, dict) else None
    if not isinstance(errors, list) or len(errors) != len(records) or index.get("image_size") != image_size:
        return None
    if not all(e is None or isinstance(e, str) for e in errors):
        return None
    count = sum(e is None for e in errors)
    st = os.lstat(pixels)
    if not stat.S_ISREG(st.st_mode) or st.st_size != count * image_size * image_size * 3:
        return None
    return errors if index.get("sha256") == _file_sha256(pixels) else None


def _load_cached(cache_dir: Path, root: Path, records: list[ImageRecord], image_size: int):
    """The disk cache behind ``load_images(..., cache_dir=...)``: ``(memmap, errors)``.

    Two files per cache entry: ``KEY.u8`` (the pixels of the readable images, in order)
    and ``KEY.json`` (which files failed and why, and the pixels' SHA-256). Both are
    written under unpredictable temporary names created exclusively (never through a
    planted link) and renamed into place, the JSON last, so an entry is complete or
    absent. An entry that does not verify is decoded again.
    """
    cache_dir = cache_folder(cache_dir)
    key = _cache_key(root, records, image_size)
    pixels, index = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (image_size, image_size, 3)
    try:
        errors = _valid_entry(json.loads(index.read_text()), records, image_size, pixels)
        if errors is not None:
            return _open_memmap(pixels, sum(e is None for e in errors), shape), errors
        log.warning(f"the cache entry {index.name} in {cache_dir} does not match its images; decoding them again")
    except (OSError, ValueError):
        pass  # absent or unreadable: decode again
    with atomic_output(pixels) as tmp:
        out = np.memmap(tmp, np.uint8, "r+", shape=(max(1, len(records)), *shape))  # NumPy cannot map 0 bytes
        x, errors = decode_images([root / r.relpath for r in records], image_size, out=out)
        count = len(x)
        out.flush()
        del out, x
        os.truncate(tmp, count * int(np.prod(shape)))
        digest = _file_sha256(tmp)
    entry = {"image_size": image_size, "sha256": digest, "files": [shown(r.relpath) for r in records], "errors": errors}
    write_json(index, entry)
    return _open_memmap(pixels, count, shape), errors


def _open_memmap(path: Path, count: int, shape: tuple[int, ...]) -> np.ndarray:
    if count == 0:  # NumPy cannot map an empty file
        return np.empty((0, *shape), dtype=np.uint8)
    return np.memmap(path, np.uint8, "r", shape=(count, *shape))


PIPELINE_DEPTH = 2  # batches gathered in parallel, and batches kept ready, by make_tf_dataset


def make_tf_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0, in_graph=False):
    """Stream ``(x, y)`` to Keras in float32 batches with tf.data.

    The pipeline shuffles and batches *indices* and gathers each batch from the uint8
    array, so there is never a float32 copy of the dataset, and by default not even a
    second uint8 one: ``tf.numpy_function`` gathers straight from the NumPy array.
    ``in_graph=True`` slices a TensorFlow copy instead, for tf.distribute, whose
    multi-worker input pipelines cannot call Python functions.

    TensorFlow keeps the gather function, and so what it reads, after the dataset is
    gone (after training, the decoded images were still referenced from its closure):
    ``ds.release_arrays()`` lets the arrays go when the dataset will not be read again
    (training calls it after fitting).
    """
    from .quiet import import_tensorflow

    tf = import_tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((x, y)) if in_graph else tf.data.Dataset.range(len(x))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if in_graph:
        # uint8 batches, no map: the model casts its input. Under MultiWorkerMirroredStrategy
        # (TF 2.21, Keras 3.15) any map after batch fed wrong shapes from the second epoch on.
        ds.release_arrays = lambda: None  # the TensorFlow copy goes with the dataset
        return ds
    source = {"x": x, "y": y}

    def gather(idx):
        xb, yb = tf.numpy_function(lambda i: (source["x"][i], source["y"][i]), [idx], (tf.uint8, tf.int32), stateful=False)
        xb.set_shape((None, *x.shape[1:]))
        yb.set_shape((None,))
        return tf.cast(xb, tf.float32), yb

    # Fixed parallelism and no tf.data.AUTOTUNE, which starts a tuning thread (it sleeps for
    # doubling periods of up to a minute): deleting the training iterator waited for that
    # thread, so Keras' fit returned up to a minute after a long run's last epoch
    # (bench/README.md, "A minute after the last epoch"). Two gathers in flight and two
    # batches ready keep up with the network (the benchmark's input-pipeline rows).
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.map(gather, num_parallel_calls=PIPELINE_DEPTH).prefetch(PIPELINE_DEPTH).with_options(options)
    ds.release_arrays = source.clear
    return ds


def load_data(
    path, image_size: int | None = None, val_split: float = TrainConfig.val_split, test_split: float = TrainConfig.test_split
):
    """Load a folder-of-class-folders dataset like ``keras.datasets.mnist.load_data()``.

    Returns ``(x_train, y_train), (x_test, y_test)``: uint8 image arrays of shape
    ``(N, image_size, image_size, 3)`` and uint8 label arrays of shape ``(N,)``. The
    training part holds the train and validation splits; the test part is the same
    test split that ``--mode test`` uses, copies of training images set aside as there
    (see ``duplicates.py``). ``image_size`` defaults to the automatic size.
    """
    check_splits(val_split, test_split)
    dataset = scan_dataset(Path(path), val_split, test_split)
    size = image_size or auto_image_size(dataset)
    parts = {}
    for split in SPLITS:
        records = dataset.split(split)
        x, y = load_images(dataset, records, size)
        parts[split] = (x, y, Fingerprints.of(dataset, records, x, y))
    (x_train, y_train, f_train), (x_val, y_val, f_val), (x_test, y_test, f_test) = parts.values()
    keep_val = set_aside_near_copies(dataset, f_train, f_val)
    keep_test = set_aside_near_copies(dataset, f_train + f_val.take(keep_val), f_test)
    x_train, y_train = np.concatenate([x_train, x_val[keep_val]]), np.concatenate([y_train, y_val[keep_val]])
    x_test, y_test = x_test[keep_test], y_test[keep_test]
    label_dtype = np.uint8 if len(dataset.class_names) <= 256 else np.int32
    return (x_train, y_train.astype(label_dtype)), (x_test, y_test.astype(label_dtype))


def ensure_digits_dataset(root: Path) -> Path:
    """Write scikit-learn's 1,797 handwritten digits as PNG class folders, once.

    The 8x8 originals (grey levels 0-16) are scaled to 32x32 pixels. The folder is
    written beside ``root`` and renamed into place, so it is complete or absent.
    """
    root = Path(root)
    if root.is_dir():
        return root
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    ensure_writable_dir(root.parent, "datasets")
    with atomic_dir(root, replace=False) as tmp:  # another run may write it first: keep theirs
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            grey = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8))  # 2-D uint8: mode "L"
            grey.resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"digit_{i:04d}.png")
    return root

"""A dataset that knows its splits: scanning, splitting, decoding, and the copy rule.

A dataset is a folder whose sub-folders are the classes, sorted by name::

    flower_photos/
        daisy/      100080576_f52e8ee070_n.jpg ...
        dandelion/  ...

:class:`ImageDataset` owns its life cycle, in the order the modes use it:

1. :meth:`ImageDataset.scan` finds the classes and images, checks each header
   (``images.py``), gives each image a split that never moves (:func:`split_of`), and
   sets aside byte-identical copies that would straddle the splits.
2. :meth:`ImageDataset.decode` decodes a list of images into a :class:`Split` (uint8
   pixels at the training size, labels, fingerprints), in RAM or through the verified
   disk cache (``cache.py``); unreadable files are skipped and counted.
3. :meth:`ImageDataset.hold_out_copies` is the one home of the copy rule for near
   copies (``duplicates.py``): a group of copies belongs to the earliest split any of
   its members falls in. :meth:`training_splits` and :meth:`test_split` apply it, so
   train, test, ``--quantize`` and :func:`load_data` all see the same images.
4. :meth:`ImageDataset.summary` says what was found (counts, imbalance, copies,
   skipped files), once, for the results and the report.

Nothing here imports TensorFlow, so classify and ``--help`` stay fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import duplicates
from .cache import load_cached
from .config import TrainConfig, check_splits
from .duplicates import Fingerprints
from .errors import DataError, printable
from .files import atomic_dir, ensure_writable_dir
from .images import check_header, decode_images, image_files, try_each, usable_cpus

log = logging.getLogger(__name__)

SPLIT_SALT = b"simple_cnn split v1"
SPLITS = ("train", "val", "test")  # also the order in which a group of copies claims a split
# The automatic training size: the median short side of the images, within these bounds.
AUTO_SIZE_MIN, AUTO_SIZE_MAX = 32, 112  # why 112: bench/README.md, "Tried after the 1x1 layer"


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


def check_class_name(name: str, root: Path) -> None:
    """Refuse a class folder name that could not travel safely into labels, CSV and JSON."""
    if printable(name) != name:
        raise DataError(
            f"the class folder {printable(name)!r} in {printable(str(root))} has a name that is not valid UTF-8 or holds "
            "a control character (newline, tab, escape): rename the folder"
        )


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
            "set_aside": [{"file": printable(f), "copy_of": printable(kept)} for f, kept in self.set_aside],
            "mixed_labels": [[f"{printable(f)} ({class_names[self.labels[f]]})" for f in g] for g in mixed],
        }


@dataclass
class Split:
    """Decoded images of one split: uint8 pixels ``[N, S, S, 3]``, labels ``[N]`` and their fingerprints."""

    x: np.ndarray | None  # None once released (train mode, after its last use)
    y: np.ndarray
    fingerprints: Fingerprints

    @property
    def files(self) -> list[str]:
        return self.fingerprints.files

    def __len__(self) -> int:
        return len(self.y)

    def take(self, keep: np.ndarray) -> Split:
        return self if keep.all() else Split(self.x[keep], self.y[keep], self.fingerprints.take(keep))


@dataclass
class ImageDataset:
    """A folder of class folders with a stable split per image (see the module's docstring)."""

    root: Path
    class_names: list[str]
    images: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    copies: Copies = field(default_factory=Copies)

    # ------------------------------------------------------------------ 1. scan

    @classmethod
    def scan(cls, root, val_split: float = TrainConfig.val_split, test_split: float = TrainConfig.test_split) -> ImageDataset:
        """Find the classes and images under ``root`` and check each image's header.

        Hidden files and folders and files without an image suffix are ignored; images
        in nested sub-folders of a class belong to that class. Files that cannot be
        read are recorded in ``skipped``, never raised. Links that lead outside the
        dataset (a class folder or an image) are not followed.
        """
        root = Path(root)
        dataset = cls(root=root, class_names=_class_folders(root), images=[])
        candidates = []
        for label, name in enumerate(dataset.class_names):
            for path in image_files(root / name):
                relpath = path.relative_to(root).as_posix()
                if path.is_symlink() and not _inside(path, root):
                    dataset.skipped.append((relpath, "a link to a file outside the dataset (not followed)"))
                else:
                    candidates.append((relpath, label))
        # Header checks wait on the disk more than on the CPU: twice the threads.
        headers, errors = try_each(lambda item: check_header(root / item[0]), candidates, threads=min(8, 2 * usable_cpus()))
        for (relpath, label), header, error in zip(candidates, headers, errors):
            if error is not None:
                dataset.skipped.append((relpath, error))
            else:
                size, nbytes = header
                dataset.images.append(ImageRecord(relpath, label, split_of(relpath, val_split, test_split), size, nbytes))
        dataset._set_aside_identical_files()
        dataset._refuse_empty_classes()
        return dataset

    @classmethod
    def of_model(cls, root, metadata: dict, model_path) -> ImageDataset:
        """The dataset at ``root`` split as the model ``metadata`` says; refused if its classes differ."""
        dataset = cls.scan(root, metadata["val_split"], metadata["test_split"])
        if dataset.class_names != metadata["class_names"]:
            raise DataError(
                f"the classes of {dataset.root} ({', '.join(map(printable, dataset.class_names))}) differ from "
                f"those the model {model_path} was trained on ({', '.join(metadata['class_names'])}): "
                "use the dataset the model was trained on"
            )
        return dataset

    def _set_aside_identical_files(self) -> None:
        """Link byte-identical files; set aside those whose group already has an earlier split."""
        paths = [self.root / r.relpath for r in self.images]
        for group in duplicates.identical_files(paths, [r.nbytes for r in self.images]):
            members = sorted((self.images[i] for i in group), key=lambda r: (SPLITS.index(r.split), r.relpath))
            first = members[0]
            for r in members[1:]:
                self.copies.link(first.relpath, first.label, r.relpath, r.label)
                if r.split != first.split:
                    self.copies.set_aside.append((r.relpath, first.relpath))
        gone = {relpath for relpath, _ in self.copies.set_aside}
        self.images = [r for r in self.images if r.relpath not in gone]

    def _refuse_empty_classes(self) -> None:
        per_class = Counter(r.label for r in self.images)
        empty = [printable(n) for i, n in enumerate(self.class_names) if per_class[i] == 0]
        if empty:
            raise DataError(
                f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {self.root} "
                "hold no readable images (.jpg, .png, .bmp, .gif, .webp): add images or remove the folder"
            )

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.images if r.split == name]

    def counts(self) -> dict[str, int]:
        c = Counter(r.split for r in self.images)
        return {s: c.get(s, 0) for s in SPLITS}

    def training_image_size(self, image_size: int | None = None, warn_imbalance: bool = True) -> int:
        """Refuse a dataset too small to train on, say what it holds (and warn about imbalance,
        unless the loss is weighted); the training size: ``image_size``, else the automatic one."""
        counts = self.counts()
        if counts["val"] == 0 or counts["train"] == 0:
            raise DataError(
                f"{self.root} has {len(self.images)} images, too few for a train and a validation "
                "split: add images or raise --val_split"
            )
        log.info(self.describe())
        if (ratio := self.imbalance()) > 3 and warn_imbalance:
            log.warning(
                f"the largest class has {ratio:.1f} times the training images of the smallest: consider "
                "--class_weight auto, and judge the model by its balanced accuracy and macro-F1 (--mode test)"
            )
        return image_size or self.auto_image_size()

    def auto_image_size(self) -> int:
        """The median short side of the images, within [AUTO_SIZE_MIN, AUTO_SIZE_MAX], a multiple of 8."""
        short = int(np.median([min(r.size) for r in self.images]))
        return int(np.clip(short // 8 * 8, AUTO_SIZE_MIN, AUTO_SIZE_MAX))

    # ------------------------------------------------------------------ 2. decode

    def decode(self, records: list[ImageRecord], image_size: int, cache_dir: Path | None = None) -> Split:
        """Decode ``records`` in parallel into a :class:`Split`; files that fail are added to ``skipped``.

        The pixels are the training cache: uint8 at the training size, a quarter of the
        memory of float32, decoded once. With ``cache_dir`` they are a read-only memory
        map of a verified file in that folder (``cache.py``) instead of an array in RAM.
        """
        if cache_dir is None:
            x, errors = decode_images([self.root / r.relpath for r in records], image_size)
        else:
            x, errors = load_cached(Path(cache_dir), self.root, [(r.relpath, r.label) for r in records], image_size)
        self.skipped += [(r.relpath, error) for r, error in zip(records, errors) if error is not None]
        kept = [r for r, error in zip(records, errors) if error is None]
        y = np.array([r.label for r in kept], dtype=np.int32)
        return Split(x, y, Fingerprints.of([r.relpath for r in kept], y, x))

    # ------------------------------------------------------------------ 3. the copy rule

    def hold_out_copies(self, earlier: Fingerprints, later: Split) -> Split:
        """``later`` without its near copies of ``earlier`` rows (an earlier split), which are set aside.

        Near copies among both are linked in ``copies``; a group that reaches an
        ``earlier`` row belongs to that split.
        """
        both = earlier + later.fingerprints
        pairs = duplicates.near_pairs(both.hashes, both.thumbnails)
        for i, j in pairs:
            self.copies.link(both.files[i], int(both.labels[i]), both.files[j], int(both.labels[j]))
        keep = np.ones(len(later), dtype=bool)
        n = len(earlier.files)
        for group in duplicates.groups(len(both.files), pairs):
            first = min(group)
            if first < n:
                for j in (j for j in group if j >= n):
                    keep[j - n] = False
                    self.copies.set_aside.append((both.files[j], both.files[first]))
        return later.take(keep)

    def training_splits(self, image_size: int, cache_dir=None, shard=list) -> tuple[Split, Split]:
        """The train and validation splits (``shard`` picks this worker's share), validation
        images that copy training ones held out; what was skipped or set aside is logged."""
        train = self.decode(shard(self.split("train")), image_size, cache_dir)
        val = self.hold_out_copies(train.fingerprints, self.decode(shard(self.split("val")), image_size, cache_dir))
        self._log_findings()
        if len(train) == 0 or len(val) == 0:
            raise DataError(f"no readable images left in the train or validation split of {self.root}")
        return train, val

    def test_split(self, image_size: int, training: Fingerprints | None, cache_dir=None) -> Split:
        """The test split as test mode scores it: test images that copy a training or
        validation image (``training``: their fingerprints) are held out."""
        if training is None:
            log.warning(
                "the model file holds no fingerprints of its training images (saved by an older simple_cnn): "
                "test images that are near copies of training images cannot be set aside"
            )
            training = Fingerprints.none()
        test = self.hold_out_copies(training, self.decode(self.split("test"), image_size, cache_dir))
        if len(test) == 0:
            raise DataError(
                f"the test split of {self.root} holds no readable images: add images or retrain with a larger --test_split"
            )
        return test

    # ------------------------------------------------------------------ 4. what was found

    def imbalance(self) -> float:
        """The largest class over the smallest, in the training split."""
        per_class = np.bincount([r.label for r in self.split("train")], minlength=len(self.class_names))
        return float(per_class.max() / max(1, per_class.min()))

    def summary(self) -> dict:
        """What the results and the report carry about the dataset: counts, imbalance, copies, skipped files."""
        return {
            "dataset_path": str(self.root),
            "class_names": self.class_names,
            "images": self.counts(),
            "imbalance": round(self.imbalance(), 2),
            "duplicates": self.copies.report(self.class_names),
            "skipped": [{"file": printable(p), "reason": why} for p, why in self.skipped],
        }

    def describe(self) -> str:
        counts = self.counts()
        return (
            f"Dataset {self.root}: {len(self.class_names)} classes, {len(self.images)} images "
            f"(train {counts['train']}, validation {counts['val']}, test {counts['test']}, held out)"
        )

    def skipped_summary(self, limit: int = 3) -> str:
        """e.g. '2 unreadable files skipped (cats/a.jpg: truncated file; ...)', or ''."""
        if not self.skipped:
            return ""
        some = "; ".join(f"{printable(p)}: {why}" for p, why in self.skipped[:limit])
        more = ", ..." if len(self.skipped) > limit else ""
        n = len(self.skipped)
        return f"{n} unreadable file{'s' if n != 1 else ''} skipped ({some}{more})"

    def _log_findings(self) -> None:
        """Warn about skipped files and mislabelled copies; say how many copies were set aside."""
        if self.skipped:
            log.warning(self.skipped_summary())
        found = self.copies.report(self.class_names)
        if found["groups"]:
            log.info(
                f"Copies: {found['groups']} group(s) of identical or near-identical images ({found['images']} images); "
                f"{len(found['set_aside'])} set aside so that no copy straddles the splits"
            )
        for group in found["mixed_labels"]:
            log.warning(f"the same picture is filed under different classes: {', '.join(group)}; keep one")


def _inside(path: Path, root: Path) -> bool:
    """Does ``path``, its links resolved, lie inside ``root`` (links resolved too)?"""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _class_folders(root: Path) -> list[str]:
    """The class folders of ``root``, sorted; links that lead outside it are not followed."""
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist: give --dataset_path a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(
            f"dataset path {root} is a file, not a folder: give --dataset_path a folder with one sub-folder per class"
        )
    try:
        folders = sorted((e.name, e.is_symlink()) for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise DataError(f"cannot read the dataset folder {root}: permission denied") from None
    outside = [name for name, link in folders if link and not _inside(root / name, root)]
    if outside:
        log.warning(
            f"not following {len(outside)} class folder link(s) that lead outside {root}: {', '.join(map(printable, outside))}"
        )
    class_names = [name for name, _ in folders if name not in outside]
    for name in class_names:
        check_class_name(name, root)
    if len(class_names) < 2:
        found = f"only {printable(class_names[0])!r}" if class_names else "none"
        raise DataError(f"dataset folder {root} needs at least two class sub-folders (found {found})")
    return class_names


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
    dataset = ImageDataset.scan(path, val_split, test_split)
    size = image_size or dataset.auto_image_size()
    train = dataset.decode(dataset.split("train"), size)
    val = dataset.hold_out_copies(train.fingerprints, dataset.decode(dataset.split("val"), size))
    test = dataset.hold_out_copies(train.fingerprints + val.fingerprints, dataset.decode(dataset.split("test"), size))
    label_dtype = np.uint8 if len(dataset.class_names) <= 256 else np.int32
    x_train, y_train = np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y])
    return (x_train, y_train.astype(label_dtype)), (test.x, test.y.astype(label_dtype))


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

"""A dataset that knows its splits: scanning, splitting, decoding, and the copy rule.

A dataset is a folder whose sub-folders are the classes, sorted by name::

    flower_photos/
        daisy/      100080576_f52e8ee070_n.jpg ...
        dandelion/  ...

:class:`ImageDataset` owns its life cycle, in the order the modes use it:

1. :meth:`ImageDataset.scan` finds the classes and images (class folders or a labels
   file, ``sources.py``), checks each header (``images.py``), gives each image its split
   (``splits.py``: stratified by class, groups kept whole, a labels file's own split
   followed), and sets aside byte-identical copies that would straddle the splits.
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

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import duplicates, sources, splits
from .cache import load_cached
from .duplicates import Copies, Fingerprints
from .errors import DataError, UsageError, printable
from .images import READABLE, check_header, decode_images, try_each, usable_cpus
from .labels import LabelsFile
from .splits import SPLIT_SALT, SPLITS, Layout, split_of  # noqa: F401 (split_of and SPLIT_SALT: the dataset's API too)

log = logging.getLogger(__name__)
# The automatic training size: the median short side of the images, within these bounds.
AUTO_SIZE_MIN, AUTO_SIZE_MAX = 32, 112  # why 112: bench/README.md, "Tried after the 1x1 layer"


@dataclass
class ImageRecord:
    relpath: str  # e.g. "daisy/123.jpg", always with "/" separators
    label: int  # the class it counts for in splits and copies (multi-label: its rarest label)
    split: str | None  # None until the dataset gives it one (a labels file may)
    size: tuple[int, int]  # (width, height) from the header
    nbytes: int = 0  # the file's size in bytes
    labels: tuple[int, ...] = ()  # every label (multi-label); () means (label,)
    group: str | None = None  # --group_by's name for it, or the labels file's group column

    @property
    def all_labels(self) -> tuple[int, ...]:
        return self.labels or (self.label,)


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
    """A folder of images with their labels and a split per image (see the module's docstring)."""

    root: Path
    class_names: list[str]
    images: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    copies: Copies = field(default_factory=Copies)
    layout: Layout = field(default_factory=Layout)
    labels_file: LabelsFile | None = None
    multi_label: bool = False
    trained_on: int = 0  # test images not scored: the model trained on them (the dataset changed since)
    drawn: tuple[str, ...] = splits.HELD_OUT  # the splits drawn by the rule; split folders give the others

    # ------------------------------------------------------------------ 1. scan

    @classmethod
    def scan(cls, root, layout: Layout | None = None) -> ImageDataset:
        """Find the classes and images under ``root`` as ``layout`` says, and check each image's header.

        Class folders: hidden files and folders and files without an image suffix are
        ignored; images in nested sub-folders of a class belong to that class; links that
        lead outside the dataset are not followed. A labels file: ``labels.py``. Files
        that cannot be read are recorded in ``skipped``, never raised.
        """
        root, layout = Path(root), layout or Layout()
        source = sources.find(root, layout.labels, layout.multi_label)
        dataset = cls(root, source.class_names, [], source.skipped, layout=layout, labels_file=source.labels_file)
        dataset.multi_label, dataset.drawn = source.multi_label, source.drawn
        # Header checks wait on the disk more than on the CPU: twice the threads.
        found = source.candidates
        headers, errors = try_each(lambda c: check_header(root / c.relpath), found, threads=min(8, 2 * usable_cpus()))
        for c, primary, header, error in zip(found, source.primary_labels(), headers, errors):
            if error is not None:
                dataset.skipped.append((c.relpath, error))
            else:
                size, nbytes = header
                labels = c.labels if source.multi_label else ()
                dataset.images.append(ImageRecord(c.relpath, primary, c.split, size, nbytes, labels, c.group))
        dataset._refuse_empty_classes()
        dataset._give_splits()
        dataset._set_aside_identical_files()
        return dataset

    @classmethod
    def of_model(cls, root, metadata: dict, model_path, labels=None) -> ImageDataset:
        """The dataset at ``root`` labelled and split as the model ``metadata`` says; refused if its classes
        differ, or if the model's labels file changed (unless the file gives its own split)."""
        record = metadata.get("labels_file") if isinstance(metadata.get("labels_file"), dict) else None
        if record and labels is None:
            labels = Path(root) / str(record.get("name"))
            if not labels.is_file():
                raise UsageError(
                    f"{model_path} was trained with the labels file {printable(str(record.get('name')))}, "
                    f"which is not in {root}: give --labels FILE"
                )
        dataset = cls.scan(root, Layout.of_metadata(metadata, labels))
        if dataset.class_names != metadata["class_names"]:
            raise DataError(
                f"the classes of {dataset.root} ({', '.join(map(printable, dataset.class_names))}) differ from "
                f"those the model {model_path} was trained on ({', '.join(metadata['class_names'])}): "
                "use the dataset the model was trained on"
            )
        if record and dataset.labels_file.sha256 != record.get("sha256"):
            if not dataset.labels_file.has_split:
                raise DataError(
                    f"the labels file {labels} changed since {model_path} was trained with it (its SHA-256 differs), "
                    "so its splits would too: use the file the model was trained with, or train again"
                )
            log.warning(f"the labels file {labels} changed since {model_path} was trained with it: following its split column")
        return dataset

    def _give_splits(self) -> None:
        """Each image's split: a labels file's own, else stratified by class over units (images or groups)."""
        if self.layout.group_by is not None:
            pattern = re.compile(self.layout.group_by)
            for r in self.images:
                r.group = splits.group_of(r.relpath, pattern)
            if self.images and all(r.group is None for r in self.images):
                raise UsageError(
                    f"--group_by {self.layout.group_by!r} matches none of the {len(self.images)} image paths in {self.root} "
                    f"(e.g. {printable(self.images[0].relpath)!r}): the pattern is searched in the path inside the dataset"
                )
        free = [r for r in self.images if r.split is None]
        units, strata = [r.group or r.relpath for r in free], [r.label for r in free]
        for r, split in zip(free, splits.assign(units, strata, self.layout, self.drawn)):
            r.split = split

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
        per_class = Counter(label for r in self.images for label in r.all_labels)
        empty = [printable(n) for i, n in enumerate(self.class_names) if per_class[i] == 0]
        if empty and self.labels_file is not None:
            raise DataError(f"no readable image is labelled {', '.join(empty)} in {self.labels_file.path}: check its rows")
        if empty:
            raise DataError(
                f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {self.root} "
                f"hold no readable images ({READABLE}): add images or remove the folder"
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
        if (counts["val"] == 0 or counts["train"] == 0) and self.labels_file and self.labels_file.has_split:
            raise DataError(f"{self.labels_file.path} gives no image to the train or the val split: mark some rows so")
        if counts["val"] == 0 or counts["train"] == 0:
            aside = len(self.copies.set_aside)
            copies = f" once {aside} byte-identical copies of them were set aside" if aside else ""
            raise DataError(
                f"{self.root} has {len(self.images)} images{copies}, too few for a train and a validation "
                "split: add images or raise --val_split"
            )
        untrained = [printable(n) for n, count in self.per_class_counts()["train"].items() if count == 0]
        if untrained:
            raise UsageError(
                f"no training image is labelled {', '.join(untrained[:5])} in {self.root}: a class the model never sees "
                "cannot be learnt (add images of it, or move some to the train split)"
            )
        log.info(self.describe())
        self._log_groups()
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
        primary = np.array([r.label for r in kept], dtype=np.int32)
        return Split(
            x, self.targets(kept) if self.multi_label else primary, Fingerprints.of([r.relpath for r in kept], primary, x)
        )

    def targets(self, records: list[ImageRecord]) -> np.ndarray:
        """Multi-label targets: one row of 0s and 1s per image, ``[N, classes]`` float32."""
        y = np.zeros((len(records), len(self.class_names)), np.float32)
        for row, r in enumerate(records):
            y[row, list(r.all_labels)] = 1
        return y

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
        trained = set(training.files)
        records = [r for r in self.split("test") if r.relpath not in trained]
        self.trained_on = len(self.split("test")) - len(records)
        if self.trained_on:
            log.warning(
                f"{self.trained_on} test images of {self.root} were training or validation images of this model "
                "(images or labels were added, removed or renamed since): they are not scored"
            )
        test = self.hold_out_copies(training, self.decode(records, image_size, cache_dir))
        if len(test) == 0:
            own = self.labels_file is not None and self.labels_file.has_split
            fix = f"mark some rows of {self.labels_file.path} as test" if own else "retrain with a larger --test_split"
            raise DataError(f"the test split of {self.root} holds no readable images: add images or {fix}")
        return test

    # ------------------------------------------------------------------ 4. what was found

    def per_class_counts(self) -> dict[str, dict[str, int]]:
        """Images of each class in each split (a multi-label image counts for each of its labels)."""
        counts = {s: dict.fromkeys(self.class_names, 0) for s in SPLITS}
        for r in self.images:
            for label in r.all_labels:
                counts[r.split][self.class_names[label]] += 1
        return counts

    def imbalance(self) -> float:
        """The largest class over the smallest, in the training split."""
        per_class = list(self.per_class_counts()["train"].values())
        return float(max(per_class) / max(1, min(per_class)))

    def groups(self) -> dict | None:
        """Groups per split, and those holding more than a tenth of a split; None without groups."""
        if self.layout.group_by is None and not (self.labels_file and self.labels_file.has_group):
            return None
        units = [r.group or r.relpath for r in self.images]
        per_split = {s: len({u for u, r in zip(units, self.images) if r.split == s}) for s in SPLITS}
        large = splits.large_groups(units, [r.split for r in self.images])
        return {
            "by": self.layout.group_by or "the labels file's group column",
            "per_split": per_split,
            "ungrouped_images": sum(r.group is None for r in self.images),
            "large": [{"group": printable(g), "split": s, "share": round(share, 3)} for g, s, share in large],
        }

    def summary(self) -> dict:
        """What the results and the report carry about the dataset: counts, imbalance, copies, skipped files."""
        return {
            "dataset_path": str(self.root),
            "class_names": self.class_names,
            "images": self.counts(),
            "class_counts": self.per_class_counts(),
            "imbalance": round(self.imbalance(), 2),
            "duplicates": self.copies.report(self.class_names),
            "skipped": [{"file": printable(p), "reason": why} for p, why in self.skipped],
            "labels_rows_skipped": self.labels_file.skipped.as_dict() if self.labels_file else None,
            "groups": self.groups(),
            "multi_label": self.multi_label,
            "trained_on_not_scored": self.trained_on,
        }

    def describe(self) -> str:
        counts = self.counts()
        shares = "; ".join(
            f"{split} " + ", ".join(f"{printable(n)} {c}" for n, c in list(per.items())[:12]) + (", ..." if len(per) > 12 else "")
            for split, per in self.per_class_counts().items()
        )
        source = f" labelled by {self.labels_file.path.name}" if self.labels_file else ""
        return (
            f"Dataset {self.root}{source}: {len(self.class_names)} classes, {len(self.images)} images "
            f"(train {counts['train']}, validation {counts['val']}, test {counts['test']}, held out)"
            f"{', multi-label' if self.multi_label else ''}; per class: {shares}"
        )

    def _log_groups(self) -> None:
        if (found := self.groups()) is None:
            return
        per = found["per_split"]
        log.info(f"Groups ({found['by']}): train {per['train']}, validation {per['val']}, test {per['test']}")
        for big in found["large"][:3]:
            log.warning(
                f"the group {big['group']!r} holds {big['share']:.0%} of the {big['split']} split: its figures "
                "depend on that one group (more, smaller groups give steadier ones)"
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


def load_data(
    path, image_size: int | None = None, val_split: float = Layout.val_split, test_split: float = Layout.test_split, **layout
):
    """Load a dataset like ``keras.datasets.mnist.load_data()``.

    Returns ``(x_train, y_train), (x_test, y_test)``: uint8 image arrays of shape
    ``(N, image_size, image_size, 3)`` and uint8 label arrays of shape ``(N,)`` (multi-label:
    ``(N, classes)`` of 0s and 1s). The training part holds the train and validation splits;
    the test part is the same test split that ``--mode test`` uses, copies of training
    images set aside as there (see ``duplicates.py``). ``image_size`` defaults to the
    automatic size; ``layout``: ``labels``, ``multi_label``, ``group_by`` as the flags of
    the same names (``splits.Layout``).
    """
    dataset = ImageDataset.scan(path, Layout(val_split, test_split, **layout))
    size = image_size or dataset.auto_image_size()
    train = dataset.decode(dataset.split("train"), size)
    val = dataset.hold_out_copies(train.fingerprints, dataset.decode(dataset.split("val"), size))
    test = dataset.hold_out_copies(train.fingerprints + val.fingerprints, dataset.decode(dataset.split("test"), size))
    label_dtype = np.uint8 if len(dataset.class_names) <= 256 or dataset.multi_label else np.int32
    x_train, y_train = np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y])
    return (x_train, y_train.astype(label_dtype)), (test.x, test.y.astype(label_dtype))

"""Where a dataset's images and their labels come from: class folders, or a labels file.

Either way the result is a :class:`Source`: the class names and, per image, its path in
the dataset, its label indices, and the split or group a labels file gave it. Nothing is
decoded here; ``dataset.ImageDataset.scan`` checks the headers and gives the splits.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError, printable
from .files import atomic_dir, ensure_writable_dir
from .images import ignored_line, image_files
from .labels import LabelsFile, read_labels_file

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    relpath: str  # e.g. "daisy/123.jpg", always with "/" separators
    labels: tuple[int, ...]  # one index, or several (multi-label)
    split: str | None = None  # as a labels file gave it
    group: str | None = None  # as a labels file gave it


@dataclass
class Source:
    class_names: list[str]
    candidates: list[Candidate]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    labels_file: LabelsFile | None = None

    @property
    def multi_label(self) -> bool:
        return self.labels_file is not None and self.labels_file.multi_label

    def primary_labels(self) -> list[int]:
        """Each image's rarest label: the class it counts for when splits are stratified."""
        frequency = Counter(label for c in self.candidates for label in c.labels)
        return [min(c.labels, key=lambda label: (frequency[label], label)) for c in self.candidates]


def find(root: Path, labels=None, multi_label: bool | None = None) -> Source:
    """The images of the dataset at ``root``: from the labels file ``labels`` if given, else its class folders."""
    if labels is None:
        return class_folders(root)
    _check_root(root, "a folder holding the images the labels file names")
    table = read_labels_file(labels, root, multi_label)
    index = {name: i for i, name in enumerate(table.class_names)}
    candidates = [Candidate(r.relpath, tuple(sorted(index[label] for label in r.labels)), r.split, r.group) for r in table.rows]
    if table.skipped.count:
        log.warning(table.skipped.summary())
    return Source(table.class_names, candidates, labels_file=table)


def class_folders(root: Path) -> Source:
    """Each sub-folder of ``root`` is a class; images in its nested folders belong to it too.
    Links that lead outside the dataset (a class folder or an image) are not followed."""
    source, ignored = Source(_class_folder_names(root), []), Counter()
    for label, name in enumerate(source.class_names):
        for path in image_files(root / name, ignored):
            relpath = path.relative_to(root).as_posix()
            if path.is_symlink() and not inside(path, root):
                source.skipped.append((relpath, "a link to a file outside the dataset (not followed)"))
            else:
                source.candidates.append(Candidate(relpath, (label,)))
    if ignored:
        log.warning(ignored_line(ignored, root))
    return source


def check_class_name(name: str, root: Path) -> None:
    """Refuse a class folder name that could not travel safely into labels, CSV and JSON."""
    if printable(name) != name:
        raise DataError(
            f"the class folder {printable(name)!r} in {printable(str(root))} has a name that is not valid UTF-8 or holds "
            "a control character (newline, tab, escape): rename the folder"
        )


def inside(path: Path, root: Path) -> bool:
    """Does ``path``, its links resolved, lie inside ``root`` (links resolved too)?"""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _check_root(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist: give --dataset_path {what}")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is a file, not a folder: give --dataset_path {what}")


def _class_folder_names(root: Path) -> list[str]:
    """The class folders of ``root``, sorted; links that lead outside it are not followed."""
    _check_root(root, "a folder with one sub-folder per class (or --labels FILE)")
    try:
        folders = sorted((e.name, e.is_symlink()) for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise DataError(f"cannot read the dataset folder {root}: permission denied") from None
    outside = [name for name, link in folders if link and not inside(root / name, root)]
    if outside:
        log.warning(
            f"not following {len(outside)} class folder link(s) that lead outside {root}: {', '.join(map(printable, outside))}"
        )
    class_names = [name for name, _ in folders if name not in outside]
    for name in class_names:
        check_class_name(name, root)
    if len(class_names) < 2:
        found = f"only {printable(class_names[0])!r}" if class_names else "none"
        raise DataError(f"dataset folder {root} needs at least two class sub-folders (found {found}), or --labels FILE")
    return class_names


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

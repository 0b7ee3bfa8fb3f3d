"""Where a dataset's images and their labels come from: class folders (or split folders of
class folders), or a labels file.

Either way the result is a :class:`Source`: the class names and, per image, its path in
the dataset, its label indices, and the split or group a labels file gave it. Nothing is
decoded here; ``dataset.ImageDataset.scan`` checks the headers and gives the splits.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError, printable
from .files import atomic_dir, ensure_writable_dir
from .images import IMAGE_SUFFIXES, ignored_line, image_files, is_hidden
from .labels import LabelsFile, read_labels_file
from .splits import HELD_OUT, SPLITS, UNLABELLED, drawn_besides, folder_split

log = logging.getLogger(__name__)

# Not unpacked here: download_datasets.sh unpacks with the checks an archive from strangers needs (bombs, links, ..).
ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".7z", ".rar")


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
    drawn: tuple[str, ...] = HELD_OUT  # the splits the split rule draws; split folders give the others

    @property
    def multi_label(self) -> bool:
        return self.labels_file is not None and self.labels_file.multi_label

    def primary_labels(self) -> list[int]:
        """Each image's rarest label: the class it counts for when splits are stratified."""
        frequency = Counter(label for c in self.candidates for label in c.labels)
        return [min(c.labels, key=lambda label: (frequency[label], label)) for c in self.candidates]


def find(root: Path, labels=None, multi_label: bool | None = None) -> Source:
    """The images of the dataset at ``root``: from the labels file ``labels`` if given, else its class folders."""
    source = class_folders(root) if labels is None else labelled_by(root, labels, multi_label)
    for line in names_alike(source, labels or root):
        log.warning(line)
    return source


def labelled_by(root: Path, labels, multi_label: bool | None) -> Source:
    """The images the labels file ``labels`` names in the dataset folder ``root``."""
    _check_root(root, "a folder holding the images the labels file names")
    table = read_labels_file(_labels_path(Path(labels), root), root, multi_label)
    index = {name: i for i, name in enumerate(table.class_names)}
    candidates = [Candidate(r.relpath, tuple(sorted(index[label] for label in r.labels)), r.split, r.group) for r in table.rows]
    if table.skipped.count:
        log.warning(table.skipped.summary())
    source = Source(table.class_names, candidates, labels_file=table)
    if table.has_split:
        _draw_missing_splits(source, table.path)
    return source


def _draw_missing_splits(source: Source, path: Path) -> None:
    """A split column that names no test rows, or no validation rows (fastai's is_valid names none for test):
    those splits are drawn from its train rows by the usual rule, as from the train folder of split folders."""
    named = {c.split for c in source.candidates if c.split}
    missing = drawn_besides(named)
    if not missing or "train" not in named:
        return  # rows with an empty cell are drawn into both, as before
    source.drawn = missing
    for candidate in source.candidates:
        candidate.split = None if candidate.split == "train" else candidate.split
    log.info(f"{path} names no {' or '.join(source.drawn)} rows: {' and '.join(source.drawn)} images drawn from its train rows")


def _labels_path(labels: Path, root: Path) -> Path:
    """``labels`` as given or, where no such file is there, the dataset's own file of that name: in Docker,
    ``--labels labels.csv`` beside ``--dataset_path /app/datasets/xrays`` means the one in the dataset (as test
    mode looks for a model's labels file there)."""
    inside = root / labels
    if not labels.exists() and not labels.is_absolute() and inside.is_file():
        log.info(f"--labels {labels}: no such file here, so {inside} is read")
        return inside
    return labels


def names_alike(source: Source, where) -> list[str]:
    """A line for each set of class names that differ only in case, spaces or punctuation (``Cat``, ``cat``,
    ``sun_flower``, ``sunflower``): as a labels file is typed by hand or datasets are merged, usually one class
    written two ways, which the model is then taught to tell apart. Said, not merged: the user decides."""
    alike = defaultdict(list)
    for i, name in enumerate(source.class_names):
        folded = unicodedata.normalize("NFKC", name).casefold()
        alike[re.sub(r"[\W_]+", "", folded) or folded].append(i)  # names of symbols alone are compared whole
    counts = Counter(label for c in source.candidates for label in c.labels)
    named = [f"{printable(name)!r} ({counts[i]} image{'s' * (counts[i] != 1)})" for i, name in enumerate(source.class_names)]
    return [
        f"the classes {', '.join(named[i] for i in members)} of {printable(str(where))} differ only in case, spaces or "
        "punctuation: if they are one class, give them one name"
        for members in alike.values()
        if len(members) > 1
    ]


def class_folders(root: Path) -> Source:
    """Each sub-folder of ``root`` is a class; images in its nested folders belong to it too.
    Links that lead outside the dataset (a class folder or an image) are not followed.
    Split folders of class folders instead (:func:`split_folders`), or class folders of split folders
    (:func:`_split_folders_inside`): their splits are followed."""
    if given := split_folders(root):
        return _split_layout(root, given)
    source, ignored = Source(_class_folder_names(root), []), Counter()
    within = _split_folders_inside(root, source.class_names)
    for label, name in enumerate(source.class_names):
        for folder, split in within.get(name, {"": "train"}).items():
            _add_images(source, root, root / name / folder, label, ignored, None if split == "train" else split)
    if within:
        given = {split for folders in within.values() for split in folders.values()}
        source.drawn = drawn_besides(given)
        drawn = f"; {' and '.join(source.drawn)} images drawn from their train folders" if source.drawn else ""
        log.info(f"the class folders of {root} hold split folders ({', '.join(sorted(given))}): followed{drawn}")
    if ignored:
        log.warning(ignored_line(ignored, root))
    if named := [name for name in source.class_names if folder_split(name)]:
        # cat/, dog/ and test/ (the images to predict, or a test split of mixed classes) is a class named test
        log.warning(
            f"{root} has class folders named as a split or as images to predict ({', '.join(map(printable, named))}): "
            "if they hold no class of their own, move them out of the dataset folder"
        )
    return source


def _split_folders_inside(root: Path, class_names: list[str]) -> dict[str, dict[str, str]]:
    """{class: {folder: split}} where every class folder holds split folders alone (``cat/train/``,
    ``cat/test/``: the split inside the classes), each with a train folder and no image beside them; else {}."""
    found = {}
    for name in class_names:
        try:  # is_dir() follows links, and a link that loops raises: then this is not that layout
            entries = [(e.name, e.is_dir()) for e in os.scandir(root / name) if not is_hidden(e.name)]
        except OSError:
            return {}
        folders = {entry: folder_split(entry) for entry, folder in entries if folder}
        images = [entry for entry, folder in entries if not folder and Path(entry).suffix.lower() in IMAGE_SUFFIXES]
        splits = list(folders.values())
        if images or "train" not in splits or not set(splits) <= set(SPLITS) or len(set(splits)) < len(splits):
            return {}
        found[name] = folders
    return found


def split_folders(root: Path) -> dict[str, str]:
    """{folder: split} where every folder of ``root`` is named as a split (:func:`splits.folder_split`: ``train``,
    ``val``/``valid``/``validation``, ``test``, ``seg_train``, ``Testing``, ``training_set``...), one of them
    train, each holding folders (the layout of ImageNet, Ultralytics' classify datasets and many Kaggle ones);
    a folder of images to predict (``seg_pred``) may sit beside them, as :data:`splits.UNLABELLED`; else {}.
    A split folder besides train that holds no class folders holds unlabelled images too; a train folder
    without class folders is refused (they are not two classes either)."""
    if not root.is_dir():
        return {}
    try:
        given = {name: folder_split(name) for name in _subfolders(root)}
        splits = [split for split in given.values() if split != UNLABELLED]
        if None in given.values() or "train" not in splits or len(set(splits)) < len(splits):
            return {}
        flat = {name for name, split in given.items() if split != UNLABELLED and not _subfolders(root / name)}
    except OSError:
        return {}
    if any(given[name] == "train" for name in flat):  # Kaggle's dogs vs cats: train/cat.0.jpg, labels in the names
        raise DataError(
            f"dataset folder {root} holds split folders ({', '.join(map(printable, sorted(given)))}), but its "
            f"{printable(next(n for n in flat if given[n] == 'train'))} folder holds no class folders: sort its images "
            "into one folder per class, or give --labels FILE"
        )
    # A competition's test/ of images without class folders, beside train/'s class folders: not labelled.
    return {name: UNLABELLED if name in flat else split for name, split in given.items()}


def _split_layout(root: Path, given: dict[str, str]) -> Source:
    """The images of split folders of class folders: the classes are all their class folders; a split with
    no folder of its own (validation, test) is drawn from the train folder by the usual rule."""
    unlabelled = sorted(_unwrapped(root, folder, split) for folder, split in given.items() if split == UNLABELLED)
    given = {_unwrapped(root, folder, split): split for folder, split in given.items() if split != UNLABELLED}
    classes = {folder: _folders(root / folder) for folder in given}
    names = sorted(set().union(*classes.values()))
    if len(names) < 2:
        raise DataError(f"the split folders of {root} ({', '.join(sorted(given))}) need at least two class folders in all")
    source, ignored = Source(names, [], drawn=drawn_besides(given.values())), Counter()
    log.info(_split_layout_line(root, given, source.drawn, unlabelled))
    for folder, split in sorted(given.items()):
        for name in classes[folder]:
            _add_images(source, root, root / folder / name, names.index(name), ignored, None if split == "train" else split)
    if ignored:
        log.warning(ignored_line(ignored, root))
    return source


def _unwrapped(root: Path, folder: str, split: str) -> str:
    """The folder that holds a split's class folders: ``folder``, or the one folder inside it named as the
    same split, as Kaggle's archives unpack (``seg_train/seg_train``, ``training_set/training_set``)."""
    inner = _subfolders(root / folder)
    while len(inner) == 1 and folder_split(inner[0]) == split and not (root / folder / inner[0]).is_symlink():  # a loop
        folder = f"{folder}/{inner[0]}"
        inner = _subfolders(root / folder)
    return folder


def _split_layout_line(root: Path, given: dict[str, str], drawn: tuple[str, ...], unlabelled: list[str]) -> str:
    """What the output says of a split layout: the folders followed, the splits drawn from train and the
    flags that no longer apply, and the folders of unlabelled images left out."""
    train = next(folder for folder, split in given.items() if split == "train")
    held_out = [(folder, split) for folder, split in sorted(given.items()) if split != "train"]
    return "; ".join(
        [f"{root} holds the split folder{'s' * (len(given) > 1)} {', '.join(map(printable, sorted(given)))}: followed"]
        + [f"{split} images from {printable(folder)}/ (so --{split}_split is not used)" for folder, split in held_out]
        + ([f"{' and '.join(drawn)} images drawn from {printable(train)}/"] if drawn else [])
        + [
            f"{printable(f)}/ left out: images without class folders (--mode classify --input_path {printable(str(root / f))})"
            for f in unlabelled
        ]
    )


def _add_images(source: Source, root: Path, folder: Path, label: int, ignored: Counter, split: str | None = None) -> None:
    """The images of one class folder, as candidates of ``source`` (``split``: the one its split folder gives)."""
    for path in image_files(folder, ignored):
        relpath = path.relative_to(root).as_posix()
        if path.is_symlink() and not inside(path, root):
            source.skipped.append((relpath, "a link to a file outside the dataset (not followed)"))
        else:
            source.candidates.append(Candidate(relpath, (label,), split))


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
        if root.name.lower().endswith(ARCHIVES):
            raise DataError(f"dataset path {root} is an archive: unpack it first (unzip, tar -xf) and give --dataset_path {what}")
        raise DataError(f"dataset path {root} is a file, not a folder: give --dataset_path {what}")


def _class_folder_names(root: Path) -> list[str]:
    """The class folders of ``root``, sorted; links that lead outside it are not followed."""
    _check_root(root, "a folder with one sub-folder per class (or --labels FILE)")
    class_names = _folders(root)
    if len(class_names) == 1 and len(inner := _folders(root / class_names[0])) >= 2:  # as an archive often unpacks
        raise DataError(
            f"dataset folder {root} holds one folder, {printable(class_names[0])}, which holds {len(inner)} folders: "
            f"give --dataset_path {printable(str(root / class_names[0]))}"
        )
    if len(class_names) < 2:
        found = f"only {printable(class_names[0])!r}" if class_names else "none"
        raise DataError(f"dataset folder {root} needs at least two class sub-folders (found {found}), or --labels FILE")
    return class_names


def _subfolders(folder: Path) -> list[str]:
    """The names of the folders in ``folder`` that are not hidden (:func:`images.is_hidden`), sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))


def _folders(root: Path) -> list[str]:
    """The folders of ``root`` that are classes, sorted: not hidden, and not links that lead outside it."""
    try:
        folders = sorted((e.name, e.is_symlink()) for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))
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

"""Which split each image belongs to: stable hashes, every class in every split, groups kept whole.

Each image, or each group of images (``--group_by``, or a labels file's ``group`` column),
is a *unit*; a salted SHA-256 of the unit's name gives it a number in [0, 1) that depends
on nothing else (:func:`hash_fraction`).

- ``stratified`` (the default): the units of each class, ranked by that number, fill the
  test split, then the validation split, to the fractions of the class's images; the rest
  train. A class of at least :data:`MIN_STRATIFIED` units gets at least one validation
  and one test unit however small the fractions. An image can move to another split only
  when images of its own class are added, removed or renamed (the ranks near a boundary
  shift); other classes' images never move it.
- ``hash``: the number alone decides (``u < test_split``: test, and so on), so an image
  never moves whatever else changes, but a small class's share per split is left to
  chance. Models trained before stratification used it, and test mode follows them.

Whatever moves, a model's test mode never scores an image that model trained on: the
model file lists its training images (``dataset.ImageDataset.test_split``). In a
multi-label dataset an image's class for this purpose is its rarest label; a group's is
the class most of its images have.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

from .config import TrainConfig, check_group_pattern, check_splits

SPLIT_SALT = b"simple_cnn split v1"
SPLITS = ("train", "val", "test")  # also the order in which a group of copies claims a split
HELD_OUT = SPLITS[1:]  # the splits the rule draws from a dataset's images, unless its folders give them
SPLIT_METHODS = ("stratified", "hash")
MIN_STRATIFIED = 5  # units a class needs for at least one validation and one test unit
LARGE_GROUP = 0.1  # a group holding more than this share of a split is warned about
# The words a split goes by, in a labels file's split column or a split folder's name (lower case).
SPLIT_WORDS = {
    **dict.fromkeys(("train", "training", "trainset"), "train"),
    **dict.fromkeys(("val", "valid", "validation", "dev"), "val"),
    **dict.fromkeys(("test", "testing", "testset"), "test"),
}
# A split folder's name may hold these words beside its split, as Kaggle's datasets come: seg_train (Intel's
# scenes), training_set (cats and dogs), train_images.
FOLDER_WORDS = {"seg", "set", "data", "dataset", "images", "image", "imgs", "img", "split", "photos", "files"}
# A folder of images without labels beside the split folders (Intel's seg_pred): left out, not a split.
UNLABELLED = "unlabelled"
UNLABELLED_WORDS = {"pred", "predict", "prediction", "predictions", "unlabeled", "unlabelled", "inference"}


@dataclass(frozen=True)
class Layout:
    """How a dataset's images get their labels and splits: from the training settings, and
    recorded in the model (``as_metadata``) so that test mode splits the same way."""

    val_split: float = TrainConfig.val_split
    test_split: float = TrainConfig.test_split
    labels: str | None = None  # a labels file (labels.py) instead of class folders
    multi_label: bool | None = None  # None: as the labels file says
    group_by: str | None = None  # a regular expression over the path; its first group names the image's group
    split_method: str = "stratified"

    def __post_init__(self):
        check_splits(self.val_split, self.test_split)
        if self.group_by is not None:
            check_group_pattern(self.group_by)

    @classmethod
    def of_config(cls, config: TrainConfig) -> Layout:
        return cls(config.val_split, config.test_split, config.labels, config.multi_label, config.group_by)

    @classmethod
    def of_metadata(cls, metadata: dict, labels=None) -> Layout:
        """The layout a model was trained with (older models: hash splits of class folders);
        ``labels``: where its labels file is now, if it had one."""
        recorded = metadata.get("layout") if isinstance(metadata.get("layout"), dict) else {}
        method = recorded.get("split_method") if recorded.get("split_method") in SPLIT_METHODS else "hash"
        group_by = recorded.get("group_by") if isinstance(recorded.get("group_by"), str) else None
        multi = bool(metadata.get("multi_label"))
        return cls(metadata["val_split"], metadata["test_split"], labels, multi, group_by, method)

    def as_metadata(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("split_method", "group_by")}


def drawn_besides(given) -> tuple[str, ...]:
    """The held-out splits the rule draws when a dataset's folders or split column give the splits ``given``."""
    return tuple(s for s in HELD_OUT if s not in given)


def split_named(word: str) -> str | None:
    """The split a labels file's split cell names (``Training`` is train), or None."""
    return SPLIT_WORDS.get(word.strip().lower())


def folder_split(name: str) -> str | None:
    """The split a folder's name gives (``seg_train``, ``Testing``, ``training_set``), :data:`UNLABELLED`
    for a folder of images to predict (``seg_pred``), or None: one split word, and only
    :data:`FOLDER_WORDS` and numbers (``train2017``, ``test1``) beside it."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()  # TrainingSet
    words = [w for w in re.split(r"[^a-z]+", spaced) if w and w not in FOLDER_WORDS]  # numbers too: train2017, test1
    if len(words) != 1:
        return None
    return UNLABELLED if words[0] in UNLABELLED_WORDS else SPLIT_WORDS.get(words[0])


def hash_fraction(name: str) -> float:
    """A number in [0, 1) from a salted SHA-256 of ``name``: the same on every run and machine."""
    digest = hashlib.sha256(SPLIT_SALT + b"\0" + os.fsencode(name)).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(relpath: str, val_split: float, test_split: float) -> str:
    """The ``hash`` split of one unit, from its name alone."""
    u = hash_fraction(relpath)
    if u < test_split:
        return "test"
    if u < test_split + val_split:
        return "val"
    return "train"


def group_of(relpath: str, pattern: re.Pattern) -> str | None:
    """The group of an image: the pattern's first group (or whole match) in its path; None if it does not match."""
    match = pattern.search(relpath)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def assign(units: list[str], strata: list[int], layout: Layout, drawn=HELD_OUT) -> list[str]:
    """The split of each image, given its unit (its own path, or its group) and its class. ``drawn``: the
    splits drawn from these units besides train (a split the dataset gives otherwise, as its folders do, is not)."""
    if layout.split_method == "hash":
        return [split_of(u, layout.val_split * ("val" in drawn), layout.test_split * ("test" in drawn)) for u in units]
    size = Counter(units)
    votes: dict[str, Counter] = defaultdict(Counter)
    for unit, stratum in zip(units, strata):
        votes[unit][stratum] += 1
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for unit, counts in votes.items():
        by_stratum[counts.most_common(1)[0][0]].append(unit)
    chosen = {}
    for members in by_stratum.values():
        chosen |= _fill(sorted(members, key=hash_fraction), size, layout, drawn)
    return [chosen[u] for u in units]


def _fill(ranked: list[str], size: Counter, layout: Layout, drawn) -> dict[str, str]:
    """Units of one class in rank order: test first, then validation, to their shares of the images."""
    images = sum(size[u] for u in ranked)
    least = 1 if len(ranked) >= MIN_STRATIFIED else 0
    share = {"test": layout.test_split, "val": layout.val_split}
    wanted = {s: max(least, round(share[s] * images)) if s in drawn else 0 for s in ("test", "val")}
    taken = {"test": 0, "val": 0}
    chosen = {}
    for i, unit in enumerate(ranked):
        left = len(ranked) - i  # this unit and those after it: one at least stays for training
        split = next((s for s in ("test", "val") if taken[s] < wanted[s] and left > 1), "train")
        if split != "train":
            taken[split] += size[unit]
        chosen[unit] = split
    return chosen


def large_groups(groups: list[str], splits: list[str]) -> list[tuple[str, str, float]]:
    """(group, split, share) of each group holding more than LARGE_GROUP of its split's images."""
    per_split = Counter(splits)
    held = Counter(zip(groups, splits))
    return sorted(
        ((g, s, n / per_split[s]) for (g, s), n in held.items() if n / per_split[s] > LARGE_GROUP and per_split[s] >= 20),
        key=lambda t: -t[2],
    )

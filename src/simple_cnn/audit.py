"""Audit mode: which labels look wrong, and which images are certainly a problem.

1. **Out-of-sample probabilities for every image** by cross-fitting: the images (every
   split; a group stays whole) are dealt into :data:`FOLDS` folds by their stable hash,
   class by class; each fold is scored by a network trained on the other folds only, so
   no image is judged by a model that memorised its label. (In-sample losses are low
   exactly where the network memorised a wrong label.) Each fold trains for a share of
   ``--max_minutes``; a fold done is kept, so an interrupted audit resumes.
2. **Confident learning** (Northcutt, Jiang and Chuang, JAIR 2021): each class's threshold
   is the mean probability of that class over the images labelled with it; an image's
   confident class is its most likely class among those above their thresholds; the
   confident joint counts given against confident classes, and each off-diagonal cell
   ``(i, j)`` with ``n`` images flags the ``n`` images labelled ``i`` with the largest
   margin of ``j`` over ``i`` ("prune by noise rate"). The flagged images are ranked by
   their self-confidence, the probability of the given label, lowest first (cleanlab's
   default label quality score): ranked by the normalized margin (that probability minus
   the largest other) the list put the network's confident mistakes on correct labels above
   wrong labels whose true class it was less sure of (bench/README.md, "Auditing labels").
3. **Certain problems** beside them: copies filed under different classes (``duplicates.py``)
   and unusable images (``quality.py``).

Nothing in the dataset is changed: the audit writes ``label_issues.csv``, ``audit.json``
and ``audit.html`` to ``images_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import duplicates, interrupts, quality
from .backbones import SIMPLE
from .config import DEFAULT_IMAGES_DIR, TrainConfig, auto_batch_size
from .dataset import ImageDataset, Split
from .errors import DataError, UsageError, printable
from .files import atomic_output, ensure_writable_dir
from .splits import Layout, hash_fraction

log = logging.getLogger(__name__)

FOLDS = 4
AUDIT_MINUTES = 10.0  # flower_photos-sized data: four folds of two and a half minutes
AUDIT_SIZE_MAX = 64  # the audit's image side at most: fewer pixels, more epochs per fold in the budget
MIN_PER_CLASS = 2 * FOLDS  # images a class needs, so that every fold trains on and scores some of it
MIN_IMAGES = 50


def audit(dataset_path, images_dir=DEFAULT_IMAGES_DIR, config: TrainConfig | None = None):
    """Audit the dataset at ``dataset_path`` (class folders, or ``config.labels``) within
    ``config.max_minutes`` (default AUDIT_MINUTES); the results, and the files in ``images_dir``."""
    from . import audit_report
    from .results import AuditResult

    started = time.monotonic()
    config = config or TrainConfig()
    images_dir = ensure_writable_dir(Path(images_dir), "images")
    dataset = ImageDataset.scan(
        dataset_path, Layout(labels=config.labels, multi_label=config.multi_label, group_by=config.group_by)
    )
    check_auditable(dataset)
    size = min(dataset.auto_image_size(), AUDIT_SIZE_MAX) if config.image_size is None else config.image_size
    records = [r for split in ("train", "val", "test") for r in dataset.split(split)]
    decoded = dataset.decode(records, size)
    kept = {r.relpath: r for r in records}
    fold = fold_of([kept[f] for f in decoded.files])
    budget = 60 * (config.max_minutes or AUDIT_MINUTES)
    probabilities = cross_fit(decoded, fold, len(dataset.class_names), size, config, budget, images_dir)
    labels = label_issues(probabilities, decoded.y)
    m = quality.measures(decoded.x, [kept[f].size for f in decoded.files])
    unusable = quality.problems(m, size)
    mixed = mixed_copies(dataset, decoded)
    result = AuditResult(
        **dataset.summary(),
        audited_images=len(decoded),
        image_size=size,
        folds=FOLDS,
        label_issues=describe_issues(labels, probabilities, decoded, fold, dataset.class_names),
        image_issues=[{"file": printable(f), "problems": p} for f, p in zip(decoded.files, unusable) if p],
        mixed_copies=mixed,
        minutes=0.0,
    )
    result.minutes = round((time.monotonic() - started) / 60, 2)
    result.images_written = audit_report.write_all(images_dir, result, decoded, labels)
    return result


def check_auditable(dataset: ImageDataset) -> None:
    """Refuse, in one line, a dataset the audit cannot cross-fit."""
    if dataset.multi_label:
        raise UsageError("--mode audit checks single-label datasets; a multi-label labels file is not audited yet")
    per_class = Counter(r.label for r in dataset.images)
    small = [printable(n) for i, n in enumerate(dataset.class_names) if per_class[i] < MIN_PER_CLASS]
    if len(dataset.images) < MIN_IMAGES or small:
        which = f" (fewer in {', '.join(small[:5])})" if small else ""
        raise DataError(
            f"{dataset.root} holds {len(dataset.images)} images, too few to cross-fit over {FOLDS} folds: the audit needs "
            f"at least {MIN_IMAGES} images and {MIN_PER_CLASS} a class{which}"
        )


def fold_of(records) -> np.ndarray:
    """Each image's fold: the units (images, or groups) of each class ranked by their hash, dealt in turn."""
    unit_of = [r.group or r.relpath for r in records]
    fold, seen = np.zeros(len(records), dtype=np.int64), {}
    for label in sorted({r.label for r in records}):
        units = sorted(
            {u for u, r in zip(unit_of, records) if r.label == label} - set(seen), key=lambda u: hash_fraction("audit " + u)
        )
        seen |= {u: i % FOLDS for i, u in enumerate(units)}
    for i, unit in enumerate(unit_of):
        fold[i] = seen[unit]
    return fold


def cross_fit(data: Split, fold: np.ndarray, classes: int, size: int, config: TrainConfig, budget: float, images_dir):
    """Out-of-sample probabilities ``[N, classes]``: each fold's from a network trained on the others."""
    state = state_folder(images_dir, data, fold, size, config, budget)
    probabilities = np.zeros((len(data), classes), dtype=np.float32)
    for k in range(FOLDS):
        saved = state / f"fold{k}.npy"
        held = fold == k
        if saved.is_file() and (done := np.load(saved)).shape == (int(held.sum()), classes):
            log.info(f"Fold {k + 1} of {FOLDS}: kept from an interrupted audit")
            probabilities[held] = done
            continue
        log.info(f"Fold {k + 1} of {FOLDS}: training on {int((~held).sum())} images, scoring {int(held.sum())}")
        with interrupts.deferred():
            probabilities[held] = fit_and_score(data, ~held, held, classes, size, config, budget / FOLDS)
        with atomic_output(saved) as tmp, open(tmp, "wb") as f:
            np.save(f, probabilities[held])
    shutil.rmtree(state, ignore_errors=True)
    return probabilities


def state_folder(images_dir: Path, data: Split, fold, size, config: TrainConfig, budget: float) -> Path:
    """Where finished folds wait for a resumed audit: named by everything that must match."""
    identity = json.dumps([data.files, data.y.tolist(), fold.tolist(), size, config.seed, budget]).encode()
    folder = Path(images_dir) / ".audit-state" / hashlib.sha256(identity).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fit_and_score(data: Split, train: np.ndarray, held: np.ndarray, classes: int, size: int, config: TrainConfig, seconds):
    """Train the default network on ``train`` rows for ``seconds`` (the schedule chooses the epochs), score ``held``."""
    from .callbacks import SafePoints
    from .model import build_model, build_training_variables, view_probabilities
    from .pipeline import make_tf_dataset
    from .quiet import import_keras
    from .schedule import Plan, Schedule

    keras = import_keras()
    keras.utils.set_random_seed(config.seed)
    model = build_model(classes, size, augment=config.augment)
    model.compile(
        keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay), "sparse_categorical_crossentropy"
    )
    build_training_variables(model)
    batch = config.batch_for(size, SIMPLE)  # the default network's batch, whatever --backbone says
    x, y = data.x[train], data.y[train]
    batches = make_tf_dataset(x, y, batch, shuffle=True, seed=config.seed)
    # As in training: the default budget gives way to the fewest epochs (a small dataset learns), --max_minutes does not.
    plan = Plan(None, seconds, soft_budget=config.max_minutes is None, decay_start=max(config.warmup, config.hold))
    with contextlib.redirect_stdout(sys.stderr):
        model.fit(batches.repeat(), epochs=plan.horizon, shuffle=False, steps_per_epoch=math.ceil(len(y) / batch), verbose=0,
                  callbacks=[SafePoints(), Schedule(plan, config.learning_rate, config.warmup)])  # fmt: skip
    batches.release_arrays()
    scored = make_tf_dataset(data.x[held], data.y[held], auto_batch_size(size))
    return view_probabilities(model, scored, callbacks=[SafePoints()]).mean(axis=1)


def label_issues(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the suspected label errors by confident learning, the worst (lowest self-confidence; then margin) first."""
    classes = p.shape[1]
    thresholds = np.array([p[y == c, c].mean() if (y == c).any() else 1.0 for c in range(classes)])
    above = p >= thresholds
    confident = np.where(above, p, -1.0).argmax(axis=1)
    joint = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(joint, (y[above.any(axis=1)], confident[above.any(axis=1)]), 1)
    flagged = np.zeros(len(y), dtype=bool)
    for i in range(classes):
        mine = np.flatnonzero(y == i)
        for j in range(classes):
            if i != j and joint[i, j]:
                flagged[mine[np.argsort(-(p[mine, j] - p[mine, i]), kind="stable")[: joint[i, j]]]] = True
    found = np.flatnonzero(flagged)
    return found[np.lexsort((normalized_margin(p[found], y[found]), self_confidence(p[found], y[found])))]


def self_confidence(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The probability of the given label: the lower, the more likely the label is wrong."""
    return p[np.arange(len(y)), y]


def normalized_margin(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The probability of the given label minus the largest other: below zero, another class is more likely."""
    rows = np.arange(len(y))
    others = p.copy()
    others[rows, y] = -1.0
    return p[rows, y] - others.max(axis=1)


def describe_issues(found: np.ndarray, p: np.ndarray, data: Split, fold: np.ndarray, names: list[str]) -> list[dict]:
    """Each suspect: the given and suggested labels, the score and the evidence, worst first."""
    out = []
    for i in found:
        others = p[i].copy()
        others[data.y[i]] = -1.0
        suggested = int(others.argmax())
        p_given = float(p[i, data.y[i]])
        out.append(
            {
                "file": printable(data.files[i]),
                "given": names[data.y[i]],
                "suggested": names[suggested],
                "score": round(1 - p_given, 4),  # higher: more surely wrong (the ranking's order)
                "p_given": round(p_given, 4),
                "p_suggested": round(float(p[i, suggested]), 4),
                "fold": int(fold[i]),
            }
        )
    return out


def mixed_copies(dataset: ImageDataset, decoded: Split) -> list[list[str]]:
    """Groups of the same picture (identical or near copies) filed under different classes."""
    f = decoded.fingerprints
    for a, b in duplicates.near_pairs(f.hashes, f.thumbnails):
        dataset.copies.link(f.files[a], int(f.labels[a]), f.files[b], int(f.labels[b]))
    return dataset.copies.report(dataset.class_names)["mixed_labels"]

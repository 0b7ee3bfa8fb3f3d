"""Train mode: fit the CNN on the train split, choose the best epoch on the validation split."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gc
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import __version__, data, distribute, plots
from .errors import DataError, SimpleCNNError
from .export import write_tflite
from .files import ensure_writable_dir, write_json
from .model import build_model, check_model_path, save_model
from .quiet import import_keras, import_tensorflow


@dataclass
class TrainConfig:
    """Every training hyperparameter, in one place (the CLI flags map onto these)."""

    epochs: int = 20  # the learning rate decays to zero over these; 9 minutes for 3,670 photos on 2 cores
    batch_size: int = 32
    image_size: int | None = None  # None: the median short side of the images, in [32, 96]
    learning_rate: float = 2e-3  # the peak, after a warmup; then cosine decay (see learning_rate_schedule)
    warmup: float = 0.05  # the fraction of training spent warming the learning rate up
    weight_decay: float = 0.05  # AdamW's decoupled weight decay: +1 point on flowers-dev over Adam (2 seeds)
    patience: int = 10  # epochs without a better validation loss before stopping early
    val_split: float = 0.15
    test_split: float = 0.15
    seed: int = 42
    augment: bool = True
    max_minutes: float | None = None  # stop after the epoch that would overrun this budget
    distribute: str = "none"  # none, auto, mirrored or multiworker (see distribute.py)
    mixed_precision: bool = False  # mixed_float16 on GPUs; no effect on CPUs


HISTORY = "history.csv"
BEST_WEIGHTS = "best.weights.h5"


def training_dir(model_path: Path, suffix: str = "") -> Path:
    """Where an unfinished run keeps its state: a hidden folder beside the model file.

    ``suffix`` is "" except on multi-worker runs' non-chief workers (".worker1", ...).
    """
    return model_path.parent / f".{model_path.name}.training{suffix}"


@contextlib.contextmanager
def _exclusive(model_path: Path, suffix: str = ""):
    """Hold a lock for ``model_path``, so that two runs never train into the same state."""
    lock_path = model_path.parent / f".{model_path.name}{suffix}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SimpleCNNError(
                f"another training run is writing {model_path}: wait for it, or choose another --model_file_path"
            ) from None
        yield


def _resume_or_start(model_path: Path, run: dict, fresh: bool, log, suffix: str = "") -> Path:
    work = training_dir(model_path, suffix)
    if work.exists():
        try:
            previous = json.loads((work / "run.json").read_text())
        except (OSError, ValueError):
            previous = None
        if fresh or previous != run:
            why = "--fresh" if fresh else "it had other settings"
            log(f"Discarding the unfinished run in {work} ({why})")
            shutil.rmtree(work)
        else:
            try:  # the epoch BackupAndRestore will resume after
                done = json.loads((work / "backup" / "training_metadata.json").read_text())["epoch"]
            except (OSError, ValueError, KeyError):
                done = 0
            log(f"Resuming the unfinished run after epoch {done} (--fresh starts over)")
    work.mkdir(exist_ok=True)
    write_json(work / "run.json", run)
    return work


def read_history(path: Path) -> dict[str, list[float]]:
    """Keras' CSVLogger file as ``{metric: [value per epoch]}``; the last row per epoch wins."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = {int(r["epoch"]): r for r in csv.DictReader(f) if r.get("epoch", "").isdigit()}
    ordered = [rows[e] for e in sorted(rows)]
    keys = [k for k in (ordered[0] if ordered else {}) if k != "epoch"]
    return {k: [float(r[k]) for r in ordered] for k in keys}


def time_budget(model, minutes: float):
    """A Keras callback that ends training before an epoch would overrun ``minutes``:
    it stops when the time used plus the slowest epoch so far exceeds the budget.
    (Keras has no time-limit callback, so it is a LambdaCallback.)"""
    keras = import_keras()
    clock = {"start": time.monotonic(), "epoch": 0.0, "slowest": 0.0}

    def begin(epoch, logs=None):
        clock["epoch"] = time.monotonic()

    def end(epoch, logs=None):
        now = time.monotonic()
        clock["slowest"] = max(clock["slowest"], now - clock["epoch"])
        if now - clock["start"] + clock["slowest"] > minutes * 60:
            model.stop_training = True

    return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)


def learning_rate_schedule(peak: float, epochs: int, warmup: float, minutes: float | None = None):
    """A Keras callback setting the learning rate before every step: a linear warmup to
    ``peak`` over the first ``warmup`` of training, then a cosine decay to zero.

    In the tuning runs on flowers-dev (README, "Performance") a cosine decay over 34
    epochs reached 0.740 accuracy where Adam at 1e-3 with ReduceLROnPlateau and early
    stopping (our previous default) stopped at 0.697. Keras' ``CosineDecay`` counts
    steps only; this callback also follows ``--max_minutes``: progress is the larger of
    the epochs done and the budget used, so a run cut short by its budget still ends at
    a small learning rate.
    """
    keras = import_keras()

    class CosineWithWarmup(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.epoch = time.monotonic(), 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch  # counts from the first epoch of a resumed run, too

        def on_train_batch_begin(self, batch, logs=None):
            progress = (self.epoch + batch / (self.params.get("steps") or 1)) / epochs
            if minutes:
                progress = max(progress, (time.monotonic() - self.started) / (minutes * 60))
            progress = min(progress, 1.0)
            if progress < warmup:
                rate = peak * progress / warmup
            else:
                rate = peak * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
            self.model.optimizer.learning_rate.assign(rate)

    return CosineWithWarmup()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    dataset_path, model_path, images_dir, config: TrainConfig | None = None, fresh: bool = False, log=_log, cache_dir=None
) -> dict:
    """Train a model on ``dataset_path`` and save it to ``model_path``.

    Writes ``training_curves.png`` and ``examples_train_images.png`` to ``images_dir``
    and returns a summary (split sizes, files skipped, best epoch, wall time, ...).
    Progress goes to ``log`` and Keras' progress output to stderr.

    An interrupted run (Ctrl-C, a kill, a crash) resumes from its last completed epoch
    when called again with the same dataset and settings; ``fresh=True`` starts over.
    ``cache_dir`` keeps the decoded images on disk instead of in RAM (see ``data.load_images``).
    """
    model_path = check_model_path(model_path)
    ensure_writable_dir(model_path.parent, "model")
    config = config or TrainConfig()
    suffix = distribute.worker_suffix(config.distribute)
    with _exclusive(model_path, suffix):
        return _train(Path(dataset_path), model_path, Path(images_dir), config, fresh, suffix, log, cache_dir)


def _train(
    dataset_path: Path, model_path: Path, images_dir: Path, config: TrainConfig, fresh: bool, suffix: str, log, cache_dir
) -> dict:
    started = time.monotonic()
    images_dir = ensure_writable_dir(images_dir, "images")
    dataset = data.scan_dataset(dataset_path, config.val_split, config.test_split)
    counts = dataset.counts()
    if counts["val"] == 0 or counts["train"] == 0:
        raise DataError(
            f"{dataset.root} has {len(dataset.images)} images, too few for a train and a validation "
            "split: add images or raise --val_split"
        )
    image_size = config.image_size or data.auto_image_size(dataset)
    log(
        f"Dataset {dataset.root}: {len(dataset.class_names)} classes, {len(dataset.images)} images "
        f"(train {counts['train']}, validation {counts['val']}, test {counts['test']}, held out)"
    )
    keras = import_keras()
    tf = import_tensorflow()
    cluster = distribute.make_cluster(config.distribute)
    if cluster.workers > 1:
        role = " (chief)" if cluster.is_chief else ""
        log(f"Worker {cluster.worker_index} of {cluster.workers}{role}: reading its share of the files")
    x_train, y_train = data.load_images(dataset, distribute.shard(dataset.split("train"), cluster), image_size, cache_dir)
    x_val, y_val = data.load_images(dataset, distribute.shard(dataset.split("val"), cluster), image_size, cache_dir)
    if dataset.skipped:
        log(f"Warning: {dataset.skipped_summary()}")
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"no readable images left in the train or validation split of {dataset.root}")

    if config.mixed_precision:
        if tf.config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")  # the output layer stays float32
            log("Mixed precision: float16 compute, float32 weights and outputs")
        else:
            log("Warning: --mixed_precision has no effect without a GPU; training in float32")
    global_batch = config.batch_size * cluster.replicas
    learning_rate = config.learning_rate * cluster.replicas
    if cluster.kind != "none":
        log(
            f"Distributed ({cluster.kind}): {cluster.replicas} replicas on {cluster.workers} worker(s); "
            f"batch {config.batch_size} per replica, {global_batch} in all; learning rate scaled to {learning_rate:g}"
        )
    keras.utils.set_random_seed(config.seed)
    with cluster.strategy.scope() if cluster.strategy else contextlib.nullcontext():
        model = build_model(len(dataset.class_names), image_size, augment=config.augment)
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    distribute.patch_keras_for_multiworker(model, cluster)
    run = {  # what must match for a run to resume; --epochs and --max_minutes may change
        "dataset_path": str(dataset.root.resolve()),
        "class_names": dataset.class_names,
        "config": asdict(config) | {"image_size": image_size, "epochs": None, "max_minutes": None},
    }
    work = _resume_or_start(model_path, run, fresh, log, suffix)
    if not cluster.is_chief:
        # Every worker resumes from the chief's state (on the shared models volume), as
        # tf.keras' BackupAndRestore did: workers' own states can end one epoch apart.
        shutil.rmtree(work / "backup", ignore_errors=True)
        chief_backup = training_dir(model_path) / "backup"
        if chief_backup.is_dir():
            shutil.copytree(chief_backup, work / "backup")
    history = read_history(work / HISTORY)
    best_so_far = min(history["val_loss"]) if history.get("val_loss") else None
    callbacks = [
        # Order matters: the history row and best weights of an epoch are written
        # before BackupAndRestore marks the epoch as done.
        keras.callbacks.CSVLogger(str(work / HISTORY), append=True),
        keras.callbacks.ModelCheckpoint(
            str(work / BEST_WEIGHTS),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience),
        learning_rate_schedule(learning_rate, config.epochs, config.warmup, config.max_minutes),
        keras.callbacks.BackupAndRestore(str(work / "backup"), double_checkpoint=True),
    ]
    if config.max_minutes:
        callbacks.insert(0, time_budget(model, config.max_minutes))
    log(
        f"Training at {image_size}x{image_size} pixels, batch size {config.batch_size}, "
        f"{config.epochs} epochs, learning rate warming up to {learning_rate:g} then decaying to zero "
        f"(early stopping after {config.patience} epochs without improvement)"
    )
    fit_started = time.monotonic()
    # Keras writes its progress to stdout; we keep stdout for results (and --json), so
    # it goes to stderr: a live progress bar in a terminal, one line per epoch in logs.
    in_graph = cluster.strategy is not None
    train_ds = data.make_tf_dataset(x_train, y_train, global_batch, shuffle=True, seed=config.seed, in_graph=in_graph)
    val_ds = data.make_tf_dataset(x_val, y_val, global_batch, in_graph=in_graph)
    steps = {}
    if cluster.strategy is not None:  # every worker runs the same number of steps
        steps = {
            "steps_per_epoch": math.ceil(counts["train"] / global_batch),
            "validation_steps": math.ceil(counts["val"] / global_batch),
        }
        log(f"{steps['steps_per_epoch']} steps per epoch, {len(x_train)} training images on this worker")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model.fit(
                distribute.prepare_dataset(train_ds, cluster),
                validation_data=distribute.prepare_dataset(val_ds, cluster),
                epochs=config.epochs,
                shuffle=False,  # the tf.data pipeline shuffles
                callbacks=callbacks,
                verbose=1 if sys.stderr.isatty() else 2,
                **steps,
            )
    except tf.errors.OpError as e:
        if cluster.kind != "multiworker":
            raise
        detail = (e.message or type(e).__name__).strip().splitlines()[0][:200]
        raise SimpleCNNError(
            f"multi-worker training failed ({type(e).__name__}: {detail}): if a worker was lost, start every "
            "worker again with the same command to resume from the last completed epoch"
        ) from None
    history = read_history(work / HISTORY)  # every epoch, including those before a resume
    try:
        with warnings.catch_warnings():  # the checkpoint holds no optimizer state; we need none
            warnings.simplefilter("ignore", UserWarning)
            model.load_weights(work / BEST_WEIGHTS)
    except (OSError, ValueError):  # only if a kill hit the write of the best weights
        log("Warning: the best epoch's weights could not be read back; keeping the last epoch's")
    fit_seconds = time.monotonic() - fit_started
    best = int(np.argmin(history["val_loss"]))
    images_used = {"train": int(len(x_train)), "val": int(len(x_val))}
    if not cluster.is_chief:  # the chief writes the model, plots and metrics
        shutil.rmtree(work, ignore_errors=True)
        return {
            "mode": "train",
            "worker": cluster.worker_index,
            "workers": cluster.workers,
            "chief": False,
            "images_used": images_used,
            "steps_per_epoch": steps.get("steps_per_epoch"),
            "epochs_run": len(history["loss"]),
            "train_seconds": round(fit_seconds, 1),
            "wall_seconds": round(time.monotonic() - started, 1),
        }

    summary = {
        "mode": "train",
        "dataset_path": str(dataset.root),
        "class_names": dataset.class_names,
        "images": counts,
        "images_used": images_used,
        "skipped": [{"file": data.shown(p), "reason": r} for p, r in dataset.skipped],
        "image_size": image_size,
        "epochs_run": len(history["loss"]),
        "best_epoch": best + 1,
        "best_val_accuracy": float(history["val_accuracy"][best]),
        "best_val_loss": float(history["val_loss"][best]),
        "train_seconds": round(fit_seconds, 1),
        "config": asdict(config) | {"image_size": image_size},
        "model_file_path": str(model_path),
        "distribute": {
            "kind": cluster.kind,
            "replicas": cluster.replicas,
            "workers": cluster.workers,
            "global_batch": global_batch,
            "steps_per_epoch": steps.get("steps_per_epoch"),
        },
    }
    metadata = {
        "class_names": dataset.class_names,
        "image_size": image_size,
        "val_split": config.val_split,
        "test_split": config.test_split,
        "split_salt": data.SPLIT_SALT.decode(),
        "dataset_path": str(dataset.root),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "simple_cnn_version": __version__,
        "keras_version": keras.__version__,
        "training": {k: summary[k] for k in ("epochs_run", "best_epoch", "best_val_accuracy", "config")},
    }
    save_model(model, model_path, metadata)
    # Training is over: drop the compiled training, evaluation and prediction graphs so
    # that the LiteRT converter reuses their memory (43 MB lower peak RSS on flowers-dev).
    model.train_function = model.test_function = model.predict_function = None
    gc.collect()
    try:  # the LiteRT copy lets classify start without TensorFlow; without it, classify still works
        summary["tflite_file_path"] = str(write_tflite(model, model_path, metadata))
    except Exception as e:  # noqa: BLE001 (any converter failure only costs speed)
        log(f"Warning: could not write the LiteRT copy of the model ({str(e).splitlines()[0] if str(e) else e!r})")

    plots.training_curves(history, images_dir / "training_curves.png")
    pick = np.random.default_rng(config.seed).choice(len(x_train), size=min(9, len(x_train)), replace=False)
    labels = [dataset.class_names[y_train[i]] for i in pick]
    plots.image_grid(x_train[pick], labels, images_dir / "examples_train_images.png", "Training images")
    summary["images_written"] = [str(images_dir / "training_curves.png"), str(images_dir / "examples_train_images.png")]
    shutil.rmtree(work, ignore_errors=True)  # done: nothing left to resume
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    return summary

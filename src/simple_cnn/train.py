"""Train mode: fit the CNN on the train split, choose the best epoch on the validation split.

:func:`train` reads as its steps: scan the dataset, load the splits, build and compile
the model, fit it (the callbacks, the run state that lets a killed run resume), save
the outputs. Distribution is behind ``distribute.Cluster``; resuming is ``runstate.py``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import __version__, data, distribute, interrupts, metrics, plots, report
from .config import AUTO_EPOCHS, AUTO_EPOCHS_ON_CLUSTERS, DEFAULT_IMAGES_DIR, DEFAULT_MODEL, TrainConfig
from .errors import DataError
from .files import ensure_writable_dir
from .formats import LITERT_SHA256, check_model_path, save_model, write_tflite
from .model import build_model, view_probabilities
from .quiet import import_keras, import_tensorflow
from .results import TrainResult, WorkerResult
from .runstate import RunState

log = logging.getLogger(__name__)

__all__ = ["Plan", "TrainConfig", "train", "learning_rate_schedule", "time_budget"]


@dataclass
class Splits:
    """The decoded training and validation images (uint8), their labels and fingerprints.

    ``save_outputs`` sets the images to None once it has drawn them, to lower the run's peak memory.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprints: data.Fingerprints  # of the rows above, train then validation, for --mode test


def train(
    dataset_path,
    model_path=DEFAULT_MODEL,
    images_dir=DEFAULT_IMAGES_DIR,
    config: TrainConfig | None = None,
    fresh: bool = False,
    cache_dir=None,
) -> TrainResult | WorkerResult:
    """Train a model on ``dataset_path`` and save it to ``model_path``.

    Writes ``training_curves.png`` and ``examples_train_images.png`` to ``images_dir``.
    Progress goes to the ``simple_cnn`` logger and Keras' progress output to stderr.

    An interrupted run (Ctrl-C, a kill, a crash) resumes from its last completed epoch
    when called again with the same dataset and settings; ``fresh=True`` starts over.
    ``cache_dir`` keeps the decoded images on disk instead of in RAM (see ``data.load_images``).
    """
    started = time.monotonic()
    model_path = check_model_path(model_path)
    ensure_writable_dir(model_path.parent, "model")
    images_dir = ensure_writable_dir(Path(images_dir), "images")
    if cache_dir is not None:
        cache_dir = data.cache_folder(cache_dir)  # refused before any work
    config = config or TrainConfig()
    with RunState(model_path, distribute.worker_suffix(config.distribute)).lock() as run:
        dataset, image_size = scan(Path(dataset_path), config)
        config = replace(config, batch_size=config.batch_for(image_size))  # recorded as used
        cluster = distribute.make_cluster(config.distribute)
        for line in cluster.describe():
            log.info(line)
        splits = load_splits(dataset, image_size, cluster, cache_dir)
        with interrupts.deferred():  # from here TensorFlow works: a signal waits for a safe point
            model = build_and_compile(len(dataset.class_names), image_size, config, cluster)
            run.start(run_identity(dataset, config, image_size), fresh, follow_chief=not cluster.is_chief)
            fit_seconds, steps_per_epoch, epochs = fit(model, splits, dataset.counts(), config, cluster, run)
            history = run.history()
            if not cluster.is_chief:  # the chief writes the model, plots and metrics
                run.finish()
                return worker_result(cluster, splits, history, fit_seconds, steps_per_epoch, time.monotonic() - started)
            result = summarize(dataset, splits, image_size, config, cluster, history, model_path, fit_seconds, steps_per_epoch)
            result.config["epochs"] = epochs  # as chosen, when --epochs was not given
            result.config["calibrate"] = config.calibrates(len(splits.y_val))  # as decided, when not given
            if result.config["calibrate"]:
                interrupts.check()
                result.calibration = calibrate(model, splits.x_val, splits.y_val, config.batch_size)
            elif config.calibrate is None:
                too_few = f"{len(splits.y_val)} validation images are too few to fit a temperature"
                log.info(f"Not calibrated: {too_few} (--calibrate fits one)")
        with interrupts.deferred(finishing=True):  # a signal now lets the last files be written
            save_outputs(model, result, config, history, dataset, splits, images_dir)
            run.finish()
    result.wall_seconds = round(time.monotonic() - started, 1)
    return result


def scan(dataset_path: Path, config: TrainConfig) -> tuple[data.Dataset, int]:
    """Find the images and their splits; choose the image size."""
    dataset = data.scan_dataset(dataset_path, config.val_split, config.test_split)
    counts = dataset.counts()
    if counts["val"] == 0 or counts["train"] == 0:
        raise DataError(
            f"{dataset.root} has {len(dataset.images)} images, too few for a train and a validation "
            "split: add images or raise --val_split"
        )
    log.info(
        f"Dataset {dataset.root}: {len(dataset.class_names)} classes, {len(dataset.images)} images "
        f"(train {counts['train']}, validation {counts['val']}, test {counts['test']}, held out)"
    )
    if (ratio := imbalance(dataset)) > 3 and config.class_weight == "none":
        log.warning(
            f"the largest class has {ratio:.1f} times the training images of the smallest: consider "
            "--class_weight auto, and judge the model by its balanced accuracy and macro-F1 (--mode test)"
        )
    return dataset, config.image_size or data.auto_image_size(dataset)


def load_splits(dataset: data.Dataset, image_size: int, cluster: distribute.Cluster, cache_dir) -> Splits:
    """Decode this worker's share of the train and validation images (unreadable ones are skipped).

    Validation images that are near copies of training images are set aside (``duplicates.py``).
    """
    decoded = []
    for split in ("train", "val"):
        records = cluster.shard(dataset.split(split))
        x, y = data.load_images(dataset, records, image_size, cache_dir)
        decoded.append((x, y, data.Fingerprints.of(dataset, records, x, y)))
    (x_train, y_train, f_train), (x_val, y_val, f_val) = decoded
    keep = data.set_aside_near_copies(dataset, f_train, f_val)
    if not keep.all():
        x_val, y_val, f_val = x_val[keep], y_val[keep], f_val.take(keep)
    if dataset.skipped:
        log.warning(dataset.skipped_summary())
    report_copies(dataset)
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"no readable images left in the train or validation split of {dataset.root}")
    return Splits(x_train, y_train, x_val, y_val, f_train + f_val)


def report_copies(dataset: data.Dataset) -> None:
    """Log the copies found so far; warn about copies filed under different classes."""
    found = dataset.copies.report(dataset.class_names)
    if found["groups"]:
        log.info(
            f"Copies: {found['groups']} group(s) of identical or near-identical images ({found['images']} images); "
            f"{len(found['set_aside'])} set aside so that no copy straddles the splits"
        )
    for group in found["mixed_labels"]:
        log.warning(f"the same picture is filed under different classes: {', '.join(group)}; keep one")


def imbalance(dataset: data.Dataset) -> float:
    """The largest class over the smallest, in the training split."""
    per_class = np.bincount([r.label for r in dataset.split("train")], minlength=len(dataset.class_names))
    return float(per_class.max() / max(1, per_class.min()))


def class_weights(y_train: np.ndarray, num_classes: int) -> dict[int, float]:
    """Keras' ``class_weight`` for inverse class frequency: n / (classes * count), as
    scikit-learn's ``compute_class_weight("balanced")`` (which this calls)."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y_train)
    weights = compute_class_weight("balanced", classes=present, y=y_train)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(num_classes) if c not in present}


def calibrate(model, x_val: np.ndarray, y_val: np.ndarray, batch_size: int) -> dict:
    """Fit one temperature on the validation split and bake it into the network.

    The output layer computes softmax(W x + b); dividing W and b by the temperature T
    gives softmax((W x + b) / T), so every runtime and every export (LiteRT, SavedModel,
    ONNX) gives the calibrated probabilities with no extra step. T cannot change which
    class is most likely, so accuracy is unchanged.

    The temperature is fitted on each view's probabilities (the image and its mirror), as
    the network applies it, not on their average. The validation images go through
    ``predict`` in training-sized batches, as test mode's do: eager calls on 256 images at
    a time (and their mirror images) held 2.5 GiB more at their peak on flowers-dev than
    training itself.
    """
    val_ds = data.make_tf_dataset(x_val, y_val, batch_size)
    views = view_probabilities(model, val_ds, callbacks=[interrupts.safe_points()])
    val_ds.release_arrays()
    fitted = metrics.fit_temperature(views, y_val)
    before = metrics.expected_calibration_error(views.mean(axis=1), y_val)  # the network's output
    after = metrics.expected_calibration_error(metrics.rescale_views(views, fitted), y_val)  # and with T baked in
    if after >= before:  # a small validation split can fit a temperature that does no good: keep 1
        log.info(f"Not calibrated: a temperature of {fitted:.2f} would not lower the validation calibration error ({before:.3f})")
        return {"temperature": 1.0, "fitted_temperature": fitted, "val_ece_before": before, "val_ece_after": before}
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / fitted, bias / fitted])
    log.info(f"Calibrated on the validation split: temperature {fitted:.2f}, calibration error {before:.3f} -> {after:.3f}")
    return {"temperature": fitted, "fitted_temperature": fitted, "val_ece_before": before, "val_ece_after": after}


def build_and_compile(num_classes: int, image_size: int, config: TrainConfig, cluster: distribute.Cluster):
    """The network, with AdamW and the loss, inside the cluster's scope."""
    keras = import_keras()
    if config.mixed_precision:
        if import_tensorflow().config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")  # the output layer stays float32
            log.info("Mixed precision: float16 compute, float32 weights and outputs")
        else:
            log.warning("--mixed_precision has no effect without a GPU; training in float32")
    keras.utils.set_random_seed(config.seed)
    with cluster.scope():
        model = build_model(num_classes, image_size, augment=config.augment)
        model.compile(
            # the learning rate is set before every step (learning_rate_schedule)
            optimizer=keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    cluster.prepare_model(model)
    return model


def run_identity(dataset: data.Dataset, config: TrainConfig, image_size: int) -> dict:
    """What must match for a run to resume; --epochs, --max_minutes, --tensorboard_dir and --calibrate
    (which acts after training) may change."""
    may_change = {"epochs": None, "max_minutes": None, "tensorboard_dir": None, "calibrate": None}
    return {
        "dataset_path": str(dataset.root.resolve()),
        "class_names": dataset.class_names,
        "config": asdict(config) | {"image_size": image_size} | may_change,
    }


def fit(
    model, splits: Splits, counts: dict, config: TrainConfig, cluster: distribute.Cluster, run: RunState
) -> tuple[float, int, int | None]:
    """Train with the schedule, early stopping and the run's state: ``(seconds, steps per epoch, epochs planned)``.

    Afterwards ``model`` holds the best epoch's weights.
    """
    global_batch, learning_rate = cluster.scale(config.batch_size, config.learning_rate)
    weights = class_weights(splits.y_train, model.output_shape[-1]) if config.class_weight == "auto" else None
    plan = plan_training(config, cluster, run)
    decay_from = decay_start(config.warmup, config.hold)
    training_callbacks = [
        early_stopping(config.patience, plan, decay_from),
        learning_rate_schedule(learning_rate, plan, config.warmup, decay_from),
    ]
    if plan.epochs is None:
        training_callbacks.insert(0, auto_epochs(plan, run, decay_from))
    if plan.seconds:
        training_callbacks.insert(0, time_budget(plan))
    if config.tensorboard_dir and cluster.is_chief:
        training_callbacks.append(tensorboard_log(Path(config.tensorboard_dir)))
    log.info(
        f"Training at {splits.x_train.shape[1]}x{splits.x_train.shape[2]} pixels, batch size {config.batch_size}, "
        f"{plan.describe()}, learning rate warming up to {learning_rate:g}, held to {decay_from:.0%} "
        f"of training, then decaying to zero "
        f"(early stopping after {config.patience} epochs without improvement, counted once it decays)"
    )
    train_ds = data.make_tf_dataset(
        splits.x_train, splits.y_train, global_batch, shuffle=True, seed=config.seed, in_graph=cluster.in_graph
    )
    val_ds = data.make_tf_dataset(splits.x_val, splits.y_val, global_batch, in_graph=cluster.in_graph)
    releases = (train_ds.release_arrays, val_ds.release_arrays)
    steps = cluster.fit_steps(counts["train"], counts["val"], global_batch)
    if not steps:
        # One training iterator for the whole run, not a new one each epoch: with a new one,
        # TensorFlow ran about half the epochs on one core of two (bench/README.md, "Epochs of
        # two speeds"). Each epoch is still one pass, reshuffled: the pipeline batches a shuffle.
        train_ds = train_ds.repeat()
        steps = {"steps_per_epoch": math.ceil(len(splits.x_train) / global_batch)}
    log.info(f"{steps['steps_per_epoch']} steps per epoch, {len(splits.x_train)} training images on this worker")
    started = time.monotonic()
    # Keras writes its progress to stdout; we keep stdout for results (and --json), so
    # it goes to stderr: a live progress bar in a terminal, one line per epoch in logs.
    with cluster.failures(), contextlib.redirect_stdout(sys.stderr):
        model.fit(
            cluster.prepare_dataset(train_ds),
            validation_data=cluster.prepare_dataset(val_ds),
            epochs=plan.horizon,
            shuffle=False,  # the tf.data pipeline shuffles
            callbacks=[interrupts.safe_points(), *run.callbacks(training_callbacks)],
            class_weight=weights,
            verbose=1 if sys.stderr.isatty() else 2,
            **steps,
        )
    for release in releases:  # the datasets will not be read again (make_tf_dataset)
        release()
    run.restore_best(model)
    return time.monotonic() - started, steps["steps_per_epoch"], plan.epochs


def worker_result(cluster, splits: Splits, history: dict, fit_seconds: float, steps_per_epoch, wall_seconds: float):
    """What a non-chief worker reports: it trained, the chief saved."""
    return WorkerResult(
        worker=cluster.worker_index,
        workers=cluster.workers,
        images_used={"train": len(splits.x_train), "val": len(splits.x_val)},
        steps_per_epoch=steps_per_epoch,
        epochs_run=len(history["loss"]),
        train_seconds=round(fit_seconds, 1),
        wall_seconds=round(wall_seconds, 1),
    )


def summarize(dataset, splits, image_size, config, cluster, history, model_path, fit_seconds, steps_per_epoch) -> TrainResult:
    """The result of a chief's (or a single machine's) run, best epoch first."""
    best = int(np.argmin(history["val_loss"]))
    return TrainResult(
        dataset_path=str(dataset.root),
        class_names=dataset.class_names,
        images=dataset.counts(),
        imbalance=round(imbalance(dataset), 2),
        duplicates=dataset.copies.report(dataset.class_names),
        images_used={"train": len(splits.x_train), "val": len(splits.x_val)},
        skipped=dataset.skipped_list(),
        image_size=image_size,
        epochs_run=len(history["loss"]),
        best_epoch=best + 1,
        best_val_accuracy=float(history["val_accuracy"][best]),
        best_val_loss=float(history["val_loss"][best]),
        train_seconds=round(fit_seconds, 1),
        config=asdict(config) | {"image_size": image_size},
        model_file_path=str(model_path),
        distribute={
            "kind": cluster.kind,
            "replicas": cluster.replicas,
            "workers": cluster.workers,
            "global_batch": config.batch_size * cluster.replicas,
            "steps_per_epoch": steps_per_epoch,
        },
    )


def model_metadata(result: TrainResult, config: TrainConfig, history: dict) -> dict:
    """What the model file carries about itself (see ``formats.py``), the report's training part included."""
    return {
        "class_names": result.class_names,
        "image_size": result.image_size,
        "val_split": config.val_split,
        "test_split": config.test_split,
        "split_salt": data.SPLIT_SALT.decode(),
        "dataset_path": result.dataset_path,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "simple_cnn_version": __version__,
        "keras_version": import_keras().__version__,
        "calibration": result.calibration or {},
        "images": result.images_used | {"test": result.images["test"]},
        "training": {
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "train_seconds": result.train_seconds,
            "config": result.config,
            "history": {k: [round(float(v), 5) for v in values] for k, values in history.items() if k != "epoch"},
        },
    }


def save_outputs(model, result: TrainResult, config: TrainConfig, history: dict, dataset, splits: Splits, images_dir: Path):
    """The training curves, example images, the model file, its LiteRT copy and the report page.

    The pictures come first: the example grid is the last use of the decoded images, which
    are then released (``splits`` keeps their labels and fingerprints), so that the LiteRT
    converter's memory does not come on top of theirs at the run's peak.
    """
    curves = plots.training_curves(history, images_dir / "training_curves.png")
    names = dataset.class_names
    examples = plots.sample_grid(
        splits.x_train,
        lambda i: names[splits.y_train[i]],
        images_dir / "examples_train_images.png",
        "Training images",
        config.seed,
    )
    splits.x_train = splits.x_val = None
    metadata = model_metadata(result, config, history)
    # Training is over: drop the compiled training, evaluation and prediction graphs so
    # that the LiteRT converter reuses their memory.
    model.train_function = model.test_function = model.predict_function = None
    gc.collect()
    try:  # the LiteRT copy lets classify start without TensorFlow; without it, classify still works
        path, digest = write_tflite(model, result.model_file_path, metadata)
        result.tflite_file_path = str(path)
        metadata[LITERT_SHA256] = digest  # classify runs that copy only (formats.write_tflite)
    except Exception as e:  # noqa: BLE001 (any converter failure only costs speed)
        log.warning(f"could not write the LiteRT copy of the model ({str(e).splitlines()[0] if str(e) else e!r})")
    save_model(model, Path(result.model_file_path), metadata, splits.fingerprints.as_dict())
    page = report.write_report(
        images_dir,
        metadata,
        curves,
        {"Training examples": examples},
        skipped=result.skipped,
        duplicates=result.duplicates,
    )
    result.images_written = [str(curves), str(examples), str(page)]


@dataclass
class Plan:
    """How long training runs; the learning-rate schedule and the budget callbacks read it.

    ``epochs`` is None until it is chosen (without --epochs: by :func:`auto_epochs`, after
    the second epoch); ``seconds`` is the time budget, or None; ``soft``: the budget is the
    default one, which gives way to the fewest epochs (see :func:`auto_epochs`).
    """

    epochs: int | None
    seconds: float | None = None
    soft: bool = False

    @property
    def horizon(self) -> int:
        """The epochs the learning rate decays over: until they are chosen, the most there can be."""
        return self.epochs or AUTO_EPOCHS[1]

    def describe(self) -> str:
        budget = f"{self.seconds / 60:g} minutes" if self.seconds else None
        if self.epochs is None:
            return f"epochs chosen after the second to fill {budget} ({AUTO_EPOCHS[0]} to {AUTO_EPOCHS[1]})"
        return f"{self.epochs} epochs" + (f" or {budget}, whichever ends first" if budget else "")


def plan_training(config: TrainConfig, cluster: distribute.Cluster, run: RunState) -> Plan:
    """The plan of a run: --epochs, the epochs an interrupted run chose, or to be chosen."""
    minutes = config.budget_minutes
    seconds = minutes * 60 if minutes else None
    if config.epochs is not None:
        return Plan(config.epochs, seconds)
    if cluster.workers > 1:  # every worker must stop after the same epoch
        log.info(f"Several workers: {AUTO_EPOCHS_ON_CLUSTERS} epochs, not chosen by the clock (--epochs sets them)")
        return Plan(AUTO_EPOCHS_ON_CLUSTERS, config.max_minutes * 60 if config.max_minutes else None)
    if (chosen := run.planned_epochs()) is not None:  # a resumed run: its choice decides, not a restarted clock
        return Plan(chosen, config.max_minutes * 60 if config.max_minutes else None)
    return Plan(None, seconds, soft=config.max_minutes is None)


def auto_epochs(plan: Plan, run: RunState, settle_at: float):
    """A Keras callback that chooses ``plan.epochs`` and stops training after them.

    After the second epoch this process runs (the first also builds the graphs), it
    chooses as many epochs as fit in the budget at that epoch's speed, within
    ``AUTO_EPOCHS``. When even the fewest do not fit then and the budget is the default
    (``plan.soft``), the budget gives way: a large dataset trains its fewest epochs
    rather than stopping half-trained.

    Until ``settle_at`` of the chosen epochs (where the learning rate starts to decay:
    before it, the rate does not depend on their number), it chooses again after every
    epoch, at the median speed of the last three: a machine that speeds up gets the
    epochs it has time for, one that slows down fewer, never so few that the decay would
    have begun already. Each choice is kept in the run's state, so that a resumed run
    keeps it.
    """
    keras = import_keras()
    low, high = AUTO_EPOCHS

    class AutoEpochs(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.lengths = time.monotonic(), []

        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            now, done = time.monotonic(), epoch + 1
            self.lengths.append(now - self.began)
            first_choice = plan.epochs is None and len(self.lengths) == 2
            revising = plan.epochs is not None and plan.seconds and done < settle_at * plan.epochs
            if first_choice or revising:
                self.choose(done, now)
            if plan.epochs is not None and done >= plan.epochs:
                self.model.stop_training = True

        def choose(self, done: int, now: float):
            first = plan.epochs is None
            seconds = float(np.median(self.lengths[1:][-3:]))  # not the first: it also built the graphs
            fitting = done + max(0, int((plan.seconds - (now - self.started)) // seconds))
            decay_not_begun = 0 if first else math.ceil(done / settle_at)
            epochs = max(low, min(high, fitting), decay_not_begun)
            if epochs == plan.epochs:
                return
            plan.epochs = epochs
            if first and low > fitting and plan.soft:
                plan.seconds = None
            run.remember_epochs(plan.epochs)
            now_or_not = "" if first else " now"
            log.info(f"Training for {plan.epochs} epochs{now_or_not}: {seconds:.1f} s an epoch ({plan.describe()})")

    return AutoEpochs()


def early_stopping(patience: int, plan: Plan, decay_from: float):
    """Keras' ``EarlyStopping`` on the validation loss, counting only the epochs from
    where the learning rate starts to decay (``decay_from`` of ``plan.horizon``, which may
    change while the epochs are chosen): at the held peak rate the validation loss
    wanders, and the epochs that lower it most are the decaying ones, so stopping before
    them would end training at its worst point. (Keras' ``start_from_epoch`` is fixed
    when the callback is made; here it follows the plan.)"""
    keras = import_keras()

    class EarlyStoppingAfterTheHold(keras.callbacks.EarlyStopping):
        def on_epoch_end(self, epoch, logs=None):
            self.start_from_epoch = math.floor(decay_from * plan.horizon)
            super().on_epoch_end(epoch, logs)

    return EarlyStoppingAfterTheHold(monitor="val_loss", mode="min", patience=patience)


def time_budget(plan: Plan):
    """A Keras callback that ends training before an epoch would overrun ``plan.seconds``:
    it stops when the time used plus the slowest epoch so far (not counting the first,
    which also builds the graphs, once there are others) exceeds the budget. A soft
    budget waits for the epochs to be chosen. Keras has no time-limit callback."""
    keras = import_keras()

    class TimeBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.lengths = time.monotonic(), []

        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            now = time.monotonic()
            self.lengths.append(now - self.began)
            slowest = max(self.lengths[1:] or self.lengths)
            undecided = plan.soft and plan.epochs is None
            if plan.seconds and not undecided and now - self.started + slowest > plan.seconds:
                self.model.stop_training = True

    return TimeBudget()


def tensorboard_log(log_dir: Path):
    """A Keras callback writing each epoch's metrics and learning rate for TensorBoard.

    The same event files and names as ``keras.callbacks.TensorBoard`` (``train/`` and
    ``validation/`` runs, ``epoch_loss``, ``epoch_accuracy``, ``epoch_learning_rate``),
    but written with TensorFlow's own ``tf.summary.write``: Keras' callback calls
    ``tf.summary.scalar``, which TensorFlow takes from the ``tensorboard`` package, and
    the runtime image does not carry it (only ``tensorboard --logdir`` needs it).
    """
    keras, tf = import_keras(), import_tensorflow()
    from tensorflow.core.framework import summary_pb2

    scalar = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"), data_class=summary_pb2.DATA_CLASS_SCALAR
    )

    class TensorBoardScalars(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.writers = {run: tf.summary.create_file_writer(str(log_dir / run)) for run in ("train", "validation")}

        def on_epoch_end(self, epoch, logs=None):
            values = dict(logs or {})
            values["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())
            for name, value in values.items():
                run, name = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
                with self.writers[run].as_default():
                    tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch, metadata=scalar)
            for writer in self.writers.values():
                writer.flush()

        def on_train_end(self, logs=None):
            for writer in self.writers.values():
                writer.close()

    return TensorBoardScalars()


def decay_start(warmup: float, hold: float) -> float:
    """The fraction of training where the learning rate starts to decay: the end of the
    warmup, or of the hold (--hold) if that is later."""
    return max(warmup, hold)


def learning_rate_schedule(peak: float, plan: Plan, warmup: float, decay_from: float):
    """A Keras callback setting the learning rate before every step: a linear warmup to
    ``peak`` over the first ``warmup`` of training, held there until ``decay_from`` of
    training (:func:`decay_start`), then a cosine decay to zero.

    Not Keras' ``CosineDecay``: it counts steps of a fixed total only, and this callback
    follows the ``plan``: its epochs (chosen during training when --epochs is not given)
    and its time budget. Progress is the larger of the epochs done and the budget used,
    so a run cut short by its budget still ends at a small learning rate. (Why this
    schedule: bench/README.md, "How the recipe was chosen" and "Flat then cosine".)
    """
    keras = import_keras()

    class CosineWithWarmup(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.epoch = time.monotonic(), 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch  # counts from the first epoch of a resumed run, too

        def on_train_batch_begin(self, batch, logs=None):
            progress = (self.epoch + batch / (self.params.get("steps") or 1)) / plan.horizon
            if plan.seconds:
                progress = max(progress, (time.monotonic() - self.started) / plan.seconds)
            progress = min(progress, 1.0)
            if progress < warmup:
                rate = peak * progress / warmup
            elif progress < decay_from:
                rate = peak
            else:
                rate = peak * 0.5 * (1 + math.cos(math.pi * (progress - decay_from) / (1 - decay_from)))
            self.model.optimizer.learning_rate.assign(rate)

    return CosineWithWarmup()

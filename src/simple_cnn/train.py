"""Train mode: fit the CNN on the train split, choose the best epoch on the validation split.

:func:`train` reads as its steps: scan the dataset and decode its splits (``dataset.py``),
build and compile the model, fit it (``schedule.py`` keeps the time; ``runstate.py`` lets a
killed run resume), calibrate it, save the outputs. Distribution is behind
``distribute.Cluster``.
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

from . import __version__, calibration, distribute, interrupts, multilabel, report, transfer, unknown
from .cache import cache_folder
from .config import DEFAULT_IMAGES_DIR, DEFAULT_MODEL, ClusterConfig, TrainConfig
from .converters import write_tflite
from .dataset import SPLIT_SALT, ImageDataset, Split
from .files import ensure_free_space, ensure_writable_dir
from .formats import LITERT_SHA256, check_model_path, fingerprints_member, save_model
from .model import build_model, build_training_variables
from .pipeline import make_tf_dataset
from .quiet import import_keras, import_tensorflow
from .results import TrainResult, WorkerResult
from .runstate import RunState
from .splits import Layout

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train"]


def train(
    dataset_path,
    model_path=DEFAULT_MODEL,
    images_dir=DEFAULT_IMAGES_DIR,
    config: TrainConfig | None = None,
    fresh: bool = False,
    cache_dir=None,
    cluster_config: ClusterConfig | None = None,
) -> TrainResult | WorkerResult:
    """Train a model on ``dataset_path`` and save it to ``model_path``.

    Writes ``training_curves.png``, ``examples_train_images.png`` and ``report.html`` to
    ``images_dir``. Progress goes to the ``simple_cnn`` logger and Keras' progress output
    to stderr.

    An interrupted run (Ctrl-C, a kill, a crash) resumes from its last completed epoch
    when called again with the same dataset and settings; ``fresh=True`` starts over.
    ``cache_dir`` keeps the decoded images on disk instead of in RAM (``cache.py``);
    ``cluster_config``: where the other workers are, and how long to wait for them.
    """
    started = time.monotonic()
    model_path = check_model_path(model_path)
    ensure_writable_dir(model_path.parent, "model")
    images_dir = ensure_writable_dir(Path(images_dir), "images")
    cache_dir = cache_folder(cache_dir) if cache_dir is not None else None  # refused before any work
    config = config or TrainConfig()
    if config.tensorboard_dir:  # refused before any work too, not after the images are decoded
        ensure_writable_dir(Path(config.tensorboard_dir), "TensorBoard")
    with RunState(model_path, distribute.worker_suffix(config.distribute)).lock() as run:
        dataset = ImageDataset.scan(dataset_path, Layout.of_config(config))  # said before TensorFlow starts
        start = transfer.resolve_start(config.backbone, config.weights, config.init_from)  # downloads, if it must
        image_size = dataset.training_image_size(
            config.image_size or start.image_size, warn_imbalance=config.class_weight == "none"
        )
        config = replace(config, batch_size=config.batch_for(image_size, start.backbone))  # recorded as used
        cluster = distribute.make_cluster(config.distribute, (cluster_config or ClusterConfig()).worker_wait)
        for line in cluster.describe():
            log.info(line)
        splits = dataset.training_splits(image_size, cache_dir, cluster.shard)
        summary = dataset.summary()  # what was found, skipped and set aside
        with interrupts.deferred():  # from here TensorFlow works: a signal waits for a safe point
            model = build_and_compile(len(dataset.class_names), image_size, config, cluster, dataset.multi_label, start)
            run.start(run_identity(dataset, config, image_size, start), fresh, follow_chief=not cluster.is_chief)
            fitted = fit_from_start(model, start, splits, summary["images"], config, cluster, run)
            if not cluster.is_chief:  # the chief writes the model, plots and metrics
                run.finish()
                return worker_result(cluster, splits, fitted, time.monotonic() - started)
            result = summarize(summary, splits, image_size, config, cluster, fitted, model_path)
            detector = after_training(model, splits, config, result, dataset.multi_label)
            result.layout = layout_metadata(dataset) | {"backbone": start.backbone, "start": start.record()}
        with interrupts.deferred(finishing=True):  # a signal now lets the last files be written
            save_outputs(model, result, config, fitted.history, splits, images_dir, detector)
            run.finish()
    result.wall_seconds = round(time.monotonic() - started, 1)
    return result


def after_training(model, splits, config: TrainConfig, result: TrainResult, multi_label: bool):
    """On the validation split: the thresholds or the temperature (``calibration.py``), then the unknown
    detector on the calibrated outputs (``unknown.py``), which it returns; their records go into ``result``."""
    # Training is over: the compiled training and evaluation graphs go, so that the passes
    # after it and the LiteRT converter reuse their memory.
    model.train_function = model.test_function = model.predict_function = None
    gc.collect()
    if multi_label:
        result.thresholds = calibration.choose_thresholds(model, splits[1], config.batch_size, config.calibrate)
    else:
        result.calibration = calibration.calibrate_if_wanted(model, splits[1], config, result.config)
    gc.collect()  # the calibration's network and graph: Keras models sit in reference cycles
    detector, result.unknown = unknown.fit_on_splits(model, *splits)
    return detector


@dataclass
class Fitted:
    """What fitting produced, besides the model's best weights."""

    history: dict[str, list[float]]  # every epoch's metrics, those before a resume included
    seconds: float
    steps_per_epoch: int
    epochs: int | None  # as planned or chosen (None: not chosen yet when training ended)


def class_weights(y_train: np.ndarray, num_classes: int) -> dict[int, float]:
    """Keras' ``class_weight`` for inverse class frequency: n / (classes * count), as
    scikit-learn's ``compute_class_weight("balanced")`` (which this calls)."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y_train)
    weights = compute_class_weight("balanced", classes=present, y=y_train)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(num_classes) if c not in present}


def layout_metadata(dataset: ImageDataset) -> dict:
    """How the dataset was labelled and split, for the model file: test mode does the same again."""
    return {
        "layout": dataset.layout.as_metadata(),
        "labels_file": dataset.labels_file.record() if dataset.labels_file else None,
        "multi_label": dataset.multi_label,
        "class_counts": dataset.per_class_counts(),
    }


def build_and_compile(
    num_classes: int, image_size: int, config: TrainConfig, cluster: distribute.Cluster, multi_label=False, start=None
):
    """The network from its ``start`` (``transfer.py``; random weights by default), compiled, inside the cluster's scope."""
    keras = import_keras()
    if config.mixed_precision:
        if import_tensorflow().config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")  # the output layer stays float32
            log.info("Mixed precision: float16 compute, float32 weights and outputs")
        else:
            log.warning("--mixed_precision has no effect without a GPU; training in float32")
    keras.utils.set_random_seed(config.seed)
    start = start or transfer.Start("random", config.backbone)
    with cluster.scope():
        model = build_model(num_classes, image_size, augment=config.augment, multi_label=multi_label, backbone=start.backbone)
        transfer.apply_start(model, start)
    compile_model(model, config, cluster)
    return model


def compile_model(model, config: TrainConfig, cluster: distribute.Cluster) -> None:
    """AdamW and the loss (binary cross-entropy per class for a multi-label model), inside the cluster's scope;
    again whenever layers are frozen or unfrozen, as Keras requires."""
    keras = import_keras()
    multi_label = model.get_layer("probabilities").activation.__name__ == "sigmoid"
    with cluster.scope():
        model.compile(
            # the learning rate is set before every step (schedule.Schedule)
            optimizer=keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay),
            loss="binary_crossentropy" if multi_label else "sparse_categorical_crossentropy",
            # multi-label: the share of right label decisions at 0.5, under the history's usual name
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy") if multi_label else "accuracy"],
        )
        build_training_variables(model, multi_label)
    cluster.prepare_model(model)


def fit_from_start(model, start, splits, counts: dict, config: TrainConfig, cluster, run: RunState) -> Fitted:
    """:func:`fit`; from a pretrained start, the transfer recipe (``transfer.py``): the head alone for a few
    epochs, then every layer at a lower learning rate, in what is left of the time budget."""
    if not start.pretrained:
        return fit(model, *splits, counts, config, cluster, run)
    head_seconds = 0.0 if run.history() else fit_head(model, splits[0], config, cluster)  # a resumed run is past it
    transfer.unfreeze_keeping_batch_norm(model)
    budget = config.budget_minutes
    tuning = replace(
        config,
        learning_rate=config.learning_rate * transfer.FINE_TUNE_LEARNING_RATE,
        max_minutes=max(budget - head_seconds / 60, budget / 2) if budget else None,
    )
    compile_model(model, tuning, cluster)
    fitted = fit(model, *splits, counts, tuning, cluster, run)
    fitted.seconds += head_seconds
    return fitted


def fit_head(model, train: Split, config: TrainConfig, cluster) -> float:
    """The new head alone, everything below it frozen, for transfer.HEAD_EPOCHS epochs at the peak learning rate; its seconds."""
    from .callbacks import SafePoints

    transfer.freeze_below_head(model)
    compile_model(model, config, cluster)
    global_batch, learning_rate = cluster.scale(config.batch_size, config.learning_rate)
    model.optimizer.learning_rate = learning_rate
    log.info(f"Training the new head alone for {transfer.HEAD_EPOCHS} epochs, the layers below it frozen")
    ds = make_tf_dataset(train.x, train.y, global_batch, shuffle=True, seed=config.seed, in_graph=cluster.in_graph)
    started = time.monotonic()
    with cluster.failures(), contextlib.redirect_stdout(sys.stderr):  # as in fit
        model.fit(
            cluster.prepare_dataset(ds.repeat()),
            epochs=transfer.HEAD_EPOCHS,
            shuffle=False,  # as in fit: the tf.data pipeline shuffles
            steps_per_epoch=math.ceil(len(train) / global_batch),
            callbacks=[SafePoints()],
            verbose=1 if sys.stderr.isatty() else 2,
        )
    ds.release_arrays()  # fit makes its own datasets; this one would keep the decoded images (make_tf_dataset)
    seconds = time.monotonic() - started
    log.info(f"The head trained in {seconds:.0f} s ({seconds / (transfer.HEAD_EPOCHS * len(train)) * 1000:.1f} ms per image)")
    return seconds


def run_identity(dataset: ImageDataset, config: TrainConfig, image_size: int, start=None) -> dict:
    """What must match for a run to resume; --epochs, --max_minutes, --tensorboard_dir and --calibrate
    (which acts after training) may change."""
    may_change = {"epochs": None, "max_minutes": None, "tensorboard_dir": None, "calibrate": None}
    return {
        "dataset_path": str(dataset.root.resolve()),
        "class_names": dataset.class_names,
        "labels_sha256": dataset.labels_file.sha256 if dataset.labels_file else None,
        "start_sha256": start.sha256 if start else None,
        "config": asdict(config) | {"image_size": image_size} | may_change,
    }


def training_callbacks(config: TrainConfig, cluster: distribute.Cluster, run: RunState, learning_rate: float):
    """The plan, and the callbacks that act on it: the schedule, early stopping, TensorBoard."""
    from .callbacks import TensorBoardScalars
    from .schedule import EarlyStoppingAfterTheHold, Schedule, plan_training

    plan = plan_training(config, cluster.workers, run.planned_epochs())
    callbacks = [
        Schedule(plan, learning_rate, config.warmup, remember=run.remember_epochs),
        EarlyStoppingAfterTheHold(config.patience, plan),
    ]
    if config.tensorboard_dir and cluster.is_chief:
        callbacks.append(TensorBoardScalars(Path(config.tensorboard_dir)))
    return plan, callbacks


def fit(model, train: Split, val: Split, counts: dict, config: TrainConfig, cluster: distribute.Cluster, run: RunState) -> Fitted:
    """Train with the schedule, early stopping and the run's state; afterwards ``model`` holds the best epoch's weights.

    ``counts``: the images of each split in the whole dataset (every worker runs the same steps).
    """
    from .callbacks import SafePoints

    global_batch, learning_rate = cluster.scale(config.batch_size, config.learning_rate)
    weights = None
    if config.class_weight == "auto" and train.y.ndim == 2:
        log.warning("--class_weight auto weighs single-label classes; a multi-label model is trained unweighted")
    elif config.class_weight == "auto":
        weights = class_weights(train.y, model.output_shape[-1])
    plan, callbacks = training_callbacks(config, cluster, run, learning_rate)
    log.info(
        f"Training at {train.x.shape[1]}x{train.x.shape[2]} pixels, batch size {config.batch_size}, "
        f"{plan.describe()}, learning rate warming up to {learning_rate:g}, held to {plan.decay_start:.0%} "
        "of training, then decaying to zero "
        f"(early stopping after {config.patience} epochs without improvement, counted once it decays)"
    )
    train_ds = make_tf_dataset(train.x, train.y, global_batch, shuffle=True, seed=config.seed, in_graph=cluster.in_graph)
    val_ds = make_tf_dataset(val.x, val.y, global_batch, in_graph=cluster.in_graph)
    releases = (train_ds.release_arrays, val_ds.release_arrays)
    steps = cluster.fit_steps(counts["train"], counts["val"], global_batch)
    if not steps:
        # One training iterator for the whole run, not a new one each epoch: with a new one,
        # TensorFlow ran about half the epochs on one core of two (bench/README.md, "Epochs of
        # two speeds"). Each epoch is still one pass, reshuffled: the pipeline batches a shuffle.
        train_ds = train_ds.repeat()
        steps = {"steps_per_epoch": math.ceil(len(train) / global_batch)}
    log.info(f"{steps['steps_per_epoch']} steps per epoch, {len(train)} training images on this worker")
    started = time.monotonic()
    # Keras writes its progress to stdout; we keep stdout for results (and --json), so
    # it goes to stderr: a live progress bar in a terminal, one line per epoch in logs.
    with cluster.failures(), contextlib.redirect_stdout(sys.stderr):
        model.fit(
            cluster.prepare_dataset(train_ds),
            validation_data=cluster.prepare_dataset(val_ds),
            epochs=plan.horizon,
            shuffle=False,  # the tf.data pipeline shuffles
            callbacks=[SafePoints(), *run.callbacks(callbacks)],
            class_weight=weights,
            verbose=1 if sys.stderr.isatty() else 2,
            **steps,
        )
    for release in releases:  # the datasets will not be read again (pipeline.make_tf_dataset)
        release()
    run.restore_best(model)
    return Fitted(run.history(), time.monotonic() - started, steps["steps_per_epoch"], plan.epochs)


def worker_result(cluster, splits: tuple[Split, Split], fitted: Fitted, wall_seconds: float) -> WorkerResult:
    """What a non-chief worker reports: it trained, the chief saved."""
    return WorkerResult(
        worker=cluster.worker_index,
        workers=cluster.workers,
        images_used={"train": len(splits[0]), "val": len(splits[1])},
        steps_per_epoch=fitted.steps_per_epoch,
        epochs_run=len(fitted.history["loss"]),
        train_seconds=round(fitted.seconds, 1),
        wall_seconds=round(wall_seconds, 1),
    )


def summarize(summary: dict, splits, image_size, config, cluster, fitted: Fitted, model_path) -> TrainResult:
    """The result of a chief's (or a single machine's) run, best epoch first; ``summary``: the dataset's."""
    history = fitted.history
    best = int(np.argmin(history["val_loss"]))
    return TrainResult(
        **summary,
        images_used={"train": len(splits[0]), "val": len(splits[1])},
        image_size=image_size,
        epochs_run=len(history["loss"]),
        best_epoch=best + 1,
        best_val_accuracy=float(history["val_accuracy"][best]),
        best_val_loss=float(history["val_loss"][best]),
        train_seconds=round(fitted.seconds, 1),
        config=asdict(config) | {"image_size": image_size, "epochs": fitted.epochs},  # epochs as chosen
        model_file_path=str(model_path),
        distribute={
            "kind": cluster.kind,
            "replicas": cluster.replicas,
            "workers": cluster.workers,
            "global_batch": config.batch_size * cluster.replicas,
            "steps_per_epoch": fitted.steps_per_epoch,
        },
    )


def model_metadata(result: TrainResult, config: TrainConfig, history: dict) -> dict:
    """What the model file carries about itself (see ``formats.py``), the report's training part included."""
    return {
        "class_names": result.class_names,
        "image_size": result.image_size,
        "val_split": config.val_split,
        "test_split": config.test_split,
        "split_salt": SPLIT_SALT.decode(),
        "dataset_path": result.dataset_path,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "simple_cnn_version": __version__,
        "keras_version": import_keras().__version__,
        "calibration": result.calibration or {},
        **result.layout,
        "thresholds": result.thresholds,
        "unknown": result.unknown,
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


def save_outputs(model, result: TrainResult, config: TrainConfig, history: dict, splits, images_dir: Path, detector=None):
    """The training curves, example images, the model file (with the unknown ``detector``), its LiteRT copy
    (whose second output is the detector's distance) and the report page.

    The pictures come first: the example grid is the last use of the decoded images, which
    are then released (the splits keep their labels and fingerprints), so that the LiteRT
    converter's memory does not come on top of theirs at the run's peak.
    """
    from . import plots  # matplotlib loads once the memory peak is behind (bench/README.md, "Memory: MobileNetV3Small's batch")
    from .callbacks import state_bytes

    train_split, val_split = splits
    curves = plots.training_curves(history, images_dir / "training_curves.png")
    names = result.class_names
    examples = plots.sample_grid(
        train_split.x,
        lambda i: multilabel.label_text(train_split.y[i], names),
        images_dir / "examples_train_images.png",
        "Training images",
        config.seed,
    )
    train_split.x = val_split.x = None
    ensure_free_space(Path(result.model_file_path).parent, state_bytes(model), "the model and its LiteRT copy")
    metadata = model_metadata(result, config, history)
    try:  # the LiteRT copy lets classify start without TensorFlow; without it, classify still works
        network = unknown.inference_network(model, detector) if detector else model
        path, digest = write_tflite(network, result.model_file_path, metadata)
        result.tflite_file_path = str(path)
        metadata[LITERT_SHA256] = digest  # classify runs that copy only (converters.write_tflite)
    except Exception as e:  # noqa: BLE001 (any converter failure only costs speed)
        log.warning(f"could not write the LiteRT copy of the model ({str(e).splitlines()[0] if str(e) else e!r})")
    members = fingerprints_member(train_split.fingerprints + val_split.fingerprints)  # for --mode test's copy rule
    save_model(model, Path(result.model_file_path), metadata, members | (detector.as_member() if detector else {}))
    page = report.write_report(
        images_dir, metadata, curves, {"Training examples": examples}, skipped=result.skipped, duplicates=result.duplicates
    )
    result.images_written = [str(curves), str(examples), str(page)]

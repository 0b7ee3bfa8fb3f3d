"""The peers train_bench.py measures ours against, each trained with its own published recipe.

- ``tutorial``: the TensorFlow tutorial's CNN (https://www.tensorflow.org/tutorials/images/classification),
  with its augmentation and dropout (its best published setting).
- ``keras_io``: keras.io's "Image classification from scratch"
  (https://keras.io/examples/vision/image_classification_from_scratch/), a small Xception, the
  closest Keras example to ours (our network's ancestor).
- ``ultralytics``: Ultralytics' YOLO classify from scratch (``bench/ultralytics_run.py``), in a
  virtual environment of its own (``bench/peers/install.sh``): it needs PyTorch, which is no part
  of simple_cnn, its tests or CI.

Every peer trains on our split and is tested on the images ``--mode test`` scores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"  # made by bench/peers/install.sh, which marks it complete last


def tutorial_cnn(num_classes: int, image_size: int):
    """The TensorFlow tutorial's network, its augmentation inside the model as the tutorial has it."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            layers.RandomFlip("horizontal"),
            layers.RandomRotation(0.1),
            layers.RandomZoom(0.1),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )


def keras_io_network(num_classes: int, image_size: int):
    """keras.io's ``make_model``: an entry convolution, three residual blocks of separable
    convolutions (256, 512, 728), a 1024-wide separable convolution, dropout 0.25, logits."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(128, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    previous = x
    for size in (256, 512, 728):
        for _ in range(2):
            x = layers.Activation("relu")(x)
            x = layers.SeparableConv2D(size, 3, padding="same")(x)
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.add([x, layers.Conv2D(size, 1, strides=2, padding="same")(previous)])
        previous = x
    x = layers.SeparableConv2D(1024, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.25)(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x))


def keras_io_augmentation():
    """keras.io's augmentation, which it applies in the tf.data pipeline (its advice for training on CPUs)."""
    import keras
    from keras import layers

    return keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)])


@dataclass(frozen=True)
class KerasRecipe:
    """A Keras peer's recipe, as published: its network, image size, batch and Adam's rate."""

    network: Callable
    image_size: int
    batch_size: int
    learning_rate: float
    from_logits: bool
    pipeline_augmentation: Callable | None = None  # None: the network augments (the tutorial)


KERAS_RECIPES = {
    "tutorial": KerasRecipe(tutorial_cnn, 180, 32, 1e-3, from_logits=False),
    "keras_io": KerasRecipe(keras_io_network, 180, 128, 3e-4, from_logits=True, pipeline_augmentation=keras_io_augmentation),
}


def stop_at_the_clock(seconds: float):
    """A callback that ends training after the batch that uses up ``seconds``, mid-epoch if need
    be, as Ultralytics' ``time=`` does: keras.io's network at 180 pixels takes longer than a
    5-minute budget for one epoch on 2 cores, and our Schedule ends training only between epochs."""
    import keras

    class StopAtTheClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.batches = time.monotonic(), 0  # batches: what a cut epoch's speed counts

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if time.monotonic() - self.started > seconds:
                self.model.stop_training = True

    return StopAtTheClock()


def fit_keras_recipe(name: str, ds, minutes: float, quick: bool, seed: int | None = None) -> dict:
    """Train a Keras peer on ``ds``'s training split until ``minutes`` run out (its epochs cut by
    the clock, the last one mid-epoch; its learning rate its own and constant). ``quick``: at 64
    pixels (a smoke run). ``seed`` None: 42."""
    from simple_cnn.pipeline import make_tf_dataset
    from simple_cnn.quiet import import_keras, import_tensorflow
    from simple_cnn.schedule import Plan, Schedule

    keras, tf = import_keras(), import_tensorflow()
    recipe = KERAS_RECIPES[name]
    image_size = 64 if quick else recipe.image_size
    t = time.monotonic()
    train_split, val_split = ds.decode(ds.split("train"), image_size), ds.decode(ds.split("val"), image_size)
    decode_seconds = time.monotonic() - t
    keras.utils.set_random_seed(42 if seed is None else seed)
    model = recipe.network(len(ds.class_names), image_size)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=recipe.from_logits)
    model.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate), loss=loss, metrics=["accuracy"])
    feed = make_tf_dataset(train_split.x, train_split.y, recipe.batch_size, shuffle=True).repeat()
    if recipe.pipeline_augmentation:
        augment = recipe.pipeline_augmentation()
        feed = feed.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    clock = stop_at_the_clock(minutes * 60)
    t = time.monotonic()
    history = model.fit(  # one iterator for the run, as ours (bench/README.md, "Epochs of two speeds")
        feed,
        steps_per_epoch=math.ceil(len(train_split) / recipe.batch_size),
        validation_data=make_tf_dataset(val_split.x, val_split.y, recipe.batch_size),
        epochs=1000,
        verbose=0,
        # The clock only, its own rate: between epochs, the Schedule stops one that would not fit.
        callbacks=[Schedule(Plan(1000, minutes * 60), peak=None, warmup=0.0), clock],
    )
    if recipe.from_logits:  # classify and the tests read probabilities
        model = keras.Model(model.input, keras.layers.Softmax()(model.output))
    return {
        "model": model,
        "image_size": image_size,
        "decode_seconds": decode_seconds,
        "train_seconds": time.monotonic() - t,
        "epochs": len(history.history["loss"]),
        "train_images": len(train_split),
        "images_trained": min(clock.batches * recipe.batch_size, len(history.history["loss"]) * len(train_split)),
        "batch_size": recipe.batch_size,
    }


def export_split(ds, test_files: list[str], root: Path) -> Path:
    """Our split in the layout of torchvision's ImageFolder (what Ultralytics reads):
    ``root/{train,val,test}/CLASS/FILE``, the test folder holding only ``test_files`` (the
    images ``--mode test`` scores). Copies, not links, so nothing can reach the dataset."""
    if root.exists():
        shutil.rmtree(root)
    scored = set(test_files)
    wanted = {"train": ds.split("train"), "val": ds.split("val"), "test": [r for r in ds.split("test") if r.relpath in scored]}
    for split, records in wanted.items():
        for record in records:
            target = root / split / ds.class_names[record.label] / record.relpath.replace("/", "__")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ds.root / record.relpath, target)
    return root


def require_ultralytics() -> None:
    """Stop at once, in one line, where Ultralytics' environment was not installed."""
    if not (PEERS_VENV / "complete").exists():
        raise SystemExit(f"no complete {PEERS_VENV}: run bash bench/peers/install.sh first (Ultralytics needs PyTorch)")


def run_ultralytics(root: Path, minutes: float, image_size: int | None, work: Path, quick: bool, seed: int | None = None) -> dict:
    """Ultralytics trained and tested on ``root`` (:func:`export_split`) by ``ultralytics_run.py``
    in its own environment; its JSON row. ``image_size`` and ``seed`` None: its own defaults."""
    require_ultralytics()
    command = [str(PEERS_VENV / "bin" / "python"), str(HERE / "ultralytics_run.py"), "--data", str(root)]
    command += ["--minutes", str(minutes), "--work", str(work), *(["--imgsz", str(image_size)] if image_size else [])]
    command += ["--quick"] if quick else []
    command += ["--seed", str(seed)] if seed is not None else []
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(work / "config")}  # nothing to fetch, nothing in $HOME
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])

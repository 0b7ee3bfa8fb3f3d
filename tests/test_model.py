"""The model file: metadata round trip, atomic saving, clear errors for bad files."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from simple_cnn import formats
from simple_cnn import model as model_lib
from simple_cnn.errors import DataError, UsageError
from simple_cnn.files import atomic_output

METADATA = {"class_names": ["cat", "dog", "snake"], "image_size": 32, "val_split": 0.15, "test_split": 0.15}


@pytest.fixture(scope="module")
def untrained_model():
    return model_lib.build_model(3, 32)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_model_file_round_trip_keeps_metadata_and_predictions(tmp_path, untrained_model, suffix):
    path = tmp_path / f"m{suffix}"
    formats.save_model(untrained_model, path, METADATA)
    assert formats.read_metadata(path) == METADATA
    loaded, metadata = formats.load_model(path)
    assert metadata == METADATA
    x = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(untrained_model(x, training=False))
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), expected, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_a_failed_save_leaves_the_previous_model_intact(tmp_path, untrained_model, monkeypatch):
    path = tmp_path / "m.keras"
    formats.save_model(untrained_model, path, METADATA)
    before = path.read_bytes()

    def broken_save(self, filepath, *a, **k):  # writes half a file, then dies
        with open(filepath, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(untrained_model), "save", broken_save)
    with pytest.raises(OSError):
        formats.save_model(untrained_model, path, {**METADATA, "class_names": ["x", "y", "z"]})
    assert path.read_bytes() == before
    assert formats.read_metadata(path) == METADATA
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert target.stat().st_mode & 0o044, "outputs are readable like any file the user writes"


def test_bad_model_files_are_clear_errors(tmp_path, untrained_model):
    with pytest.raises(UsageError, match=r"\.keras"):
        formats.check_model_path(tmp_path / "model.pt")
    with pytest.raises(DataError, match="train one first"):
        formats.read_metadata(tmp_path / "missing.keras")

    good = tmp_path / "good.keras"
    formats.save_model(untrained_model, good, METADATA)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt or truncated"):
        formats.read_metadata(truncated)

    not_a_model = tmp_path / "text.h5"
    not_a_model.write_text("hello")
    with pytest.raises(DataError, match="corrupt or truncated"):
        formats.read_metadata(not_a_model)

    foreign = tmp_path / "foreign.keras"  # a Keras file not written by simple_cnn
    untrained_model.save(foreign)
    with pytest.raises(DataError, match="not saved by simple_cnn"):
        formats.read_metadata(foreign)

    broken_weights = tmp_path / "broken.keras"  # metadata fine, weights damaged
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken_weights, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            dst.writestr(item, payload[:100] if item.filename.endswith(".h5") else payload)
    with pytest.raises(DataError, match="cannot load the model"):
        formats.load_model(broken_weights)


def test_model_takes_raw_pixels_and_augments_only_in_training(untrained_model):
    x = np.full((2, 32, 32, 3), 255, dtype=np.float32)
    a = np.asarray(untrained_model(x, training=False))
    b = np.asarray(untrained_model(x, training=False))
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a.sum(axis=1), 1, atol=1e-5)
    assert [layer.name for layer in untrained_model.layers[1:3]] == ["mirror", "rescale"]


def test_prediction_is_the_mean_over_the_image_and_its_mirror(untrained_model):
    """Test-time flip averaging: an image and its mirror image get the same answer, the
    mean of what the network without the averaging says for each."""
    import keras

    x = np.random.default_rng(3).integers(0, 256, size=(4, 32, 32, 3)).astype(np.float32)
    mirrored = x[:, :, ::-1]
    np.testing.assert_allclose(untrained_model(x, training=False), untrained_model(mirrored, training=False), atol=1e-6)
    single = keras.Model(untrained_model.get_layer("rescale").input, untrained_model.get_layer("probabilities").output)
    expected = (np.asarray(single(x, training=False)) + np.asarray(single(mirrored, training=False))) / 2
    np.testing.assert_allclose(untrained_model(x, training=False), expected, atol=1e-6)
    assert not np.allclose(single(x, training=False), single(mirrored, training=False))  # the network alone is not symmetric


def test_grad_cam_reads_the_head_or_an_older_models_last_block(untrained_model):
    """Grad-CAM reads the 1x1 head before pooling; models trained before it existed still
    explain (their last block is read); a network of another kind is one clear error."""
    from simple_cnn import explain
    from simple_cnn.quiet import import_keras

    keras = import_keras()
    x = np.random.default_rng(4).integers(0, 256, size=(2, 32, 32, 3)).astype(np.uint8)
    heat = explain.heat_maps(untrained_model, x, np.array([0, 2]))
    assert heat.shape == (2, 2, 2) and 0 <= heat.min() <= heat.max() <= 1  # 32 / 16 = 2 cells a side

    plain = model_lib.build_model(3, 32, augment=False)
    pooled = keras.layers.GlobalAveragePooling2D()(plain.get_layer("b256_add").output)
    older = keras.Model(plain.input, keras.layers.Dense(3, activation="softmax")(pooled))
    assert "head_relu" not in {layer.name for layer in older.layers}
    assert explain.heat_maps(older, x, np.array([1, 1])).shape == (2, 2, 2)

    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(DataError, match="no layer 'head_relu'.*trained by simple_cnn"):
        explain.heat_maps(other, x, np.array([0, 0]))


class _Clock:
    """A clock the test moves: a busy machine cannot change what the schedule sees."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeModel:
    stop_training = False


def _epochs_run(schedule, clock: _Clock, lengths: list[float]) -> int:
    """Drive ``schedule``'s epoch hooks with epochs of ``lengths`` seconds; the epochs run."""
    model = _FakeModel()
    schedule.set_model(model)
    schedule.on_train_begin()
    for epoch, seconds in enumerate(lengths):
        schedule.on_epoch_begin(epoch)
        clock.now += seconds
        schedule.on_epoch_end(epoch)
        if model.stop_training:
            return epoch + 1
    return len(lengths)


class _Remembered:
    epochs = None

    def __call__(self, epochs):
        self.epochs = epochs


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_training_step_is_traced_once(monkeypatch, multi_label):
    """The optimizer's and metrics' variables exist before fit (model.build_training_variables):
    a training step that creates them while it is traced is traced a second time."""
    from simple_cnn.config import TrainConfig
    from simple_cnn.distribute import Cluster
    from simple_cnn.pipeline import make_tf_dataset
    from simple_cnn.train import compile_model

    network = model_lib.build_model(3, 32, augment=True, multi_label=multi_label)
    compile_model(network, TrainConfig(), Cluster("none", None))
    traced, step = [], type(network).train_step

    def counting_step(self, data):
        traced.append(1)
        return step(self, data)

    monkeypatch.setattr(type(network), "train_step", counting_step)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    y = np.eye(3, dtype=np.float32)[labels] if multi_label else labels
    history = network.fit(
        make_tf_dataset(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y, 16), epochs=2, shuffle=False, verbose=0
    )
    assert len(history.history["loss"]) == 2 and len(traced) == 1


def test_the_schedule_stops_before_an_epoch_would_overrun_the_budget():
    from simple_cnn.schedule import Plan, Schedule

    def epochs_run(seconds: float) -> int:
        clock = _Clock()
        schedule = Schedule(Plan(10, seconds), 1.0, 0.0, clock=clock)
        return _epochs_run(schedule, clock, [0.3] + [0.1] * 9)  # the first epoch also builds the graphs

    # A fifth epoch would end past 0.65 s (the slow first one is not taken for a typical
    # one once there are others); with ten minutes all ten run.
    assert epochs_run(0.65) == 4 and epochs_run(600) == 10


def test_early_stopping_counts_only_the_epochs_of_the_decay():
    """A validation loss that never improves stops training ``patience`` epochs after the
    decay starts, not after the first epochs at the held peak; the start follows the plan."""
    from simple_cnn.schedule import EarlyStoppingAfterTheHold, Plan

    def stopped_after(plan: Plan, choose_at: int | None = None, epochs: int | None = None) -> int:
        stopper, model = EarlyStoppingAfterTheHold(3, plan), _FakeModel()
        stopper.set_model(model)
        stopper.on_train_begin()
        for epoch in range(30):
            if epoch == choose_at:
                plan.epochs = epochs
            stopper.on_epoch_end(epoch, {"val_loss": 1.0})
            if model.stop_training:
                return epoch + 1
        return 30

    assert stopped_after(Plan(20, decay_start=0.5)) == 14  # the decay from epoch 11 (index 10): its loss, then 3 more
    assert stopped_after(Plan(None, decay_start=0.5), choose_at=2, epochs=12) == 10  # chosen: the decay from index 6
    assert stopped_after(Plan(None, decay_start=0.5)) == 16  # not chosen: the most epochs (25), the decay from index 12


def test_without_epochs_training_fills_its_budget_within_the_bounds():
    """The epochs are chosen after the second from its speed: as many as fit in the budget, 10 to 25."""
    from simple_cnn.config import AUTO_EPOCHS
    from simple_cnn.schedule import Plan, Schedule

    low, high = AUTO_EPOCHS

    def run(plan: Plan) -> tuple[int, _Remembered]:
        clock, remembered = _Clock(), _Remembered()
        return _epochs_run(Schedule(plan, 1.0, 0.0, remember=remembered, clock=clock), clock, [0.1] * high), remembered

    roomy = Plan(None, 60.0, decay_start=0.05)  # 600 epochs of 0.1 s would fit: the most, 25
    ran, remembered = run(roomy)
    assert ran == roomy.epochs == remembered.epochs == high

    between = Plan(None, 1.7, soft_budget=True, decay_start=0.05)  # 15 epochs of 0.1 s fit after the first two
    ran, _ = run(between)
    assert low <= between.epochs < high and ran <= between.epochs

    tight = Plan(None, 0.5, soft_budget=True, decay_start=0.05)  # only 5 fit: the default budget gives way to the fewest
    ran, _ = run(tight)
    assert ran == tight.epochs == low and tight.budget_seconds is None

    hard = Plan(None, 0.5, decay_start=0.05)  # an explicit --max_minutes does not give way
    ran, _ = run(hard)
    assert ran < low


def test_while_the_learning_rate_is_held_the_epochs_follow_the_machine_s_speed():
    """Until the decay starts, the epochs are chosen again after every epoch: a machine
    that speeds up gets more of them, one that slows down fewer, but never so few that
    the decay would have begun; without a hold the first choice stays."""
    from simple_cnn.config import AUTO_EPOCHS
    from simple_cnn.schedule import Plan, Schedule

    def epochs_run(decay_start: float, lengths: list[float]) -> tuple[Plan, int, _Remembered]:
        plan, clock, remembered = Plan(None, 4.0, soft_budget=True, decay_start=decay_start), _Clock(), _Remembered()
        ran = _epochs_run(Schedule(plan, 1.0, 0.0, remember=remembered, clock=clock), clock, lengths)
        return plan, ran, remembered

    low, high = AUTO_EPOCHS
    speeding_up = [0.25] * 3 + [0.04] * (high - 3)  # 16 epochs fit at the second's speed
    held, ran, remembered = epochs_run(0.5, speeding_up)
    assert held.epochs == ran == remembered.epochs == high  # the faster epochs leave time for the most
    not_held, ran, remembered = epochs_run(0.05, speeding_up)  # the decay starts after the warmup: the first choice stays
    assert not_held.epochs == ran == remembered.epochs == 16

    slowing_down = [0.1] * 6 + [1.0] * (high - 6)  # after 8 epochs only 9 fit, but the decay starts at 16
    slowed, ran, remembered = epochs_run(0.5, slowing_down)
    assert slowed.epochs == remembered.epochs == 16 and low < 16 < high
    assert ran == 9  # the budget still stops the run before a tenth epoch of 1 s would overrun its 4 s


def test_the_schedule_fills_its_budget_in_a_real_keras_fit():
    """The schedule chooses the epochs and stops Keras' fit after them (real epochs, real clock)."""
    import time

    from simple_cnn.config import AUTO_EPOCHS
    from simple_cnn.quiet import import_keras
    from simple_cnn.schedule import Plan, Schedule

    keras = import_keras()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    slow = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: time.sleep(0.05))
    plan = Plan(None, 60.0, decay_start=0.05)  # far more than 25 epochs of 0.1 s fit: the most
    x = np.zeros((8, 2), "float32")
    history = model.fit(x, x[:, :1], batch_size=4, epochs=plan.horizon, verbose=0, callbacks=[Schedule(plan, 0.01, 0.0), slow])
    assert plan.epochs == len(history.history["loss"]) == AUTO_EPOCHS[1]


def test_learning_rate_warms_up_is_held_then_decays_to_zero_by_epochs_or_by_the_clock():
    from simple_cnn.quiet import import_keras
    from simple_cnn.schedule import Plan, Schedule

    keras = import_keras()

    def rates(minutes, hold=0.0):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.5), loss="mse")
        seen = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda b, logs: seen.append(float(model.optimizer.learning_rate))
        )
        x = np.zeros((40, 2), "float32")
        schedule = Schedule(Plan(4, minutes and minutes * 60, decay_start=max(0.25, hold)), 1.0, 0.25)
        model.fit(x, x[:, :1], batch_size=4, epochs=4, verbose=0, callbacks=[schedule, record])  # 10 steps an epoch
        return np.array(seen)

    by_epochs = rates(None)
    assert len(by_epochs) == 40
    np.testing.assert_allclose(by_epochs[:10], np.arange(10) / 10)  # linear warmup over the first quarter
    assert by_epochs[10] == pytest.approx(1.0)  # the peak
    assert np.all(np.diff(by_epochs[10:]) < 0) and by_epochs[-1] < 0.01  # cosine decay towards zero
    by_clock = rates(1e-9)  # a budget already spent: the clock says training is over
    assert np.all(by_clock < 1e-6)
    held = rates(None, hold=0.5)  # flat then cosine: the peak until half of training
    np.testing.assert_allclose(held[:20], np.minimum(np.arange(20) / 10, 1.0))
    np.testing.assert_allclose(held[20:], 0.5 * (1 + np.cos(np.pi * np.arange(20) / 20)), atol=1e-6)


def test_a_released_pipeline_lets_go_of_its_arrays():
    """TensorFlow keeps the pipeline's gather function after the dataset is gone; once
    released, the decoded images it read are freed (training's peak memory, docs/train.md)."""
    import gc
    import weakref

    from simple_cnn.pipeline import make_tf_dataset

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10, dtype=np.int32)
    ds = make_tf_dataset(x, y, 4)
    xb, yb = next(iter(ds))
    assert np.array_equal(np.asarray(xb), x[:4].astype(np.float32)) and list(np.asarray(yb)) == [0, 1, 2, 3]
    freed = weakref.ref(x)
    ds.release_arrays()
    del x, ds, xb, yb
    gc.collect()
    assert freed() is None


def test_the_training_pipeline_passes_each_image_once_an_epoch_without_a_tuning_thread():
    """Repeated as training repeats it, each epoch is one reshuffled pass; and the pipeline
    runs no tf.data autotuning thread, which a deleted iterator waited for (Keras' fit
    returned up to a minute after the last epoch; bench/README.md)."""
    from simple_cnn.pipeline import make_tf_dataset

    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    ds = make_tf_dataset(x, np.arange(10, dtype=np.int32), 4, shuffle=True, seed=1)
    assert ds.options().autotune.enabled is False
    labels = np.concatenate([np.asarray(yb) for _, yb in ds.repeat().take(9)])  # 3 epochs of 3 batches
    epochs = [sorted(labels[i : i + 10]) for i in (0, 10, 20)]
    assert all(epoch == list(range(10)) for epoch in epochs)
    assert list(labels[:10]) != list(labels[10:20])  # reshuffled


def test_importing_tensorflow_loads_no_scikit_learn_or_matplotlib_until_they_are_used():
    """Keras imports scikit-learn and matplotlib for parts simple_cnn does not use: memory that
    train mode would hold throughout, and import time for every command (quiet.keras_extras_deferred);
    training imports matplotlib only to draw. Outside the CLI the garbage collector is not frozen
    (quiet.freeze_collector_after_import)."""
    import subprocess
    import sys

    code = (
        "import sys; from simple_cnn.quiet import import_keras; import simple_cnn.train, simple_cnn.classify, "
        "simple_cnn.serve, simple_cnn.export; import_keras(); "
        "assert not {'sklearn', 'matplotlib'} & set(sys.modules), 'loaded'; "
        "import gc; assert gc.get_freeze_count() == 0, 'frozen'; "  # a notebook's objects stay collectable (quiet.py)
        "from sklearn.metrics import f1_score; from simple_cnn import plots; "
        "print(f1_score([0, 1, 1], [0, 1, 1]), plots.plt.get_backend())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1.0", "Agg"]


ARENA_PROBE = """
import ctypes, os, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
if sys.argv[1] == "simple_cnn":
    from simple_cnn.quiet import import_tensorflow
    tf = import_tensorflow()
else:
    import tensorflow as tf
x = tf.random.uniform((32, 64, 64, 16))  # work in TensorFlow's thread pools
for _ in range(3):
    tf.nn.conv2d(x, tf.random.uniform((3, 3, 16, 16)), 1, "SAME").numpy()
with ThreadPoolExecutor(8) as pool:  # and in threads of Python's, each allocating from malloc
    list(pool.map(lambda _: [bytearray(4096) for _ in range(2000)], range(64)))
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))  # one per arena (glibc's malloc_info)
os.unlink(path)
"""


def _arenas(how: str, env: dict | None = None) -> int:
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE, how], capture_output=True, text=True, timeout=120, env={**environment, **(env or {})}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "malloc_info"), reason="glibc's malloc only")
def test_tensorflow_imported_through_simple_cnn_keeps_few_malloc_arenas():
    """Each arena keeps memory its threads freed: with glibc's default of up to eight per core,
    TensorFlow's thread pools hold more at training's peak (quiet.limit_malloc_arenas)."""
    from simple_cnn.quiet import MALLOC_ARENAS

    assert _arenas("simple_cnn") <= MALLOC_ARENAS
    assert _arenas("plain") > MALLOC_ARENAS  # the probe does make more threads allocate
    assert _arenas("simple_cnn", {"MALLOC_ARENA_MAX": "1"}) == 1  # the user's own setting wins

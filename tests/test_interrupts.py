"""Interrupted runs and concurrent writers: a killed training resumes, a killed save leaves
the previous model, two writers never leave a corrupt one.

Split from test_reliability.py so that the test workers share these slow tests out; docs/reliability.md's
"Reliability" table lists them too (test_reliability.test_reliability_table_is_in_step).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, make_shapes_dataset, run_cli, start_cli, wait_for_epochs

# ---------------------------------------------------------------- interrupted runs


def _start_training(work: Path, preexec_fn=None) -> subprocess.Popen:
    args = ("--mode", "train", "--dataset_path", "ds", "--epochs", "8", "--batch_size", "6", "--json")
    return start_cli(*args, cwd=work, preexec_fn=preexec_fn)


@pytest.fixture
def small_dataset(tmp_path):
    # Enough images for about 20 steps per epoch: a signal sent after epoch 2 of 8 lands
    # mid-training even on a busy machine (with 4 epochs, a test process starved for a
    # few seconds once sent it after training had ended).
    make_shapes_dataset(tmp_path / "ds", per_class=60)
    return tmp_path


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    "sig, code, fresh, inherited",
    [
        (signal.SIGINT, 130, False, None),
        # Started as a non-interactive shell starts a background job: SIGINT ignored. The
        # CLI still stops on it (before it set its own handler, it trained to the end).
        (signal.SIGINT, 130, False, _ignore_sigint),
        (signal.SIGKILL, -9, False, None),
        (signal.SIGTERM, 143, True, None),
    ],
    ids=["SIGINT-resume", "SIGINT-ignored-by-parent-resume", "SIGKILL-resume", "SIGTERM-fresh"],
)
def test_killed_training_resumes_from_its_last_epoch(small_dataset, sig, code, fresh, inherited):
    """Killed after 2 of 8 epochs, the same command resumes; with --fresh it starts over."""
    work = small_dataset
    proc = _start_training(work, inherited)
    wait_for_epochs(proc, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    if sig != signal.SIGKILL:
        last = err.strip().splitlines()[-1]
        assert last.startswith("simple-cnn: interrupted") and "resume" in last, err
        assert "Traceback" not in err
    assert not (work / "models" / "cnn_model.keras").exists()
    if inherited:  # what this variant is for is checked; resuming is the plain SIGINT's
        return

    args = ["--mode", "train", "--dataset_path", "ds", "--epochs", "8", "--batch_size", "6", "--json"]
    if fresh:  # fewer epochs are enough to show it starts over (--epochs may change between runs)
        args[args.index("8")] = "3"
    else:  # --calibrate acts after training: adding it does not start the run over
        args.append("--calibrate")
    again = run_cli(*args, *(["--fresh"] if fresh else []), cwd=work)
    assert again.returncode == 0, again.stderr
    epochs_now = sum("val_loss" in ln for ln in again.stderr.splitlines())
    if fresh:
        assert "Discarding the unfinished run" in again.stderr and epochs_now == 3
    else:
        resumed = re.search(r"Resuming the unfinished run after epoch (\d+)", again.stderr)
        assert resumed, again.stderr
        resumed_after = int(resumed.group(1))
        assert resumed_after >= 2 and epochs_now <= 8 - resumed_after
        assert json.loads(again.stdout)["calibration"]["fitted_temperature"] > 0
    assert json.loads(again.stdout)["epochs_run"] == (3 if fresh else 8)  # resumed, the history spans both runs
    assert not (work / "models" / ".cnn_model.keras.training").exists()


@pytest.fixture
def cli_signal_handlers():
    """The CLI's SIGINT and SIGTERM handlers in this process, Python's restored afterwards."""
    from simple_cnn import interrupts

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    yield interrupts
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_while_tensorflow_works_is_raised_at_the_next_step(cli_signal_handlers):
    """Inside ``deferred()`` a signal lands mid-step and is raised at the start of the next step.

    Raised where it lands, it once unwound through TensorFlow's own Python code at the
    start of an epoch, and glibc aborted the process ("free(): invalid next size").
    """
    interrupts = cli_signal_handlers
    keras = pytest.importorskip("keras")
    from simple_cnn.callbacks import SafePoints
    from simple_cnn.pipeline import make_tf_dataset

    seen = []

    class SignalDuringStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)
            if batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("went on")  # the handler ran (Python runs it at once) and raised nothing

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    # Training's own pipeline, not NumPy arrays: for those Keras builds a tf.data iterator with
    # a tuning thread, which the exception's traceback kept alive after the test, and whichever
    # later test of this worker collected it waited up to a minute (bench/README.md, "The test suite").
    batches = make_tf_dataset(np.zeros((40, 2), np.uint8), np.arange(40) % 3, 4)
    with pytest.raises(KeyboardInterrupt) as raised, interrupts.deferred():
        model.fit(batches, epochs=2, shuffle=False, verbose=0, callbacks=[SafePoints(), SignalDuringStep()])
    assert raised.value.args == (signal.SIGTERM,)
    assert seen == [0, 1, 2, "went on"]  # step 3 never began


def test_a_second_signal_is_raised_at_once_and_a_finishing_block_ends_normally(cli_signal_handlers):
    interrupts = cli_signal_handlers
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached = "after the first"
        os.kill(os.getpid(), signal.SIGINT)
        reached = "after the second"
    assert reached == "after the first"
    with interrupts.deferred(finishing=True):  # the last files: a signal is satisfied by their end
        os.kill(os.getpid(), signal.SIGTERM)
    interrupts.check()  # nothing left pending
    with pytest.raises(KeyboardInterrupt):  # outside deferred(): raised where it lands, as Python does
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_second_training_run_on_the_same_model_is_refused(small_dataset):
    """While one run trains into models/cnn_model.keras (it holds the lock), another is refused."""
    work = small_dataset
    (work / "models").mkdir()
    with open(work / "models" / ".cnn_model.keras.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running training holds
        second = run_cli("--mode", "train", "--dataset_path", "ds", "--epochs", "1", cwd=work)
    assert_one_line_error(second, 1, "another training run", "models/cnn_model.keras")


SAVE_LOOP = """
import sys, itertools
from simple_cnn.formats import save_model
from simple_cnn.model import build_model
path, tag = sys.argv[1], sys.argv[2]
model = build_model(3, 16)
meta = {"class_names": ["a", "b", "c"], "image_size": 16, "val_split": 0.15, "test_split": 0.15}
print("ready", flush=True)
for i in itertools.count():
    save_model(model, path, {**meta, "writer": tag, "round": i})
    if i == 0:
        print("saved", flush=True)
"""


def _assert_loadable(path: Path) -> dict:
    from simple_cnn.formats import load_model

    model, metadata = load_model(path)
    assert model.output_shape[-1] == 3
    return metadata


def test_kill_during_save_leaves_a_loadable_model(tmp_path):
    path = tmp_path / "m.keras"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    rng = np.random.default_rng(0)
    for attempt in range(3):  # killed at a different moment of the save loop each time
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(path), f"k{attempt}"], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout.readline().strip() == "ready"
        # Killed only after its first complete save: on a loaded machine one save can take
        # longer than the random delay, and the file would still be the previous writer's.
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(float(rng.uniform(0.0, 1.3)))
        proc.kill()
        proc.wait()
        assert _assert_loadable(path)["writer"] == f"k{attempt}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m.keras"]
    assert all(p.startswith(".m.") for p in leftovers)  # only a killed writer's temporary file, never the model


def test_two_writers_never_leave_a_corrupt_model(tmp_path):
    path = tmp_path / "m.keras"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path), tag], stdout=subprocess.PIPE, text=True, env=env)
        for tag in ("one", "two")
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for _ in range(6):
        time.sleep(0.4)
        if path.exists():
            assert _assert_loadable(path)["writer"] in ("one", "two")
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait()
    assert _assert_loadable(path)["writer"] in ("one", "two")

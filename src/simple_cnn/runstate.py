"""An unfinished training run's state, so that a killed run resumes where it stopped.

Everything about resuming lives here. While a run trains into ``models/cnn_model.keras``
it holds a lock (``models/.cnn_model.keras.lock``) and keeps its state in a hidden folder
beside the model (``models/.cnn_model.keras.training/``):

- ``run.json``: what must match for a later run to resume (dataset, classes, settings);
- ``history.csv``: Keras' ``CSVLogger``, one row per epoch, across resumes;
- ``best.weights.h5``: the best epoch's weights so far (``ModelCheckpoint``);
- ``plan.json``: the number of epochs chosen, when ``--epochs`` was not given;
- ``backup/``: Keras' ``BackupAndRestore``, the last completed epoch's full state.

The same command resumes after the last completed epoch; ``fresh=True`` or other settings
discard the state. On a multi-worker run the other workers keep theirs under a suffix
(``.training.worker1``) and start from the chief's backup.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import shutil
import warnings
from pathlib import Path

from .errors import SimpleCNNError
from .files import write_json
from .quiet import import_keras

log = logging.getLogger(__name__)


def training_dir(model_path: Path, suffix: str = "") -> Path:
    """Where an unfinished run keeps its state: a hidden folder beside the model file."""
    return model_path.parent / f".{model_path.name}.training{suffix}"


def read_history(path: Path) -> dict[str, list[float]]:
    """Keras' CSVLogger file as ``{metric: [value per epoch]}``; the last row per epoch wins.

    A row that does not parse (cut short by a kill or a full disk) is left out.
    """
    if not path.exists():
        return {}
    rows = {}
    with open(path, newline="", errors="replace") as f:
        for row in csv.DictReader(f):
            try:
                rows[int(row.pop("epoch"))] = {k: float(v) for k, v in row.items()}
            except (TypeError, ValueError, KeyError, AttributeError):
                continue
    ordered = [rows[e] for e in sorted(rows)]
    keys = list(ordered[0]) if ordered else []
    return {k: [r.get(k, float("nan")) for r in ordered] for k in keys}


def _drop_partial_last_line(path: Path) -> None:
    """Cut a half-written last row, so that CSVLogger's next row starts on a line of its own."""
    if path.exists():
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(text.rfind(b"\n") + 1)


class RunState:
    """The state folder of one training run into ``model_path`` (see the module docstring)."""

    HISTORY = "history.csv"
    BEST_WEIGHTS = "best.weights.h5"
    PLAN = "plan.json"

    def __init__(self, model_path: Path, suffix: str = ""):
        self.model_path, self.suffix = model_path, suffix
        self.folder = training_dir(model_path, suffix)

    @contextlib.contextmanager
    def lock(self):
        """Hold the model's lock, so that two runs never train into the same state."""
        lock_path = self.model_path.parent / f".{self.model_path.name}{self.suffix}.lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SimpleCNNError(
                    f"another training run is writing {self.model_path}: wait for it, or choose another --model_file_path"
                ) from None
            yield self

    def start(self, identity: dict, fresh: bool, follow_chief: bool = False) -> None:
        """Keep the state of an earlier run with the same ``identity``, or start afresh.

        ``follow_chief``: a non-chief worker resumes from the chief's backup (on the shared
        models volume), as tf.keras' BackupAndRestore did: workers' own states can end one
        epoch apart.
        """
        if self.folder.exists():
            try:
                previous = json.loads((self.folder / "run.json").read_text())
            except (OSError, ValueError, RecursionError):
                previous = None
            if fresh or previous != identity:
                why = "--fresh" if fresh else "it had other settings"
                log.info(f"Discarding the unfinished run in {self.folder} ({why})")
                shutil.rmtree(self.folder)
        self.folder.mkdir(exist_ok=True)
        write_json(self.folder / "run.json", identity)
        _drop_partial_last_line(self.folder / self.HISTORY)
        if follow_chief:
            shutil.rmtree(self.folder / "backup", ignore_errors=True)
            chief_backup = training_dir(self.model_path) / "backup"
            if chief_backup.is_dir():
                shutil.copytree(chief_backup, self.folder / "backup")

    def planned_epochs(self) -> int | None:
        """The epochs this run chose before it was interrupted (``remember_epochs``), if any."""
        try:
            return int(json.loads((self.folder / self.PLAN).read_text())["epochs"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None

    def remember_epochs(self, epochs: int) -> None:
        write_json(self.folder / self.PLAN, {"epochs": epochs})

    def history(self) -> dict[str, list[float]]:
        """Every epoch's metrics so far, including those before a resume."""
        return read_history(self.folder / self.HISTORY)

    def callbacks(self, training_callbacks: list) -> list:
        """``training_callbacks`` wrapped in the ones that record this run's state.

        Order matters: an epoch's history row and best weights are written before
        BackupAndRestore marks the epoch as done.
        """
        keras = import_keras()
        from .callbacks import DiskSpaceGuard, ResumeNote

        history = self.history()
        best_so_far = min(history["val_loss"]) if history.get("val_loss") else None
        return [
            DiskSpaceGuard(self.folder),  # first: before anything of the epoch is written
            keras.callbacks.CSVLogger(str(self.folder / self.HISTORY), append=True),
            keras.callbacks.ModelCheckpoint(
                str(self.folder / self.BEST_WEIGHTS),
                monitor="val_loss",
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=best_so_far,
            ),
            *training_callbacks,
            ResumeNote(),
            keras.callbacks.BackupAndRestore(str(self.folder / "backup"), double_checkpoint=True),
        ]

    def restore_best(self, model) -> None:
        """Load the best epoch's weights into ``model`` (they are the ones saved)."""
        try:
            with warnings.catch_warnings():  # the checkpoint holds no optimizer state; we need none
                warnings.simplefilter("ignore", UserWarning)
                model.load_weights(self.folder / self.BEST_WEIGHTS)
        except Exception as e:  # noqa: BLE001 (h5py and Keras raise many kinds on a truncated file: a kill, a full disk)
            detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            log.warning(f"the best epoch's weights could not be read back ({detail}); keeping the last epoch's")

    def finish(self) -> None:
        """Training is over: nothing left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)

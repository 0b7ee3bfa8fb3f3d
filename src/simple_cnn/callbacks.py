"""The Keras callbacks that are not the schedule's: safe points for signals, the resume
note and the TensorBoard log. Importing this module imports Keras: the modes import it
only where they run Keras."""

from __future__ import annotations

import logging
from pathlib import Path

from . import interrupts
from .quiet import import_keras, import_tensorflow

keras, tf = import_keras(), import_tensorflow()
log = logging.getLogger(__name__)


class SafePoints(keras.callbacks.Callback):
    """Raises a recorded signal at the start of each step and epoch (``interrupts.py``).

    Begin hooks, not end hooks: Keras runs batch-end hooks on a thread of its own when it
    can, and an overridden end hook would make it wait for every step's results.
    """

    def on_epoch_begin(self, epoch, logs=None):
        interrupts.check()

    def on_train_batch_begin(self, batch, logs=None):
        interrupts.check()

    def on_test_batch_begin(self, batch, logs=None):
        interrupts.check()

    def on_predict_batch_begin(self, batch, logs=None):
        interrupts.check()


class DiskSpaceGuard(keras.callbacks.Callback):
    """Stops training with one line before an epoch's state is written to a disk too full for it.

    Placed before the callbacks that write (the history, the best weights, the backup):
    about three copies of the weights and the optimizer's state, and a MiB to spare.
    """

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def on_epoch_end(self, epoch, logs=None):
        from .files import ensure_free_space

        ensure_free_space(self.folder, state_bytes(self.model), f"the training state of epoch {epoch + 1}")


def state_bytes(model) -> int:
    """About what a run's state of ``model`` takes on disk: three copies of its weights and optimizer state, and 1 MiB."""
    variables = [*model.weights, *(model.optimizer.variables if model.optimizer else [])]
    return 3 * sum(int(v.numpy().nbytes) for v in variables) + (1 << 20)


class ResumeNote(keras.callbacks.Callback):
    """Says, once, which epoch a resumed run starts from.

    Keras' ``fit`` passes the first epoch it runs to ``on_epoch_begin``: after
    BackupAndRestore restored a state, that is the number of epochs already done.
    """

    def on_train_begin(self, logs=None):
        self.first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first and epoch > 0:
            log.info(f"Resuming the unfinished run after epoch {epoch} (--fresh starts over)")
        self.first = False


class TensorBoardScalars(keras.callbacks.Callback):
    """Each epoch's metrics and learning rate for TensorBoard.

    The same event files and names as ``keras.callbacks.TensorBoard`` (``train/`` and
    ``validation/`` runs, ``epoch_loss``, ``epoch_accuracy``, ``epoch_learning_rate``),
    but written with TensorFlow's own ``tf.summary.write``: Keras' callback calls
    ``tf.summary.scalar``, which TensorFlow takes from the ``tensorboard`` package, and
    the runtime image does not carry it (only ``tensorboard --logdir`` needs it).
    """

    def __init__(self, log_dir: Path):
        super().__init__()
        from tensorflow.core.framework import summary_pb2

        self.log_dir = Path(log_dir)
        self.scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"), data_class=summary_pb2.DATA_CLASS_SCALAR
        )

    def on_train_begin(self, logs=None):
        self.writers = {run: tf.summary.create_file_writer(str(self.log_dir / run)) for run in ("train", "validation")}

    def on_epoch_end(self, epoch, logs=None):
        values = dict(logs or {})
        values["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())
        for name, value in values.items():
            run, name = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
            with self.writers[run].as_default():
                tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch, metadata=self.scalar)
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()

"""Several GPUs or machines: TensorFlow's tf.distribute strategies, chosen by ``--distribute``.

- ``none``: one device (the default on a CPU).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over this machine's GPUs (one replica
  on a machine without GPUs).
- ``multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy`` across the machines
  listed in the standard ``TF_CONFIG`` environment variable (what Kubeflow's TFJob and
  similar operators set for each pod).
- ``auto``: ``mirrored`` when more than one GPU is visible, else ``none``.

``--batch_size`` stays per replica: the global batch is ``batch_size * replicas`` and the
learning rate scales by the same factor. Each worker decodes only its own share of the
training and validation files (the split itself is the same stable hash everywhere);
the chief (task ``chief``, else ``worker`` 0) alone writes the model, plots and metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import types
from dataclasses import dataclass

from .config import DISTRIBUTE_KINDS
from .errors import SimpleCNNError, UsageError
from .quiet import import_tensorflow

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    """Where training runs. Every distribution detail of training is behind this class,
    so that, on one machine (``kind == "none"``), each method is a no-op."""

    kind: str  # "none", "mirrored" or "multiworker"
    strategy: object | None  # a tf.distribute.Strategy, or None for the default
    replicas: int = 1
    workers: int = 1
    worker_index: int = 0
    is_chief: bool = True

    def describe(self) -> list[str]:
        """Lines for the log, before any work: which worker this is."""
        if self.workers == 1:
            return []
        role = " (chief)" if self.is_chief else ""
        return [f"Worker {self.worker_index} of {self.workers}{role}: reading its share of the files"]

    def scale(self, batch_size: int, learning_rate: float) -> tuple[int, float]:
        """The global batch and learning rate: ``--batch_size`` stays per replica, and the
        learning rate scales with the global batch."""
        global_batch, scaled = batch_size * self.replicas, learning_rate * self.replicas
        if self.kind != "none":
            log.info(
                f"Distributed ({self.kind}): {self.replicas} replicas on {self.workers} worker(s); "
                f"batch {batch_size} per replica, {global_batch} in all; learning rate scaled to {scaled:g}"
            )
        return global_batch, scaled

    def shard(self, items: list) -> list:
        """This worker's share of ``items``: every ``workers``-th item, from ``worker_index``."""
        return items[self.worker_index :: self.workers]

    def scope(self):
        """Build and compile the model in this context."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    @property
    def in_graph(self) -> bool:
        """Whether input pipelines must be pure TensorFlow (no Python functions)."""
        return self.strategy is not None

    def prepare_model(self, model) -> None:
        patch_keras_for_multiworker(model, self)

    def prepare_dataset(self, ds):
        """A dataset each worker feeds itself (already sharded by files), repeated for fixed steps."""
        if self.strategy is None:
            return ds
        tf = import_tensorflow()
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.repeat().with_options(options)

    def fit_steps(self, train_images: int, val_images: int, global_batch: int) -> dict:
        """``fit`` arguments: under a strategy, every worker runs the same number of steps."""
        if self.strategy is None:
            return {}
        return {
            "steps_per_epoch": math.ceil(train_images / global_batch),
            "validation_steps": math.ceil(val_images / global_batch),
        }

    @contextlib.contextmanager
    def failures(self):
        """Turn a lost worker's TensorFlow error into one line that says how to resume."""
        tf = import_tensorflow()
        try:
            yield
        except tf.errors.OpError as e:
            if self.kind != "multiworker":
                raise
            detail = (e.message or type(e).__name__).strip().splitlines()[0][:200]
            raise SimpleCNNError(
                f"multi-worker training failed ({type(e).__name__}: {detail}): if a worker was lost, start every "
                "worker again with the same command to resume from the last completed epoch"
            ) from None


def _tf_config() -> dict:
    text = os.environ.get("TF_CONFIG", "")
    try:
        config = json.loads(text) if text else {}
        tasks = config.get("cluster", {})
        task = config["task"]
        chiefs = len(tasks.get("chief", []))
        return {
            "workers": chiefs + len(tasks.get("worker", [])),
            # one numbering for every task: the chief first, then the workers
            "index": int(task["index"]) + (chiefs if task["type"] == "worker" else 0),
        }
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            f'"task": {{"type": "worker", "index": 0}}}}; got {text[:80]!r}'
        ) from None


def make_cluster(kind: str) -> Cluster:
    """Create the strategy for ``kind`` (see the module docstring)."""
    tf = import_tensorflow()
    if kind == "auto":
        kind = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if kind == "none":
        return Cluster("none", None)
    if kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        return Cluster("mirrored", strategy, replicas=strategy.num_replicas_in_sync)
    if kind != "multiworker":
        raise UsageError(f"--distribute must be one of {', '.join(DISTRIBUTE_KINDS)}, not {kind}")
    if not os.environ.get("TF_CONFIG"):
        raise UsageError("--distribute multiworker needs the TF_CONFIG environment variable on each worker (see README)")
    config = _tf_config()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return Cluster(
        "multiworker", strategy, strategy.num_replicas_in_sync, config["workers"], config["index"], config["index"] == 0
    )


def worker_suffix(kind: str) -> str:
    """ "" on the chief or a single machine, ".workerN" on other workers: their state files' suffix.

    Read from TF_CONFIG without starting TensorFlow, so that a run can take its lock first.
    """
    if kind != "multiworker" or not os.environ.get("TF_CONFIG"):
        return ""
    index = _tf_config()["index"]
    return f".worker{index}" if index else ""


def patch_keras_for_multiworker(model, cluster: Cluster) -> None:
    """Work around two Keras 3.15 bugs that break ``fit`` under MultiWorkerMirroredStrategy.

    keras-team/keras#20585 (tensorflow/tensorflow#72388): ``fit`` averages the first
    distributed batch with ``strategy.reduce`` just to learn its shapes, which fails for
    the collective strategy; and it averages scalar metrics across workers with
    ``axis=0``. Both are replaced for multi-worker runs only: the sample batch is one
    replica's local batch, and scalars are averaged with ``axis=None``. The Keras version
    is pinned in requirements.txt; tests/test_distribute.py fails if a new one breaks this.
    """
    if cluster.kind != "multiworker":
        return
    tf = import_tensorflow()
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return cluster.strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(local, next(it))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(maybe_symbolic_build, model)

    if not getattr(trainer.reduce_per_replica, "_simple_cnn_patch", False):
        original = trainer.reduce_per_replica

        def reduce_per_replica(values, strategy, reduction):
            if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
                return tree.map_structure(
                    lambda v: strategy.reduce("MEAN", v, axis=None) if isinstance(v, tf.distribute.DistributedValues) else v,
                    values,
                )
            return original(values, strategy, reduction)

        reduce_per_replica._simple_cnn_patch = True
        trainer.reduce_per_replica = reduce_per_replica

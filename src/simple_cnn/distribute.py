"""Several GPUs or machines: TensorFlow's tf.distribute strategies, chosen by ``--distribute``.

- ``none``: one device (the default on a CPU).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over this machine's GPUs (one replica
  on a machine without GPUs).
- ``multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy`` across the machines
  listed in the standard ``TF_CONFIG`` environment variable (what Kubeflow's TFJob and
  similar operators set for each pod). Without one, :func:`join_cluster` writes it from
  the scheduler's own environment: a Slurm step (``srun``), else a Kubernetes Indexed
  Job. An explicit TF_CONFIG always wins.
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

from .config import DISTRIBUTE_KINDS, ClusterConfig
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


def _tf_config(text: str | None = None) -> dict:
    """TF_CONFIG read: ``{"workers": n, "index": this task, "addresses": [...]}``, chief first."""
    text = os.environ.get("TF_CONFIG", "") if text is None else text
    try:
        config = json.loads(text) if text else {}
        tasks = config.get("cluster", {})
        task = config["task"]
        chiefs = list(tasks.get("chief", []))
        addresses = [str(a) for a in chiefs + list(tasks.get("worker", []))]
        return {
            "workers": len(addresses),
            # one numbering for every task: the chief first, then the workers
            "index": int(task["index"]) + (len(chiefs) if task["type"] == "worker" else 0),
            "addresses": addresses,
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            f'"task": {{"type": "worker", "index": 0}}}}; got {text[:80]!r}'
        ) from None


@dataclass(frozen=True)
class Membership:
    """This worker's place in a multi-worker cluster, and who told it."""

    source: str  # "TF_CONFIG", "Slurm" or "Kubernetes Indexed Job"
    rank: int
    addresses: list[str]

    def describe(self) -> list[str]:
        role = " (the chief)" if self.rank == 0 else ""
        return [
            f"Cluster from {self.source}: this is worker {self.rank} of {len(self.addresses)}{role}",
            f"Workers: {', '.join(self.addresses)}",
        ]


def discover(settings: ClusterConfig | None = None, env=None) -> Membership:
    """Where this worker stands: an explicit TF_CONFIG wins, then Slurm, then an Indexed Job.

    Raises UsageError (one line) for anything inconsistent, before any work.
    """
    settings, env = settings or ClusterConfig(), os.environ if env is None else env
    if env.get("TF_CONFIG"):
        found = _tf_config(env["TF_CONFIG"])
        membership = Membership("TF_CONFIG", found["index"], found["addresses"])
    elif "SLURM_PROCID" in env:
        membership = _from_slurm(env, settings.worker_port)
    elif "JOB_COMPLETION_INDEX" in env:
        membership = _from_indexed_job(env, settings)
    else:
        raise UsageError(
            "--distribute multiworker needs to know its cluster: set TF_CONFIG on each worker, run it in a Slurm step "
            "(srun), or in a Kubernetes Indexed Job with --workers and --worker_hosts (see docs/distributed.md)"
        )
    n = len(membership.addresses)
    if n < 2:
        raise UsageError(
            f"{membership.source} describes {n} worker: --distribute multiworker needs two or more "
            "(on one machine, use --distribute none or mirrored)"
        )
    if not 0 <= membership.rank < n:
        raise UsageError(f"this worker's index {membership.rank} is outside the {n} workers that {membership.source} lists")
    if len(set(membership.addresses)) < n:
        raise UsageError(f"{membership.source} gives two workers the same address: {', '.join(membership.addresses)}")
    return membership


def join_cluster(settings: ClusterConfig | None = None) -> Membership:
    """Find this worker's cluster (:func:`discover`) and write it as TF_CONFIG, the form
    TensorFlow's own resolver (and every later step) reads. Call it before training."""
    membership = discover(settings)
    if membership.source != "TF_CONFIG":
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": membership.addresses}, "task": {"type": "worker", "index": membership.rank}}
        )
    return membership


def _integer(env, name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise UsageError(f"{name} must be a whole number, not {env.get(name)!r}") from None


def _from_slurm(env, port: int) -> Membership:
    """One address per Slurm task, in the order of Slurm's node list; a node's tasks take
    consecutive ports; SLURM_PROCID is this task's rank.

    The node list and tasks-per-node syntax (``node[01-03,07],gpu-a``, ``2(x3),1``) are
    parsed by TensorFlow's own SlurmClusterResolver functions. Not that resolver itself:
    it sorts the nodes by name, which disagrees with SLURM_PROCID when Slurm's node
    order is not alphabetical, and it calls nvidia-smi.
    """
    import_tensorflow()
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
        expand_hostlist,
        expand_tasks_per_node,
    )

    name = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    try:
        hosts = expand_hostlist(env.get(name, ""))
        if not hosts or not all(hosts):
            raise ValueError("empty")
    except (ValueError, AssertionError):
        raise UsageError(f"cannot read Slurm's node list {name}={env.get(name, '')!r}: is this an srun step?") from None
    per_node_name = "SLURM_STEP_TASKS_PER_NODE" if env.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    try:
        per_node = expand_tasks_per_node(env[per_node_name]) if env.get(per_node_name) else [1] * len(hosts)
    except ValueError:
        raise UsageError(f"cannot read {per_node_name}={env[per_node_name]!r}") from None
    if len(per_node) != len(hosts):
        raise UsageError(f"{per_node_name} names {len(per_node)} nodes but {name} {len(hosts)}")
    addresses = [f"{host}:{port + k}" for host, tasks in zip(hosts, per_node) for k in range(tasks)]
    count_name = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    if env.get(count_name) and _integer(env, count_name) != len(addresses):
        raise UsageError(f"{count_name}={env[count_name]} but the node list holds {len(addresses)} tasks")
    return Membership("Slurm", _integer(env, "SLURM_PROCID"), addresses)


def _from_indexed_job(env, settings: ClusterConfig) -> Membership:
    """Worker ``i`` at ``--worker_hosts`` with ``{index}`` = i; this pod's JOB_COMPLETION_INDEX is its rank."""
    if settings.workers is None or settings.worker_hosts is None:
        raise UsageError(
            "in a Kubernetes Indexed Job, --distribute multiworker needs --workers N and --worker_hosts PATTERN "
            "(e.g. 'JOB-{index}.SERVICE'), as in deploy/kubernetes/indexed-job.yaml"
        )
    addresses = []
    for i in range(settings.workers):
        try:
            address = settings.worker_hosts.format(index=i, port=settings.worker_port + i)
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"--worker_hosts {settings.worker_hosts!r} may hold only {{index}} and {{port}}") from None
        addresses.append(address if ":" in address else f"{address}:{settings.worker_port}")
    return Membership("Kubernetes Indexed Job", _integer(env, "JOB_COMPLETION_INDEX"), addresses)


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
        raise UsageError(
            "--distribute multiworker needs its cluster: call distribute.join_cluster() first (see docs/distributed.md)"
        )
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

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
import re
import signal
import sys
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


MAX_WORKERS = 4096  # a bound on what a cluster description may expand to, checked before expanding it
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")  # host:port, or [IPv6]:port


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _tf_config(text: str | None = None) -> dict:
    """TF_CONFIG read: ``{"workers": n, "index": this task, "addresses": [...]}``, chief first.

    Only what training here can act on is accepted: a ``chief`` (at most one) and
    ``worker`` tasks given as lists of ``host:port`` strings, and this task's type
    (``chief`` or ``worker``, not an evaluator or a parameter server) and whole-number index.
    """
    text = os.environ.get("TF_CONFIG", "") if text is None else text
    try:
        config = json.loads(text, parse_constant=_refuse_constant) if text else {}
        tasks, task = config.get("cluster", {}), config["task"]
        chiefs, workers = tasks.get("chief", []), tasks.get("worker", [])
        kind, index = task["type"], task["index"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise UsageError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            f'"task": {{"type": "worker", "index": 0}}}}; got {text[:80]!r}'
        ) from None
    addresses = _tf_config_addresses(chiefs, workers)
    if kind not in ("chief", "worker"):
        raise UsageError(f"TF_CONFIG's task type is {str(kind)[:40]!r}: simple_cnn's workers are a chief and workers")
    if (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not 0 <= index < (len(chiefs) if kind == "chief" else len(workers))
    ):
        raise UsageError(f"TF_CONFIG's task index {str(index)[:40]!r} is not the number of one of its {kind} tasks")
    # one numbering for every task: the chief first, then the workers
    return {"workers": len(addresses), "index": index + (len(chiefs) if kind == "worker" else 0), "addresses": addresses}


def _tf_config_addresses(chiefs, workers) -> list[str]:
    """The chief's and the workers' addresses, each checked to be ``host:port``."""
    if not isinstance(chiefs, list) or not isinstance(workers, list) or len(chiefs) > 1:
        raise UsageError('TF_CONFIG\'s "chief" (at most one) and "worker" tasks must be lists of "host:port" addresses')
    if len(chiefs) + len(workers) > MAX_WORKERS:
        raise UsageError(f"TF_CONFIG lists more than {MAX_WORKERS} tasks")
    for address in chiefs + workers:
        found = _ADDRESS.match(address) if isinstance(address, str) else None
        if not found or not 1 <= int(found.group(2)) <= 65535:
            raise UsageError(f"TF_CONFIG's address {str(address)[:80]!r} is not host:port (a port from 1 to 65535)")
    return chiefs + workers


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
    order is not alphabetical, and it calls nvidia-smi. What they would expand is counted
    first, before TensorFlow is even imported.
    """
    name = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    per_node_name = "SLURM_STEP_TASKS_PER_NODE" if env.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    _refuse_too_many(name, env.get(name, ""), _hostlist_size(env.get(name, "")))
    _refuse_too_many(per_node_name, env.get(per_node_name, ""), _tasks_size(env.get(per_node_name, "")))
    import_tensorflow()
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
        expand_hostlist,
        expand_tasks_per_node,
    )

    try:
        hosts = expand_hostlist(env.get(name, ""))
        if not hosts or not all(hosts):
            raise ValueError("empty")
    except (ValueError, AssertionError):
        raise UsageError(f"cannot read Slurm's node list {name}={env.get(name, '')!r}: is this an srun step?") from None
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


def _refuse_too_many(name: str, text: str, count: int) -> None:
    if count > MAX_WORKERS:
        raise UsageError(f"{name}={text[:80]!r} describes more than {MAX_WORKERS} workers: is it the right variable?")


def _hostlist_size(text: str) -> int:
    """How many hosts a Slurm node list such as ``node[01-03,07],gpu-a`` names, counted without expanding it."""
    total = 0
    for host in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", text):
        count = 1
        for ranges in re.findall(r"\[([^\]]*)\]", host):
            count *= sum(_range_size(part) for part in ranges.split(","))
        total += count if host else 0
    return total


def _range_size(part: str) -> int:
    low, _, high = part.partition("-")
    if low.isdigit() and high.isdigit():
        return max(0, int(high) - int(low) + 1)
    return 1


def _tasks_size(text: str) -> int:
    """How many tasks a Slurm tasks-per-node value such as ``2(x3),1`` gives in all, counted without expanding it."""
    total = 0
    for tasks, _, repeat in re.findall(r"(\d+)(\(x(\d+)\))?", text):
        total += int(tasks) * (int(repeat) if repeat else 1)
    return total


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


def make_cluster(kind: str, worker_wait: float = ClusterConfig.worker_wait) -> Cluster:
    """Create the strategy for ``kind`` (see the module docstring); ``worker_wait``: see :func:`_multiworker_strategy`."""
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
    strategy = _multiworker_strategy(tf, config["addresses"], config["index"], worker_wait)
    return Cluster(
        "multiworker", strategy, strategy.num_replicas_in_sync, config["workers"], config["index"], config["index"] == 0
    )


def _multiworker_strategy(tf, addresses: list[str], me: int, worker_wait: float):
    """``MultiWorkerMirroredStrategy()``, which waits for every worker, but not for ever, and
    without taking the process's signals.

    Building it installs TensorFlow's own SIGTERM handler, after which ``docker stop`` and
    pod deletion waited out their grace period: the handlers in place before (the CLI's,
    ``interrupts.py``) are put back. A peer that never starts holds the build for ever,
    inside TensorFlow's C++ with Python's lock held, so no thread of this process can act:
    a watchdog process (:data:`_WATCHDOG`) names the workers that do not answer and ends
    this one after ``worker_wait`` seconds, unless the build is done by then.
    """
    import subprocess

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    others = [a for i, a in enumerate(addresses) if i != me]
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(worker_wait), *others], stdin=subprocess.PIPE, text=True
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.stdin.close()  # built (or failed): the watchdog leaves
        watchdog.wait()
        for sig, handler in handlers.items():
            if handler is not None:  # None: a handler not set from Python, nothing to put back
                signal.signal(sig, handler)


# The watchdog, a process of its own with the standard library only (the worker's Python is
# stuck): it waits for its stdin to close (built) for the given seconds, else ends the worker.
_WATCHDOG = """
import os, select, signal, socket, sys
parent, seconds, others = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
if select.select([sys.stdin], [], [], seconds)[0]:
    raise SystemExit(0)
def answers(address):
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False
missing = [a for a in others if not answers(a)]
names = ", ".join(missing) if missing else "all accept connections, but not all joined"
print(f"simple-cnn: error: waited {seconds:g} s for the other workers ({names}): start every worker with the same "
      "command, check their addresses, or raise --worker_wait", file=sys.stderr, flush=True)
os.kill(parent, signal.SIGKILL)
"""


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

"""--distribute: two CPU workers on 127.0.0.1 training together through TF_CONFIG."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, assert_one_line_error, make_shapes_dataset, run_cli, shape_image, start_cli


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_worker(work: Path, env: dict, *args: str) -> subprocess.Popen:
    """One multi-worker training process in ``work``, its cluster described by ``env``."""
    return start_cli(
        "--mode", "train", "--dataset_path", "ds", "--distribute", "multiworker", "--batch_size", "8", *args, cwd=work, env=env
    )


def _start_workers(work: Path, ports: list[int], *args: str) -> list[subprocess.Popen]:
    """Workers on 127.0.0.1 ``ports``, configured by TF_CONFIG."""
    procs = []
    for index in range(len(ports)):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        procs.append(_start_worker(work, {"TF_CONFIG": json.dumps(tf_config)}, *args))
    return procs


def _finish(procs, timeout=400) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Two workers train one model together; their outputs."""
    work = tmp_path_factory.mktemp("multiworker")
    make_shapes_dataset(work / "ds", per_class=60)
    results = _finish(_start_workers(work, _free_ports(2), "--epochs", "8"))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return work, results


def test_two_workers_train_one_model(two_workers):
    work, results = two_workers
    files = sorted(p.name for p in (work / "models").iterdir() if not p.name.endswith(".lock"))
    assert files == ["cnn_model.keras", "cnn_model.tflite"]  # the chief alone wrote, and nothing is left to resume
    assert "Model saved to models/cnn_model.keras" in results[0][1]
    assert "the chief saved the model" in results[1][1]
    assert not (work / "images" / "metrics.json").exists() and (work / "images" / "training_curves.png").exists()


def test_each_worker_reads_its_own_share(two_workers):
    work, results = two_workers
    from simple_cnn.dataset import ImageDataset

    train_total = len(ImageDataset.scan(work / "ds").split("train"))
    for _, _, err in results:
        assert "2 replicas on 2 worker(s); batch 8 per replica, 16 in all" in err
        steps, images = map(int, re.search(r"(\d+) steps per epoch, (\d+) training images on this worker", err).groups())
        assert steps == math.ceil(train_total / 16)  # not ceil(train_total / 8): the data was sharded
        assert abs(images - train_total / 2) <= 1
        assert sum("val_loss" in line for line in err.splitlines()) >= 1


def test_multiworker_model_classifies_correctly(two_workers):
    work, _ = two_workers
    rng = np.random.default_rng(77)
    (work / "new").mkdir()
    for kind in CLASSES:
        for i in range(3):
            shape_image(kind, rng).save(work / "new" / f"{kind}_{i}.png")
    result = run_cli("--mode", "classify", "--input_path", "new", "--json", cwd=work)  # one process for the nine
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)["predictions"]
    assert len(answers) == 9
    right = sum(Path(a["image"]).name.split("_")[0] == a["class"] for a in answers)
    assert right >= 7  # of 9; chance is 3


def test_killed_worker_restarted_lets_the_job_finish(tmp_path):
    work = tmp_path
    make_shapes_dataset(work / "ds", per_class=40)
    ports = _free_ports(2)
    procs = _start_workers(work, ports, "--epochs", "5")
    chief, worker = procs
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sum("val_loss" in ln for ln in lines) < 2:
        line = chief.stderr.readline()
        if not line:
            break
        lines.append(line)
    assert sum("val_loss" in ln for ln in lines) >= 2, "".join(lines)
    worker.send_signal(signal.SIGTERM)  # mid-run, as docker stop or a pod deletion does: the chief cannot go on alone
    worker.wait(timeout=30)  # TensorFlow's own SIGTERM handler no longer takes the signal (it used to wait out the grace)
    assert worker.returncode == 143
    try:
        chief.wait(timeout=180)  # it notices the lost peer and stops with one line
    except subprocess.TimeoutExpired:
        chief.kill()  # what an orchestrator does to a stuck pod
        chief.wait()
    chief.communicate()

    results = _finish(_start_workers(work, ports, "--epochs", "5"))  # the job is started again
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "Resuming the unfinished run after epoch" in results[0][2]
    summary_line = results[0][1]
    assert "Model saved to models/cnn_model.keras" in summary_line
    from simple_cnn.formats import load_model

    model, metadata = load_model(work / "models" / "cnn_model.keras")
    assert metadata["training"]["epochs_run"] >= 3


def test_a_worker_whose_peers_never_come_stops_naming_them(tmp_path):
    """A peer that never starts: the worker says which address never answered, within --worker_wait, in one line."""
    make_shapes_dataset(tmp_path / "ds", per_class=5)  # five a class: a validation image each (splits.MIN_STRATIFIED)
    ports = _free_ports(2)
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 0}}
    started = time.monotonic()
    alone = _start_worker(tmp_path, {"TF_CONFIG": json.dumps(tf_config)}, "--epochs", "1", "--worker_wait", "5")
    _, err = alone.communicate(timeout=120)
    assert time.monotonic() - started < 60 and alone.returncode == -signal.SIGKILL
    errors = [line for line in err.splitlines() if line.startswith("simple-cnn: error:")]
    assert len(errors) == 1 and f"127.0.0.1:{ports[1]}" in errors[0] and "--worker_wait" in errors[0], err
    assert "Traceback" not in err


def test_mirrored_on_a_cpu_runs_with_one_replica(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=10)
    result = run_cli(
        "--mode",
        "train",
        "--dataset_path",
        "ds",
        "--epochs",
        "1",
        "--distribute",
        "mirrored",
        "--mixed_precision",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["distribute"]["kind"] == "mirrored" and summary["distribute"]["replicas"] == 1
    assert "--mixed_precision has no effect without a GPU" in result.stderr


def test_multiworker_needs_a_cluster(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=3)
    env_free = run_cli("--mode", "train", "--dataset_path", "ds", "--distribute", "multiworker", cwd=tmp_path)
    assert_one_line_error(env_free, 2, "TF_CONFIG", "Slurm", "Indexed Job")


# ---------------------------------------------------------------- clusters from Slurm and Kubernetes


SLURM = {"SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "node[01-03,07],gpu-a", "SLURM_STEP_NUM_TASKS": "5", "SLURM_JOB_ID": "812"}


@pytest.mark.parametrize(
    "env, settings, source, rank, addresses",
    [
        (SLURM, {}, "Slurm", 3, ["node01:23456", "node02:23456", "node03:23456", "node07:23456", "gpu-a:23456"]),
        (  # two tasks on each of two nodes; the job's node list when the step's is absent
            {"SLURM_PROCID": "2", "SLURM_JOB_NODELIST": "cn-[9-10]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4"},
            {"worker_port": 4000},
            "Slurm",
            2,
            ["cn-9:4000", "cn-9:4001", "cn-10:4000", "cn-10:4001"],
        ),
        (
            {"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "train-1"},
            {"workers": 3, "worker_hosts": "train-{index}.workers"},
            "Kubernetes Indexed Job",
            1,
            ["train-0.workers:23456", "train-1.workers:23456", "train-2.workers:23456"],
        ),
        (
            {"JOB_COMPLETION_INDEX": "0"},
            {"workers": 2, "worker_hosts": "127.0.0.1:{port}", "worker_port": 5000},
            "Kubernetes Indexed Job",
            0,
            ["127.0.0.1:5000", "127.0.0.1:5001"],
        ),
        (  # an explicit TF_CONFIG wins over Slurm's variables, and Slurm over an Indexed Job
            {
                **SLURM,
                "JOB_COMPLETION_INDEX": "0",
                "TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}),
            },
            {"workers": 2, "worker_hosts": "x-{index}"},
            "TF_CONFIG",
            1,
            ["a:1", "b:2"],
        ),
        ({**SLURM, "JOB_COMPLETION_INDEX": "0"}, {"workers": 2, "worker_hosts": "x-{index}"}, "Slurm", 3, None),
    ],
    ids=["slurm-hostlist", "slurm-tasks-per-node", "indexed-job", "indexed-job-one-host", "tf-config-wins", "slurm-before-k8s"],
)
def test_cluster_is_read_from_the_schedulers_environment(env, settings, source, rank, addresses):
    from simple_cnn.config import ClusterConfig
    from simple_cnn.distribute import discover

    found = discover(ClusterConfig(**settings), env=env)
    assert (found.source, found.rank) == (source, rank)
    if addresses is not None:
        assert found.addresses == addresses


@pytest.mark.parametrize(
    "env, flags, words",
    [
        ({"SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "a,b"}, [], "outside the 2 workers"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "solo"}, [], "needs two or more"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "node[01-"}, [], "node list"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "a,b", "SLURM_STEP_NUM_TASKS": "3"}, [], "SLURM_STEP_NUM_TASKS"),
        ({"JOB_COMPLETION_INDEX": "0"}, [], "--workers"),
        ({"JOB_COMPLETION_INDEX": "2"}, ["--workers", "2", "--worker_hosts", "w-{index}"], "outside the 2 workers"),
        ({"JOB_COMPLETION_INDEX": "x"}, ["--workers", "2", "--worker_hosts", "w-{index}"], "JOB_COMPLETION_INDEX"),
        ({"JOB_COMPLETION_INDEX": "0"}, ["--workers", "2", "--worker_hosts", "w-{rank}"], "--worker_hosts"),
        ({"JOB_COMPLETION_INDEX": "0"}, ["--workers", "1", "--worker_hosts", "w-{index}"], "--workers"),
        (
            {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": Infinity}}'},
            [],
            "TF_CONFIG must be JSON",
        ),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1e999}}'}, [], "task index"),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "evaluator", "index": 0}}'}, [], "task type"),
        ({"TF_CONFIG": '{"cluster": {"worker": "a:1,b:2"}, "task": {"type": "worker", "index": 0}}'}, [], "lists of"),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": true}}'}, [], "task index"),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 0}}'}, [], "host:port"),
        ({"TF_CONFIG": "[" * 5_000 + "]" * 5_000}, [], "TF_CONFIG must be JSON"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n[0-99999999]"}, [], "more than 4096"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "a,b", "SLURM_STEP_TASKS_PER_NODE": "1(x99999999)"}, [], "more than 4096"),
    ],
    ids=[
        "index-out-of-range",
        "one-worker",
        "bad-hostlist",
        "task-count",
        "no-workers",
        "k8s-index",
        "k8s-not-a-number",
        "bad-pattern",
        "k8s-one-worker",
        "tf-config-infinity",
        "tf-config-overflow",
        "tf-config-evaluator",
        "tf-config-string-list",
        "tf-config-bool-index",
        "tf-config-no-port",
        "tf-config-nested",
        "slurm-huge-hostlist",
        "slurm-huge-tasks",
    ],
)
def test_inconsistent_cluster_is_one_line_before_any_work(tmp_path, env, flags, words):
    make_shapes_dataset(tmp_path / "ds", per_class=3)
    proc = start_cli("--mode", "train", "--dataset_path", "ds", "--distribute", "multiworker", *flags, cwd=tmp_path, env=env)
    out, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(result, 2, words)
    assert not (tmp_path / "models").exists()


def _consecutive_free_ports() -> int:
    while True:
        base = _free_ports(1)[0]
        if base < 65000:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", base + 1))
                    return base
                except OSError:
                    continue


@pytest.mark.parametrize("scheduler", ["slurm", "indexed-job"])
def test_two_workers_find_each_other_without_tf_config(tmp_path, scheduler):
    """As the TF_CONFIG test, but the cluster comes from Slurm's or an Indexed Job's variables."""
    make_shapes_dataset(tmp_path / "ds", per_class=20)
    base = _consecutive_free_ports()
    procs = []
    for rank in (0, 1):
        if scheduler == "slurm":  # two tasks of one srun step on this node
            env = {
                "SLURM_PROCID": str(rank),
                "SLURM_STEP_NODELIST": "127.0.0.1",
                "SLURM_STEP_TASKS_PER_NODE": "2",
                "SLURM_STEP_NUM_TASKS": "2",
            }
            flags = ["--worker_port", str(base)]
        else:
            env = {"JOB_COMPLETION_INDEX": str(rank)}
            flags = ["--workers", "2", "--worker_hosts", "127.0.0.1:{port}", "--worker_port", str(base)]
        procs.append(_start_worker(tmp_path, env, "--epochs", "2", *flags))
    results = _finish(procs)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    source = "Slurm" if scheduler == "slurm" else "Kubernetes Indexed Job"
    for rank, (_, _, err) in enumerate(results):
        first = err.splitlines()[:2]
        assert first[0].startswith(f"Cluster from {source}: this is worker {rank} of 2"), err[:500]
        assert first[1] == f"Workers: 127.0.0.1:{base}, 127.0.0.1:{base + 1}"
    files = sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock"))
    assert files == ["cnn_model.keras", "cnn_model.tflite"]
    image = tmp_path / "ds" / "square" / "square_000.png"
    answer = run_cli("--mode", "classify", "--single_image_path", image, "--json", cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["class"] in CLASSES


def test_deploy_files_are_well_formed():
    """The manifests parse into the expected kinds; the sbatch script is valid bash.
    (Not run on a real cluster here: docs/distributed.md says so.)"""
    import shutil

    import yaml

    repo = Path(__file__).resolve().parents[1]
    indexed = list(yaml.safe_load_all((repo / "deploy" / "kubernetes" / "indexed-job.yaml").read_text()))
    assert [d["kind"] for d in indexed] == ["Service", "PersistentVolumeClaim", "Job"]
    service, claim, job = indexed
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--workers") + 1] == str(job["spec"]["completions"])
    hosts = args[args.index("--worker_hosts") + 1]
    assert hosts == f"{job['metadata']['name']}-{{index}}.{service['metadata']['name']}"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (tfjob,) = yaml.safe_load_all((repo / "deploy" / "kubernetes" / "tfjob.yaml").read_text())
    assert (tfjob["apiVersion"], tfjob["kind"]) == ("kubeflow.org/v1", "TFJob")
    sbatch = repo / "deploy" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)], capture_output=True).returncode == 0
    assert "--distribute multiworker" in sbatch.read_text() and "srun" in sbatch.read_text()
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:
        assert subprocess.run([shellcheck, str(sbatch)], capture_output=True).returncode == 0

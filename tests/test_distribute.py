"""--distribute: two CPU workers on 127.0.0.1 training together through TF_CONFIG."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
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


def _start_workers(work: Path, ports: list[int], *args: str) -> list[subprocess.Popen]:
    procs = []
    for index in range(len(ports)):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        procs.append(
            start_cli(
                "--mode",
                "train",
                "--dataset_path",
                "ds",
                "--distribute",
                "multiworker",
                "--batch_size",
                "8",
                *args,
                cwd=work,
                env={"TF_CONFIG": json.dumps(tf_config)},
            )
        )
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
    from simple_cnn.data import scan_dataset

    train_total = len(scan_dataset(work / "ds").split("train"))
    for _, _, err in results:
        assert "2 replicas on 2 worker(s); batch 8 per replica, 16 in all" in err
        steps, images = map(int, re.search(r"(\d+) steps per epoch, (\d+) training images on this worker", err).groups())
        assert steps == math.ceil(train_total / 16)  # not ceil(train_total / 8): the data was sharded
        assert abs(images - train_total / 2) <= 1
        assert sum("val_loss" in line for line in err.splitlines()) >= 1


def test_multiworker_model_classifies_correctly(two_workers):
    work, _ = two_workers
    rng = np.random.default_rng(77)
    right = 0
    for kind in CLASSES:
        for i in range(3):
            image = work / f"{kind}_{i}.png"
            shape_image(kind, rng).save(image)
            result = run_cli("--mode", "classify", "--single_image_path", image.name, "--json", cwd=work)
            assert result.returncode == 0, result.stderr
            right += json.loads(result.stdout)["class"] == kind
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
    worker.send_signal(signal.SIGKILL)  # mid-run: the chief cannot go on alone
    worker.wait()
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


def test_multiworker_needs_tf_config(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=3)
    env_free = run_cli("--mode", "train", "--dataset_path", "ds", "--distribute", "multiworker", cwd=tmp_path)
    assert_one_line_error(env_free, 2, "TF_CONFIG")

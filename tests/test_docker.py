"""The container, as a user runs it: the README's docker commands, verbatim.

Runs wherever ``docker`` works: a real engine, or on a machine without one, a drop-in
such as the podman shim that ``.ci/run`` puts first on PATH. Elsewhere it is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from simple_cnn.config import AUTO_EPOCHS
from simple_cnn.formats import read_metadata

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- tests/test_docker.py runs these commands verbatim -->"
SLIM_MARKER = "<!-- tests/test_docker.py runs these slim-image commands verbatim, after the ones above -->"


def _docker_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"docker does not answer: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def readme_docker_commands(marker: str = MARKER) -> list[str]:
    """The shell commands of the README block that follows ``marker``."""
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(marker) + r"\s*```sh\n(.*?)```", text, re.S)
    assert block, f"README.md has no docker block after {marker}"
    return [line for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def docker_ready():
    reason = _docker_available()
    if reason:
        pytest.skip(reason)


def sh(command: str, cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The user's folder: the full image's commands train here, the slim image's reuse the model."""
    return tmp_path_factory.mktemp("user")


def test_readme_docker_commands_train_test_and_classify(docker_ready, workdir):
    tmp_path = workdir
    commands = readme_docker_commands()
    assert commands[0] == "docker build -t simple_cnn ."
    build = sh(commands[0], cwd=REPO)
    assert build.returncode == 0, build.stderr[-3000:]

    outputs = {}
    for command in commands[1:]:
        result = sh(command, cwd=tmp_path)  # the volumes ./datasets etc. land in tmp_path
        assert result.returncode == 0, (command, result.stderr[-3000:])
        mode = re.search(r"--mode (\w+)", command)
        if mode:
            outputs[mode.group(1)] = result.stdout

    assert (tmp_path / "models" / "cnn_model.keras").stat().st_size > 100_000
    for name in ("training_curves.png", "examples_train_images.png", "confusion_matrix.png", "examples_test_images.png"):
        with Image.open(tmp_path / "images" / name) as im:
            assert im.format == "PNG" and min(im.size) > 250, name
    page = (tmp_path / "images" / "report.html").read_text()
    assert 'src="data:image/' in page and not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    assert '<span id="accuracy">' in page
    metrics = json.loads((tmp_path / "images" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9 and metrics["test_images"] > 200  # the built-in digits
    assert "Best epoch" in outputs["train"]
    # No --epochs in the README's command: the digits' short epochs fill no budget, so the most.
    assert read_metadata(tmp_path / "models" / "cnn_model.keras")["training"]["config"]["epochs"] == AUTO_EPOCHS[1]
    assert outputs["classify"].split(": ")[1].startswith("7 "), outputs["classify"]


def test_unwritable_mount_gives_one_clear_line(docker_ready, tmp_path):
    models = tmp_path / "models"
    models.mkdir(mode=0o755)  # owned by the host user; the image's default user (1000) cannot write
    if models.stat().st_uid == 1000:
        pytest.skip("the host user is uid 1000, the container's own")
    result = sh("docker run --rm -v ./models:/app/models simple_cnn --mode train", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("simple-cnn: error: cannot write to the model folder /app/models"), result.stderr
    assert "--user" in lines[-1] and "Traceback" not in result.stderr


def _wait_until_serving(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sh(f"curl -sf {url}/healthz", cwd=REPO, timeout=10).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer {url}/healthz within {timeout} s")


def test_slim_image_classifies_and_serves_the_full_images_model(docker_ready, workdir):
    """The README's slim-image block, after the full image trained: no TensorFlow, the LiteRT copy answers."""
    if not (workdir / "models" / "cnn_model.tflite").exists():
        pytest.skip("the full image's test did not train a model")
    commands = readme_docker_commands(SLIM_MARKER)
    build, classify, serve, curl, stop = commands
    assert build.startswith("docker build --target classify")
    assert sh(build, cwd=REPO).returncode == 0

    result = sh(classify, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split(": ")[1].startswith("7 "), result.stdout
    no_tf = sh("docker run --rm --entrypoint python simple_cnn:classify -c 'import tensorflow'", cwd=workdir)
    assert no_tf.returncode != 0 and "No module named 'tensorflow'" in no_tf.stderr
    refused = sh(
        "docker run --rm -v ./datasets:/app/datasets -v ./models:/app/models simple_cnn:classify --mode train", cwd=workdir
    )
    assert refused.returncode != 0 and "full" in refused.stderr.strip().splitlines()[-1], refused.stderr

    sh("docker rm -f simple_cnn_serve", cwd=workdir)  # a leftover of an interrupted run
    try:
        assert sh(serve, cwd=workdir).returncode == 0
        _wait_until_serving("http://127.0.0.1:8501")
        answer = sh(curl, cwd=workdir)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["class"] == "7", answer.stdout
        stop_container, remove = stop.split(" && ")
        assert sh(stop_container, cwd=workdir).returncode == 0
        code = sh("docker inspect simple_cnn_serve --format '{{.State.ExitCode}}'", cwd=workdir)
        assert code.stdout.strip() == "0", code  # SIGTERM: a clean stop
        logs = sh("docker logs simple_cnn_serve", cwd=workdir).stderr
        assert re.search(r"POST /classify 200 \d", logs), logs  # one line per request
        assert sh(remove, cwd=workdir).returncode == 0
    finally:
        sh("docker rm -f simple_cnn_serve", cwd=workdir)

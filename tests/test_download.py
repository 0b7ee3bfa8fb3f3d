"""download_datasets.sh against a local HTTP server on 127.0.0.1 serving archives made here."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOWERS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
ANIMALS = ("cats", "dogs", "snakes")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` by path; ``server.truncate`` paths get half their body."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.path in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path])
            self.end_headers()
            return
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if self.path not in self.server.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.stall:  # a little, then nothing: a stalled transfer
            self.wfile.write(body[:100])
            self.wfile.flush()
            time.sleep(8)
            return
        self.wfile.write(body[: len(body) // 2] if self.path in self.server.truncate else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def archive_server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.truncate, srv.requests = {}, set(), []
    srv.redirects, srv.stall, srv.no_length = {}, set(), set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def _tgz(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _flowers_tgz(extra: dict[str, bytes] | None = None) -> bytes:
    entries = {f"flower_photos/{c}/{c}_{i}.jpg": f"{c}{i}".encode() for c in FLOWERS for i in range(2)}
    entries["flower_photos/LICENSE.txt"] = b"CC-BY"
    return _tgz({**entries, **(extra or {})})


def _animals_zip(tag: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in ANIMALS:
            for i in range(2):
                z.writestr(f"Animals/{c}/{c}_{i}.jpg", c.encode() + tag)
    return buf.getvalue()


@pytest.fixture
def project(tmp_path):
    """A copy of the script in an empty project folder (it works beside itself)."""
    shutil.copy(REPO / "download_datasets.sh", tmp_path / "download_datasets.sh")
    return tmp_path


def run_script(project: Path, archive_server, *args, sha: str | None = None, **extra_env):
    base_url = f"http://127.0.0.1:{archive_server.server_port}"
    env = {**os.environ, "SIMPLE_CNN_DATASETS_BASE_URL": base_url, "PYTHON": sys.executable}
    env.update(extra_env)
    env.pop("SIMPLE_CNN_FLOWERS_SHA256", None)
    if sha:
        env["SIMPLE_CNN_FLOWERS_SHA256"] = sha
    return subprocess.run(
        ["bash", str(project / "download_datasets.sh"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "datasets").iterdir() if p.name not in (".checksums", ".download.lock"))


def test_good_archive_is_verified_unpacked_and_not_downloaded_twice(project, archive_server):
    archive = _flowers_tgz()
    archive_server.files["/flower_photos.tgz"] = archive
    result = run_script(project, archive_server, "flowers", sha=hashlib.sha256(archive).hexdigest())
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    for d in ("datasets", "models", "images"):
        assert (project / d).is_dir()
    target = project / "datasets" / "flower_photos"
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == list(FLOWERS)
    assert (target / "roses" / "roses_1.jpg").read_bytes() == b"roses1"
    assert _leftovers(project) == ["flower_photos"]

    again = run_script(project, archive_server, "flowers", sha=hashlib.sha256(archive).hexdigest())
    assert again.returncode == 0 and "already present" in again.stdout
    assert archive_server.requests == ["/flower_photos.tgz"]


def test_wrong_checksum_leaves_nothing(project, archive_server):
    archive_server.files["/flower_photos.tgz"] = _flowers_tgz()
    result = run_script(project, archive_server, "flowers")  # the published checksum: cannot match
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.stderr
    assert _leftovers(project) == []


def test_truncated_download_is_retried_a_few_times_then_fails_cleanly(project, archive_server):
    archive = _flowers_tgz()
    archive_server.files["/flower_photos.tgz"] = archive
    archive_server.truncate.add("/flower_photos.tgz")
    result = run_script(project, archive_server, "flowers", sha=hashlib.sha256(archive).hexdigest())
    assert result.returncode == 1
    assert "download from" in result.stderr
    assert 2 <= len(archive_server.requests) <= 4  # retried, with a limit
    assert _leftovers(project) == []


@pytest.mark.parametrize(
    "extra, links",
    [({"../evil.txt": b"x"}, None), ({"/tmp/evil_abs.txt": b"x"}, None), ({}, {"flower_photos/daisy/link": "/etc/passwd"})],
    ids=["dotdot", "absolute", "symlink"],
)
def test_unsafe_archives_are_refused_before_writing_anything(project, archive_server, extra, links):
    entries = {f"flower_photos/{c}/a.jpg": b"x" for c in FLOWERS}
    archive = _tgz({**entries, **extra}, links)
    archive_server.files["/flower_photos.tgz"] = archive
    result = run_script(project, archive_server, "flowers", sha=hashlib.sha256(archive).hexdigest())
    assert result.returncode == 1, result.stdout
    assert "refused" in result.stderr
    assert _leftovers(project) == []
    assert not (project / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()


@pytest.mark.parametrize(
    "extra, env, words",
    [
        ({"flower_photos/daisy/big.jpg": b"\0" * (100 << 20)}, {}, "100 times its size"),  # a zip bomb: 100 MB from ~100 KB
        ({"flower_photos/daisy/big.jpg": b"\1" * (3 << 20)}, {"SIMPLE_CNN_MAX_UNPACKED_MB": "2"}, "SIMPLE_CNN_MAX_UNPACKED_MB"),
        ({f"flower_photos/daisy/{i}.jpg": b"x" for i in range(60)}, {"SIMPLE_CNN_MAX_FILES": "50"}, "SIMPLE_CNN_MAX_FILES"),
    ],
    ids=["bomb", "too-large", "too-many"],
)
def test_archives_that_unpack_too_large_or_to_too_many_files_are_refused(project, archive_server, extra, env, words):
    """The bounds are checked from the sizes the archive declares, before anything is unpacked or kept."""
    archive = _tgz({**{f"flower_photos/{c}/a.jpg": b"x" for c in FLOWERS}, **extra})
    archive_server.files["/flower_photos.tgz"] = archive
    result = run_script(project, archive_server, "flowers", sha=hashlib.sha256(archive).hexdigest(), **env)
    assert result.returncode == 1 and words in result.stderr, result.stderr
    assert _leftovers(project) == [] and not (project / "datasets" / "flower_photos").exists()


def test_unpublished_checksum_is_recorded_then_enforced(project, archive_server):
    archive = _animals_zip()
    archive_server.files["/animal-image-classification-dataset.zip"] = archive
    first = run_script(project, archive_server, "animals")
    assert first.returncode == 0, first.stderr
    assert "recorded SHA-256" in first.stdout
    assert sorted(p.name for p in (project / "datasets" / "Animals").iterdir() if p.is_dir()) == list(ANIMALS)
    manifest = (project / "datasets" / ".checksums").read_text()
    assert hashlib.sha256(archive).hexdigest() in manifest

    shutil.rmtree(project / "datasets" / "Animals")
    archive_server.files["/animal-image-classification-dataset.zip"] = _animals_zip(tag=b"changed")
    second = run_script(project, archive_server, "animals")
    assert second.returncode == 1 and "recorded" in second.stderr
    assert _leftovers(project) == []


def test_usage(project, archive_server):
    assert run_script(project, archive_server, "--help").returncode == 0
    bad = run_script(project, archive_server, "imagenet")
    assert bad.returncode == 2 and "imagenet" in bad.stderr
    assert archive_server.requests == []


def test_digits_needs_no_network(project, archive_server):
    (project / "src").symlink_to(REPO / "src")
    result = run_script(project, archive_server, "digits")
    assert result.returncode == 0, result.stderr
    assert len(list((project / "datasets" / "digits").rglob("*.png"))) == 1797
    assert archive_server.requests == []


ANIMALS_PATH = "/animal-image-classification-dataset.zip"


def test_bad_first_download_is_not_pinned(project, archive_server):
    """An error page served with status 200 fails, and is not recorded: the genuine archive then works."""
    archive_server.files[ANIMALS_PATH] = b"<html>Too many requests, try later</html>"
    first = run_script(project, archive_server, "animals")
    assert first.returncode == 1 and "refused to unpack" in first.stderr
    assert not (project / "datasets" / ".checksums").exists() or not (project / "datasets" / ".checksums").read_text()
    archive = _animals_zip()
    archive_server.files[ANIMALS_PATH] = archive
    second = run_script(project, archive_server, "animals")
    assert second.returncode == 0, second.stderr
    assert hashlib.sha256(archive).hexdigest() in (project / "datasets" / ".checksums").read_text()


@pytest.mark.parametrize("declared", [True, False], ids=["with-length", "without-length"])
def test_oversized_download_is_refused(project, archive_server, declared):
    archive_server.files[ANIMALS_PATH] = _animals_zip() + os.urandom(3 * 1024 * 1024)  # over a 2 MiB bound
    if not declared:
        archive_server.no_length.add(ANIMALS_PATH)
    result = run_script(project, archive_server, "animals", SIMPLE_CNN_MAX_DOWNLOAD_MB="2")
    assert result.returncode == 1 and "over 2 MiB" in result.stderr
    assert _leftovers(project) == []


def test_stalled_download_gives_up(project, archive_server):
    archive_server.files[ANIMALS_PATH] = _animals_zip() + os.urandom(200_000)
    archive_server.stall.add(ANIMALS_PATH)
    started = time.monotonic()
    result = run_script(project, archive_server, "animals", SIMPLE_CNN_STALL_SECONDS="1")
    assert result.returncode == 1 and "stall" in result.stderr
    assert time.monotonic() - started < 60
    assert _leftovers(project) == []


def test_redirect_to_plain_http_is_refused(project, archive_server):
    archive_server.files["/elsewhere.zip"] = _animals_zip()
    archive_server.redirects[ANIMALS_PATH] = f"http://127.0.0.1:{archive_server.server_port}/elsewhere.zip"
    result = run_script(project, archive_server, "animals")
    assert result.returncode == 1 and "redirect" in result.stderr
    assert "/elsewhere.zip" not in archive_server.requests
    assert _leftovers(project) == []


def test_killed_run_leftovers_are_cleaned(project, archive_server):
    leftover = project / "datasets" / ".download-animals.Ab12Cd"
    leftover.mkdir(parents=True)
    (leftover / "archive").write_bytes(b"half an archive")
    archive_server.files[ANIMALS_PATH] = _animals_zip()
    result = run_script(project, archive_server, "animals")
    assert result.returncode == 0, result.stderr
    assert not leftover.exists() and _leftovers(project) == ["Animals"]

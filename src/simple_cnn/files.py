"""Reading and writing files safely: nothing the user had is ever lost, nothing hangs.

Every file simple_cnn writes (model, plots, metrics, caches) goes through :func:`atomic_output`,
and every folder (a SavedModel export, the digits dataset) through :func:`atomic_dir`:
the content is written to a temporary file in the same folder and renamed over the
target only when complete. ``os.replace`` is atomic on POSIX and Windows, so a reader
(or a crash) sees either the old file or the new one, never half of one.

Reading goes through :func:`open_regular_file`, which refuses a FIFO, a device or a
socket without blocking, so a file named like an image or a model can never hang a run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, SimpleCNNError


def ensure_writable_dir(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and check that we can write into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SimpleCNNError(f"cannot create the {what} folder {folder}: {e.strerror}") from None
    if not folder.is_dir():
        raise SimpleCNNError(f"the {what} path {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SimpleCNNError(
            f"cannot write to the {what} folder {folder.absolute()} (user id {os.getuid()}): "
            "make it writable, e.g. `chmod u+w` it, or in Docker pass "
            '--user "$(id -u):$(id -g)" so the container runs as its owner'
        )
    return folder


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary name keeps the suffix, because Keras and matplotlib choose the
    file format from it. On any error the temporary file is removed and ``path``
    keeps its previous content.
    """
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (mode 0600); ours get the usual
    # permissions (0666 less the umask), like any file the user writes.
    # The stem is cut so that the temporary name stays a legal file name beside a long one.
    tmp_path = path.parent / f".{path.stem[:100]}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # flush the content to disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success swap it in for ``path``.

    The old folder (if any) stays whole until the new one is complete; on any error the
    temporary folder is removed. ``replace=False`` keeps a folder that another process
    put at ``path`` meanwhile, and discards ours. (Two renames, so a crash between them leaves the old
    folder under a hidden ``.NAME.old-*`` name, never half of one.)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
        if path.exists() and not replace:
            return
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to write ``what`` into ``folder`` when its disk has fewer than ``needed`` bytes free.

    HDF5 (behind Keras' weight files) can end the process with a segmentation fault when a
    write meets a full disk, which no ``except`` catches, and leaves a truncated file: so
    the space is checked before each write, and the run stops with one line instead.
    """
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SimpleCNNError(
            f"the disk holding {folder} is full ({free:,} bytes free, about {needed:,} needed to write {what}): "
            "free some space, then run the same command again (a training run resumes from its last saved epoch)"
        )


def os_reason(e: OSError) -> str:
    """A short reason for an operating system's refusal, for a "skipped: ..." line."""
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "file not found (broken link?)"
    return e.strerror or str(e) or type(e).__name__  # e.g. a symbolic link loop


def open_regular_file(path: Path):
    """Open ``path`` for reading in binary mode, if it is a regular file.

    Anything else (a FIFO, a device, a socket) raises ValueError without blocking: the
    file is opened non-blocking and checked on the descriptor itself (no check-then-open
    race), so a FIFO named like an image can never hang a run.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ValueError(os_reason(e)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file (a FIFO, device or socket)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int = 1 << 30) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; else DataError."""
    try:
        with open_regular_file(path) as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise DataError(f"{path} is larger than {limit:,} bytes: is it a model file?")
            return f.read(limit + 1)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def csv_cell(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: one starting with =, +, -, @ (or a tab or
    carriage return) would be run as a formula, so it gets a leading apostrophe (OWASP's
    advice against CSV injection)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """``rows`` under ``header`` as CSV, every cell safe for a spreadsheet, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(c) for c in row])
    with atomic_output(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()

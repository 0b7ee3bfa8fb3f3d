"""Writing output files so that nothing the user had is ever lost.

Every file simple_cnn writes (model, plots, metrics, caches) goes through :func:`atomic_output`,
and every folder (a SavedModel export, the digits dataset) through :func:`atomic_dir`:
the content is written to a temporary file in the same folder and renamed over the
target only when complete. ``os.replace`` is atomic on POSIX and Windows, so a reader
(or a crash) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import SimpleCNNError


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
    tmp_path = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
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

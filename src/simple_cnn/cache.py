"""The verified disk cache of decoded images (``--cache_dir``), for datasets larger than memory.

Two files per entry: ``KEY.u8`` (the pixels of the readable images, in order) and
``KEY.json`` (which files failed and why, and the pixels' SHA-256). Both are written
under unpredictable temporary names created exclusively (never through a planted link)
and renamed into place, the JSON last, so an entry is complete or absent. Nothing in the
folder is trusted: an entry that does not verify is decoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np

from .errors import DataError, printable
from .files import atomic_output, ensure_writable_dir, write_json
from .images import decode_images

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when read_image's output or the entry format changes, so old entries are not reused


def cache_key(root: Path, files: list[tuple[str, int]], image_size: int) -> str:
    """A name for the decoded cache of ``files`` (path in the dataset, label): it changes when any file, label or size does."""
    h = hashlib.sha256(f"simple_cnn cache v{CACHE_VERSION}\0{root.resolve()}\0{image_size}".encode())
    for relpath, label in files:
        try:
            st = os.stat(root / relpath)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(os.fsencode(relpath) + f"\0{label}\0{stamp}\n".encode())
    return h.hexdigest()[:24]


def cache_folder(cache_dir: Path) -> Path:
    """The ``--cache_dir`` folder, created private, and refused when someone else could
    plant entries in it: it must belong to this user and not be writable by others."""
    cache_dir = Path(cache_dir)
    with contextlib.suppress(OSError):  # ensure_writable_dir says what went wrong
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_writable_dir(cache_dir, "cache")
    st = os.stat(cache_dir)
    if st.st_uid != os.geteuid():
        raise DataError(
            f"refusing the cache folder {cache_dir}: it belongs to another user (uid {st.st_uid}), who could "
            "change the images it holds; give --cache_dir a folder of your own"
        )
    if st.st_mode & stat.S_IWOTH:
        raise DataError(
            f"refusing the cache folder {cache_dir}: everyone may write to it, so anyone could change the images it "
            f"holds; `chmod o-w {cache_dir}`, or give --cache_dir a folder of your own"
        )
    return cache_dir


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _valid_entry(index: dict, count_files: int, image_size: int, pixels: Path) -> list | None:
    """An entry's error list if the entry is whole and its pixels are the ones it recorded; else None.

    The index must have the expected shape, and the pixel file must be a regular file of
    the recorded size and SHA-256 (hashing is far cheaper than decoding again).
    """
    errors = index.get("errors") if isinstance(index, dict) else None
    if not isinstance(errors, list) or len(errors) != count_files or index.get("image_size") != image_size:
        return None
    if not all(e is None or isinstance(e, str) for e in errors):
        return None
    count = sum(e is None for e in errors)
    st = os.lstat(pixels)
    if not stat.S_ISREG(st.st_mode) or st.st_size != count * image_size * image_size * 3:
        return None
    return errors if index.get("sha256") == _file_sha256(pixels) else None


def load_cached(cache_dir: Path, root: Path, files: list[tuple[str, int]], image_size: int):
    """The images ``files`` (path in ``root``, label) decoded through the cache: ``(memmap, errors)``.

    A later call with the same files and size reuses the entry and decodes nothing; the
    operating system pages images in as batches need them.
    """
    cache_dir = cache_folder(cache_dir)
    key = cache_key(root, files, image_size)
    pixels, index = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (image_size, image_size, 3)
    try:
        errors = _valid_entry(json.loads(index.read_text()), len(files), image_size, pixels)
        if errors is not None:
            return _open_memmap(pixels, sum(e is None for e in errors), shape), errors
        log.warning(f"the cache entry {index.name} in {cache_dir} does not match its images; decoding them again")
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past the stack
        pass  # absent or unreadable: decode again
    with atomic_output(pixels) as tmp:
        out = np.memmap(tmp, np.uint8, "r+", shape=(max(1, len(files)), *shape))  # NumPy cannot map 0 bytes
        x, errors = decode_images([root / relpath for relpath, _ in files], image_size, out=out)
        count = len(x)
        out.flush()
        del out, x
        os.truncate(tmp, count * int(np.prod(shape)))
        digest = _file_sha256(tmp)
    entry = {"image_size": image_size, "sha256": digest, "files": [printable(f) for f, _ in files], "errors": errors}
    write_json(index, entry)
    return _open_memmap(pixels, count, shape), errors


def _open_memmap(path: Path, count: int, shape: tuple[int, ...]) -> np.ndarray:
    if count == 0:  # NumPy cannot map an empty file
        return np.empty((0, *shape), dtype=np.uint8)
    return np.memmap(path, np.uint8, "r", shape=(count, *shape))

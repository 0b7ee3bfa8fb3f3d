"""Reading one image file: what counts as an image, the checks before decoding, the decoder.

The one decoder (:func:`read_image`) serves training, testing, classifying and serving,
so all of them see the same pixels. Every check that keeps a hostile file from costing
memory or hanging a run happens here, before any pixel is decoded: the format and the
declared size from the header (:func:`check_header`), the regular-file check
(``files.open_regular_file``), and a bound on the pixels decoded at once across threads
(:data:`DECODING`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import printable
from .files import open_regular_file, os_reason

log = logging.getLogger(__name__)

# .jfif and .jpe: JPEGs as some browsers save them. The format is read from the header either way.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".avif"}
READABLE = ", ".join(sorted(IMAGE_SUFFIXES))  # for messages: what a user's files must end in
# Folders that archivers and file servers add beside the data: a zip made on a Mac holds __MACOSX/ (its
# files' resource forks, named like the images), a Synology NAS an @eaDir/ of thumbnails in every folder.
NOT_DATA = {"__MACOSX", "@eaDir"}
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "AVIF"}  # MPO: JPEG from some cameras
# The only parsers a file (or an upload from a stranger) reaches: Pillow would otherwise try each of its
# formats in turn, and some parse a header (TIFF's) with warnings written to stderr, before the format is checked.
OPENED = sorted(IMAGE_FORMATS - {"MPO"})  # an MPO opens through the JPEG parser
# Images are refused above this many pixels before anything is decoded (a 40-megapixel
# photo is fine; a "decompression bomb" declaring 50,000 x 50,000 pixels is not).
MAX_PIXELS = 100_000_000

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check, at our limit
# Between that limit and twice it, Pillow warns (on stderr, in the words of a Python warning) and opens the
# image; _checked_size then refuses it with one reason, as for any other unusable file.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class PixelBudget:
    """At most ``capacity`` decoded pixels in flight across all decoding threads.

    One image may hold up to MAX_PIXELS; without a shared bound, every thread could hold
    one at once, and a folder of large, small-on-disk PNGs would exhaust memory. A thread
    waits until the pixels it needs are free (an image larger than the budget waits for
    the whole of it).
    """

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self.free += pixels
                self._changed.notify_all()


# One 100-megapixel image (about 300 MB as RGB, twice that while converting) or many
# smaller ones at a time. JPEGs count at their reduced decoding scale (Image.draft).
DECODING = PixelBudget(MAX_PIXELS)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_hidden(name: str) -> bool:
    """Is this file or folder left out of every dataset and folder walk: hidden, or :data:`NOT_DATA`?"""
    return name.startswith(".") or name in NOT_DATA


def image_files(folder: Path, ignored: Counter | None = None) -> list[Path]:
    """Every image file under ``folder``, recursively, in a stable order.

    The one rule for what counts as an image file, for datasets and for classify:
    hidden files and folders (:func:`is_hidden`) are ignored, and so are files without an image suffix.
    Links to folders are not followed, so a link that loops never hangs the walk.
    ``ignored``, when given, counts the files left out for their suffix, by suffix, so
    that the caller can say so (:func:`ignored_line`): a folder of TIFFs must not
    quietly become a smaller class, or an empty one.
    """
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(f for f in files if not is_hidden(f)):
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                found.append(Path(parent) / name)
            elif ignored is not None:
                ignored[printable(suffix) or "no suffix"] += 1
    return found


def images_in_folder(folder: Path) -> list[Path]:
    """:func:`image_files` of one folder that a user named (classify's input, ``--unknown_path``),
    with a warning for the files left out."""
    found = image_files(folder, ignored := Counter())
    if ignored:
        log.warning(ignored_line(ignored, folder))
    return found


def ignored_line(ignored: Counter, where) -> str:
    """One line for the files :func:`image_files` left out of ``where``: how many, their suffixes, what is read."""
    kinds = ", ".join(f"{suffix} {n}" for suffix, n in ignored.most_common(5)) + (", ..." if len(ignored) > 5 else "")
    total = sum(ignored.values())
    return (
        f"ignored {total} file{'s' if total > 1 else ''} in {printable(str(where))} without an image suffix ({kinds}): "
        f"only {READABLE} files are read"
    )


def try_each(fn, items: list, threads: int | None = None) -> tuple[list, list[str | None]]:
    """``fn(item)`` for every item on a thread pool: ``(results, errors)``.

    A ValueError (our readers' "cannot use this file, because ...") becomes that item's
    error and its result is None; anything else propagates. Pillow decodes without the
    GIL, so threads use every core.
    """

    def attempt(item):
        try:
            return fn(item), None
        except ValueError as e:
            return None, str(e)

    # Not `with ThreadPoolExecutor(...)`: its exit waits for every thread, and on Ctrl-C
    # a thread stuck in a read would keep the process alive. The CLI ends the process.
    pool = ThreadPoolExecutor(max_workers=threads or usable_cpus())
    try:
        pairs = list(pool.map(attempt, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [r for r, _ in pairs], [e for _, e in pairs]


def _checked_size(im: Image.Image) -> tuple[int, int]:
    """An opened image's size, if its format and size are acceptable; else ValueError."""
    if im.format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported format {im.format}")
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} is more than {MAX_PIXELS:,} pixels")
    if w < 1 or h < 1:
        raise ValueError("empty image")
    return w, h


def check_header(path: Path) -> tuple[tuple[int, int], int]:
    """Open an image's header only; return its size and the file's bytes, or raise ValueError with the reason."""
    with open_regular_file(path) as f:
        try:
            with Image.open(f, formats=OPENED) as im:
                return _checked_size(im), os.fstat(f.fileno()).st_size
        except Exception as e:  # Pillow's parsers raise many kinds (OSError, SyntaxError, struct.error, ...) on bad bytes
            raise ValueError(_reason(e)) from None


def _reason(e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"more than {MAX_PIXELS:,} pixels"
    if isinstance(e, PermissionError | FileNotFoundError) or (isinstance(e, OSError) and e.strerror and e.filename):
        return os_reason(e)
    text = str(e).split("\n")[0] or type(e).__name__
    if text.startswith("cannot identify image file"):
        return "not an image"
    return "truncated file" if "truncated" in text.lower() else text


@contextlib.contextmanager
def _opened(f, image_size: int):
    """The image in the open binary file ``f``, its format and size checked from the header
    (a decompression bomb is refused before any decoding), set to decode a JPEG at a reduced
    scale (Image.draft). Any failure, then or in the block, is a ValueError with the reason."""
    try:
        with Image.open(f, formats=OPENED) as im:
            _checked_size(im)
            im.draft("RGB", (image_size, image_size))
            yield im
    except Exception as e:  # as in check_header: Pillow's parsers raise many kinds on bad bytes
        raise ValueError(_reason(e)) from None


def pixels_to_decode(f, image_size: int) -> int:
    """The pixels :func:`decode_stream` would decode from the open image ``f`` (a JPEG at its
    reduced decoding scale), read from the header alone; ValueError for what cannot be read."""
    with _opened(f, image_size) as im:
        return im.size[0] * im.size[1]


def read_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one image file to a ``(image_size, image_size, 3)`` uint8 RGB array.

    Pillow rather than ``tf.io.decode_image``: it names the file that fails before
    training starts, honours EXIF orientation, reads CMYK and 16-bit images, composites
    transparency on white, and needs no TensorFlow import. Raises ValueError with a
    short reason for anything it cannot read.
    """
    with open_regular_file(path) as f:
        return decode_stream(f, image_size)


def decode_stream(f, image_size: int) -> np.ndarray:
    """:func:`read_image` for an open binary file or a ``BytesIO`` (an upload, say)."""
    with _opened(f, image_size) as im, DECODING.hold(im.size[0] * im.size[1]):
        return _decode(im, image_size)


def _decode(im: Image.Image, image_size: int) -> np.ndarray:
    """Pixels of an opened image: EXIF orientation, 16-bit grey, transparency on white, RGB."""
    im = ImageOps.exif_transpose(im)  # also loads the pixels: truncation fails here
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit) grey: keep the top 8 bits; convert("L") would clip.
        bits = 16 if im.mode.startswith("I;16") else 32
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> (bits - 8)).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_images(paths: list[Path], image_size: int, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``paths`` in parallel: ``(x, errors)``, the readable images packed in order.

    ``x`` is ``out`` (a preallocated ``(len(paths), S, S, 3)`` uint8 array, e.g. a memory
    map) or a new array; it holds only the readable images, in order, so it is a view of
    its first rows when files fail. ``errors[i]`` is why ``paths[i]`` failed, or None.
    """
    x = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8) if out is None else out

    def decode_row(i):
        x[i] = read_image(paths[i], image_size)

    _, errors = try_each(decode_row, list(range(len(paths))))
    count = 0
    for i, error in enumerate(errors):  # pack the readable images together (rows only move up)
        if error is None:
            if count != i:
                x[count] = x[i]
            count += 1
    return x[:count], errors

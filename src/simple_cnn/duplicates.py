"""Copies of one picture never straddle the splits.

A photo saved twice, once in the training split and once in the test split, makes
the test accuracy a memory test. Two kinds of copies are found:

- **Identical files** (same bytes under another name or in another class folder):
  while scanning, in every mode. Only files that share their size (known from the
  header check) with another one are read and hashed (SHA-256).
- **Near copies** (re-encoded, resized, mirrored, very lightly cropped): a 64-bit
  perceptual hash (pHash: the signs of the 8x8 lowest frequencies of the discrete
  cosine transform of a 32x32 grey thumbnail, against their median) of the pixels
  that training and testing decode anyway, so it costs no extra decode. Two images
  are near copies when their hashes differ in at most :data:`NEAR` of 64 bits *and*
  their 16x16 grey thumbnails correlate at :data:`SAME` or more: the hash finds
  candidates fast, the thumbnail confirms them. Look-alike images whose hashes are
  close by nature (the tests' synthetic shapes on dark noise) are told apart by the
  thumbnail. A mirrored copy counts: training flips images at random, so the network
  has seen the mirror image of every training photo. Crops move the content, and
  only crops of a few pixels are caught (bench/README.md has the rates).

The rule: a group of copies belongs to the earliest split any of its members falls in
(train, then validation, then test). A copy that would land in a later split is set
aside: it is not used there, and the outputs name it. Images without copies keep the
split :func:`dataset.split_of` gives them.

Why our own code: imagededup and ImageHash compute the same hashes but decode every
file again (our pixels are already in memory), and compare by brute force or a
Python BK-tree; :func:`near_pairs` is a vectorised pigeonhole index instead.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import printable

# The thresholds were chosen with bench/duplicates_bench.py on real photos (the rates they
# catch and miss: bench/README.md, "Finding copies"): re-encoded, half-size and mirrored
# copies pass all three, distinct photos and the tests' look-alike synthetic shapes (which
# pass the first two: same shape, same place, another shade) do not. A wider NEAR finds
# more cropped copies but costs far more on large datasets.
NEAR = 4  # candidates: the hashes differ in at most this many of 64 bits
SAME = 0.96  # near copies: the mean-free 16x16 thumbnails correlate at least this much
TINT = 16  # near copies: no colour of a 4x4 grid of cell means differs by more (of 255)
SMALL = 16  # the confirming thumbnail's side
GRID = 4  # the colour grid's side
THUMBNAIL_BYTES = SMALL * SMALL + GRID * GRID * 3  # a row of signatures()' thumbnails
HASHED_SIDE = 32  # the side of the grey thumbnail whose DCT gives the pHash
LOW = 8  # the lowest LOW x LOW frequencies make the 64 bits
GREY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luma, as Pillow's convert("L")


def identical_files(paths: list[Path], sizes: list[int]) -> list[list[int]]:
    """Groups (two or more indices into ``paths``) of files with the same bytes; ``sizes`` in bytes."""
    by_size = defaultdict(list)
    for i, size in enumerate(sizes):
        by_size[size].append(i)
    by_digest = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        for i in same_size:
            try:
                with open(paths[i], "rb") as f:
                    by_digest[hashlib.file_digest(f, "sha256").digest()].append(i)
            except OSError:
                continue
    return [group for group in by_digest.values() if len(group) > 1]


SAMPLES = 24  # pixels sampled per row and column: enough for 8 frequencies and a 16x16 thumbnail


def _mirror_symmetric_samples(size: int, count: int) -> np.ndarray:
    """About ``count`` pixel positions in ``range(size)``, as many on each side of the middle.

    Mirror-symmetric, so that the samples of a mirrored image are the mirrored samples
    (plain every-k-th-pixel sampling would shift them, and the hashes with them).
    """
    count = min(count, size) // 2
    left = np.floor(np.linspace(0, size / 2 - 1, count)).astype(int)
    return np.unique(np.concatenate([left, size - 1 - left]))


def _dct_rows(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size ``n`` (rows are frequencies), from SciPy."""
    from scipy.fft import dct

    return dct(np.eye(n), norm="ortho", axis=0)


def _area_resize(size: int, n: int) -> np.ndarray:
    """The ``(n, size)`` matrix that averages ``size`` pixels into ``n`` (box filter)."""
    m = np.zeros((n, size))
    for j in range(n):
        a, b = j * size / n, (j + 1) * size / n
        for i in range(int(a), int(np.ceil(b))):
            m[j, i] = min(b, i + 1) - max(a, i)
    return m / m.sum(axis=1, keepdims=True)


def signatures(x: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, thumbnails)`` of the images in ``x`` (uint8 ``[N, S, S, 3]``).

    ``hashes``: uint64 ``[N, 2]``, the pHash of each image and of its mirror image.
    ``thumbnails``: uint8 ``[N, 256 + 48]``, each image's 16x16 grey thumbnail, then
    its mean colours on a 4x4 grid (RGB).

    Linear algebra on the decoded pixels: grey, then one matrix ``M = DCT[:8] @ resize``
    gives the 8x8 low frequencies as ``M @ grey @ M.T``, chunk by chunk (bounded memory,
    memory-mapped caches welcome). Mirroring an image negates its odd horizontal frequencies.
    """
    n = len(x)
    out = np.zeros((n, 2), dtype=np.uint64)
    thumbnails = np.zeros((n, THUMBNAIL_BYTES), dtype=np.uint8)
    if n == 0:
        return out, thumbnails
    rows = _mirror_symmetric_samples(x.shape[2], SAMPLES)
    side = len(rows)
    # Everything is linear in the pixels, so two matrix products per chunk give it all
    # (NumPy's batched products of small matrices, and its grey conversion, are many
    # times slower). Vertically: the 8 DCT rows, the 16 thumbnail rows, the 4 grid rows.
    vertical = np.concatenate(
        [_dct_rows(HASHED_SIDE)[:LOW] @ _area_resize(side, HASHED_SIDE), _area_resize(side, SMALL), _area_resize(side, GRID)]
    ).astype(np.float32)
    # Horizontally, on interleaved RGB: the same 24 rows applied to grey, then the grid per colour.
    grey_rows = np.einsum("jx,c->xcj", vertical[: LOW + SMALL], GREY).reshape(side * 3, -1)
    colour_rows = np.einsum("gx,cd->xcgd", vertical[LOW + SMALL :], np.eye(3, dtype=np.float32)).reshape(side * 3, -1)
    horizontal = np.concatenate([grey_rows, colour_rows], axis=1).astype(np.float32)  # [side * 3, 24 + 12]
    flip = np.where(np.arange(LOW) % 2, -1, 1).astype(np.float32)  # per horizontal frequency
    weights = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)
    g = LOW + SMALL

    def sign(start: int) -> None:
        # Two takes, not x[:, rows[:, None], rows], whose result NumPy lays out image-last.
        pixels = x[start : start + chunk].take(rows, axis=1).take(rows, axis=2).astype(np.float32)  # [k, y, x, rgb]
        k = len(pixels)
        across = (pixels.reshape(k * side, side * 3) @ horizontal).reshape(k, side, -1)  # [k, y, horizontal]
        done = np.matmul(vertical, across).transpose(0, 2, 1)  # [k, horizontal, vertical]
        low = done[:, :LOW, :LOW].transpose(0, 2, 1)  # [k, 8, 8]: vertical frequency, horizontal frequency
        small = done[:, LOW:g, LOW:g].transpose(0, 2, 1)  # [k, 16, 16] grey
        grid = done[:, g:, g:].reshape(k, GRID, 3, GRID).transpose(0, 2, 3, 1)  # [k, rgb, 4 down, 4 across]
        thumbnails[start : start + k, : SMALL * SMALL] = np.rint(np.clip(small, 0, 255)).reshape(k, -1)
        thumbnails[start : start + k, SMALL * SMALL :] = np.rint(np.clip(grid, 0, 255)).reshape(k, -1)
        for column, coefficients in enumerate((low, low * flip)):
            c = coefficients.reshape(k, LOW * LOW)
            median = np.median(c[:, 1:], axis=1, keepdims=True)  # the DC term is the brightness: left out
            bits = (c > median).astype(np.uint64)
            out[start : start + k, column] = (bits * weights).sum(axis=1, dtype=np.uint64)

    for start in range(0, n, chunk):  # a thread pool measured no faster on 2 CPUs
        sign(start)
    return out, thumbnails


def _similar(thumbnails: np.ndarray, a: np.ndarray, b: np.ndarray, same: float = SAME, tint: float = TINT) -> np.ndarray:
    """Whether images ``a`` and ``b`` (row indices) look alike: as they are, or ``b`` mirrored.

    Alike: their grey thumbnails correlate at ``same`` or more, and the colours of their
    grids differ by at most ``tint`` (so recoloured look-alikes are not copies).
    """
    alike = np.zeros(len(a), dtype=bool)
    for mirror in (False, True):
        alike |= (_correlation(thumbnails, a, b, mirror) >= same) & (_colour_difference(thumbnails, a, b, mirror) <= tint)
    return alike


def _correlation(thumbnails, a, b, mirror: bool) -> np.ndarray:
    def normalised(rows):
        t = thumbnails[rows, : SMALL * SMALL].reshape(-1, SMALL, SMALL).astype(np.float32)
        t -= t.mean(axis=(1, 2), keepdims=True)
        return t / (np.sqrt((t * t).sum(axis=(1, 2), keepdims=True)) + 1e-6)

    tb = normalised(b)
    return (normalised(a) * (tb[:, :, ::-1] if mirror else tb)).sum(axis=(1, 2))


def _colour_difference(thumbnails, a, b, mirror: bool) -> np.ndarray:
    def colours(rows):
        return thumbnails[rows, SMALL * SMALL :].reshape(-1, 3, GRID, GRID).astype(np.int16)

    cb = colours(b)
    return np.abs(colours(a) - (cb[..., ::-1] if mirror else cb)).max(axis=(1, 2, 3))


def near_pairs(hashes: np.ndarray, thumbnails: np.ndarray, near: int = NEAR, same: float = SAME) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, whose images are near copies (either one possibly mirrored).

    ``hashes`` and ``thumbnails`` are :func:`signatures`'. A pigeonhole index, not N²
    comparisons: two 64-bit hashes at most ``near`` bits apart agree exactly on at
    least one of ``near + 1`` bands of bits, so only hashes sharing a band's value are
    compared: about ``5 x (2N)² / 2**13`` comparisons at the default, all vectorised
    (the cost for 3,670 and 100,000 images is in bench/README.md).
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    values = np.concatenate([hashes[:, 0], hashes[:, 1]])  # a plain and a mirror entry per image
    owner = np.concatenate([np.arange(n), np.arange(n)])
    edges = np.linspace(0, 64, near + 2).astype(int)  # near + 1 bands
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = (values >> np.uint64(64 - hi)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(band, kind="stable")
        a, b = _pairs_within_runs(band[order])
        i, j = owner[order[a]], owner[order[b]]
        close = np.bitwise_count(values[order[a]] ^ values[order[b]]) <= near
        found.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)[close & (i != j)])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs[_similar(thumbnails, pairs[:, 0], pairs[:, 1], same)]


def _pairs_within_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of positions ``a < b`` of sorted ``keys`` with equal keys, without a Python loop."""
    starts = np.r_[0, np.flatnonzero(np.diff(keys)) + 1]
    ends = np.r_[starts[1:], len(keys)]
    after = np.repeat(ends, ends - starts) - np.arange(len(keys)) - 1  # equal keys after each position
    a = np.repeat(np.arange(len(keys)), after)
    b = a + 1 + np.arange(len(a)) - np.repeat(np.cumsum(after) - after, after)
    return a, b


def groups(n: int, pairs) -> list[list[int]]:
    """The connected groups (two or more members) of ``n`` items linked by ``pairs``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    members = defaultdict(list)
    for i, c in enumerate(component):
        members[c].append(i)
    return [m for m in members.values() if len(m) > 1]


@dataclass
class Fingerprints:
    """Decoded rows' files, labels and signatures (:func:`signatures`): what the copy rule compares,
    and what a model file keeps of its training images."""

    files: list[str]
    labels: np.ndarray
    hashes: np.ndarray  # uint64 [N, 2]: the pHash of the image and of its mirror image
    thumbnails: np.ndarray  # uint8 [N, THUMBNAIL_BYTES]: 16x16 grey, 4x4 RGB

    @classmethod
    def of(cls, files: list[str], labels: np.ndarray, x: np.ndarray) -> Fingerprints:
        return cls(files, np.asarray(labels), *signatures(x))

    @classmethod
    def none(cls) -> Fingerprints:
        return cls([], np.zeros(0, np.int64), *signatures(np.zeros((0, 8, 8, 3), np.uint8)))

    def take(self, keep: np.ndarray) -> Fingerprints:
        files = [f for f, k in zip(self.files, keep) if k]
        return Fingerprints(files, self.labels[keep], self.hashes[keep], self.thumbnails[keep])

    def __add__(self, other: Fingerprints) -> Fingerprints:
        arrays = [(self.labels, other.labels), (self.hashes, other.hashes), (self.thumbnails, other.thumbnails)]
        return Fingerprints(self.files + other.files, *(np.concatenate(pair) for pair in arrays))

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "labels": self.labels.tolist(),
            "phash": [f"{a:016x}{b:016x}" for a, b in self.hashes],
            "thumbnails": base64.b64encode(self.thumbnails.tobytes()).decode(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprints:
        hashes = np.array([(int(h[:16], 16), int(h[16:], 16)) for h in d["phash"]], dtype=np.uint64).reshape(-1, 2)
        thumbnails = np.frombuffer(base64.b64decode(d["thumbnails"]), dtype=np.uint8).reshape(len(hashes), -1)
        return cls(list(d["files"]), np.array(d["labels"], dtype=np.int64), hashes, thumbnails)


@dataclass
class Copies:
    """The copies found in a dataset (see ``duplicates.py``): links between files, and what was set aside."""

    links: list[tuple[str, str]] = field(default_factory=list)  # (relpath, relpath) of two copies
    labels: dict[str, int] = field(default_factory=dict)  # the class of every linked file
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # (relpath, the copy that kept its split)

    def link(self, a: str, label_a: int, b: str, label_b: int) -> None:
        self.links.append((a, b))
        self.labels[a], self.labels[b] = label_a, label_b

    def groups(self) -> list[list[str]]:
        names = sorted(self.labels)
        index = {name: i for i, name in enumerate(names)}
        pairs = [(index[a], index[b]) for a, b in self.links]
        return [sorted(names[i] for i in g) for g in groups(len(names), pairs)]

    def report(self, class_names: list[str]) -> dict:
        """For the outputs: how many groups and images, what was set aside, and mislabelled groups."""
        found = self.groups()
        mixed = [g for g in found if len({self.labels[f] for f in g}) > 1]
        return {
            "groups": len(found),
            "images": sum(map(len, found)),
            "set_aside": [{"file": printable(f), "copy_of": printable(kept)} for f, kept in self.set_aside],
            "mixed_labels": [[f"{printable(f)} ({class_names[self.labels[f]]})" for f in g] for g in mixed],
        }

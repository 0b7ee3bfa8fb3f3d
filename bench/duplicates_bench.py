"""What finding copies costs: against the decode it rides on, and at 100,000 images.

    python bench/duplicates_bench.py --dataset PATH [--image_size N] [--robustness 10] [--synthetic 100000]

For the dataset (every split, as ``load_data`` decodes it), in one run: the decode
time, then the extra time of each step of ``duplicates.py`` (identical files by size
and SHA-256; pHash and thumbnails; the pigeonhole comparison), as a share of the
decode; and the copies found. ``--robustness K`` alters every K-th image (re-encoded,
half size, mirrored, cropped) and counts the copies found. ``--synthetic N`` also times the comparison alone on N
random signatures with a realistic share of copies, for the cost at scale.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from simple_cnn import duplicates  # noqa: E402
from simple_cnn.dataset import ImageDataset  # noqa: E402
from simple_cnn.images import decode_images, read_image  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def on_dataset(path: Path, image_size: int | None) -> None:
    dataset = ImageDataset.scan(path)
    size = image_size or dataset.auto_image_size()
    records = dataset.images
    paths = [dataset.root / r.relpath for r in records]
    (x, _), decode = timed(decode_images, paths, size)
    groups, identical = timed(duplicates.identical_files, paths, [r.nbytes for r in records])
    (hashes, thumbnails), signing = timed(duplicates.signatures, x)
    pairs, comparing = timed(duplicates.near_pairs, hashes, thumbnails)
    near = duplicates.groups(len(x), pairs)
    print(f"{path}: {len(paths)} images decoded at {size}x{size} in {decode:.2f} s")
    for name, seconds in [("identical files", identical), ("pHash + thumbnails", signing), ("comparison", comparing)]:
        print(f"  {name:20s} {seconds * 1000:8.1f} ms  {100 * seconds / decode:5.2f}% of the decode")
    total = identical + signing + comparing
    print(f"  {'all of it':20s} {total * 1000:8.1f} ms  {100 * total / decode:5.2f}% of the decode")
    print(f"  identical groups: {len(groups)}; near-copy groups: {len(near)} ({sum(map(len, near))} images)")
    for g in near[:10]:
        print("   ", ", ".join(records[i].relpath for i in g))


COPIES = {
    "JPEG quality 30": lambda im: _jpeg(im, 30),
    "half size": lambda im: im.resize((max(8, im.width // 2), max(8, im.height // 2)), Image.Resampling.LANCZOS),
    "mirrored": ImageOps.mirror,
    "cropped 1% a side": lambda im: _crop(im, 0.01),
    "cropped 2% a side": lambda im: _crop(im, 0.02),
    "cropped 4% a side": lambda im: _crop(im, 0.04),
}


def _jpeg(im, quality):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(buf)


def _crop(im, f):
    dx, dy = round(im.width * f), round(im.height * f)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


def robustness(path: Path, image_size: int | None, every: int) -> None:
    """How many altered copies of every ``every``-th image are found, and false matches between the originals."""
    dataset = ImageDataset.scan(path)
    size = image_size or dataset.auto_image_size()
    paths = [dataset.root / r.relpath for r in dataset.images]
    x, _ = decode_images(paths, size)
    hashes, thumbnails = duplicates.signatures(x)
    false = len(duplicates.near_pairs(hashes, thumbnails))
    print(f"robustness at {size}x{size}: near-copy pairs between the {len(x)} originals: {false}")
    chosen = list(range(0, len(paths), every))
    with tempfile.TemporaryDirectory() as tmp:
        for name, alter in COPIES.items():
            copies = []
            for n, i in enumerate(chosen):
                with Image.open(paths[i]) as im:
                    target = Path(tmp) / f"{n}.png"
                    alter(im.convert("RGB")).save(target)
                copies.append(read_image(target, size))
            h, t = duplicates.signatures(np.stack(copies))
            found = 0
            for n, i in enumerate(chosen):
                pair_h = np.stack([hashes[i], h[n]])
                pair_t = np.stack([thumbnails[i], t[n]])
                found += len(duplicates.near_pairs(pair_h, pair_t)) == 1
            print(f"  {name:20s} found {found} of {len(chosen)}")


def synthetic(n: int) -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    thumbnails = rng.integers(0, 256, size=(n, duplicates.THUMBNAIL_BYTES), dtype=np.uint8)
    copies = rng.choice(n, n // 100, replace=False)  # 1% are near copies of another image
    hashes[copies] = hashes[copies - 1] ^ np.uint64(0b101)
    thumbnails[copies] = thumbnails[copies - 1]
    pairs, seconds = timed(duplicates.near_pairs, hashes, thumbnails)
    print(f"synthetic: {n:,} random signatures, 1% near copies: comparison {seconds:.2f} s, {len(pairs):,} pairs found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--image_size", type=int)
    parser.add_argument(
        "--robustness", type=int, default=0, metavar="EVERY", help="also alter every EVERY-th image and count the copies found"
    )
    parser.add_argument("--synthetic", type=int, default=0, help="also time the comparison on this many random signatures")
    args = parser.parse_args()
    on_dataset(args.dataset, args.image_size)
    if args.robustness:
        robustness(args.dataset, args.image_size, args.robustness)
    if args.synthetic:
        synthetic(args.synthetic)


if __name__ == "__main__":
    main()

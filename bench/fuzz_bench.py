"""Fuzzing the image reader of one format: is it safe to read files (and uploads) from strangers?

    python bench/fuzz_bench.py --format AVIF --cases 30000

Seed files of the format, in several modes and sizes (and, for TIFF, compressions), are written by
Pillow; each case mutates one of them (overwritten, deleted or inserted bytes, 1 to 32 edits) and
reads it as simple_cnn does (``images.decode_stream``: the header checks, then the decoding). It
counts the outcomes (read, or the reason it was skipped), the cases slower than a second, and the
bytes the decoder libraries wrote to the process's stderr themselves: simple_cnn promises one line
on stderr for bad input, and ``--mode serve`` must not let strangers write to its log. A crash ends
the run, which is an answer too. The mutations are a seeded ``random.Random``, so a run repeats.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from collections import Counter

import numpy as np
from PIL import Image

from simple_cnn.images import decode_stream

MODES = (("RGB", (64, 48)), ("RGBA", (33, 17)), ("L", (40, 40)), ("RGB", (300, 200)))
TIFF_COMPRESSIONS = (None, "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg", "group4")


def seeds(fmt: str) -> list[bytes]:
    """Valid files of ``fmt`` that Pillow writes: each mode and size, two qualities or the compressions."""
    rng = np.random.default_rng(0)
    out = []
    for mode, (w, h) in MODES:
        pixels = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        options = [{"compression": c} for c in TIFF_COMPRESSIONS] if fmt == "TIFF" else [{"quality": 30}, {"quality": 90}]
        for option in options:
            if mode == "RGBA" and (fmt == "JPEG" or option.get("compression") == "jpeg"):
                continue
            buffer = io.BytesIO()
            picture = image.convert("1") if option.get("compression") == "group4" else image  # fax: black and white
            picture.save(buffer, fmt, **{k: v for k, v in option.items() if v is not None})
            out.append(buffer.getvalue())
    return out


def mutated(seed: bytes, rng: random.Random) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.choice((1, 2, 4, 8, 32))):
        k, op = rng.randrange(len(data)), rng.random()
        if op < 0.6:
            data[k] = rng.randrange(256)
        elif op < 0.8:
            del data[k : k + rng.randrange(1, 16)]
        else:
            data[k:k] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="AVIF", help="a format Pillow writes: AVIF, WEBP, PNG, JPEG, TIFF...")
    parser.add_argument("--cases", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    valid = seeds(args.format)
    print(f"{len(valid)} seed files of {args.format}, {min(map(len, valid)):,}-{max(map(len, valid)):,} bytes", flush=True)
    rng, outcomes, slow = random.Random(args.seed), Counter(), 0
    captured, saved = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(captured.fileno(), 2)  # the file descriptor, not sys.stderr: C libraries write there directly
    started = time.perf_counter()
    try:
        for _ in range(args.cases):
            case = time.perf_counter()
            try:
                decode_stream(io.BytesIO(mutated(rng.choice(valid), rng)), 32)
                outcomes["read"] += 1
            except ValueError as e:
                outcomes[str(e)[:40]] += 1
            slow += time.perf_counter() - case > 1
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
    captured.seek(0)
    written = captured.read()
    print(f"{args.cases:,} cases in {time.perf_counter() - started:.1f} s; slower than 1 s: {slow}")
    print(f"bytes the decoders wrote to stderr: {len(written):,}" + (f", starting {written[:200]!r}" if written else ""))
    for outcome, n in outcomes.most_common(12):
        print(f"{n:>7,}  {outcome}")


if __name__ == "__main__":
    main()

"""Images that are certainly a problem, whatever their label: blurry, blank, tiny, odd-shaped, grey.

Each check is one number per image with a fixed threshold, computed on the pixels the
audit decodes anyway (uint8 at the audit's size) or on the header's size. The thresholds
and the share of flowers-dev's real photos each flags are in docs/audit.md. The blur
measure is the variance of the Laplacian (Pech-Pacheco et al., 2000), SciPy's filter on
the grey image: a sharp photo has strong second derivatives somewhere, a blurred one
nowhere.
"""

from __future__ import annotations

import numpy as np

BLURRY = 20.0  # variance of the Laplacian of the grey image (0-255), below: very blurry
DARK, BRIGHT = 12.0, 243.0  # mean grey level below / above: nearly black / white
UNIFORM = 6.0  # standard deviation of the grey levels below: nearly one colour (no information)
TINY = 0.5  # the shorter side below this share of the audit's image size: upscaled mush
ASPECT = 3.0  # the longer side over the shorter beyond it: a strip, not a photo
GREY = 2.0  # mean difference between colour channels below it: a grey image
GREY_DATASET = 0.1  # a dataset is a colour one when fewer than this share of its images are grey
CHUNK = 256  # images measured at a time


def grey_levels(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of uint8 RGB images ``[N, S, S, 3]``, as float32 ``[N, S, S]``."""
    return (x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114).astype(np.float32)


def measures(x: np.ndarray, sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Every measure of every image: ``x`` the decoded pixels, ``sizes`` (width, height) from the headers."""
    wide = np.array(sizes, dtype=np.float64).reshape(-1, 2)
    # A chunk at a time: the float intermediates of the whole array at once are many times its
    # decoded size, and were the audit's peak memory (bench/README.md, "Auditing labels").
    starts = range(0, len(x), CHUNK) or [0]  # no images: one empty chunk, so every measure is there, empty
    chunks = [pixel_measures(x[i : i + CHUNK]) for i in starts]
    return {
        **{name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]},
        "short_side": wide.min(axis=1),
        "aspect": wide.max(axis=1) / np.maximum(wide.min(axis=1), 1),
    }


def pixel_measures(x: np.ndarray) -> dict[str, np.ndarray]:
    """The measures read from the pixels ``x`` (uint8 ``[N, S, S, 3]``)."""
    from scipy.ndimage import laplace

    grey = grey_levels(x)
    channels = x.astype(np.int16)
    return {
        "sharpness": np.array([laplace(g).var() for g in grey], dtype=np.float32),
        "brightness": grey.mean(axis=(1, 2)),
        "contrast": grey.std(axis=(1, 2)),
        "colourfulness": np.abs(channels - channels.mean(axis=-1, keepdims=True)).mean(axis=(1, 2, 3)),
    }


def problems(m: dict[str, np.ndarray], image_size: int) -> list[list[str]]:
    """The problems of each image, in words, from :func:`measures`' numbers."""
    grey = m["colourfulness"] < GREY
    colour_dataset = grey.mean() < GREY_DATASET
    found = []
    for i in range(len(m["sharpness"])):
        mine = []
        if m["contrast"][i] < UNIFORM:
            mine.append(f"nearly one colour (grey-level spread {m['contrast'][i]:.1f} < {UNIFORM:g})")
        elif m["sharpness"][i] < BLURRY:
            mine.append(f"very blurry (variance of the Laplacian {m['sharpness'][i]:.1f} < {BLURRY:g})")
        if m["brightness"][i] < DARK:
            mine.append(f"nearly black (mean grey level {m['brightness'][i]:.0f})")
        elif m["brightness"][i] > BRIGHT:
            mine.append(f"nearly white (mean grey level {m['brightness'][i]:.0f})")
        if m["short_side"][i] < TINY * image_size:
            mine.append(f"far smaller than the training size ({m['short_side'][i]:.0f} pixels, training at {image_size})")
        if m["aspect"][i] > ASPECT:
            mine.append(f"an extreme aspect ratio ({m['aspect'][i]:.1f}:1)")
        if colour_dataset and grey[i]:
            mine.append("grayscale in a colour dataset")
        found.append(mine)
    return found

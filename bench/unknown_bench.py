"""Unknown by distance (issue 37): does the detector tell images of no class from the classes, better than the softmax?

A model is trained with default flags (within ``--minutes``) on a folder of class folders
(flower_photos-small), once per seed. Test mode then scores it with ``--unknown_path`` on
each set of images that belong to none of its classes, written here:

- ``digits``: scikit-learn's handwritten digits, white on black, scaled up;
- ``noise``: uniform random pixels;
- ``textures``: stripes at random angles, frequencies and colours;
- ``smooth``: smooth colour fields (four random corners, interpolated);
- ``photo_crops``: random crops of scikit-learn's photo of a temple in China (other objects).

For each, the AUROC of the distance and of the softmax against the test images, and the
shares caught and kept at the thresholds chosen in training (both keep 95 % of the
validation images). Then the costs: the model file's and the LiteRT copy's bytes, one
image's LiteRT latency with and without the distance output, and the seconds the fit
takes at the end of training.

    python bench/unknown_bench.py --photos ../shared/datasets/flower_photos-small [--seeds 1 2] [--minutes 4]

Prints one JSON line per result and writes them all (default bench/results/unknown.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from transfer_bench import cli  # the same subprocess wrapper, with the peak memory

SETS = ("digits", "noise", "textures", "smooth", "photo_crops")


def write_set(name: str, folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` images of the set ``name`` as PNG files in ``folder/name``."""
    rng = np.random.default_rng(seed)
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits().images[:count] / 16 * 255
        images = [Image.fromarray(d.astype(np.uint8)).convert("RGB").resize((96, 96), Image.BILINEAR) for d in digits]
    elif name == "photo_crops":
        from sklearn.datasets import load_sample_image

        photo = Image.fromarray(load_sample_image("china.jpg"))
        images = []
        for _ in range(count):
            side = int(rng.integers(80, 300))
            x, y = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
            images.append(photo.crop((x, y, x + side, y + side)).resize((160, 160), Image.BILINEAR))
    else:
        images = [Image.fromarray(synthetic(name, rng)) for _ in range(count)]
    for i, image in enumerate(images):
        image.save(out / f"{name}_{i:04d}.png")
    return out


def synthetic(name: str, rng: np.random.Generator, side: int = 160) -> np.ndarray:
    grid = np.linspace(0, 1, side)
    if name == "noise":
        return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    if name == "textures":
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(2, 20)
        wave = np.sin(2 * np.pi * frequency * (np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]))
        return ((wave[..., None] * 0.5 + 0.5) * rng.integers(60, 256, 3)).astype(np.uint8)
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(corners).resize((side, side), Image.BILINEAR))


def costs(model_path: Path, photos: Path) -> dict:
    """Bytes and one image's LiteRT latency with and without the distance; the fit's seconds."""
    from simple_cnn import converters, formats, unknown
    from simple_cnn.dataset import ImageDataset
    from simple_cnn.runtime import LiteRT

    model, metadata = formats.load_model(model_path)
    detector = unknown.read_detector(model_path)
    plain = converters.litert_bytes(model, metadata)
    with_distance = converters.litert_bytes(unknown.inference_network(model, detector), metadata)
    x = np.zeros((1, metadata["image_size"], metadata["image_size"], 3), np.uint8)
    latency = {}
    for name, content in (("without", plain), ("with", with_distance)):
        litert = LiteRT(content)
        litert.run(x)
        times = []
        for _ in range(300):
            started = time.perf_counter()
            litert.run(x)
            times.append(time.perf_counter() - started)
        latency[name] = round(1000 * float(np.median(times)), 3)
    dataset = ImageDataset.of_model(photos, metadata, model_path)
    train, val = dataset.training_splits(metadata["image_size"])
    started = time.monotonic()
    unknown.fit_on_splits(model, train, val)
    return {
        "model_bytes": model_path.stat().st_size,
        "detector_member_bytes": len(detector.as_member()[unknown.MEMBER]),
        "litert_bytes": {"without": len(plain), "with": len(with_distance)},
        "litert_latency_ms": latency,
        "fit_seconds": round(time.monotonic() - started, 1),
        "training_images": len(train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="a folder of class folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--minutes", type=float, default=4.0, help="each training run's --max_minutes")
    parser.add_argument("--count", type=int, default=200, help="images in each set of no class")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "unknown.json")
    args = parser.parse_args()
    photos = args.photos.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = {name: write_set(name, work / "none", args.count) for name in SETS}
        for seed in args.seeds:
            model = work / f"seed{seed}.keras"
            flags = ("--dataset_path", str(photos), "--model_file_path", str(model), "--images_dir", str(work / "images"))
            budget = ("--max_minutes", str(args.minutes), "--seed", str(seed))
            trained, seconds, peak = cli("--mode", "train", *flags, *budget, cwd=work)
            row = {"seed": seed, "kind": "train", "val_accuracy": trained["best_val_accuracy"], "seconds": round(seconds, 1)}
            rows.append(row | {"peak_kib": peak, "unknown": trained["unknown"]})
            print(json.dumps(rows[-1]), flush=True)
            for name, folder in folders.items():
                tested, _, _ = cli("--mode", "test", *flags, "--unknown_path", str(folder), cwd=work)
                row = {"seed": seed, "kind": "unknown", "set": name, "test_accuracy": tested["accuracy"]}
                rows.append(row | tested["unknown"])
                rows[-1].pop("skipped")
                print(json.dumps(rows[-1]), flush=True)
            rows.append({"seed": seed, "kind": "costs"} | costs(model, photos))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    """One line per set: the AUROCs and shares caught over the seeds (min-max)."""
    for name in SETS:
        found = [r for r in rows if r.get("set") == name]
        if not found:
            continue

        def spread(key, part, found=found):
            values = [r[part][key] for r in found]
            return f"{min(values):.3f}-{max(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

        print(
            f"{name:12s} AUROC distance {spread('auroc', 'distance')} softmax {spread('auroc', 'softmax')}; "
            f"caught distance {spread('caught', 'distance')} softmax {spread('caught', 'softmax')}; "
            f"test kept distance {spread('test_kept', 'distance')} softmax {spread('test_kept', 'softmax')}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()

"""Multi-label on real photos: two photos side by side, labelled with both.

From a folder of class folders (e.g. flowers-dev), makes a labels-file dataset where
each image is one photo (half of them) or two photos of different classes side by side,
labelled with each class it shows, then trains and tests it through the CLI with default
flags (optionally a shorter ``--max_minutes``). Compared in the same run against the
baseline that predicts each label at its training frequency, on the same test images.

    python bench/multilabel_bench.py --photos ../shared/datasets/flowers-dev [--seeds 1 2] [--max_minutes 4]

Prints one line per seed and writes the figures as JSON (default bench/results/multilabel.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 160  # each photo's square crop, as flower_photos-small's shorter side


def square(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    s = min(image.size)
    left, top = (image.width - s) // 2, (image.height - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def make_pairs(photos: Path, out: Path, seed: int) -> Path:
    """Each photo used once: half alone, the rest in pairs of different classes; labels.csv beside them."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in photos.iterdir() if p.is_dir() and not p.name.startswith("."))
    pool = [(c, p) for c in classes for p in sorted((photos / c).glob("*.jpg"))]
    order = rng.permutation(len(pool))
    (out / "images").mkdir(parents=True)
    rows, i = [], 0
    singles = len(pool) // 2
    while i < len(order):
        first = pool[order[i]]
        second = None
        if i >= singles:  # pair it with the next photo of another class
            j = next((k for k in range(i + 1, len(order)) if pool[order[k]][0] != first[0]), None)
            if j is not None:
                second = pool[order[j]]
                order[[i + 1, j]] = order[[j, i + 1]]
        canvas = Image.new("RGB", (2 * SIDE, SIDE)) if second else square(first[1])
        if second:
            left, right = (first, second) if rng.random() < 0.5 else (second, first)
            canvas.paste(square(left[1]), (0, 0))
            canvas.paste(square(right[1]), (SIDE, 0))
        name = f"images/{len(rows):05d}.jpg"
        canvas.save(out / name, quality=90)
        rows.append([name, "|".join(sorted({first[0]} | ({second[0]} if second else set())))])
        i += 2 if second else 1
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return out


def cli(*args: str, cwd: Path) -> tuple[dict, float, int]:
    """Run simple-cnn with ``args`` and ``--json``; its result, wall seconds and peak RSS in KiB."""
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run([sys.executable, "-m", "simple_cnn", *args, "--json"], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(result.stdout), time.monotonic() - started, max(peak, before)


def frequency_baseline(work: Path) -> dict:
    """mAP and micro-F1 of predicting each label at its training frequency (the same test images)."""
    from sklearn.metrics import average_precision_score, f1_score

    from simple_cnn.dataset import ImageDataset
    from simple_cnn.splits import Layout

    dataset = ImageDataset.scan(work / "data", Layout(labels=work / "data" / "labels.csv"))
    y_train = dataset.targets(dataset.split("train"))
    y_test = dataset.targets(dataset.split("test"))
    frequency = np.tile(y_train.mean(axis=0), (len(y_test), 1))
    present = y_test.any(axis=0)
    ap = [average_precision_score(y_test[:, c], frequency[:, c]) for c in np.flatnonzero(present)]
    # A constant answer at its best F1 threshold gives every label (precision: its frequency, recall 1).
    always = np.ones_like(y_test)
    return {"mean_average_precision": float(np.mean(ap)), "micro_f1": float(f1_score(y_test, always, average="micro"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max_minutes", type=float, default=None)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "multilabel.json")
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_pairs(args.photos.resolve(), work / "data", seed)
            budget = ("--max_minutes", str(args.max_minutes)) if args.max_minutes else ()
            train, train_s, train_kib = cli("--mode", "train", "--dataset_path", "data", "--labels", "data/labels.csv",
                                            "--seed", str(seed), *budget, cwd=work)  # fmt: skip
            test, test_s, _ = cli("--mode", "test", "--dataset_path", "data", cwd=work)
            run = {
                "seed": seed,
                "images": train["images"],
                "train_seconds_whole_command": round(train_s, 1),
                "peak_rss_kib": train_kib,
                "epochs_run": train["epochs_run"],
                "image_size": train["image_size"],
                "mean_average_precision": round(test["mean_average_precision"], 4),
                "micro_f1": round(test["micro_f1"], 4),
                "macro_f1": round(test["macro_f1"], 4),
                "subset_accuracy": round(test["subset_accuracy"], 4),
                "hamming_loss": round(test["hamming_loss"], 4),
                "baseline": frequency_baseline(work),
                "test_seconds": round(test_s, 1),
            }
            runs.append(run)
            print(json.dumps(run))
    summary = {
        key: {"mean": statistics.mean(r[key] for r in runs), "min": min(r[key] for r in runs), "max": max(r[key] for r in runs)}
        for key in ("mean_average_precision", "micro_f1", "subset_accuracy", "train_seconds_whole_command", "peak_rss_kib")
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

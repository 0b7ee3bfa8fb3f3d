"""Starting from more than zero (issue 36): the transfer effect, and each Keras backbone from scratch.

Part 1, the transfer effect with weights this machine can make. From a folder of five
class folders (flower_photos-small), a model is trained on three classes (``--pretrain``,
default daisy, dandelion, roses) and then fine-tuned with ``--init_from`` on the other two
with few training images each (``--shots``, default 10 and 30 per class, 10 per class for
validation), against the same command from random weights. Both are tested on every other
image of the two new classes, which the pretraining never saw (it saw none of their class).

Part 2, each ``--backbone`` with ``--weights none`` on the whole dataset beside the default
network: images per second, peak memory and test accuracy at ``--backbone_minutes``.

    python bench/transfer_bench.py --photos ../shared/datasets/flower_photos-small [--seeds 1 2]

Prints one JSON line per run and writes them all (default bench/results/transfer.json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The child's peak resident memory, printed by a wrapper process after the command ends.
_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def cli(*args: str, cwd: Path) -> tuple[dict, float, int]:
    """simple-cnn ``args --json``: its result, the whole command's seconds and its peak RSS in KiB."""
    started = time.monotonic()
    command = [sys.executable, "-c", _PEAK, sys.executable, "-m", "simple_cnn", *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    peak = int(result.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return json.loads(result.stdout), time.monotonic() - started, peak


def interval(accuracy: float, n: int) -> list[float]:
    """Wilson's 95 % interval of an accuracy on n images."""
    z = 1.96
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 3), round(centre + half, 3)]


def labels_file(photos: Path, out: Path, classes: list[str], shots: int | None, seed: int) -> Path:
    """A labels file over ``photos`` for ``classes``: ``shots`` train and 10 val images per class and
    the rest test, or (``shots`` None) every image left to simple_cnn's own split."""
    rng = np.random.default_rng(seed)
    rows = ["path,label,split"] if shots else ["path,label"]
    for name in classes:
        files = sorted((photos / name).glob("*.jpg"))
        for rank, i in enumerate(rng.permutation(len(files))):
            relative = f"{name}/{files[i].name}"
            if shots is None:
                rows.append(f"{relative},{name}")
            else:
                rows.append(f"{relative},{name},{'train' if rank < shots else 'val' if rank < shots + 10 else 'test'}")
    out.write_text("\n".join(rows) + "\n")
    return out


def transfer_runs(photos: Path, pretrain: list[str], shots: list[int], seed: int, minutes: float) -> list[dict]:
    others = sorted(p.name for p in photos.iterdir() if p.is_dir() and p.name not in pretrain)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        labels = labels_file(photos, work / "pretrain.csv", pretrain, None, seed)
        common = ("--dataset_path", str(photos), "--seed", str(seed))
        old, seconds, peak = cli("--mode", "train", *common, "--labels", str(labels), "--max_minutes", str(minutes),
                                 "--model_file_path", "old.keras", cwd=work)  # fmt: skip
        runs.append({"part": "pretrain", "seed": seed, "classes": pretrain, "seconds": round(seconds, 1), "peak_kib": peak,
                     "best_val_accuracy": old["best_val_accuracy"], "image_size": old["image_size"]})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
        for n in shots:
            labels = labels_file(photos, work / f"new{n}.csv", others, n, seed)
            for start in ("scratch", "init_from"):
                flags = ("--init_from", "old.keras") if start == "init_from" else ("--image_size", str(old["image_size"]))
                model = f"{start}{n}.keras"
                trained, seconds, peak = cli("--mode", "train", *common, "--labels", str(labels), *flags,
                                             "--model_file_path", model, cwd=work)  # fmt: skip
                tested, _, _ = cli("--mode", "test", "--model_file_path", model, "--labels", str(labels), cwd=work)
                runs.append({"part": "transfer", "seed": seed, "classes": others, "shots": n, "start": start,
                             "test_accuracy": round(tested["accuracy"], 4),
                             "interval": interval(tested["accuracy"], tested["test_images"]),
                             "test_images": tested["test_images"], "seconds": round(seconds, 1), "peak_kib": peak,
                             "epochs_run": trained["epochs_run"]})  # fmt: skip
                print(json.dumps(runs[-1]), flush=True)
    return runs


def backbone_runs(photos: Path, backbones: list[str], seed: int, minutes: float) -> list[dict]:
    runs = []
    for backbone in backbones:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            weights = ("--weights", "none") if backbone != "simple" else ()
            trained, seconds, peak = cli("--mode", "train", "--dataset_path", str(photos), "--backbone", backbone, *weights,
                                         "--max_minutes", str(minutes), "--seed", str(seed), cwd=work)  # fmt: skip
            tested, _, _ = cli("--mode", "test", "--dataset_path", str(photos), cwd=work)
            history = trained["train_seconds"]
            images_per_second = trained["images_used"]["train"] * trained["epochs_run"] / history
            runs.append({"part": "backbone", "backbone": backbone, "seed": seed, "image_size": trained["image_size"],
                         "batch_size": trained["config"]["batch_size"], "epochs_run": trained["epochs_run"],
                         "train_images_per_second": round(images_per_second, 1), "seconds": round(seconds, 1),
                         "peak_kib": peak, "test_accuracy": round(tested["accuracy"], 4),
                         "interval": interval(tested["accuracy"], tested["test_images"])})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pretrain", nargs="+", default=["daisy", "dandelion", "roses"])
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--pretrain_minutes", type=float, default=3.0)
    parser.add_argument("--backbones", nargs="*", default=["simple", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetV2B0"])
    parser.add_argument("--backbone_minutes", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "transfer.json")
    args = parser.parse_args()
    photos = args.photos.resolve()
    runs = []
    for seed in args.seeds:
        runs += transfer_runs(photos, args.pretrain, args.shots, seed, args.pretrain_minutes)
    runs += backbone_runs(photos, args.backbones, args.seeds[0], args.backbone_minutes)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Ultralytics YOLO classify from scratch, as train_bench.py's peer; runs in bench/.peers-venv
(bench/peers/install.sh), never in simple_cnn's environment.

    .peers-venv/bin/python bench/ultralytics_run.py --data EXPORTED --minutes N --work DIR [--imgsz S]

EXPORTED is our split in ImageFolder layout (peers.export_split: train/, val/, test/, the
test folder holding the images ``--mode test`` scores). It trains its smallest classify model
with ``pretrained=False`` and its own default recipe, stopped by its own ``time=`` budget, picks
its best epoch on val as it does, then tests on test/ and times classification in fresh
processes. Prints one JSON row (the keys of train_bench.py's rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODEL = "yolo26n-cls.yaml"  # its current smallest classify network (YOLO26n), built from its definition: no weights
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def tree_pss_kib(pid: int) -> int:
    """The proportional set size of ``pid`` and every process below it (its data-loading
    workers): shared pages counted once in all, not once per process as RSS would."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue  # a worker that ended between two reads
    return total


class PeakMemory(threading.Thread):
    """Samples :func:`tree_pss_kib` of this process every quarter second; ``peak`` is the largest."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, tree_pss_kib(os.getpid()))
            time.sleep(0.25)


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def predict_seconds(weights: Path, source: Path, imgsz: int) -> float:
    """Wall seconds of a fresh process that loads the model and classifies ``source`` (a file, or a
    folder: every image below it, by the recursive glob its loader takes)."""
    code = (
        "import sys; from ultralytics import YOLO; "
        f"[r for r in YOLO(sys.argv[1]).predict(sys.argv[2], imgsz={imgsz}, stream=True, verbose=False, device='cpu')]"
    )
    pattern = str(source / "**" / "*.*") if source.is_dir() else str(source)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(weights), pattern], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--imgsz", type=int, help="default: its own (224 for classify)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one classify process, figures not meaningful")
    parser.add_argument("--seed", type=int, help="default: its own (0)")
    args = parser.parse_args()
    from ultralytics import YOLO

    options = {"imgsz": args.imgsz} if args.imgsz else {}
    options |= {"seed": args.seed} if args.seed is not None else {}
    memory = PeakMemory()
    memory.start()
    started = time.monotonic()
    model = YOLO(MODEL)
    # An absolute project folder: Ultralytics puts a relative one under its own runs/ folder.
    model.train(
        data=str(args.data), pretrained=False, time=args.minutes / 60, device="cpu", plots=False,
        project=str(args.work.resolve()), name="train", exist_ok=True, verbose=False, **options,
    )  # fmt: skip
    train_seconds = time.monotonic() - started
    memory.running = False
    train_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # as ours: up to the end of training
    trainer = model.trainer
    imgsz, epochs = int(trainer.args.imgsz), int(trainer.epoch) + 1
    best = Path(trainer.best)
    tested = YOLO(best)
    test_images = images_of(args.data / "test")
    correct = 0
    for path, result in zip(test_images, tested.predict([str(p) for p in test_images], imgsz=imgsz, stream=True, verbose=False)):
        correct += result.names[int(result.probs.top1)] == path.parent.name
    train_images = len(images_of(args.data / "train"))
    one = test_images[0]
    cold = [predict_seconds(best, one, imgsz) for _ in range(1 if args.quick else 3)]
    every = images_of(args.data)
    print(
        json.dumps(
            {
                "recipe": f"ultralytics_{imgsz}",
                "network": MODEL,
                "image_size": imgsz,
                "epochs": epochs,
                "train_images": train_images,
                "batch_size": int(trainer.args.batch),
                "test_images": len(test_images),
                "test_correct": int(correct),
                "test_accuracy": correct / len(test_images),
                "train_seconds": round(train_seconds, 1),
                "seconds_per_epoch": round(train_seconds / epochs, 2),
                "train_images_per_second": round(train_images * epochs / train_seconds, 1),
                "peak_rss_mib": round(train_peak / 1024),  # the main process only
                "peak_pss_mib_with_workers": round(memory.peak / 1024),  # in training, sampled: what the table shows
                "classify_runtime": "pytorch",
                "classify_cold_start_seconds": round(statistics.median(cold), 2),
                "classify_images_per_second": round(len(every) / predict_seconds(best, args.data, imgsz), 1),
            }
        )
    )


if __name__ == "__main__":
    main()

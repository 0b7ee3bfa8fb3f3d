"""The GPU path, measured (issue 38, part 4): the whole train command on one GPU, and its test accuracy.

Runs ``--mode train`` on a dataset (flower_photos-small) with the settings a GPU wants, for
each ``--batch_sizes`` entry: ``--mixed_precision``, ``--distribute auto`` (mirrored when
more than one GPU is visible), the batch as given and the learning rate scaled from the
default's 2e-3 at batch 32 (the linear rule), a time budget of ``--max_minutes``; then
``--mode test``. Reports the whole command's wall time, training images per second, peak
GPU memory (``nvidia-smi``, sampled every 200 ms) and peak host memory, and test accuracy.

Install the GPU requirements first (``requirements-gpu.txt``, into a virtual environment of
its own), then:

    python bench/gpu_bench.py --photos DATASET [--batch_sizes 128 256] [--max_minutes 1]

Without a GPU it says so and still runs (a dry run of the script on the CPU: give a small
``--max_minutes``). Prints one JSON line per run and writes them all (default
bench/results/gpu.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_LEARNING_RATE, DEFAULT_BATCH = 2e-3, 32  # config.TrainConfig's and config.AUTO_BATCH
_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


class GpuMemory:
    """The highest GPU memory in use while it runs (MiB, all GPUs summed), from nvidia-smi; None without one."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True) if shutil.which("nvidia-smi") else None

    def _sample(self):
        while not self._stop.wait(0.2):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
            ).stdout
            used = sum(int(v) for v in out.split() if v.isdigit())
            self.peak = max(self.peak or 0, used)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def cli(*args: str, cwd: Path) -> tuple[dict, float, int, int | None]:
    """simple-cnn ``args --json``: its result, wall seconds, peak host RSS (KiB) and peak GPU memory (MiB)."""
    started = time.monotonic()
    command = [sys.executable, "-c", _PEAK, sys.executable, "-m", "simple_cnn", *args, "--json"]
    with GpuMemory() as gpu:
        result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    peak = int(result.stderr.rsplit("PEAK ", 1)[1].split()[0])
    return json.loads(result.stdout), time.monotonic() - started, peak, gpu.peak


def gpus() -> int:
    probe = "from simple_cnn.quiet import import_tensorflow; print(len(import_tensorflow().config.list_physical_devices('GPU')))"
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--max_minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args()
    visible = gpus()
    if not visible:
        print("No GPU visible to TensorFlow: this is a dry run on the CPU, its figures say nothing of a GPU", file=sys.stderr)
    runs = []
    photos = str(args.photos.resolve())
    for batch in args.batch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            learning_rate = DEFAULT_LEARNING_RATE * batch / DEFAULT_BATCH
            flags = ("--batch_size", str(batch), "--learning_rate", f"{learning_rate:g}", "--max_minutes", str(args.max_minutes),
                     "--mixed_precision", "--distribute", "auto", "--seed", str(args.seed))  # fmt: skip
            trained, seconds, host_kib, gpu_mib = cli("--mode", "train", "--dataset_path", photos, *flags, cwd=work)
            tested, _, _, _ = cli("--mode", "test", "--dataset_path", photos, cwd=work)
            runs.append({"gpus": visible, "batch_size": batch, "learning_rate": learning_rate, "seed": args.seed,
                         "image_size": trained["image_size"], "epochs_run": trained["epochs_run"],
                         "train_images_per_second": round(trained["images_used"]["train"] * trained["epochs_run"]
                                                          / trained["train_seconds"], 1),
                         "whole_command_seconds": round(seconds, 1), "peak_host_kib": host_kib, "peak_gpu_mib": gpu_mib,
                         "test_accuracy": round(tested["accuracy"], 4), "test_images": tested["test_images"]})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

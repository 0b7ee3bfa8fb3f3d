"""What capping glibc's malloc arenas does to the train command: peak RSS and training seconds.

    python bench/arena_bench.py --dataset ../shared/datasets/flower_photos-small -- --epochs 2

Runs ``--mode train`` in fresh processes, taking turns: with simple_cnn's cap
(``quiet.MALLOC_ARENAS``) and with glibc's own default (``MALLOC_ARENA_MAX`` set to eight per
core, which simple_cnn leaves alone), ``--repeats`` times each. Arguments after ``--`` go to
every train command. Prints one JSON line per run, then the spread of each setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def settings() -> dict[str, dict]:
    from simple_cnn.quiet import MALLOC_ARENAS

    return {
        f"simple_cnn ({MALLOC_ARENAS} arenas)": {},
        f"glibc default ({8 * os.cpu_count()} arenas)": {"MALLOC_ARENA_MAX": str(8 * os.cpu_count())},
    }


def train_once(dataset: str, extra: list[str], env: dict, work: Path) -> dict:
    """One train command; its peak RSS (the child's own, from wait4) and its JSON result."""
    command = [sys.executable, "-m", "simple_cnn", "--mode", "train", "--dataset_path", dataset]
    command += ["--model_file_path", str(work / "m.keras"), "--images_dir", str(work / "images"), "--fresh", "--json", *extra]
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env={**environment, **env}, cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"train failed: {(work / 'stderr').read_text()[-2000:]}")
    result = json.loads((work / "stdout").read_text())
    return {
        "peak_rss_kib": usage.ru_maxrss,
        "train_seconds": result["train_seconds"],
        "wall_seconds": result["wall_seconds"],
        "best_val_accuracy": round(result["best_val_accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="arguments for every train command (after --)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, env in settings().items():
                row = {"setting": name, "repeat": repeat, **train_once(args.dataset, args.extra, env, Path(tmp))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    for name in settings():
        mine = [r for r in rows if r["setting"] == name]
        peaks, seconds = [r["peak_rss_kib"] for r in mine], [r["train_seconds"] for r in mine]
        print(
            f"{name}: peak RSS {min(peaks):,}-{max(peaks):,} KiB, training {min(seconds)}-{max(seconds)} s "
            f"(median {statistics.median(seconds)}), {len(mine)} runs"
        )


if __name__ == "__main__":
    main()

"""Classify speed: cold start of one image in a fresh process, and batch throughput.

Both runtimes in the same run on the same images, so the machine's load affects both:
LiteRT (the .tflite copy beside the model) and Keras (the same model without the copy).

    python bench/classify_bench.py --model models/cnn_model.keras --images datasets/digits [--repeats 5]

Prints a table and writes the figures as JSON (default bench/results/classify.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def classify_cli(model: Path, *args: str) -> dict:
    """Run `python -m simple_cnn --mode classify ... --json` in a fresh process; its JSON."""
    command = [sys.executable, "-m", "simple_cnn", "--mode", "classify", "--model_file_path", str(model), *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr)
    return json.loads(result.stdout)


def cold_start(model: Path, image: Path, repeats: int) -> list[float]:
    """Wall seconds to classify one image, each time in a fresh process."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        classify_cli(model, "--single_image_path", str(image))
        times.append(time.perf_counter() - started)
    return times


def throughput(model: Path, images: Path) -> dict:
    """Images per second of `--input_path FOLDER` (decode + predict), in a fresh process."""
    out = classify_cli(model, "--input_path", str(images))
    return {"runtime": out["runtime"], "images": len(out["predictions"]), "images_per_second": out["images_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/cnn_model.keras"))
    parser.add_argument("--images", type=Path, default=Path("datasets/digits"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "classify.json")
    args = parser.parse_args()
    lite = args.model.with_suffix(".tflite")
    if not lite.exists():
        sys.exit(f"{lite} not found: train the model with simple-cnn --mode train first")
    image = next(p for p in sorted(args.images.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    with tempfile.TemporaryDirectory() as tmp:  # the same model without its LiteRT copy: the Keras path
        keras_only = Path(tmp) / args.model.name
        shutil.copy(args.model, keras_only)
        rows = {}
        for name, model in (("litert", args.model), ("keras", keras_only)):
            times = cold_start(model, image, args.repeats)
            rows[name] = {
                "cold_start_seconds_median": round(statistics.median(times), 3),
                "cold_start_seconds_min": round(min(times), 3),
                **throughput(model, args.images),
            }
            assert rows[name]["runtime"] == name

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": str(args.model),
        "images": str(args.images),
        "repeats": args.repeats,
        "results": rows,
        "speedup_cold_start": round(rows["keras"]["cold_start_seconds_median"] / rows["litert"]["cold_start_seconds_median"], 1),
    }
    print(f"{'runtime':8} {'cold start (median s)':>22} {'batch images/s':>15}")
    for name, row in rows.items():
        print(f"{name:8} {row['cold_start_seconds_median']:>22.3f} {row['images_per_second']:>15.1f}")
    print(f"LiteRT starts {report['speedup_cold_start']}x faster ({args.repeats} runs each, {rows['litert']['images']} images)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

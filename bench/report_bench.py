"""What the report page costs a test run: the command's wall time with and without it, and its size.

    python bench/report_bench.py --dataset PATH --model MODEL [--repeat 3]

Runs ``simple-cnn --mode test`` in fresh processes, alternately as it is and with the
report's writer replaced by a no-op, ``--repeat`` times each, and prints the median wall
times, the difference as a share, and the page's size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
RUN = """
import sys
sys.path.insert(0, {src!r})
from simple_cnn import cli, evaluate
if {skip}:
    evaluate.write_test_report = lambda *args, **kwargs: None
sys.exit(cli.main(sys.argv[1:]))
"""


def timed_run(dataset: Path, model: Path, images: Path, skip: bool) -> float:
    code = RUN.format(src=str(SRC), skip=skip)
    args = ["--mode", "test", "--dataset_path", str(dataset), "--model_file_path", str(model), "--images_dir", str(images)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp)
        times = {"with the report": [], "without": []}
        for _ in range(args.repeat):
            times["with the report"].append(timed_run(args.dataset, args.model, images, skip=False))
            times["without"].append(timed_run(args.dataset, args.model, images, skip=True))
        size = (images / "report.html").stat().st_size
    with_report, without = (statistics.median(v) for v in times.values())
    print(f"simple-cnn --mode test on {args.dataset} with {args.model}, median of {args.repeat} runs each:")
    print(f"  with the report {with_report:.2f} s, without {without:.2f} s: +{100 * (with_report / without - 1):.1f}%")
    print(f"  report.html: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

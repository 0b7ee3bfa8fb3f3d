"""More test-time views, measured: trained models tested at their own size, at larger sizes, and
with the views of two sizes averaged (issue 38 part 3, "a second scale beside the mirror, or
testing at a slightly higher resolution than training").

    python bench/views_bench.py --dataset PATH --models A.keras B.keras [--sizes 112 128 144]

The network is fully convolutional up to its global pooling, so the same weights run at any
input size: each model's weights are copied into the same network built at each size. Every
variant is scored on the validation split (which chooses) and on the test images ``--mode test``
scores (which reports), decoded from the photos at that size, each view with its mirror as the
network averages it. Prints a table per model and the mean gain over the models, writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np


def network_at(model, size: int):
    """``model``'s weights in the same network built for ``size``-pixel images."""
    from simple_cnn.model import build_model

    resized = build_model(model.output_shape[-1], size)
    resized.set_weights(model.get_weights())
    return resized


def probabilities_by_size(model_path: Path, dataset: Path, sizes: list[int]) -> dict:
    """``{split: {size: probabilities}}`` and the labels, for the validation and scored test images."""
    from simple_cnn.dataset import ImageDataset
    from simple_cnn.formats import load_model, read_fingerprints, read_metadata

    model, _ = load_model(model_path)
    ds = ImageDataset.scan(dataset)
    kept = set(ds.test_split(read_metadata(model_path)["image_size"], read_fingerprints(model_path)).files)
    out, labels = {"val": {}, "test": {}}, {}
    for size in sizes:
        network = network_at(model, size)
        for split in out:
            decoded = ds.decode(ds.split(split), size)
            keep = np.isin(decoded.files, list(kept)) if split == "test" else np.ones(len(decoded), bool)
            out[split][size] = network.predict(decoded.x[keep], batch_size=32, verbose=0)
            labels[split] = decoded.y[keep]
    return {"probabilities": out, "labels": labels}


def accuracies(result: dict, sizes: list[int]) -> dict:
    """Accuracy of each size alone and of each pair of sizes averaged, per split."""
    table = {}
    variants = [(s,) for s in sizes] + list(itertools.combinations(sizes, 2))
    for split, by_size in result["probabilities"].items():
        y = result["labels"][split]
        for variant in variants:
            mean = np.mean([by_size[s] for s in variant], axis=0)
            table.setdefault("+".join(map(str, variant)), {})[split] = float((mean.argmax(1) == y).mean())
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", help="default: the model's size, 8/7 and 9/7 of it")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "views.json")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from simple_cnn.formats import read_metadata

    report = {}
    for path in args.models:
        trained = read_metadata(path)["image_size"]
        sizes = args.sizes or [trained, round(trained * 8 / 7 / 8) * 8, round(trained * 9 / 7 / 8) * 8]
        table = accuracies(probabilities_by_size(path, args.dataset, sizes), sizes)
        report[str(path)] = {"trained_at": trained, "accuracy": table}
        print(f"{path} (trained at {trained} px)")
        for variant, row in table.items():
            print(f"  {variant:>9}  val {row['val']:.3f}  test {row['test']:.3f}")
    variants = set.intersection(*(set(r["accuracy"]) for r in report.values()))
    for variant in sorted(variants):
        gains = [r["accuracy"][variant]["val"] - r["accuracy"][str(r["trained_at"])]["val"] for r in report.values()]
        print(f"{variant:>9}: validation gain over the trained size, per model: {', '.join(f'{100 * g:+.1f}' for g in gains)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()

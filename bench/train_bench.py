"""Accuracy per CPU-minute: simple_cnn's default recipe against the TensorFlow tutorial CNN.

Both train on the same stable split of the same dataset for the same wall-clock budget,
each in a fresh process (so peak memory is its own), then are tested on the test split
(the images ``--mode test`` scores: near copies of training images set aside).
Without --minutes, ours is the plain default (its own budget, config.AUTO_MINUTES) and
the tutorial gets that budget; with it, ours runs with --max_minutes N.

    python bench/train_bench.py --dataset PATH [--minutes N] [--seed S] [--output bench/results/train.json]

--seed gives every recipe the same seed (weights, shuffling, augmentation; the split is the
stable hash's and does not change); without it each keeps its own default (ours 42, the Keras
peers 42, Ultralytics 0).

--dataset is any folder of class folders (bench/README.md used flowers-dev). Prints a table (test
accuracy, training images/s, seconds per epoch, peak RSS, FLOPs per training image
(forward and backward, from the training step's graph) and per classified image, the
achieved fraction of this machine's measured float32 matmul ceiling, and classify speed:
cold start for one image and images/s for the whole dataset), the input pipeline's
steady-state training speed against a feed from memory, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from classify_bench import cold_start, throughput  # noqa: E402
from peers import KERAS_RECIPES, export_split, fit_keras_recipe, require_ultralytics, run_ultralytics  # noqa: E402

from simple_cnn.config import AUTO_MINUTES  # noqa: E402


def inference_flops(model, image_size: int) -> float:
    """One classified image's FLOPs, counted by TensorFlow's profiler on the inference graph (for ours,
    the image and its mirror: the network averages the two)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler import model_analyzer, option_builder

    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    opts = option_builder.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return float(model_analyzer.profile(graph, options=opts).total_float_ops)


def training_flops(model, image_size: int) -> float:
    """One training image's FLOPs, forward and backward (:func:`training_flops_by_type`)."""
    return sum(training_flops_by_type(model, image_size).values())


def training_flops_by_type(model, image_size: int) -> dict[str, float]:
    """One training image's FLOPs per op type in the graph of a training step (the loss's gradient with
    respect to every trainable weight), by the FLOP statistics TensorFlow registers for its ops, as its
    profiler counts them. TensorFlow registers none for the depthwise convolutions' two backward ops,
    so each is counted at its forward op's FLOPs (one product for the input's gradient and one for the
    filter's, as for every convolution)."""
    import collections

    import tensorflow as tf
    from tensorflow.python.framework import ops

    loss = tf.keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    spec = (tf.TensorSpec([1, image_size, image_size, 3], tf.float32), tf.TensorSpec([1], tf.int32))
    graph = step.get_concrete_function(*spec).graph
    counted = collections.Counter()
    for op in graph.get_operations():
        flops = ops.get_stats_for_node_def(graph, op.node_def, "flops").value or 0
        counted[op.type] += flops
        if op.type == "DepthwiseConv2dNative":
            counted["DepthwiseConv2dNativeBackpropInput"] += flops
            counted["DepthwiseConv2dNativeBackpropFilter"] += flops
    return dict(counted)


def matmul_gflops(n: int = 4096) -> float:
    """This machine's practical float32 ceiling: an n x n matrix product, best of 5."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.linalg.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def scored_by_test_mode(ds, files: list[str], ours: Path) -> np.ndarray:
    """Which decodable test images ``--mode test`` scores for our model ``ours``: near
    copies of its training and validation images are set aside (duplicates.py). Both
    recipes are tested on these, so they face the same images, and the same as the CLI's."""
    from simple_cnn.formats import read_fingerprints, read_metadata

    kept = ds.test_split(read_metadata(ours)["image_size"], read_fingerprints(ours)).files
    return np.isin(files, kept)


def run_one(
    recipe: str, dataset: Path, minutes: float | None, model_out: Path, quick: bool = False, seed: int | None = None
) -> dict:
    """Train one recipe for ``minutes`` (None: ours as the default; a peer then gets
    config.AUTO_MINUTES) and test it (runs in its own process). ``quick``: a Keras peer at 64
    pixels, not 180 (a smoke run: the tutorial's 4-million-weight dense layer at 180 pixels
    made it the slowest part of the test suite). ``seed`` None: the recipe's own default."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from simple_cnn.config import auto_batch_size
    from simple_cnn.dataset import ImageDataset
    from simple_cnn.formats import save_model
    from simple_cnn.pipeline import make_tf_dataset
    from simple_cnn.quiet import import_keras
    from simple_cnn.train import TrainConfig, train

    keras = import_keras()
    ds = ImageDataset.scan(dataset)
    if recipe == "simple_cnn":
        config = TrainConfig(max_minutes=minutes, **({} if seed is None else {"seed": seed}))
        summary = train(dataset, model_out, model_out.parent / "images", config).as_dict()
        fitted = {
            "model": keras.models.load_model(model_out),
            "image_size": summary["image_size"],
            "decode_seconds": summary["wall_seconds"] - summary["train_seconds"],
            "train_seconds": summary["train_seconds"],
            "epochs": summary["epochs_run"],
            "train_images": summary["images_used"]["train"],
            "images_trained": summary["images_used"]["train"] * summary["epochs_run"],
            "batch_size": auto_batch_size(summary["image_size"]),  # the default's batch, no --batch_size given
        }
    else:
        fitted = fit_keras_recipe(recipe, ds, minutes or AUTO_MINUTES, quick, seed)
        metadata = {"class_names": ds.class_names, "image_size": fitted["image_size"], "val_split": 0.15, "test_split": 0.15}
        save_model(fitted["model"], model_out, metadata)
    train_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, image_size, epochs = fitted["model"], fitted["image_size"], fitted["epochs"]
    test_split = ds.decode(ds.split("test"), image_size)
    keep = scored_by_test_mode(ds, test_split.files, model_out.with_name("simple_cnn.keras"))  # ours trained first
    xt, yt = test_split.x[keep], test_split.y[keep]
    probabilities = model.predict(make_tf_dataset(xt, yt, 64), verbose=0)
    flops, train_flops = inference_flops(model, image_size), training_flops(model, image_size)
    correct = int((probabilities.argmax(1) == yt).sum())
    return {
        "recipe": recipe,
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": fitted["batch_size"],
        "train_images": fitted["train_images"],
        "test_images": int(len(yt)),
        "test_correct": correct,
        "test_accuracy": correct / len(yt),
        "scored_test_files": [f for f, k in zip(test_split.files, keep) if k],  # what the peers outside Keras are tested on
        "train_seconds": round(fitted["train_seconds"], 1),
        "decode_seconds": round(fitted["decode_seconds"], 1),
        "seconds_per_epoch": round(fitted["train_seconds"] / epochs, 2),
        "train_images_per_second": round(fitted["images_trained"] / fitted["train_seconds"], 1),  # a cut epoch counts its part
        "inference_mflops_per_image": round(flops / 1e6, 1),
        "train_mflops_per_image": round(train_flops / 1e6, 1),  # forward and backward
        "peak_rss_mib": round(train_peak / 1024),  # ru_maxrss is in KiB; the whole process, up to the end of training
    }


def run_feeds(dataset: Path, image_size: int, steps: int = 15, rounds: int = 12) -> dict:
    """Steady-state training images/s of our model fed three ways (runs in its own process):
    ``memory`` repeats one batch already in memory as a float32 tensor (the ideal feed);
    ``pipeline`` is our tf.data pipeline over the decoded uint8 cache in RAM (the default);
    ``disk_cache`` is the same pipeline over the memory-mapped cache of ``--cache_dir``.

    The machine's speed drifts by more than the differences measured, so the feeds take
    turns in many short rounds (the order rotating each round), and each round gives a
    ratio of feeds measured seconds apart: the result is the median ratio, with its
    quartiles as the spread. (Best-of-4 rounds of 40 steps once gave 76% and 124% in two
    runs on the same data.)"""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from simple_cnn.config import auto_batch_size
    from simple_cnn.dataset import ImageDataset
    from simple_cnn.model import build_model
    from simple_cnn.pipeline import make_tf_dataset
    from simple_cnn.quiet import import_keras, import_tensorflow

    keras, tf = import_keras(), import_tensorflow()
    batch_size = auto_batch_size(image_size)  # the batch training uses at this size
    ds = ImageDataset.scan(dataset)
    records = ds.split("train")
    t = time.monotonic()
    in_memory = ds.decode(records, image_size)
    x, y = in_memory.x, in_memory.y
    decode_seconds = time.monotonic() - t
    with tempfile.TemporaryDirectory() as tmp:
        on_disk = ds.decode(records, image_size, Path(tmp))
        xd, yd = on_disk.x, on_disk.y
        keras.utils.set_random_seed(0)
        model = build_model(len(ds.class_names), image_size)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        batch = (tf.constant(x[:batch_size], tf.float32), tf.constant(y[:batch_size]))
        # Each feed is built once and stays open, so a round measures steps, not set-up.
        feeds = {
            "memory": iter(tf.data.Dataset.from_tensors(batch).repeat()),
            "pipeline": iter(make_tf_dataset(x, y, batch_size, shuffle=True).repeat()),
            "disk_cache": iter(make_tf_dataset(xd, yd, batch_size, shuffle=True).repeat()),
        }
        model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=2, epochs=1, verbose=0)  # builds all
        step = model.train_function  # what fit() calls for each step, without its callbacks
        for feed in feeds.values():  # trace once and fill every pipeline's buffers
            for _ in range(5):
                step(feed)
        speeds = {name: [] for name in feeds}
        names = list(feeds)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                for _ in range(steps):
                    logs = step(feeds[name])
                float(logs["loss"])  # wait for the last step to finish
                speeds[name].append(batch_size * steps / (time.perf_counter() - start))
    ratios = {name: np.array(speeds[name]) / np.array(speeds["memory"]) for name in ("pipeline", "disk_cache")}
    return {
        "image_size": image_size,
        "train_images": len(x),
        "rounds": rounds,
        "steps_per_round": steps,
        "decode_seconds": round(decode_seconds, 1),
        "decode_images_per_second": round(len(x) / decode_seconds, 1),
        "cache_mb": round(x.nbytes / 2**20, 1),
        **{f"{name}_images_per_second": round(float(np.median(v)), 1) for name, v in speeds.items()},
        **{f"{name}_over_memory": round(float(np.median(v)), 3) for name, v in ratios.items()},
        **{
            f"{name}_over_memory_quartiles": [round(float(q), 3) for q in np.percentile(v, [25, 75])]
            for name, v in ratios.items()
        },
    }


PEERS = ("tutorial", "keras_io", "ultralytics")
COLUMNS = [  # (key, title, format) of the printed table
    ("test_accuracy", "test acc", ".3f"),
    ("test_interval", "95% interval", ""),
    ("image_size", "px", "d"),
    ("epochs", "epochs", "d"),
    ("seconds_per_epoch", "s/epoch", ".1f"),
    ("train_images_per_second", "img/s", ".0f"),
    ("peak_mib", "peak MiB", "d"),
    ("train_mflops_per_image", "train MFLOP", ".0f"),
    ("inference_mflops_per_image", "infer MFLOP", ".0f"),
    ("fraction_of_matmul_ceiling", "of ceiling", ".1%"),
    ("classify_cold_start_seconds", "cold clf s", ".2f"),
    ("classify_images_per_second", "clf img/s", ".0f"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="a folder of class folders")
    parser.add_argument("--minutes", type=float, help="training budget per recipe (default: ours as the default, see above)")
    parser.add_argument("--seed", type=int, help="one seed for every recipe (default: each its own)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "train.json")
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=PEERS,
        default=list(PEERS),
        help="the peers to run beside ours (default: all; ultralytics needs bench/peers/install.sh first)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (the tests'): the Keras peers at 64 px, one classify run each, 2 feed rounds; figures not meaningful",
    )
    parser.add_argument("--run", choices=["simple_cnn", *KERAS_RECIPES, "feeds"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--image_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dataset is None:
        sys.exit("give --dataset PATH (a folder of class folders)")
    return args


def child(args, *flags) -> dict:
    """One measurement in a fresh process (its own memory, no leftovers): its JSON row."""
    out = subprocess.run([sys.executable, __file__, "--dataset", str(args.dataset), *flags], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def keras_row(args, recipe: str, work: Path) -> dict:
    """A Keras recipe trained and tested in a child process, then classified with through our CLI:
    ours has its LiteRT copy; a peer's model has none, so it runs on Keras, as its example does."""
    model_out = work / f"{recipe}.keras"
    budget = ("--minutes", str(args.minutes)) if args.minutes else ()
    seed = ("--seed", str(args.seed)) if args.seed is not None else ()
    row = child(args, "--run", recipe, *budget, *seed, "--model_out", str(model_out), *(["--quick"] if args.quick else []))
    if args.quick:  # one classify process, not two: its time stands in for the cold start
        started = time.perf_counter()
        batch = throughput(model_out, args.dataset)
        cold = [time.perf_counter() - started]
    else:
        one_image = next(p for p in sorted(args.dataset.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        cold = cold_start(model_out, one_image, repeats=3)
        batch = throughput(model_out, args.dataset)
    return row | {
        "classify_runtime": batch["runtime"],
        "classify_cold_start_seconds": round(sorted(cold)[len(cold) // 2], 2),  # the median
        "classify_images_per_second": batch["images_per_second"],
    }


def ultralytics_rows(args, work: Path, ours: dict) -> dict:
    """Ultralytics at its own default image size and at ours, on our split exported to its layout."""
    from simple_cnn.dataset import ImageDataset

    root = export_split(ImageDataset.scan(args.dataset), ours["scored_test_files"], work / "ultralytics_data")
    rows = {}
    for size in (None, ours["image_size"]):
        row = run_ultralytics(root, args.minutes or AUTO_MINUTES, size, work / "ultralytics", args.quick, args.seed)
        rows[row["recipe"]] = row
        print(f"{row['recipe']}: done", file=sys.stderr)
    return rows


def add_derived(rows: dict, ceiling: float) -> None:
    """Each row's test interval (Wilson), its peak memory in training (Ultralytics': with its data-loading
    workers, by their proportional set sizes) and, where its FLOPs were counted, the fraction of the ceiling."""
    from simple_cnn.metrics import wilson_interval

    for row in rows.values():
        row["test_interval"] = [round(v, 3) for v in wilson_interval(row["test_correct"], row["test_images"])]
        row["peak_mib"] = row.get("peak_pss_mib_with_workers") or row["peak_rss_mib"]
        if row.get("train_mflops_per_image"):
            achieved = row["train_mflops_per_image"] * 1e6 * row["train_images_per_second"] / 1e9
            # Not rounded: a tiny model on a busy machine reaches well under 0.1%, which
            # rounding to 3 places turned into 0 (the table formats it for people).
            row["achieved_gflops"] = float(f"{achieved:.4g}")
            row["fraction_of_matmul_ceiling"] = float(f"{achieved / ceiling:.4g}")


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"  # not measured for this peer (Ultralytics' FLOPs are not counted by TensorFlow)
    return "-".join(f"{v:.3f}" for v in value) if key == "test_interval" else f"{value:{fmt}}"


def print_table(rows: dict, feeds: dict, ceiling: float, args) -> None:
    print(f"{'recipe':16}" + "".join(f"{title:>13}" for _, title, _ in COLUMNS))
    for name, row in rows.items():
        print(f"{name:16}" + "".join(f"{cell(row, key, fmt):>13}" for key, _, fmt in COLUMNS))
    ours = rows["simple_cnn"]
    points = {name: 100 * (ours["test_accuracy"] - row["test_accuracy"]) for name, row in rows.items() if row is not ours}
    ahead = "  ".join(f"{name}: {value:+.1f}" for name, value in points.items())
    print(f"simple_cnn ahead by, in points of test accuracy: {ahead}")
    budget = "ours as the default" if args.minutes is None else "ours with --max_minutes"
    print(f"matmul ceiling {ceiling:.0f} GFLOP/s; {args.minutes or AUTO_MINUTES:g} min per recipe ({budget}) on {args.dataset}")

    def quartiles(name: str) -> str:
        return "-".join(f"{q:.0%}" for q in feeds[f"{name}_over_memory_quartiles"])

    print(
        f"input pipeline at {feeds['image_size']}px, training images/s: from one in-memory batch "
        f"{feeds['memory_images_per_second']:.0f}, our pipeline {feeds['pipeline_images_per_second']:.0f} "
        f"({feeds['pipeline_over_memory']:.0%}, quartiles {quartiles('pipeline')}), "
        f"with --cache_dir {feeds['disk_cache_images_per_second']:.0f} "
        f"({feeds['disk_cache_over_memory']:.0%}, quartiles {quartiles('disk_cache')}); medians of "
        f"{feeds['rounds']} rounds of {feeds['steps_per_round']} steps; "
        f"decoding the JPEGs once: {feeds['decode_images_per_second']:.0f} images/s, "
        f"cache {feeds['cache_mb']:.0f} MB"
    )


def main() -> None:
    args = parse_args()
    if args.run == "feeds":
        steps_rounds = (4, 2) if args.quick else (15, 12)
        print(json.dumps(run_feeds(args.dataset, args.image_size, *steps_rounds)))
        return
    if args.run:
        print(json.dumps(run_one(args.run, args.dataset, args.minutes, args.model_out, args.quick, args.seed)))
        return

    if "ultralytics" in args.peers:
        require_ultralytics()  # before the first half hour, not after it
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = args.output.parent / "train_bench_models"
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for recipe in ("simple_cnn", *[p for p in args.peers if p in KERAS_RECIPES]):
        rows[recipe] = keras_row(args, recipe, work)
        print(f"{recipe}: done", file=sys.stderr)
    if "ultralytics" in args.peers:
        rows |= ultralytics_rows(args, work, rows["simple_cnn"])
    quick = ["--quick"] if args.quick else []
    feeds = child(args, "--run", "feeds", "--image_size", str(rows["simple_cnn"]["image_size"]), *quick)
    print("input pipeline: done", file=sys.stderr)

    from simple_cnn.quiet import import_tensorflow

    import_tensorflow()
    ceiling = matmul_gflops(1024 if args.quick else 4096)
    add_derived(rows, ceiling)
    ours = rows["simple_cnn"]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "dataset": str(args.dataset),
        "minutes_per_recipe": args.minutes or AUTO_MINUTES,
        "seed": args.seed,  # None: each recipe's own default
        "ours_as_default": args.minutes is None,
        "matmul_ceiling_gflops": round(ceiling, 1),
        "results": {name: {k: v for k, v in row.items() if k != "scored_test_files"} for name, row in rows.items()},
        "points_ahead_of_each_peer": {
            name: round(100 * (ours["test_accuracy"] - row["test_accuracy"]), 1) for name, row in rows.items() if row is not ours
        },
        "input_pipeline": feeds,
    }
    print_table(rows, feeds, ceiling, args)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

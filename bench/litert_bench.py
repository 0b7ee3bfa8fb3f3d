"""What converting a network to LiteRT costs, two ways: TensorFlow's from_keras_model against the
traced inference function that simple_cnn converts (``converters.litert_bytes``).

    python bench/litert_bench.py --networks simple MobileNetV3Small --size 112 --repeats 2

Each conversion runs in a fresh process, the two ways taking turns, on the same network
(random weights from the same seed; the weights do not change the work): its seconds, the
process's resident memory just before converting and its peak, and the flatbuffer's size.
Then both flatbuffers run on the same random images in LiteRT: the largest difference
between their outputs, and whether simple_cnn's carries the signature (``serving_default``)
that from_keras_model writes. Prints one JSON line per conversion, then a summary per network.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_bench import rss_mb  # the resident memory from /proc

WAYS = ("from_keras_model", "simple_cnn")


def convert_once(network: str, size: int, way: str, out: Path) -> dict:
    """In this process: build ``network``, convert it ``way``, write the flatbuffer to ``out``."""
    from simple_cnn import converters
    from simple_cnn.model import build_model
    from simple_cnn.quiet import import_keras, import_tensorflow

    keras, tf = import_keras(), import_tensorflow()
    keras.utils.set_random_seed(0)
    model = build_model(3, size, backbone=network)
    before = round(rss_mb(os.getpid()) * 1024)
    started = time.perf_counter()
    if way == "simple_cnn":
        flat = converters.litert_bytes(model, {})
    else:  # what it prints goes to stdout, before the JSON line that run_network reads
        flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    seconds = time.perf_counter() - started
    out.write_bytes(flat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"network": network, "way": way, "seconds": round(seconds, 2), "rss_before_kib": before, "peak_kib": peak,
            "bytes": len(flat)}  # fmt: skip


def compare(paths: dict[str, Path], size: int) -> dict:
    """Both flatbuffers on the same images: the largest output difference; simple_cnn's signature."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    x = (np.random.default_rng(1).random((8, size, size, 3)) * 255).astype(np.float32)
    outputs, signatures = {}, {}
    for way, path in paths.items():
        interpreter = Interpreter(model_path=str(path))
        signatures[way] = interpreter.get_signature_list()
        outputs[way] = interpreter.get_signature_runner("serving_default")(image=x)["output_0"]
    difference = float(np.abs(outputs["simple_cnn"] - outputs["from_keras_model"]).max())
    return {"max_output_difference": difference, "same_signature": signatures["simple_cnn"] == signatures["from_keras_model"]}


def run_network(network: str, size: int, repeats: int, tmp: Path) -> dict:
    """``repeats`` conversions each way, taking turns, each in a fresh process; their summary."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    rows = []
    for repeat in range(repeats):
        for way in WAYS if repeat % 2 == 0 else WAYS[::-1]:
            out = tmp / f"{network}-{way}.tflite"
            command = [sys.executable, __file__, "--size", str(size), "--one", network, way, str(out)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                sys.exit(f"{network} {way} failed: {done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    summary = {"network": network, "size": size, **compare({w: tmp / f"{network}-{w}.tflite" for w in WAYS}, size)}
    for way in WAYS:
        seconds = [r["seconds"] for r in rows if r["way"] == way]
        summary[way] = {
            "seconds_min_median_max": [min(seconds), statistics.median(seconds), max(seconds)],
            "peak_over_before_kib": [r["peak_kib"] - r["rss_before_kib"] for r in rows if r["way"] == way],
            "peak_kib": [r["peak_kib"] for r in rows if r["way"] == way],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["simple", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetV2B0"])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("NETWORK", "WAY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(convert_once(args.one[0], args.size, args.one[1], Path(args.one[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for network in args.networks:
            print(json.dumps({"summary": run_network(network, args.size, args.repeats, Path(tmp))}), flush=True)


if __name__ == "__main__":
    main()

"""What one training step needs, per network and batch: TensorFlow's allocator peak, peak RSS, time per image.

    python bench/step_bench.py --networks simple MobileNetV3Small --batches 12 16 --size 128 --repeats 2

Each (network, batch) trains one epoch of 64 batches of random images in a fresh process,
built and compiled as ``--mode train`` builds them, and prints one JSON line: the most
TensorFlow's CPU allocator had in use at once (``tf.config.experimental.get_memory_info``:
a step's activations, gradients and weights), the process's peak RSS, and the milliseconds
per image of the steps after the first five. The settings take turns, ``--repeats`` rounds
("Memory: MobileNetV3Small's batch").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROBE = """
import json, resource, sys, time
import numpy as np
from simple_cnn.model import build_model, build_training_variables
from simple_cnn.pipeline import make_tf_dataset
from simple_cnn.quiet import import_keras, import_tensorflow

network, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keras, tf = import_keras(), import_tensorflow()
x = np.random.default_rng(0).integers(0, 256, (64 * batch, size, size, 3), np.uint8)
y = np.random.default_rng(1).integers(0, 5, len(x))
model = build_model(5, size, backbone=network)
model.compile(keras.optimizers.AdamW(2e-3), "sparse_categorical_crossentropy")
build_training_variables(model)
ends = []
class Clock(keras.callbacks.Callback):
    def on_train_batch_end(self, step, logs=None):
        ends.append(time.perf_counter())
model.fit(make_tf_dataset(x, y, batch, shuffle=True), epochs=1, verbose=0, callbacks=[Clock()])
print(json.dumps({
    "network": network, "batch": batch, "size": size,
    "allocator_peak_mib": round(tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "ms_per_image": round(1000 * (ends[-1] - ends[4]) / (len(ends) - 5) / batch, 2),
}))
"""


def probe(network: str, batch: int, size: int) -> dict:
    command = [sys.executable, "-c", PROBE, network, str(batch), str(size)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        sys.exit(f"{network} at batch {batch} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["simple", "MobileNetV3Small", "MobileNetV3Large"])
    parser.add_argument("--batches", nargs="+", type=int, default=[12, 16])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each runs every setting once, in turn")
    args = parser.parse_args()
    started = time.monotonic()
    for _ in range(args.repeats):
        for network in args.networks:
            for batch in args.batches:
                print(json.dumps(probe(network, batch, args.size)), flush=True)
    print(f"{time.monotonic() - started:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Training speed in float32 and in Keras' mixed_bfloat16, for our network and a plain-convolution twin.

Each (network, precision) pair trains in a fresh process, the pairs taking turns for
``--rounds`` rounds so that the machine's changing speed affects them all: one ``fit``
of 140 steps on random images (one iterator, batch 32), timed from step 20.

    python bench/precision_bench.py [--size 96] [--rounds 2]

"plain" is our network with every depthwise-separable convolution replaced by a plain
3x3 one: what bfloat16 on a CPU with AMX could make affordable (bench/README.md, "bfloat16").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

STEPS, WARMUP, BATCH = 140, 20, 32


def measure(network: str, policy: str, size: int) -> float:
    """Training images per second of one pair (runs in the child process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from simple_cnn.model import build_model
    from simple_cnn.quiet import import_keras, import_tensorflow

    keras, tf = import_keras(), import_tensorflow()
    if policy != "float32":
        keras.mixed_precision.set_global_policy(policy)
    if network == "plain":  # build_model looks its layers up when it runs
        keras.layers.SeparableConv2D = lambda filters, kernel, **kw: keras.layers.Conv2D(filters, kernel, **kw)
    model = build_model(5, size)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH * 40, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 5, BATCH * 40)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == WARMUP:
                self.started = time.monotonic()

        def on_train_end(self, logs=None):
            self.seconds = time.monotonic() - self.started

    clock = Clock()
    model.fit(ds, steps_per_epoch=STEPS, epochs=1, verbose=0, callbacks=[clock])
    return (STEPS - WARMUP) * BATCH / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(*args.child, args.size))
        return
    pairs = [(n, p) for n in ("ours", "plain") for p in ("float32", "mixed_bfloat16")]
    results = {pair: [] for pair in pairs}
    for _ in range(args.rounds):
        for pair in pairs:
            command = [sys.executable, __file__, "--size", str(args.size), "--child", *pair]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[pair].append(float(done.stdout.split()[-1]))
    print(f"training images/s at {args.size}x{args.size}, batch {BATCH}, one value per round")
    for (network, policy), values in results.items():
        print(f"{network:6} {policy:15} " + "  ".join(f"{v:6.1f}" for v in values))


if __name__ == "__main__":
    main()

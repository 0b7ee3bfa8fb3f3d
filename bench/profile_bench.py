"""Where a training step's time goes (issue 38 part 1): TensorFlow's profiler over steps of the default network.

Trains the default network (``model.build_model``, compiled as train mode compiles it) on
random images at ``--image_size`` and the default batch for it, for ``--warmup`` steps
and then ``--steps`` steps under TensorFlow's profiler, and reads the profile's op events
(the XPlane protocol buffer that TensorFlow writes; the events of graph ops are named
``scope/op:Type``). Prints, with the images per second of the profiled steps:

- each op type's share of the op time and of the arithmetic (the FLOPs of the training
  step's graph, ``train_bench.training_flops_by_type``), and its achieved GFLOP/s: an op type
  far below the matmul ceiling measured in the same run is bound by memory, not by
  arithmetic;
- the forward pass, the backward pass and the optimizer's shares;
- each block's share (stem, b64, b128, b256, head), and each kind of layer's (the separable
  convolutions, batch norm, pooling, ...), forward and backward together.

Op time is summed over TensorFlow's threads, so shares are of that sum, not of the wall time.

    python bench/profile_bench.py [--image_size 112] [--steps 40] [--out bench/results/profile.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from train_bench import matmul_gflops, training_flops_by_type  # the training benchmark's ceiling and count

BLOCKS = ("stem", "b64", "b128", "b256", "head")


def profile_steps(image_size: int, warmup: int, steps: int) -> tuple[list, float, float, object, int]:
    """``(op events, seconds, profiled seconds, model, batch)``: ``steps`` steps timed as they run, then as many
    under the profiler, whose graph-op events are ``(name, type, seconds)``."""
    from simple_cnn import distribute
    from simple_cnn.config import TrainConfig, auto_batch_size
    from simple_cnn.model import build_model
    from simple_cnn.pipeline import make_tf_dataset
    from simple_cnn.quiet import import_tensorflow
    from simple_cnn.train import compile_model

    tf = import_tensorflow()
    batch = auto_batch_size(image_size)
    model = build_model(5, image_size)
    compile_model(model, TrainConfig(), distribute.make_cluster("none", 60))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * 8, image_size, image_size, 3), dtype=np.uint8)
    data = make_tf_dataset(x, rng.integers(0, 5, len(x)).astype(np.int32), batch, shuffle=True).repeat()
    model.fit(data, epochs=1, steps_per_epoch=warmup, verbose=0)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    plain = time.perf_counter() - started
    folder = tempfile.mkdtemp()
    options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2)  # 2: TensorFlow's ops too
    tf.profiler.experimental.start(folder, options=options)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - started
    tf.profiler.experimental.stop()
    return read_op_events(folder), plain, seconds, model, batch


def read_op_events(folder: str) -> list[tuple[str, str, float]]:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(next(Path(folder).rglob("*.xplane.pb")).read_bytes())
    events = []
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name.startswith("StatefulPartitionedCall/") and ":" in name:
                    scope, kind = name.rsplit(":", 1)
                    events.append((scope, kind, event.duration_ps / 1e12))
    return events


def layer_of(scope: str) -> str:
    """The network layer an op belongs to, forward or backward: ``b64_sep1``; ``(outside)`` for the optimizer's."""
    found = re.search(r"simple_cnn(?:_\d+)?/([^/]+)", scope)
    return re.sub(r"_\d+$", "", found.group(1)) if found else "(outside)"


def block_of(scope: str) -> str:
    found = re.match(r"(stem|b64|b128|b256|head)_", layer_of(scope))
    return found.group(1) if found else "other"


def kind_of(scope: str) -> str:
    """The layer's kind, its block and number left out: ``sep``, ``bn``, ``pool``, ``aug_rotate``..."""
    return re.sub(r"\d+$", "", re.sub(r"^(stem|b64|b128|b256|head)_", "", layer_of(scope)))


def direction_of(scope: str) -> str:
    if "gradient_tape" in scope:
        return "backward"
    return "optimizer" if "adam" in scope.lower() else "forward"


def summarize(events, seconds: float, profiled: float, steps: int, batch: int, flops: dict, ceiling: float) -> dict:
    """The figures of :func:`profile_steps`' steps (``seconds`` unprofiled, ``profiled`` under the profiler)."""
    total = sum(s for _, _, s in events)
    by_type, by_block, by_direction, by_layer = (collections.Counter() for _ in range(4))
    for scope, kind, s in events:
        by_type[kind] += s
        by_block[block_of(scope)] += s
        by_direction[direction_of(scope)] += s
        by_layer[kind_of(scope)] += s
    images = steps * batch
    all_flops = sum(flops.values())
    types = []
    for kind, s in by_type.most_common(14):
        type_flops = flops.get(kind, 0.0) * images
        types.append(
            {
                "op": kind,
                "time_share": round(s / total, 4),
                "flop_share": round(flops.get(kind, 0.0) / all_flops, 4),
                "gflops_per_second": round(type_flops / s / 1e9, 1) if type_flops else None,
            }
        )
    return {
        "images_per_second": round(images / seconds, 1),
        "profiled_images_per_second": round(images / profiled, 1),
        "train_mflops_per_image": round(all_flops / 1e6, 1),
        "achieved_gflops": round(all_flops * images / seconds / 1e9, 1),
        "matmul_ceiling_gflops": round(ceiling, 1),
        "op_seconds_over_wall": round(total / profiled, 2),
        "by_type": types,
        "by_direction": {k: round(v / total, 4) for k, v in by_direction.most_common()},
        "by_block": {k: round(by_block[k] / total, 4) for k in (*BLOCKS, "other")},
        "by_layer_kind": {k: round(v / total, 4) for k, v in by_layer.most_common(10)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "profile.json")
    args = parser.parse_args()
    ceiling = matmul_gflops()  # before and after the steps: the machine is shared, its speed swings
    events, seconds, profiled, model, batch = profile_steps(args.image_size, args.warmup, args.steps)
    flops = training_flops_by_type(model, args.image_size)
    report = summarize(events, seconds, profiled, args.steps, batch, flops, max(ceiling, matmul_gflops()))
    report |= {"image_size": args.image_size, "batch": batch, "steps": args.steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{report['images_per_second']} images/s at {args.image_size} px, batch {batch} ({report['profiled_images_per_second']} "
        f"under the profiler); {report['train_mflops_per_image']} "
        f"MFLOPs per training image: {report['achieved_gflops']} GFLOP/s of a {report['matmul_ceiling_gflops']} ceiling"
    )
    print(f"{'op':40s} {'time':>7s} {'FLOPs':>7s} {'GFLOP/s':>8s}")
    for row in report["by_type"]:
        rate = f"{row['gflops_per_second']:8.1f}" if row["gflops_per_second"] else f"{'-':>8s}"
        print(f"{row['op']:40s} {row['time_share']:7.1%} {row['flop_share']:7.1%} {rate}")
    print("direction:", ", ".join(f"{k} {v:.1%}" for k, v in report["by_direction"].items()), file=sys.stdout)
    print("block:", ", ".join(f"{k} {v:.1%}" for k, v in report["by_block"].items()))
    print("layer kind (forward and backward):", ", ".join(f"{k} {v:.1%}" for k, v in report["by_layer_kind"].items()))


if __name__ == "__main__":
    main()

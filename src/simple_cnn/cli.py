"""The command line: parse flags, run one mode, print its result, turn errors into exit codes.

Exit codes: 0 success, 1 a runtime problem (bad dataset, model or image), 2 a usage
error (bad flag), 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .errors import SimpleCNNError, UsageError

DEFAULT_DATASET = Path("datasets/digits")
DEFAULTS = {  # kept here, not imported from train.py, so that --help needs no NumPy or Pillow
    "model_file_path": "models/cnn_model.keras",
    "images_dir": "images",
    "batch_size": 32,
    "epochs": 20,
    "val_split": 0.15,
    "test_split": 0.15,
    "seed": 42,
    "top_k": 3,
}

EXAMPLES = """\
examples:
  train on the built-in digits dataset (written to datasets/digits/ on first use):
    simple-cnn --mode train
  train on your own folder of class folders:
    simple-cnn --mode train --dataset_path datasets/flower_photos --epochs 20
  evaluate on the test split (images the model never saw), write plots and metrics.json:
    simple-cnn --mode test --dataset_path datasets/flower_photos
  classify one image:
    simple-cnn --mode classify --single_image_path datasets/flower_photos/roses/x.jpg
  classify a folder (or a glob such as 'photos/*.jpg') into a CSV file:
    simple-cnn --mode classify --input_path photos/ --output predictions.csv
  export the model for serving or devices (tflite, savedmodel or onnx), next to it:
    simple-cnn --mode export --format onnx

exit codes: 0 success, 1 runtime error, 2 usage error, 130 interrupted (Ctrl-C), 143 terminated
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # "(default: X)" where there is a default to show
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
            return f"{action.help} (default: {action.default})"
        return action.help


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="simple-cnn",
        description="Train a CNN on a folder of class folders, test it on images it never saw, classify new images.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    d = DEFAULTS
    p.add_argument("--mode", required=True, choices=["train", "test", "classify", "export"], help="what to do")
    p.add_argument(
        "--dataset_path",
        help=f"dataset folder with one sub-folder per class (default: train uses the built-in digits in "
        f"{DEFAULT_DATASET}/; test uses the model's training dataset)",
    )
    p.add_argument("--model_file_path", default=d["model_file_path"], help="model file to write (train) or read; .keras or .h5")
    p.add_argument("--batch_size", type=int, default=d["batch_size"], help="images per training step")
    p.add_argument(
        "--epochs",
        type=int,
        default=d["epochs"],
        help="epochs to train; the learning rate decays to zero over them (early stopping may end sooner)",
    )
    p.add_argument("--max_minutes", type=float, help="time budget for training: stop after the epoch that would overrun it")
    p.add_argument(
        "--cache_dir",
        help="keep decoded images in this folder on disk (memory-mapped) instead of in RAM, for datasets larger "
        "than memory; later runs on the same files reuse it (train and test modes)",
    )
    p.add_argument("--single_image_path", help="one image to classify (classify mode)")
    p.add_argument("--input_path", help="images to classify: a file, a folder (recursively) or a quoted glob")
    p.add_argument("--output", help="write classify results for --input_path to this .csv or .jsonl file")
    p.add_argument("--format", choices=["tflite", "savedmodel", "onnx"], help="export format (export mode)")
    p.add_argument("--images_dir", default=d["images_dir"], help="folder for plots and metrics.json")
    p.add_argument(
        "--image_size", type=int, help="training image side in pixels (default: the median short side of the images, in 32-96)"
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed for weights, shuffling and augmentation")
    p.add_argument("--val_split", type=float, default=d["val_split"], help="fraction of images for validation")
    p.add_argument("--test_split", type=float, default=d["test_split"], help="fraction of images held out for --mode test")
    p.add_argument("--top_k", type=int, default=d["top_k"], help="how many classes classify lists")
    p.add_argument(
        "--distribute",
        choices=["auto", "none", "mirrored", "multiworker"],
        default="none",
        help="train on several GPUs (mirrored) or machines (multiworker, configured by TF_CONFIG); "
        "auto: mirrored when more than one GPU is visible",
    )
    p.add_argument("--mixed_precision", action="store_true", help="float16 compute on GPUs (no effect on CPUs)")
    p.add_argument("--fresh", action="store_true", help="train from scratch, discarding an interrupted run's saved progress")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's log messages")
    return p


def _check(args, parser) -> None:
    """Flag checks argparse cannot express; all are usage errors (exit 2) before any work."""
    from .model import check_model_path

    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, not {args.batch_size}")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error(f"--max_minutes must be positive, not {args.max_minutes}")
    if args.top_k < 1:
        parser.error(f"--top_k must be at least 1, not {args.top_k}")
    if args.image_size is not None and not 16 <= args.image_size <= 1024:
        parser.error(f"--image_size must be between 16 and 1024 pixels, not {args.image_size}")
    for flag in ("val_split", "test_split"):
        value = getattr(args, flag)
        if not 0 < value < 1:
            parser.error(f"--{flag} must be a fraction between 0 and 1 (exclusive), not {value}")
    if args.val_split + args.test_split >= 1:
        parser.error(
            f"--val_split + --test_split must be below 1 to leave images to train on, not {args.val_split + args.test_split:g}"
        )
    if args.mode == "classify" and not (args.single_image_path or args.input_path):
        parser.error("--mode classify needs --single_image_path IMAGE or --input_path FILE|FOLDER|GLOB")
    if args.single_image_path and args.input_path:
        parser.error("give --single_image_path or --input_path, not both")
    if args.output and not (args.mode == "classify" and args.input_path):
        parser.error("--output goes with --mode classify --input_path")
    if args.output and Path(args.output).suffix not in (".csv", ".jsonl"):
        parser.error(f"--output {args.output} must end in .csv or .jsonl")
    if args.distribute == "multiworker" and not os.environ.get("TF_CONFIG"):
        parser.error("--distribute multiworker needs the TF_CONFIG environment variable on each worker (see README)")
    if args.mode == "export" and not args.format:
        parser.error("--mode export needs --format tflite|savedmodel|onnx")
    try:
        check_model_path(args.model_file_path)
    except UsageError as e:
        parser.error(str(e))


def _run(args) -> dict:
    if args.mode == "train":
        from .data import ensure_digits_dataset
        from .train import TrainConfig, train

        dataset = Path(args.dataset_path) if args.dataset_path else ensure_digits_dataset(DEFAULT_DATASET)
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            val_split=args.val_split,
            test_split=args.test_split,
            seed=args.seed,
            max_minutes=args.max_minutes,
            distribute=args.distribute,
            mixed_precision=args.mixed_precision,
        )
        return train(dataset, args.model_file_path, args.images_dir, config, fresh=args.fresh, cache_dir=args.cache_dir)
    if args.mode == "test":
        from .data import ensure_digits_dataset
        from .evaluate import evaluate
        from .model import read_metadata

        if args.dataset_path:
            dataset = Path(args.dataset_path)
        else:
            trained_on = Path(read_metadata(args.model_file_path)["dataset_path"])
            dataset = trained_on if trained_on.is_dir() else ensure_digits_dataset(DEFAULT_DATASET)
        return evaluate(dataset, args.model_file_path, args.images_dir, args.batch_size, cache_dir=args.cache_dir)
    if args.mode == "export":
        from .export import export

        return export(args.model_file_path, args.format)
    from .classify import classify, classify_many, write_predictions

    if args.single_image_path:
        return classify(args.single_image_path, args.model_file_path, args.top_k)
    result = classify_many(args.input_path, args.model_file_path, args.top_k)
    if args.output:
        write_predictions(result, Path(args.output))
        result["output"] = args.output
    return result


def _print_human(result: dict) -> None:
    mode = result["mode"]
    if mode == "train" and not result.get("chief", True):
        print(
            f"Worker {result['worker']} of {result['workers']} done: {result['epochs_run']} epochs, "
            f"{result['images_used']['train']} training images, {result['steps_per_epoch']} steps per epoch; "
            "the chief saved the model"
        )
    elif mode == "train":
        print(
            f"Best epoch {result['best_epoch']} of {result['epochs_run']}: validation accuracy "
            f"{result['best_val_accuracy']:.3f}, loss {result['best_val_loss']:.3f}"
        )
        print(
            f"Images used: train {result['images_used']['train']}, validation {result['images_used']['val']}; "
            f"test {result['images']['test']} held out for --mode test; {len(result['skipped'])} files skipped"
        )
        print(f"Model saved to {result['model_file_path']}")
        print(f"Wrote {', '.join(result['images_written'])}")
        print(f"Done in {result['wall_seconds']:.1f} s (training {result['train_seconds']:.1f} s)")
    elif mode == "test":
        skipped = len(result["skipped"])
        print(f"Test split of {result['dataset_path']}: {result['test_images']} images, {skipped} files skipped")
        print(f"Accuracy {result['accuracy']:.3f} (chance {result['chance_accuracy']:.3f}), loss {result['loss']:.3f}")
        print(result["report"].rstrip())
        print(f"Wrote {', '.join(result['images_written'])}")
    elif mode == "export":
        print(f"Exported {result['format']}: {', '.join(result['written'])}")
    elif "predictions" in result:
        if not result.get("output"):
            for r in result["predictions"]:
                top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
                print(f"{r['image']}\t{r['class']}\t{r['probability']:.3f}\t{top}")
        for s in result["skipped"]:
            print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
        where = f", written to {result['output']}" if result.get("output") else ""
        print(
            f"Classified {len(result['predictions'])} images ({result['images_per_second']} images/s, "
            f"{result['runtime']}){where}; {len(result['skipped'])} skipped",
            file=sys.stderr,
        )
    else:
        print(f"{result['image']}: {result['class']} (probability {result['probability']:.3f})")
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top_k"])
        print(f"Top {len(result['top_k'])}: {top}")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def main(argv=None) -> int:
    # `docker stop` and `kill` send SIGTERM: stop as cleanly as on Ctrl-C (temporary files
    # removed, the training state of the last completed epoch kept for resuming).
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # see quiet.py
    try:
        result = _run(args)
    except SimpleCNNError as e:
        print(f"simple-cnn: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permissions, ... on a path the message names
        where = f" {e.filename}" if e.filename else ""
        print(f"simple-cnn: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        resume = " (run the same command again to resume training; --fresh starts over)" if args.mode == "train" else ""
        print(f"simple-cnn: interrupted{resume}", file=sys.stderr)
        return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)
    if args.json:
        result.pop("report", None)
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        _print_human(result)
    return 0

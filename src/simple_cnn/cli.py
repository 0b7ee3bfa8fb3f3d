"""The command line: parse flags, run one mode, print its result, turn errors into exit codes.

Exit codes: 0 success, 1 a runtime problem (bad dataset, model or image), 2 a usage
error (bad flag), 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import traceback
import types
from pathlib import Path

from . import interrupts
from .config import (
    DEFAULT_DATASET,
    DEFAULT_IMAGES_DIR,
    DEFAULT_MODEL,
    ClassifyConfig,
    ClusterConfig,
    ServeConfig,
    SettingError,
    TrainConfig,
    flag_fields,
)
from .errors import SimpleCNNError, UsageError, printable
from .quiet import freeze_collector_after_import

log = logging.getLogger("simple_cnn")

EXAMPLES = """\
examples:
  train on the built-in digits dataset (written to datasets/digits/ on first use):
    simple-cnn --mode train
  train on your own folder of class folders:
    simple-cnn --mode train --dataset_path datasets/flower_photos --epochs 20
  train from a labels file (path,label per row; 'a|b' for several labels), keeping each patient in one split:
    simple-cnn --mode train --dataset_path datasets/xrays --labels datasets/xrays/labels.csv --group_by '^(p[0-9]+)_'
  evaluate on the test split (images the model never saw), write plots and metrics.json:
    simple-cnn --mode test --dataset_path datasets/flower_photos
  classify one image:
    simple-cnn --mode classify --single_image_path datasets/flower_photos/roses/x.jpg
  classify a folder (or a glob such as 'photos/*.jpg') into a CSV file:
    simple-cnn --mode classify --input_path photos/ --output predictions.csv
  is the new model really better? both on the same test images, with a paired test:
    simple-cnn --mode compare --model_file_path models/old.keras --other_model models/new.keras
  which labels look wrong? (cross-fitted, within --max_minutes; changes no file):
    simple-cnn --mode audit --dataset_path datasets/flower_photos
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


def _add_settings(group, config_class) -> None:
    """One flag per field of ``config_class`` (see config.py), with its default and help."""
    for f in flag_fields(config_class):
        kind = f.type
        if isinstance(kind, types.UnionType):  # e.g. int | None
            kind = next(t for t in kind.__args__ if t is not type(None))
        if kind is bool:  # a default of None means "decided at run time": --flag and --no-flag both exist
            action = argparse.BooleanOptionalAction if f.default is None else "store_true"
            group.add_argument(f"--{f.name}", action=action, default=f.default, help=f.metadata["help"])
        else:
            group.add_argument(
                f"--{f.name}", type=kind, default=f.default, choices=f.metadata["choices"], help=f.metadata["help"]
            )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="simple-cnn",
        description="Train a CNN on a folder of class folders, test it on images it never saw, classify new images.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--mode", required=True, choices=["train", "test", "classify", "export", "serve", "compare", "audit"], help="what to do"
    )
    p.add_argument(
        "--dataset_path",
        help=f"dataset folder with one sub-folder per class (default: train uses the built-in digits in "
        f"{DEFAULT_DATASET}/; test uses the model's training dataset)",
    )
    p.add_argument("--model_file_path", default=DEFAULT_MODEL, help="model file to write (train) or read; .keras or .h5")
    p.add_argument("--images_dir", default=DEFAULT_IMAGES_DIR, help="folder for plots and metrics.json")
    p.add_argument(
        "--cache_dir",
        help="keep decoded images in this folder on disk (memory-mapped) instead of in RAM, for datasets larger "
        "than memory; later runs on the same files reuse it (train and test modes)",
    )
    p.add_argument("--fresh", action="store_true", help="train from scratch, discarding an interrupted run's saved progress")
    _add_settings(p.add_argument_group("training (train mode; --batch_size also in test mode)"), TrainConfig)
    _add_settings(
        p.add_argument_group(
            "several machines (--distribute multiworker), in this order: TF_CONFIG if set; else a Slurm step "
            "(SLURM_PROCID, SLURM_STEP_NODELIST); else a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)"
        ),
        ClusterConfig,
    )
    classify = p.add_argument_group("classify mode")
    classify.add_argument("--single_image_path", help="one image to classify")
    classify.add_argument("--input_path", help="images to classify: a file, a folder (recursively) or a quoted glob")
    classify.add_argument("--output", help="write classify results for --input_path to this .csv or .jsonl file")
    _add_settings(classify, ClassifyConfig)
    _add_settings(p.add_argument_group("serve mode (also --min_confidence, --top_k, --unknown)"), ServeConfig)
    p.add_argument(
        "--other_model",
        action="append",
        default=[],
        help="compare mode: a model to compare with --model_file_path on the same test images (repeat for several)",
    )
    p.add_argument(
        "--unknown_path",
        help="test mode: a folder of images that belong to none of the classes; reports how well the unknown detector's "
        "distance, and beside it the softmax, tells them from the test images (AUROC, and the shares caught and kept)",
    )
    p.add_argument("--format", choices=["tflite", "savedmodel", "onnx"], help="export format (export mode)")
    p.add_argument(
        "--quantize",
        choices=["float16", "int8"],
        help="with --format tflite: a quantized copy, MODEL.float16.tflite or MODEL.int8.tflite (int8 is calibrated on "
        "training images), its size, speed and test accuracy measured against the float32 model",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="debug messages, and TensorFlow's own log messages")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only (Keras' progress still shows)")
    return p


def _check(args, parser) -> tuple[TrainConfig, ClassifyConfig, ClusterConfig]:
    """Build the settings (their own checks, config.py) and check what argparse cannot
    express; every problem is a usage error (exit 2) before any work."""
    from .formats import check_model_path

    try:
        train_config = TrainConfig(**{f.name: getattr(args, f.name) for f in flag_fields(TrainConfig)})
        classify_config = ClassifyConfig(**{f.name: getattr(args, f.name) for f in flag_fields(ClassifyConfig)})
        cluster_config = ClusterConfig(**{f.name: getattr(args, f.name) for f in flag_fields(ClusterConfig)})
        args.serve_config = ServeConfig(**{f.name: getattr(args, f.name) for f in flag_fields(ServeConfig)})
    except SettingError as e:
        parser.error(e.as_flags())
    if args.mode == "classify" and not (args.single_image_path or args.input_path):
        parser.error("--mode classify needs --single_image_path IMAGE or --input_path FILE|FOLDER|GLOB")
    if args.single_image_path and args.input_path:
        parser.error("give --single_image_path or --input_path, not both")
    if args.output and not (args.mode == "classify" and args.input_path):
        parser.error("--output goes with --mode classify --input_path")
    if args.output and Path(args.output).suffix not in (".csv", ".jsonl"):
        parser.error(f"--output {args.output} must end in .csv or .jsonl")
    if args.mode == "compare" and not args.other_model:
        parser.error("--mode compare needs --other_model B (and --model_file_path A)")
    if args.other_model and args.mode != "compare":
        parser.error("--other_model goes with --mode compare")
    if args.unknown_path and args.mode != "test":
        parser.error("--unknown_path goes with --mode test (classify and serve take --unknown)")
    if classify_config.unknown and args.mode not in ("classify", "serve"):
        parser.error("--unknown goes with --mode classify or serve (test mode measures the detector with --unknown_path)")
    if args.mode == "export" and not args.format:
        parser.error("--mode export needs --format tflite|savedmodel|onnx")
    if args.quantize and not (args.mode == "export" and args.format == "tflite"):
        parser.error("--quantize goes with --mode export --format tflite")
    if args.verbose and args.quiet:
        parser.error("give --verbose or --quiet, not both")
    explicit_litert = args.mode in ("classify", "serve") and Path(args.model_file_path).suffix == ".tflite"
    try:
        if not explicit_litert:  # classify also runs a .tflite file named explicitly (a quantized copy)
            check_model_path(args.model_file_path)
        for other in args.other_model:
            check_model_path(other)
    except UsageError as e:
        parser.error(str(e))
    return train_config, classify_config, cluster_config


def _join_cluster(args, parser, cluster_config: ClusterConfig) -> None:
    """--distribute multiworker: find the cluster (exit 2 if it is inconsistent) and say where it came from."""
    from .distribute import join_cluster

    try:
        membership = join_cluster(cluster_config)
    except UsageError as e:
        parser.error(str(e))
    for line in membership.describe():
        log.info(line)


def _run(args, train_config: TrainConfig, classify_config: ClassifyConfig, cluster_config: ClusterConfig):
    """Run the mode; return its result (results.py)."""
    if args.mode in TRAINING_MODES and importlib.util.find_spec("tensorflow") is None:
        # said before any folder is checked or image scanned, not when TensorFlow is first imported
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    if args.mode == "train":
        from .sources import ensure_digits_dataset
        from .train import train

        dataset = Path(args.dataset_path) if args.dataset_path else ensure_digits_dataset(Path(DEFAULT_DATASET))
        return train(dataset, args.model_file_path, args.images_dir, train_config, args.fresh, args.cache_dir, cluster_config)
    if args.mode == "test":
        from .evaluate import evaluate

        dataset = Path(args.dataset_path) if args.dataset_path else _recorded_dataset(args.model_file_path)
        return evaluate(
            dataset,
            args.model_file_path,
            args.images_dir,
            train_config.batch_size,
            args.cache_dir,
            classify_config.min_confidence,
            train_config.labels,
            args.unknown_path,
        )
    if args.mode == "export":
        from .export import export

        return export(args.model_file_path, args.format, args.quantize, args.dataset_path, train_config.labels)
    if args.mode == "audit":
        from .audit import audit

        return audit(args.dataset_path or DEFAULT_DATASET, args.images_dir, train_config)
    if args.mode == "compare":
        from .compare import compare

        return compare([args.model_file_path, *args.other_model], args.dataset_path, args.images_dir)
    if args.mode == "serve":
        from .serve import serve

        return serve(args.model_file_path, args.serve_config, classify_config)
    from .classify import classify, classify_many, write_predictions

    c = classify_config
    if args.single_image_path:
        return classify(
            args.single_image_path, args.model_file_path, c.top_k, c.min_confidence, c.explain, args.images_dir, c.unknown
        )
    result = classify_many(
        args.input_path, args.model_file_path, c.top_k, c.min_confidence, c.explain, args.images_dir, c.unknown
    )
    if args.output:
        write_predictions(result, Path(args.output))
    return result


def _recorded_dataset(model_path) -> Path:
    """Test mode without --dataset_path: the folder recorded in the model file, if it is here."""
    from .errors import DataError
    from .formats import read_metadata

    recorded = read_metadata(model_path)["dataset_path"]
    if not isinstance(recorded, str) or not Path(recorded).is_dir():
        raise DataError(
            f"{model_path} was trained on {recorded!r}, which is not a folder here: give --dataset_path the dataset to test on"
        )
    log.info(f"Testing on {recorded}, the dataset recorded in {model_path} (--dataset_path chooses another)")
    return Path(recorded)


class _LogFormatter(logging.Formatter):
    """Plain lines; warnings start with "Warning: "."""

    def format(self, record):
        text = super().format(record)
        return f"Warning: {text}" if record.levelno == logging.WARNING else text


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """The ``simple_cnn`` logger writes plain lines to stderr: info by default, debug with
    ``verbose``, warnings only with ``quiet``. (A notebook may configure it any other way.)"""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


FULL_IMAGE_ONLY = {"tensorflow", "keras", "sklearn", "matplotlib", "scipy", "h5py", "tf2onnx"}
TRAINING_MODES = ("train", "audit")  # they train networks: TensorFlow, which the slim classify image lacks


def main(argv=None) -> int:
    # Ctrl-C, `docker stop` and `kill` (SIGINT, SIGTERM) stop the run at a safe point
    # (interrupts.py): temporary files removed, the training state of the last completed
    # epoch kept for resuming.
    interrupts.install()
    freeze_collector_after_import()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # see quiet.py
    train_config, classify_config, cluster_config = _check(args, parser)
    configure_logging(args.verbose, args.quiet)
    try:
        if args.mode == "train" and train_config.distribute == "multiworker":
            _join_cluster(args, parser, cluster_config)  # inside: whatever it meets is one line too
        result = _run(args, train_config, classify_config, cluster_config)
        if result is not None:  # serve mode logs as it goes
            _print_result(result, args.json)
    except SimpleCNNError as e:
        _error(str(e))
        return e.exit_code
    except OSError as e:  # disk full, permissions, ... on a path the message names
        _error(f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e))
        return 1
    except ModuleNotFoundError as e:  # the slim classify image has no TensorFlow, scikit-learn or matplotlib
        package = (e.name or "").split(".")[0]
        if package not in FULL_IMAGE_ONLY:
            _unexpected(e, args.verbose)
        _error(f"--mode {args.mode} needs {package}, which is not installed here: use the full simple_cnn image")
        return 1
    except KeyboardInterrupt as e:
        resume = {
            "train": " (run the same command again to resume training; --fresh starts over)",
            "audit": " (run the same command again to resume the audit after its last finished fold)",
        }.get(args.mode, "")
        print(f"simple-cnn: interrupted{resume}", file=sys.stderr)
        _end_now(128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT))
    except Exception as e:  # noqa: BLE001 (the last resort: a bug, or a failure nobody foresaw)
        _unexpected(e, args.verbose)
    finally:
        # The interpreter's last collections at exit would walk every object still alive (the
        # model's and its graphs' among them), for nothing: the process ends next (bench/README.md,
        # "The test suite").
        gc.freeze()
    return 0


def _unexpected(e: Exception, verbose: bool) -> None:
    """One line for a bug or a failure nobody foresaw (the traceback with --verbose); exit 1."""
    if verbose:
        traceback.print_exc()
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    _error(f"unexpected {type(e).__name__}{': ' if detail else ''}{detail} (please report it; --verbose shows where)")
    _end_now(1)


def _print_result(result, as_json: bool) -> None:
    """The result on stdout (JSON or the human summary); notes for people on stderr."""
    try:
        if as_json:
            print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
            return
        if text := result.human():
            print(text)
        for line in result.notes():
            print(line, file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `simple-cnn ... | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds (a newline or an escape sequence in a
    file name is shown escaped, never obeyed)."""
    print(f"simple-cnn: error: {printable(message)}", file=sys.stderr)


def _end_now(code: int) -> None:
    """Exit at once with ``code``, not waiting for other threads: a thread stuck in a read
    (a network file system, a device) must not keep an interrupted process alive. Every
    file being written was already cleaned up as the exception unwound the main thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

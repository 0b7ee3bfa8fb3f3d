"""Every setting of simple_cnn in one place: its default, its help text and its check.

The dataclasses below are the Python API's configuration and the source of the command
line: ``cli.py`` builds one flag per field from the field's metadata, so a default or a
help text is written once. The checks live in ``__post_init__``, so a notebook's
``TrainConfig(epochs=0)`` is refused just as ``--epochs 0`` is (a :class:`SettingError`,
which the CLI turns into a usage error, exit 2).

This module imports nothing heavy, so ``simple-cnn --help`` stays fast.
"""

import re
from dataclasses import dataclass, field, fields

from .backbones import BACKBONES, SIMPLE
from .backbones import NAMES as BACKBONE_NAMES
from .errors import UsageError

DEFAULT_DATASET = "datasets/digits"  # written from scikit-learn's digits on first use
DEFAULT_MODEL = "models/cnn_model.keras"
DEFAULT_IMAGES_DIR = "images"
DISTRIBUTE_KINDS = ("none", "auto", "mirrored", "multiworker")
# Without --epochs, training fills a time budget: the epoch count is chosen from the
# measured speed of the epochs (schedule.py; docs/train.md, "How long training runs").
AUTO_MINUTES = 8.5  # so that the whole command on flower_photos-sized data stays under 10 minutes on 2 cores
AUTO_EPOCHS = (10, 25)  # the fewest and the most epochs it chooses (the most: the Quickstart on digits stays near a minute)
AUTO_EPOCHS_ON_CLUSTERS = 20  # several workers cannot follow one worker's clock
# Without --batch_size: 32 images a step up to 96 pixels; above, fewer, so that a step
# holds no more pixels than 32 images of 96. The activations kept for back-propagation
# grow with the pixels of a step and set training's peak memory, which must stay within
# 1.2 GB on flower_photos-sized data (measured: bench/README.md, "Tried after the 1x1 layer").
AUTO_BATCH, AUTO_BATCH_SIDE = 32, 96
# Without --calibrate or --no-calibrate, a temperature is fitted when the validation split
# holds at least this many images: on much smaller splits the fit runs to its bounds
# (measured: docs/test.md, "Calibrated probabilities").
CALIBRATION_MIN_IMAGES = 100
# The unknown detector's threshold keeps this share of the validation images (unknown.py): a
# share, not a distance, because distances have no scale a user could know.
UNKNOWN_KEEP = 0.95


def auto_batch_size(image_size: int, backbone: str = SIMPLE) -> int:
    """The default batch for ``image_size``: 32 up to 96 pixels, then fewer (a multiple of 8, at least 8).

    A Keras ``backbone`` trains on its share of it (``backbones.Backbone.batch_share``), a
    multiple of 4 and still at least 8, which batch norm's statistics need.
    """
    fitting = AUTO_BATCH * AUTO_BATCH_SIDE**2 // image_size**2
    batch = max(8, min(AUTO_BATCH, fitting // 8 * 8))
    share = BACKBONES[backbone].batch_share if backbone in BACKBONES else 1.0
    return max(8, int(batch * share) // 4 * 4)


class SettingError(UsageError):
    """A setting outside its range. ``names`` are the fields at fault, ``problem`` says why."""

    def __init__(self, names: tuple[str, ...], problem: str):
        self.names, self.problem = names, problem
        super().__init__(f"{' + '.join(names)} {problem}")

    def as_flags(self) -> str:
        """The same message naming command-line flags: ``--epochs must be ...``."""
        return f"{' + '.join('--' + n for n in self.names)} {self.problem}"


def setting(default, help: str, *, flag: bool = True, choices: tuple | None = None):
    """A dataclass field with its help text; ``flag=False`` keeps it off the command line."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def at_least(name: str, value, low) -> None:
    if value < low:
        raise SettingError((name,), f"must be at least {low}, not {value}")


def fraction(name: str, value: float, *, zero_ok: bool = False) -> None:
    if not (0 <= value < 1 if zero_ok else 0 < value < 1):
        bounds = "at least 0 and below 1" if zero_ok else "above 0 and below 1"
        raise SettingError((name,), f"must be a fraction {bounds}, not {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter. ``TrainConfig()`` is the default recipe."""

    epochs: int | None = setting(
        None,
        f"epochs to train; the learning rate decays to zero over them, early stopping may end sooner (default: as many "
        f"as fit in the time budget, {AUTO_EPOCHS[0]} to {AUTO_EPOCHS[1]}, chosen from the second epoch's speed)",
    )
    batch_size: int | None = setting(
        None,
        f"images per training step, and per prediction batch in test mode (default: {AUTO_BATCH}, fewer above "
        f"{AUTO_BATCH_SIDE} pixels so that a step holds no more pixels: {auto_batch_size(112)} at 112; "
        "MobileNetV3Small trains on fewer, for memory)",
    )
    image_size: int | None = setting(
        None, "training image side in pixels (default: the median short side of the images, in 32-112)"
    )
    learning_rate: float = setting(
        2e-3, "peak learning rate, reached after the warmup, held until --hold, then decayed to zero by a cosine"
    )
    warmup: float = setting(0.05, "fraction of training spent warming the learning rate up from zero")
    # Flat then cosine (fastai's fit_flat_cos): held at its peak, the learning rate explores
    # longer before it anneals (why it is the default: bench/README.md, "Flat then cosine").
    hold: float = setting(0.5, "fraction of training (warmup included) before the learning rate starts to decay")
    weight_decay: float = setting(0.05, "AdamW's decoupled weight decay")
    patience: int = setting(
        10, "epochs without a lower validation loss before training stops early, counted once the learning rate decays"
    )
    val_split: float = setting(0.15, "fraction of images for validation (chooses the best epoch)")
    test_split: float = setting(0.15, "fraction of images held out for --mode test")
    labels: str | None = setting(
        None,
        "a CSV (or .tsv) file naming each image's path inside --dataset_path and its label(s), instead of class "
        "folders; optional split (train, val, test) and group columns (train and test modes)",
    )
    multi_label: bool | None = setting(
        None,
        "several labels per image: a sigmoid output per class, each with its own threshold (default: when a "
        "--labels cell holds a '|'); also joins several rows of one path",
    )
    group_by: str | None = setting(
        None,
        "a regular expression over each image's path inside the dataset; its first group names the image's group "
        "(a patient, a plant, a video), and a group lands whole in one split, e.g. '^([^_]+)_'",
    )
    backbone: str = setting(
        SIMPLE,
        "the network: simple (simple_cnn's own) or a Keras Applications backbone, with its own preprocessing inside",
        choices=BACKBONE_NAMES,
    )
    weights: str | None = setting(
        None,
        "a --backbone's starting weights: imagenet (downloaded once into Keras' cache, KERAS_HOME), a weights file "
        "of that backbone (without its top), or none (default: imagenet for a Keras backbone, none for simple)",
    )
    init_from: str | None = setting(
        None,
        "start from another simple_cnn model (.keras or .h5, any classes): its layers below the head are reused, "
        "a new head is trained for this dataset's classes, then every layer at a lower learning rate",
    )
    seed: int = setting(42, "random seed for weights, shuffling and augmentation")
    augment: bool = setting(True, "random flips, rotations, zooms and contrast in training", flag=False)
    class_weight: str = setting(
        "none", "auto: weight the loss by inverse class frequency, for imbalanced datasets", choices=("none", "auto")
    )
    # On by default where the validation split can carry a fit (measured: docs/test.md,
    # "Calibrated probabilities").
    calibrate: bool | None = setting(
        None,
        f"fit a temperature on the validation split and bake it into the network (default: when the validation "
        f"split holds at least {CALIBRATION_MIN_IMAGES} images; --no-calibrate: never)",
    )
    max_minutes: float | None = setting(
        None,
        f"time budget for training: stop before an epoch would overrun it (default: {AUTO_MINUTES:g} minutes when "
        f"--epochs is not given, exceeded only to train the fewest epochs, {AUTO_EPOCHS[0]}; none when it is)",
    )
    tensorboard_dir: str | None = setting(
        None, "write TensorBoard logs here (loss, accuracy and learning rate per epoch): tensorboard --logdir DIR"
    )
    distribute: str = setting(
        "none",
        "train on several GPUs (mirrored) or machines (multiworker: the cluster comes from TF_CONFIG if set, "
        "else from a Slurm step (srun), else from a Kubernetes Indexed Job with --workers and --worker_hosts); "
        "auto: mirrored when more than one GPU is visible",
        choices=DISTRIBUTE_KINDS,
    )
    mixed_precision: bool = setting(False, "float16 compute on GPUs (no effect on CPUs)")

    def __post_init__(self):
        if self.epochs is not None:
            at_least("epochs", self.epochs, 1)
        if self.batch_size is not None:
            at_least("batch_size", self.batch_size, 1)
        at_least("patience", self.patience, 1)
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise SettingError(("image_size",), f"must be between 16 and 1024 pixels, not {self.image_size}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise SettingError(("learning_rate", "weight_decay"), "must be positive (the weight decay may be 0)")
        fraction("warmup", self.warmup, zero_ok=True)
        fraction("hold", self.hold, zero_ok=True)
        check_splits(self.val_split, self.test_split)
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise SettingError(("max_minutes",), f"must be positive, not {self.max_minutes}")
        if self.class_weight not in ("none", "auto"):
            raise SettingError(("class_weight",), f"must be none or auto, not {self.class_weight}")
        if self.group_by is not None:
            check_group_pattern(self.group_by)
        check_start(self.backbone, self.weights, self.init_from)
        if self.distribute not in DISTRIBUTE_KINDS:
            raise SettingError(("distribute",), f"must be one of {', '.join(DISTRIBUTE_KINDS)}, not {self.distribute}")

    def batch_for(self, image_size: int, backbone: str | None = None) -> int:
        """--batch_size, else the default for ``image_size`` and the network (:func:`auto_batch_size`):
        ``backbone``, the start's (an --init_from model's own), else --backbone."""
        return self.batch_size or auto_batch_size(image_size, backbone or self.backbone)

    def calibrates(self, validation_images: int) -> bool:
        """--calibrate or --no-calibrate, else whether the validation split is large enough (CALIBRATION_MIN_IMAGES)."""
        return self.calibrate if self.calibrate is not None else validation_images >= CALIBRATION_MIN_IMAGES

    @property
    def budget_minutes(self) -> float | None:
        """The training time budget: --max_minutes, else AUTO_MINUTES when the epochs are not given."""
        return self.max_minutes or (AUTO_MINUTES if self.epochs is None else None)


def check_splits(val_split: float, test_split: float) -> None:
    fraction("val_split", val_split)
    fraction("test_split", test_split)
    if val_split + test_split >= 1:
        raise SettingError(
            ("val_split", "test_split"), f"must be below 1 to leave images to train on, not {val_split + test_split:g}"
        )


def check_start(backbone: str, weights: str | None, init_from: str | None) -> None:
    """--backbone, --weights and --init_from must describe one start."""
    if backbone not in BACKBONE_NAMES:
        raise SettingError(("backbone",), f"must be one of {', '.join(BACKBONE_NAMES)}, not {backbone}")
    if init_from and (backbone != SIMPLE or weights):
        raise SettingError(("init_from",), "brings its own network and weights: give it without --backbone and --weights")
    if weights is not None and weights != "none" and backbone == SIMPLE:
        raise SettingError(
            ("weights",), "goes with a Keras --backbone (simple_cnn's own network has no published weights: use --init_from)"
        )
    if init_from and not init_from.endswith((".keras", ".h5")):
        raise SettingError(("init_from",), f"must name a simple_cnn model file ending in .keras or .h5, not {init_from}")


def check_group_pattern(pattern: str) -> None:
    """--group_by must compile (whether it matches any path is the dataset's to say)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise SettingError(("group_by",), f"is not a regular expression ({e}): e.g. '^(patient_[0-9]+)_'") from None


@dataclass(frozen=True)
class ClassifyConfig:
    """How classify mode answers."""

    top_k: int = setting(3, "how many classes classify lists")
    min_confidence: float = setting(
        0.0, "answer 'unknown' when the most likely class has a lower probability (classify); report coverage (test)"
    )
    explain: bool = setting(
        False, "classify: also write where the network looked (a Grad-CAM overlay, IMAGES_DIR/<name>_gradcam.png)"
    )
    unknown: bool = setting(
        False,
        "classify and serve: answer 'unknown' when the image lies farther from every class seen in training than the "
        f"model's distance threshold (chosen in training so that {UNKNOWN_KEEP * 100:g} in 100 validation images lie "
        "within it); the distance is always in --json",
    )

    def __post_init__(self):
        at_least("top_k", self.top_k, 1)
        fraction("min_confidence", self.min_confidence, zero_ok=True)


@dataclass(frozen=True)
class ServeConfig:
    """Where and how --mode serve listens."""

    host: str = setting("127.0.0.1", "serve: the address to listen on (0.0.0.0 in a container, to be reachable from outside)")
    port: int = setting(8501, "serve: the port (TensorFlow Serving's REST port); 0 picks a free one")
    max_body_mb: float = setting(10.0, "serve: requests with a larger body are refused with 413")
    request_timeout: float = setting(
        30.0, "serve: seconds a request's head, and then its body, may take to arrive (then the connection is closed, or 408)"
    )
    max_connections: int = setting(256, "serve: connections at once; more get 503 at once rather than waiting")
    # The decoding work one request may ask for: a small PNG can declare 100 megapixels,
    # which cost seconds and hundreds of MB to decode (JPEGs count at the reduced scale
    # they are decoded at, so a phone photo costs little).
    max_megapixels: float = setting(25.0, "serve: an image that decodes to more megapixels is refused with 413")
    max_request_megapixels: float = setting(
        50.0, "serve: a request whose images decode to more megapixels in all is refused with 413, before any is decoded"
    )

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise SettingError(("port",), f"must be a port number from 0 to 65535, not {self.port}")
        if self.max_body_mb <= 0 or self.request_timeout <= 0:
            raise SettingError(("max_body_mb", "request_timeout"), "must be positive")
        if self.max_megapixels <= 0 or self.max_request_megapixels <= 0:
            raise SettingError(("max_megapixels", "max_request_megapixels"), "must be positive")
        at_least("max_connections", self.max_connections, 1)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class ClusterConfig:
    """Where the workers of ``--distribute multiworker`` are, when no TF_CONFIG says so."""

    worker_port: int = setting(
        23456,
        "port of each worker when the cluster comes from Slurm or an Indexed Job (a node's further tasks use the next ports)",
    )
    workers: int | None = setting(None, "Kubernetes Indexed Job: the number of workers (the Job's completions)")
    worker_hosts: str | None = setting(
        None,
        "Kubernetes Indexed Job: the address of worker {index}, e.g. 'train-{index}.train-workers' (pods behind a headless "
        "Service); ':{port}' may follow, {port} being --worker_port plus the index",
    )
    worker_wait: float = setting(
        300.0, "seconds a worker waits for the others to start before it stops, naming those that never answered"
    )

    def __post_init__(self):
        if self.worker_wait <= 0:
            raise SettingError(("worker_wait",), f"must be positive, not {self.worker_wait}")
        if not 1 <= self.worker_port <= 65535 - 64:
            raise SettingError(("worker_port",), f"must be a port number from 1 to 65471, not {self.worker_port}")
        if self.workers is not None:
            at_least("workers", self.workers, 2)
        if self.worker_hosts is not None and "{index}" not in self.worker_hosts and "{port}" not in self.worker_hosts:
            raise SettingError(
                ("worker_hosts",), f"must hold {{index}} (or {{port}}) to tell the workers apart: {self.worker_hosts!r}"
            )


def flag_fields(config_class) -> list:
    """The fields of ``config_class`` that are command-line flags."""
    return [f for f in fields(config_class) if f.metadata.get("flag", False)]

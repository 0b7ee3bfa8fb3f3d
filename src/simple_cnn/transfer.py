"""Where training starts: random weights, a backbone's pretrained weights (``--weights``),
or another simple_cnn model (``--init_from``), and the transfer recipe that follows.

The recipe is the Keras transfer-learning guide's: the new head alone first, everything
below it frozen, then every layer at a lower learning rate. Batch norm layers stay in
inference mode throughout (a frozen Keras BatchNormalization runs so): their statistics
come from the pretraining data, and updating them from a few small batches of new images
undoes what the pretraining learnt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .backbones import BACKBONES, SIMPLE, load_backbone_weights, weights_source
from .errors import SimpleCNNError, UsageError, printable
from .files import file_digest
from .quiet import import_keras

log = logging.getLogger(__name__)

HEAD_LAYERS = ("dropout", "probabilities", "mirror_mean")  # model.build_model's layers above the features
HEAD_EPOCHS = 3  # epochs of the head alone, before every layer trains
FINE_TUNE_LEARNING_RATE = 0.1  # the fine-tuning phase's learning rate, a share of --learning_rate
# A pretrained start without --image_size: the backbone's weights were learnt on larger
# images than simple_cnn's own default sizes (ImageNet's are 224 pixels), and they see
# more at a size nearer that; 128 keeps a step's cost near the default network's.
PRETRAINED_IMAGE_SIZE = 128


@dataclass(frozen=True)
class Start:
    """The weights a training run starts from."""

    kind: str  # "random", "weights" (--weights imagenet or a file) or "model" (--init_from)
    backbone: str  # the network's: backbones.NAMES
    path: Path | None = None
    sha256: str | None = None
    image_size: int | None = None  # the size to train at unless --image_size says otherwise
    # each layer's weights below the head, by layer name: read when the start is resolved,
    # so that a file that does not fit is refused before any image is decoded
    weights: dict[str, list] = field(default_factory=dict, repr=False, compare=False)

    @property
    def pretrained(self) -> bool:
        return self.kind != "random"

    def record(self) -> dict:
        """What the model's metadata says of its start: the kind, the file's name and its SHA-256."""
        return {"kind": self.kind, "file": self.path.name if self.path else None, "sha256": self.sha256}


def resolve_start(backbone: str, weights: str | None, init_from: str | None) -> Start:
    """The start the flags ask for, its weights read (ImageNet's downloaded) before any image is decoded."""
    if init_from:
        return _model_start(Path(init_from))
    weights = weights or ("none" if backbone == SIMPLE else "imagenet")
    if weights == "none":
        return Start("random", backbone)
    path = weights_source(BACKBONES[backbone], weights)
    # A backbone's weights do not depend on the image size (no layer above its pooling is kept): any size reads them
    layers = load_backbone_weights(BACKBONES[backbone], PRETRAINED_IMAGE_SIZE, path)
    return Start("weights", backbone, path, file_digest(path), PRETRAINED_IMAGE_SIZE, layers)


def _model_start(path: Path) -> Start:
    from .formats import load_model

    try:
        source, metadata = load_model(path)
    except SimpleCNNError as e:
        raise UsageError(f"--init_from: {e}") from None
    backbone = metadata.get("backbone", SIMPLE)  # models trained before --backbone are simple_cnn's own
    if backbone not in BACKBONES and backbone != SIMPLE:
        raise UsageError(f"--init_from {printable(str(path))} has a backbone this version does not know ({printable(backbone)})")
    layers = {layer.name: layer.get_weights() for layer in source.layers if layer.weights and layer.name not in HEAD_LAYERS}
    return Start("model", backbone, path, file_digest(path), metadata["image_size"], layers)


def apply_start(model, start: Start) -> None:
    """Give ``model`` the start's weights below its head (a new head is made for the new classes)."""
    if not start.pretrained:
        return
    copied = 0
    for layer in model.layers:
        source = start.weights.get(layer.name)
        if layer.name in HEAD_LAYERS or source is None:
            continue
        if [tuple(w.shape) for w in source] != [tuple(v.shape) for v in layer.weights]:
            raise UsageError(f"{printable(start.path.name)}'s layer {layer.name} does not fit the network being trained")
        layer.set_weights(source)
        copied += 1
    if not copied:
        raise UsageError(f"{printable(start.path.name)} holds no weights for this network's layers")
    log.info(f"Starting from {printable(start.path.name)} ({copied} layers of the {start.backbone} network; a new head)")


def freeze_below_head(model) -> None:
    """The head alone trains (the transfer recipe's first phase)."""
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS


def unfreeze_keeping_batch_norm(model) -> None:
    """Every layer trains, but batch norm stays in inference mode (the module's docstring says why)."""
    batch_norm = import_keras().layers.BatchNormalization
    for layer in model.layers:
        layer.trainable = not isinstance(layer, batch_norm)

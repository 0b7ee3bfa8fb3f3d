"""Classify mode: name the class of one new image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import read_image
from .errors import DataError
from .model import load_model, read_metadata


def classify(image_path, model_path, top_k: int = 3) -> dict:
    """Predict the class of the image at ``image_path`` with the model at ``model_path``.

    Returns the top class with its probability and the ``top_k`` most likely classes.
    """
    image_path = Path(image_path)
    metadata = read_metadata(model_path)
    if not image_path.exists():
        raise DataError(f"no image at {image_path}: check --single_image_path")
    if image_path.is_dir():
        raise DataError(f"{image_path} is a folder: give --single_image_path one image file")
    try:
        pixels = read_image(image_path, metadata["image_size"])
    except ValueError as e:
        raise DataError(f"cannot read the image {image_path}: {e}") from None

    model, _ = load_model(model_path)
    # Calling the model directly: for one image it is much faster than model.predict().
    probabilities = np.asarray(model(pixels[None].astype(np.float32), training=False))[0]
    class_names = metadata["class_names"]
    order = np.argsort(probabilities)[::-1][: max(1, top_k)]
    top = [{"class": class_names[i], "probability": float(probabilities[i])} for i in order]
    return {
        "mode": "classify",
        "image": str(image_path),
        "model_file_path": str(model_path),
        "class": top[0]["class"],
        "probability": top[0]["probability"],
        "top_k": top,
    }

"""What cmd-ray knows by name: the data set names a run may use, the noise types and the peer
architectures with the image side each takes. The built-in data sets themselves are entries of
`cmd_ray.datasets` (one module each), the methods of `cmd_ray.methods`.

Torch-free, so config validation reads it without importing torch; model building reads the
same entries.
"""

from __future__ import annotations

from typing import Optional

from cmd_ray.datasets import DATASET_NAMES

# A user's own data set by layout (cmd_ray.user_data); its classes, shape and statistics come
# from the data at import.
USER_DATASETS = ("image_folder", "parquet")
DATA_NAMES = DATASET_NAMES + USER_DATASETS
NOISE_TYPES = ("none", "symmetric", "pairflip", "asymmetric", "matrix", "labels")

# Image side each peer architecture takes (None = any).
MODEL_INPUT_SIZE = {"small_cnn": 28, "mlp": None, "preact_resnet18": 32}
MODELS = tuple(MODEL_INPUT_SIZE)


def model_fit_error(model: str, image_size: int, images: str = "the data set") -> Optional[str]:
    """Why `model` cannot take square images of side `image_size` (named `images` in the message,
    e.g. the data set's name), or None if it can. The message leaves the field name to the caller."""
    takes = MODEL_INPUT_SIZE[model]
    if takes in (None, image_size):
        return None
    fits = ", ".join(m for m, s in MODEL_INPUT_SIZE.items() if s in (None, image_size))
    return f"{model!r} takes {takes}x{takes} images, {images} has {image_size}x{image_size}; allowed here: {fits}"

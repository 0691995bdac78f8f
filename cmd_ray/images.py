"""A user's encoded images decoded into arrays: the formats read, decoding (grey stays grey,
everything else colour), resizing to one square side, refusing undecodable or mixed-size images
in one line, and the per-channel statistics a data set is normalised with.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import numpy as np

from cmd_ray.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image

# File suffixes read as images (an image folder's files, a labels file's paths).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL modes decoded as grey (scaled to 8 bits); every other mode but L and RGB becomes RGB.
GREY_MODES = ("1", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _decode(blob: bytes, where: str) -> Image:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(blob))
        image.load()  # decode now: a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x7f...>"): an address, not a file.
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", reason)
        raise _BadImage(f"{where}: {reason}") from None
    if image.mode in ("L", "RGB"):
        return image
    # Grey stays grey (high bit depths scaled to 8 bits); anything else (palette, alpha, CMYK) is colour.
    return image.convert("L" if image.mode in GREY_MODES else "RGB")


class _BadImage(Exception):
    """One image could not be decoded; collected and reported together."""


def decode_images(blobs: Iterable[tuple[bytes, str]], image_size: Optional[int], field: str) -> np.ndarray:
    """Decode (encoded bytes, where) pairs into uint8 (N, H, W, C): resized to `image_size`
    if given, else all of one square size; grey stays 1 channel unless any image has colour."""
    from PIL import Image

    images, bad, where_of = [], [], []
    for blob, where in blobs:
        try:
            image = _decode(blob, where)
        except _BadImage as err:
            bad.append(str(err))
            continue
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        images.append(image)
        where_of.append(where)
    if bad:
        raise DataError(
            f"{field}: {len(bad)} image(s) cannot be decoded (first: {bad[0]}); fix or remove them "
            "(refused, not skipped: a labels file without paths is matched to images by position)"
        )
    if not images:
        raise DataError(f"{field}: no images found; allowed: PNG or JPEG images ({', '.join(IMAGE_SUFFIXES)})")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        first = where_of[0]
        other = next(w for im, w in zip(images, where_of) if im.size != images[0].size)
        size_of = {w: im.size for im, w in zip(images, where_of) if w in (first, other)}
        raise DataError(
            f"data.image_size: got null, but images differ in size ({first} is {_size(size_of[first])}, "
            f"{other} is {_size(size_of[other])}); allowed: a side in pixels to resize every image to"
        )
    (size,) = sizes
    if size[0] != size[1]:
        raise DataError(
            f"data.image_size: got null, but the images are {_size(size)} (not square); "
            "allowed: a side in pixels to resize every image to"
        )
    colour = any(im.mode == "RGB" for im in images)
    arrays = [np.asarray(im.convert("RGB") if colour else im, dtype=np.uint8) for im in images]
    stacked = np.stack(arrays)
    return stacked if colour else stacked[..., None]


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, H, W, C) images, scaled to [0, 1]
    (in chunks, so a large data set needs no float copy of itself)."""
    channels = images.shape[-1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += part.sum(axis=0)
        squares += (part**2).sum(axis=0)
        count += len(part)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) if s > 1e-6 else 1.0 for s in std)

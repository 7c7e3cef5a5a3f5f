"""Loading user images (files or arrays) as RGB uint8 arrays.

Files get their EXIF orientation applied and any PIL mode converted to RGB.
"""

from __future__ import annotations

import os
import re
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, np.ndarray]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(image: ImageInput) -> tuple[np.ndarray, str]:
    """Returns `(rgb, name)`: an RGB uint8 (H, W, 3) array and a display name for messages.

    `image` is a path to an image file or a uint8 array of shape (H, W), (H, W, 1), (H, W, 3)
    or (H, W, 4) (alpha is dropped).
    """
    if isinstance(image, np.ndarray):
        return _from_array(image), "<array {}>".format("x".join(map(str, image.shape)))
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        return _from_file(name), name
    raise TypeError(
        f"expected an image path or a numpy uint8 array, got {type(image).__name__}"
    )


def _from_array(array: np.ndarray) -> np.ndarray:
    expected = "expected a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    if array.dtype != np.uint8:
        raise ValueError(
            f"{expected}, got dtype {array.dtype}; convert first, e.g. "
            "np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{expected}, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{expected}, got an empty array of shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _from_file(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Image.DecompressionBombError as e:  # PIL refuses to decode so many pixels
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(pixels.group(1)) / 1e6:,.0f} megapixels)" if pixels else ""
        raise ValueError(f"image {path} is too large{size}: photos may have up to "
                         f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:,.0f} megapixels; downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255; scale to 8 bits instead.
        gray = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    assert rgb.ndim == 3 and rgb.shape[2] == 3, rgb.shape
    return np.ascontiguousarray(rgb)

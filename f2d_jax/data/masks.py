"""Head masks M (face, hair, neck) for the CGDR loss, at image and at latent resolution.

A mask is uint8, 255 inside the head and 0 outside. It comes either from the 68 landmarks
(`landmark_head_mask`, the default) or from a mask file per photo (`load_mask_file` +
`warp_mask`). `latent_mask` area-averages a mask to the latent grid the loss is computed on.
Numpy and OpenCV only (`latent_mask` also takes jax arrays).
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image

from f2d_jax.data.geometry import warp_image

# The landmark mask, in units of the face measured from its landmarks: `face_height` is the
# distance from the middle of the eyebrows (points 17-26) down to the chin (point 8), along the
# face's vertical axis; `face_width` is the distance between the jaw's ends (points 0 and 16).
#
# Skull: the jaw contour (points 0-16) is mirrored about the eyebrow line and squashed to this
# fraction of its height, so the chin lands FOREHEAD_HEIGHT x face_height above the brows (the
# forehead and the top of the skull; an adult's is about 0.7-0.8 of brow-to-chin).
FOREHEAD_HEIGHT = 0.8
# Hair and ears: the head polygon is dilated by this fraction of face_width.
HAIR_MARGIN = 0.15
# Neck: a band NECK_WIDTH x face_width wide from NECK_OVERLAP x face_height above the chin
# (inside the jaw, so that the band joins the face) to NECK_LENGTH x face_height below it.
NECK_WIDTH = 0.6
NECK_OVERLAP = 0.25
NECK_LENGTH = 0.8

_SUBPIXEL_BITS = 4


def _face_axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, down) unit vectors of the face: along the eye line, and turned towards the mouth."""
    right = lm[42:48].mean(axis=0) - lm[36:42].mean(axis=0)
    right /= max(np.hypot(*right), 1e-9)
    down = np.array([-right[1], right[0]])
    if np.dot((lm[48] + lm[54]) / 2 - lm[36:48].mean(axis=0), down) < 0:
        down = -down  # a mirrored point set; keep `down` pointing at the mouth
    return right, down


def head_polygons(landmarks68: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(head hull (K, 2), neck quadrilateral (4, 2), dilation radius in pixels), in the
    landmarks' pixel frame. See the module constants for the construction."""
    lm = np.asarray(landmarks68, dtype=np.float64)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise ValueError(f"expected finite (68, 2) landmarks, got shape {lm.shape}")
    right, down = _face_axes(lm)
    brows = lm[17:27].mean(axis=0)
    face_height = max(float(np.dot(lm[8] - brows, down)), 1e-6)
    face_width = float(np.hypot(*(lm[16] - lm[0])))
    jaw = lm[0:17] - brows
    skull = brows + np.outer(jaw @ right, right) - FOREHEAD_HEIGHT * np.outer(jaw @ down, down)
    points = np.concatenate([lm, skull]).astype(np.float32)
    hull = cv2.convexHull(points)[:, 0, :].astype(np.float64)
    half_width = NECK_WIDTH * face_width / 2
    top = lm[8] - NECK_OVERLAP * face_height * down
    bottom = lm[8] + NECK_LENGTH * face_height * down
    neck = np.stack([top - half_width * right, top + half_width * right,
                     bottom + half_width * right, bottom - half_width * right])
    return hull, neck, HAIR_MARGIN * face_width


def landmark_head_mask(landmarks68: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 head mask (255 = head) from 68 landmarks given in that image's pixels.

    The convex hull of the landmarks and of the jaw contour mirrored above the eyebrows (face,
    forehead, skull), plus a band below the chin (neck), dilated by a margin proportional to the
    face width (hair, ears). `size` is R or (H, W).
    """
    height, width = (size, size) if np.isscalar(size) else size
    hull, neck, radius = head_polygons(landmarks68)
    mask = np.zeros((int(height), int(width)), np.uint8)
    for polygon in (hull, neck):
        fixed = np.round(polygon * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillConvexPoly(mask, fixed, 255, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    r = int(round(radius))
    if r > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        mask = cv2.dilate(mask, kernel)
    return mask


def load_mask_file(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 mask from an image file: 255 where any colour channel is non-zero (palette
    images: where the palette index is non-zero; an alpha channel is ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                values = np.asarray(img)
            else:
                bands = [b for b in img.getbands() if b != "A"] or list(img.getbands())
                values = np.stack([np.asarray(img.getchannel(b)) for b in bands], axis=-1)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read mask file {path}: {e}") from e
    if values.ndim == 3:
        values = values.any(axis=-1)
    return np.where(values != 0, 255, 0).astype(np.uint8)


def warp_mask(mask: np.ndarray, affine: np.ndarray, resolution: int) -> np.ndarray:
    """A (H, W) photo-sized mask carried into the training image by the image's own warp
    (`geometry.warp_image`, same resampling and border), then thresholded at half."""
    warped = warp_image(np.asarray(mask, np.uint8), affine, resolution)
    warped = warped[..., 0] if warped.ndim == 3 else warped
    return np.where(warped >= 128, 255, 0).astype(np.uint8)


def latent_mask(mask, factor: int = 8):
    """uint8 (..., R, R) or (..., R, R, 1) masks -> float32 (..., R/f, R/f, 1) in [0, 1].

    Each latent pixel is the fraction of its f x f image pixels that are head (area average of
    mask / 255). Works on numpy and on jax arrays (only reshape and mean).
    """
    shape = tuple(mask.shape)
    if len(shape) >= 3 and shape[-1] == 1:
        mask = mask.reshape(shape[:-1])
        shape = shape[:-1]
    if len(shape) < 2 or shape[-1] % factor or shape[-2] % factor:
        raise ValueError(f"latent_mask expects masks (..., H, W[, 1]) with H and W divisible by {factor}, "
                         f"got shape {tuple(mask.shape)}")
    height, width = shape[-2:]
    blocks = mask.reshape(*shape[:-2], height // factor, factor, width // factor, factor)
    area = blocks.astype(np.float32).mean(axis=(-3, -1))
    return (area / np.float32(255))[..., None].astype(np.float32)

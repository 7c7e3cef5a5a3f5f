"""The training image: an FFHQ-style square crop around the head, from the 68 landmarks.

Numpy and OpenCV only. The affine that makes the crop is kept, so that landmarks (and mask files)
can be carried into the training image.
"""
from __future__ import annotations

import cv2
import numpy as np

# The crop's half side is max(EYE_SPAN x eye distance, MOUTH_SPAN x eye-to-mouth distance), so
# its side is about 4 eye distances (FFHQ's proportions).
EYE_SPAN = 2.0
MOUTH_SPAN = 1.8
# The crop's centre lies this fraction of the eye-to-mouth vector below the midpoint of the eyes.
CENTRE_SHIFT = 0.1
# Warps reflect the photo at its borders (as FFHQ pads by reflection) rather than paint black.
BORDER = cv2.BORDER_REFLECT_101


def _check_landmarks(landmarks68) -> np.ndarray:
    lm = np.asarray(landmarks68, dtype=np.float64)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise ValueError(f"expected finite (68, 2) landmarks, got shape {lm.shape}")
    return lm


def training_affine(landmarks68: np.ndarray, resolution: int) -> np.ndarray:
    """(2, 3) affine from photo pixels to the `resolution` x `resolution` training image.

    The geometry, in photo pixels (x right, y down):
    - `eyes` is the midpoint of the two eye centres (means of points 36-41 and 42-47), `mouth`
      the midpoint of the mouth corners (48, 54); `across` = right eye - left eye and
      `down` = mouth - eyes are the face's two natural axes.
    - The crop's x axis is the unit vector along `across` + `down` turned by -90 degrees (both
      terms point to the right for an upright face). This averages the directions of the eye
      line and of the normal to the eye-mouth line: it levels the eyes of a symmetric face and
      is less sensitive to landmark noise than either line alone. The crop's y axis is the x
      axis turned by +90 degrees (pointing down the face).
    - The crop is a square centred `CENTRE_SHIFT` x `down` below `eyes`, with half side
      s = max(EYE_SPAN |across|, MOUTH_SPAN |down|): about 4 eye distances wide, which leaves room
      for the hair and the neck.
    - The square's edges map to the training image's outer pixel edges: a photo point p goes to
      R / (2 s) * ((p - c) . axis) + R / 2 - 1/2 along each axis (pixel centres at integers).
    """
    if int(resolution) < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    lm = _check_landmarks(landmarks68)
    left_eye, right_eye = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eyes = (left_eye + right_eye) / 2
    mouth = (lm[48] + lm[54]) / 2
    across, down = right_eye - left_eye, mouth - eyes
    x_axis = across + np.array([down[1], -down[0]])
    norm = np.hypot(*x_axis)
    if norm == 0:
        raise ValueError("degenerate landmarks: the eyes and the mouth coincide")
    x_axis /= norm
    y_axis = np.array([-x_axis[1], x_axis[0]])
    half = max(EYE_SPAN * np.hypot(*across), MOUTH_SPAN * np.hypot(*down))
    if half <= 0:
        raise ValueError("degenerate landmarks: zero face size")
    centre = eyes + CENTRE_SHIFT * down
    scale = resolution / (2 * half)
    rotation = scale * np.stack([x_axis, y_axis])        # rows: where each output axis reads
    offset = resolution / 2 - 0.5 - rotation @ centre
    return np.concatenate([rotation, offset[:, None]], axis=1)


def transform_points(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Applies a (2, 3) affine to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:, :2].T + affine[:, 2]


def affine_scale(affine: np.ndarray) -> float:
    """Output pixels per photo pixel of a similarity affine."""
    return float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))


def warp_image(image: np.ndarray, affine: np.ndarray, resolution: int) -> np.ndarray:
    """`image` (H, W[, C]) warped by `affine` to `resolution` x `resolution`.

    Downscaling first resizes the photo with INTER_AREA to the crop's scale (so that no detail
    aliases), then the remaining rotation and shift use INTER_LINEAR; upscaling is INTER_LINEAR.
    Borders reflect (`BORDER`).
    """
    image = np.ascontiguousarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    scale = affine_scale(affine)
    if scale < 1.0:
        height, width = image.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        if small.ndim < image.ndim:
            small = small[..., None]
        kx, ky = size[0] / width, size[1] / height
        # cv2.resize maps pixel centres x -> (x + 0.5) k - 0.5; undo that for the affine.
        to_small = np.array([[kx, 0, 0.5 * kx - 0.5], [0, ky, 0.5 * ky - 0.5], [0, 0, 1]])
        affine = (np.vstack([affine, [0, 0, 1]]) @ np.linalg.inv(to_small))[:2]
        image = small
    out = cv2.warpAffine(image, affine, (resolution, resolution), flags=cv2.INTER_LINEAR,
                         borderMode=BORDER)
    if out.ndim < image.ndim:
        out = out[..., None]
    return out

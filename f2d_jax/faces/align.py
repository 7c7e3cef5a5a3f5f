"""Aligned face crops from 68 landmarks, as Face2Diffusion's encoders expect them.

A 112x112 ArcFace-template crop for the identity encoder (MSID) and a 224x224
Deep3DFaceRecon crop for the expression encoder.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import cv2
import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform

from f2d_jax import InputWarning

from .detect import LandmarkDetector, default_detector
from .image import ImageInput, load_image

# Eye centres, nose tip and mouth corners in the standard 112x112 ArcFace crop.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

# Deep3DFaceRecon's mean-face 3D positions of the same five points (x right, y up),
# from its BFM/similarity_Lm3D_all.mat as reduced by its util/load_mats.py `load_lm3d`.
LM3D_STD = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032535, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ]
)

EXPRESSION_SIZE = 224
EXPRESSION_RESCALE = 102.0


class NoFaceError(ValueError):
    """No face was found in the image (from Python, `align_face(image, landmarks=...)` skips detection)."""


@dataclasses.dataclass(frozen=True, eq=False)
class AlignedFace:
    """One face cut out of a photo, ready for Face2Diffusion's two encoders.

    crop: (112, 112, 3) uint8 ArcFace-aligned crop (identity encoder input).
    expression_crop: (224, 224, 3) uint8 Deep3DFaceRecon-aligned crop (expression encoder).
    landmarks: (68, 2) float64 (x, y) in the input image's pixels, after EXIF orientation.
    matrix: (3, 3) similarity transform from image pixels to `crop` pixels.
    source: the file path or array description the face came from.
    """

    crop: np.ndarray
    expression_crop: np.ndarray
    landmarks: np.ndarray
    matrix: np.ndarray
    source: str


def _check_landmarks(landmarks, what: str = "landmarks") -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"{what} must have shape (68, 2) (iBUG-300W points), got {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return lm


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """Face2Diffusion's 5 points: left eye, right eye, nose tip, left and right mouth corner."""
    lm = _check_landmarks(landmarks68)
    return np.stack(
        [lm[36:42].mean(axis=0), lm[42:48].mean(axis=0), lm[30], lm[48], lm[54]]
    )


def similarity_matrix(points5: np.ndarray) -> np.ndarray:
    """(3, 3) least-squares similarity transform from 5 image points to ARCFACE_TEMPLATE_112."""
    points5 = np.asarray(points5, dtype=np.float64)
    if points5.shape != (5, 2):
        raise ValueError(f"expected 5 (x, y) points of shape (5, 2), got {points5.shape}")
    transform = SimilarityTransform.from_estimate(points5, ARCFACE_TEMPLATE_112)
    if not transform:
        raise ValueError(f"cannot fit a similarity transform to these points: {transform}")
    return np.asarray(transform.params, dtype=np.float64)


def warp_to_template(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """Warps `image` by `matrix` into a `size` x `size` crop (as the official code does)."""
    return cv2.warpPerspective(image, matrix, (size, size), flags=cv2.INTER_AREA)


def _deep3d_five_points(lm: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's `extract_5p`: eyes are the mean of the two corners only."""
    return np.stack(
        [
            (lm[36] + lm[39]) / 2,
            (lm[42] + lm[45]) / 2,
            lm[30],
            lm[48],
            lm[54],
        ]
    )


def _deep3d_pos(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Deep3DFaceRecon's `POS`: scaled orthographic fit of 3D points x (3, N) to 2D xp (2, N).

    Returns the translation (2,) and the scale.
    """
    n = xp.shape[1]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = x.T
    a[0::2, 3] = 1
    a[1::2, 4:7] = x.T
    a[1::2, 7] = 1
    b = xp.T.reshape(2 * n)  # x0, y0, x1, y1, ...
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(scale)


def expression_params(height: int, landmarks68: np.ndarray) -> tuple[float, np.ndarray]:
    """Deep3DFaceRecon's `align_img` scale s and translation t (in its y-up frame)."""
    lm = _check_landmarks(landmarks68).copy()
    lm[:, 1] = height - 1 - lm[:, 1]
    t, s = _deep3d_pos(_deep3d_five_points(lm).T, LM3D_STD.T)
    return EXPRESSION_RESCALE / s, t


def expression_box(width: int, height: int, s: float, t: np.ndarray) -> tuple[int, int, int, int]:
    """`(w, h, left, up)`: the resized size and the crop's corner, Deep3DFaceRecon's integer math."""
    half = EXPRESSION_SIZE / 2
    w = np.float64(width * s).astype(np.int32)
    h = np.float64(height * s).astype(np.int32)
    left = np.float64(w / 2 - half + (t[0] - width / 2) * s).astype(np.int32)
    up = np.float64(h / 2 - half + (height / 2 - t[1]) * s).astype(np.int32)
    return int(w), int(h), int(left), int(up)


def expression_crop(image: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
    """(224, 224, 3) uint8 crop aligned like Deep3DFaceRecon's `align_img` (its test.py setup).

    The image is scaled so the face fits its mean 3D face at 102 px per unit, bicubic-resized
    with PIL and cropped; pixels outside the image are black.
    """
    height, width = image.shape[:2]
    s, t = expression_params(height, landmarks68)
    w, h, left, up = expression_box(width, height, s, t)
    if w < 1 or h < 1:
        raise ValueError(f"face too small for the expression crop (image would resize to {w}x{h})")
    resized = Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC)
    crop = resized.crop((left, up, left + EXPRESSION_SIZE, up + EXPRESSION_SIZE))
    out = np.asarray(crop.convert("RGB"), dtype=np.uint8)
    assert out.shape == (EXPRESSION_SIZE, EXPRESSION_SIZE, 3), out.shape
    return out


def _bbox_area(lm: np.ndarray) -> float:
    size = lm.max(axis=0) - lm.min(axis=0)
    return float(size[0] * size[1])


def align_face(
    image: ImageInput,
    *,
    landmarks: Optional[np.ndarray] = None,
    detector: Optional[LandmarkDetector] = None,
) -> AlignedFace:
    """Finds the face in `image` (path or uint8 array) and returns its aligned crops.

    With `landmarks` (68, 2) given, detection is skipped. Otherwise `detector` (default: the
    shared dlib detector) runs; if it finds several faces the largest is used, with a warning.
    """
    rgb, source = load_image(image)
    if landmarks is not None:
        lm = _check_landmarks(landmarks)
    else:
        detect = detector if detector is not None else default_detector()
        faces = [_check_landmarks(f, "detector output") for f in detect(rgb)]
        if not faces:
            raise NoFaceError(
                f"no face found in {source}; use a photo with a clear, roughly frontal face"
            )
        lm = max(faces, key=_bbox_area)
        if len(faces) > 1:
            warnings.warn(
                f"{len(faces)} faces found in {source}; using the largest", InputWarning, stacklevel=2
            )
    matrix = similarity_matrix(five_points(lm))
    return AlignedFace(
        crop=warp_to_template(rgb, matrix, 112),
        expression_crop=expression_crop(rgb, lm),
        landmarks=lm,
        matrix=matrix,
        source=source,
    )


def msid_input(crops: np.ndarray) -> np.ndarray:
    """uint8 (..., 112, 112, 3) crops -> float32 in [-1, 1], the identity encoder's input.

    Works on numpy and on jax arrays (also inside jit), returning the same kind.
    """
    x = _check_crops(crops, 112, "msid_input")
    return ((x / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


def expression_input(crops: np.ndarray) -> np.ndarray:
    """uint8 (..., 224, 224, 3) crops -> float32 in [0, 1], the expression encoder's input."""
    x = _check_crops(crops, EXPRESSION_SIZE, "expression_input")
    return (x / np.float32(255)).astype(np.float32)


def _check_crops(crops: np.ndarray, size: int, name: str) -> np.ndarray:
    if not hasattr(crops, "dtype"):
        crops = np.asarray(crops)
    if crops.dtype != np.uint8 or tuple(crops.shape[-3:]) != (size, size, 3):
        raise ValueError(
            f"{name} expects uint8 crops of shape (..., {size}, {size}, 3), "
            f"got {crops.dtype} {crops.shape}"
        )
    return crops.astype(np.float32)

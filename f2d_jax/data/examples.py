"""One photo -> its training examples (aligned crops, head mask, landmarks). No jax, no TensorFlow.

`process_photo` is what `python -m f2d_jax.data.prepare` runs per photo; it never raises for a
photo without a usable face (the result says why it was skipped) but does for a missing or
mismatched mask file, which is a user error.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image

from f2d_jax.data.geometry import training_affine, transform_points, warp_image
from f2d_jax.config import CHOICES
from f2d_jax.data.masks import landmark_head_mask, load_mask_file, warp_mask
from f2d_jax.faces import NoFaceError, align_face, default_detector, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FLIP_SUFFIX = "#flip"
MASK_SOURCES = CHOICES["data.mask_source"]

# Why a photo gave no example.
NO_FACE = "no_face"
UNREADABLE = "unreadable"
BAD_FACE = "unusable_face"   # a face was found but the crops could not be made (e.g. too small)


class MaskFileError(ValueError):
    """A mask file is missing, unreadable or does not match its photo."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training example; images are uint8 RGB, `mask` uint8 (R, R) with 255 = head."""

    name: str                  # the photo's path relative to the images folder (+ "#flip")
    image: np.ndarray          # (R, R, 3) FFHQ-style training image
    mask: np.ndarray           # (R, R)
    face: np.ndarray           # (112, 112, 3) ArcFace crop (MSID input)
    expression_face: np.ndarray  # (224, 224, 3) Deep3DFaceRecon crop (expression encoder input)
    landmarks: np.ndarray      # (68, 2) float32, in training-image pixels


@dataclasses.dataclass(frozen=True, eq=False)
class PhotoResult:
    """What one photo gave: its examples (the photo, then its mirror), or why it gave none."""

    name: str
    examples: tuple[Example, ...] = ()
    skipped: Optional[str] = None        # NO_FACE / UNREADABLE / BAD_FACE
    message: str = ""                    # the reason, for the report
    faces: int = 0                       # faces the detector found in the photo
    mirror_skipped: str = ""             # why the mirror gave no example ("" if it did or flip is off)


def find_images(images_dir: str | os.PathLike) -> list[str]:
    """Relative paths ('/'-separated) of the image files under `images_dir`, recursively, sorted."""
    root = os.fspath(images_dir)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def mask_file_path(mask_dir: str | os.PathLike, name: str) -> str:
    """`<mask_dir>/<name with its suffix replaced by .png>`."""
    return os.path.join(os.fspath(mask_dir), os.path.splitext(name)[0] + ".png")


class CountingDetector:
    """Wraps a landmark detector and remembers how many faces its last call found."""

    def __init__(self, detector=None):
        self.detector = detector if detector is not None else default_detector()
        self.last_count = 0

    def __call__(self, image):
        faces = self.detector(image)
        self.last_count = len(faces)
        return faces


def make_example(name: str, rgb: np.ndarray, aligned, resolution: int, mask_source: str,
                 mask: Optional[np.ndarray] = None) -> Example:
    """The example of one aligned face: training image, mask, crops and landmarks."""
    affine = training_affine(aligned.landmarks, resolution)
    landmarks = transform_points(affine, aligned.landmarks)
    if mask_source == "landmarks":
        head = landmark_head_mask(landmarks, resolution)
    else:
        head = warp_mask(mask, affine, resolution)
    return Example(name=name, image=warp_image(rgb, affine, resolution), mask=head, face=aligned.crop,
                   expression_face=aligned.expression_crop, landmarks=landmarks.astype(np.float32))


def _read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    try:
        mask = load_mask_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise MaskFileError(str(e)) from e
    if mask.shape != shape:
        raise MaskFileError(f"mask file {path} is {mask.shape[1]}x{mask.shape[0]} but its photo is "
                            f"{shape[1]}x{shape[0]} (after EXIF orientation); masks must match their photos")
    return mask


def _align(rgb, detector):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* faces found in .*; using the largest")
        return align_face(rgb, detector=detector)


def process_photo(images_dir: str | os.PathLike, name: str, *, resolution: int, flip: bool,
                  mask_source: str = "landmarks", mask_dir: str | os.PathLike = "",
                  detector=None) -> PhotoResult:
    """Aligns the photo `<images_dir>/<name>` (and its mirror when `flip`) into examples.

    A photo that cannot be read, has no face or whose face gives no crop is skipped (the result
    says why). With several faces the largest is used (`faces` says how many there were).
    With `mask_source="files"` the mask `mask_file_path(mask_dir, name)` must exist and match
    the photo's size, else MaskFileError.
    """
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
    counting = CountingDetector(detector)
    path = os.path.join(os.fspath(images_dir), name)
    try:
        rgb, _ = load_image(path)
    except (ValueError, OSError, Image.DecompressionBombError) as e:
        return PhotoResult(name, skipped=UNREADABLE, message=str(e))
    mask = None
    if mask_source == "files":
        mask = _read_mask(mask_file_path(mask_dir, name), rgb.shape[:2])
    try:
        aligned = _align(rgb, counting)
    except NoFaceError:
        return PhotoResult(name, skipped=NO_FACE, message=f"no face found in {name}")
    except ValueError as e:
        return PhotoResult(name, skipped=BAD_FACE, message=f"{name}: {e}", faces=counting.last_count)
    faces = counting.last_count
    try:
        examples = [make_example(name, rgb, aligned, resolution, mask_source, mask)]
    except ValueError as e:
        return PhotoResult(name, skipped=BAD_FACE, message=f"{name}: {e}", faces=faces)
    mirror_skipped = ""
    if flip:
        mirrored = np.ascontiguousarray(rgb[:, ::-1])
        try:
            aligned = _align(mirrored, counting)
            examples.append(make_example(name + FLIP_SUFFIX, mirrored, aligned, resolution, mask_source,
                                         None if mask is None else np.ascontiguousarray(mask[:, ::-1])))
        except NoFaceError:
            mirror_skipped = "no face found in the mirrored photo"
        except ValueError as e:
            mirror_skipped = f"mirrored photo: {e}"
    return PhotoResult(name, examples=tuple(examples), faces=faces, mirror_skipped=mirror_skipped)

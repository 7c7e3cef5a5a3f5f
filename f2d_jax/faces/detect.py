"""Face detection and 68-point landmarks (iBUG-300W convention).

Any callable matching `LandmarkDetector` can be plugged in; the default is dlib's HOG face
detector plus its 68-point shape predictor from the `face_recognition_models` package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Protocol

import cv2
import numpy as np

_INSTALL_HINT = "pip install 'f2d-jax[faces]'"
_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


class LandmarkDetector(Protocol):
    """Finds faces in an RGB uint8 (H, W, 3) image.

    Returns one (68, 2) float array of (x, y) pixel coordinates per face, in the
    iBUG-300W 68-point order; an empty list when there is no face.
    """

    def __call__(self, image: np.ndarray) -> list[np.ndarray]: ...


def predictor_model_path(filename: str = _PREDICTOR_FILE) -> str:
    """Path of a dlib model file shipped in `face_recognition_models` (default: the 68-point shape predictor;
    also dlib_face_recognition_resnet_model_v1.dat, the face descriptor)."""
    # Deliberately not importing the package: its __init__ needs pkg_resources, which
    # recent setuptools no longer provides. Only its data file is needed.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the face_recognition_models package is not installed; run: {_INSTALL_HINT}"
        )
    path = os.path.join(spec.submodule_search_locations[0], "models", filename)
    if not os.path.isfile(path):
        raise ImportError(
            f"{path} is missing (broken face_recognition_models install?); "
            f"reinstall with: {_INSTALL_HINT}"
        )
    return path


@functools.cache
def _dlib_models():
    """(face detector, shape predictor, dlib.rectangle), loaded once per process."""
    try:
        import dlib
    except ImportError as e:
        raise ImportError(f"dlib is not installed; run: {_INSTALL_HINT}") from e
    path = predictor_model_path()
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(path), dlib.rectangle


class DlibLandmarkDetector:
    """dlib HOG frontal face detector + 68-point shape predictor (models load on first call).

    `upsample` is how many times dlib upsamples the image before detecting (1 finds faces
    down to about 40 px). Images whose longer side exceeds `max_detect_side` are detected
    on a downscaled copy; landmarks are always predicted on the full-resolution image.
    """

    def __init__(self, upsample: int = 1, max_detect_side: int = 1600):
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        if max_detect_side < 1:
            raise ValueError(f"max_detect_side must be >= 1, got {max_detect_side}")
        self.upsample = int(upsample)
        self.max_detect_side = int(max_detect_side)

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an RGB uint8 (H, W, 3) array, got {image.dtype} {image.shape}; "
                "use f2d_jax.faces.load_image to convert"
            )
        detector, predictor, rectangle = _dlib_models()  # loaded once, shared
        image = np.ascontiguousarray(image)
        height, width = image.shape[:2]
        scale = min(1.0, self.max_detect_side / max(height, width))
        small = image
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        faces = []
        for box in detector(small, self.upsample):
            if scale < 1.0:
                box = rectangle(
                    round(box.left() / scale),
                    round(box.top() / scale),
                    round(box.right() / scale),
                    round(box.bottom() / scale),
                )
            shape = predictor(image, box)
            faces.append(np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64))
        return faces


_default_detector: DlibLandmarkDetector | None = None


def default_detector() -> DlibLandmarkDetector:
    """The shared `DlibLandmarkDetector`, created on first use (models are loaded once)."""
    global _default_detector
    if _default_detector is None:
        _default_detector = DlibLandmarkDetector()
    return _default_detector

"""Face photo -> 68 landmarks -> the aligned crops Face2Diffusion's encoders take.

Plain numpy / OpenCV / PIL (plus dlib for the default detector); no jax or torch here.
"""

from .align import (
    ARCFACE_TEMPLATE_112,
    AlignedFace,
    NoFaceError,
    align_face,
    expression_crop,
    expression_input,
    five_points,
    msid_input,
    similarity_matrix,
    warp_to_template,
)
from .detect import DlibLandmarkDetector, LandmarkDetector, default_detector
from .image import load_image

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "AlignedFace",
    "DlibLandmarkDetector",
    "LandmarkDetector",
    "NoFaceError",
    "align_face",
    "default_detector",
    "expression_crop",
    "expression_input",
    "five_points",
    "load_image",
    "msid_input",
    "similarity_matrix",
    "warp_to_template",
]

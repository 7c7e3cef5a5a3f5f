"""Training data: face photos -> aligned examples -> a tfds dataset, and reading it back.

- `python -m f2d_jax.data.prepare` (`prepare.py`) builds a dataset from a folder of photos;
- `open_prepared` (`read.py`) reads one split as stacked numpy batches, without TensorFlow;
- `geometry.py` (the FFHQ-style training crop), `masks.py` (head masks, `latent_mask`) and
  `examples.py` (one photo -> its examples) are the pieces, numpy/OpenCV only.

Importing this package does not import TensorFlow, jax models or diffusers.
"""
from f2d_jax.data.geometry import training_affine, transform_points, warp_image
from f2d_jax.data.masks import landmark_head_mask, latent_mask, load_mask_file, warp_mask
from f2d_jax.data.read import (FEATURE_FIELDS, INFO_FILE, PreparedData, compatibility_problems, open_prepared,
                               read_info)

__all__ = [
    "FEATURE_FIELDS", "INFO_FILE", "PreparedData", "compatibility_problems", "landmark_head_mask", "latent_mask",
    "load_mask_file", "open_prepared", "read_info", "training_affine", "transform_points", "warp_image",
    "warp_mask",
]

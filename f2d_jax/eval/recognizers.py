"""Face recognizers for identity similarity: each maps detected faces to embedding vectors.

    dlib     dlib's ResNet face descriptor (128-d), from the `faces` extra: offline and independent of
             the generator (the default reference recognizer)
    msid     our MSID encoder (the generator's own identity features), on the ArcFace 112 crop
    arcface  an insightface ArcFace IResNet backbone.pth from a user path, on the ArcFace 112 crop

A recognizer is called with the detected faces and the RGB images they were found in.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.faces import AlignedFace, msid_input
from f2d_jax.faces.detect import predictor_model_path

DLIB_DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"


class DlibRecognizer:
    """dlib's face descriptor, computed on its own 150x150 chip from our 68 landmarks."""

    name = "dlib"

    def __init__(self):
        import dlib  # the `faces` extra, like the default detector

        self._dlib = dlib
        self._model = dlib.face_recognition_model_v1(predictor_model_path(DLIB_DESCRIPTOR))

    def __call__(self, faces: Sequence[AlignedFace], images: Sequence[np.ndarray]) -> np.ndarray:
        dlib, out = self._dlib, []
        for face, image in zip(faces, images):
            (left, top), (right, bottom) = face.landmarks.min(0), face.landmarks.max(0)
            box = dlib.rectangle(int(left), int(top), int(np.ceil(right)), int(np.ceil(bottom)))
            shape = dlib.full_object_detection(box, [dlib.point(int(round(x)), int(round(y)))
                                                     for x, y in face.landmarks])
            out.append(np.asarray(self._model.compute_face_descriptor(np.ascontiguousarray(image), shape)))
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 128), np.float32)


class CropRecognizer:
    """A flax.linen recognizer of ArcFace-aligned 112 crops in [-1, 1] (MSID, IResNet), jitted, in batches."""

    def __init__(self, name: str, model, variables, batch_size: int = 32):
        self.name, self.batch_size = name, batch_size
        self._variables = variables
        self._apply = jax.jit(model.apply)

    def __call__(self, faces: Sequence[AlignedFace], images: Sequence[np.ndarray] = ()) -> np.ndarray:
        crops = np.stack([f.crop for f in faces]) if faces else np.zeros((0, 112, 112, 3), np.uint8)
        out = [np.asarray(self._apply(self._variables, jnp.asarray(msid_input(crops[i:i + self.batch_size]))))
               for i in range(0, len(crops), self.batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


@functools.cache
def _msid_model(fields: tuple):
    from f2d_jax.models import MSIDEncoder

    return MSIDEncoder(**dict(fields))


def msid_recognizer(msid_config, weights: str = "", seed: int = 0, log=print) -> CropRecognizer:
    """MSID of the given sizes (a config's `model.msid`) with `weights` (official msid.pt, .safetensors,
    .msgpack or a weights directory); empty weights: random init, for offline smoke runs only."""
    from f2d_jax import convert

    model = _msid_model(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(msid_config).items())))
    if weights:
        variables = convert.load("msid", weights, model)
    else:
        log("msid recognizer: random init (no MSID weights): its identity scores mean nothing")
        size = model.image_size
        variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return CropRecognizer("msid", model, variables)


def arcface_recognizer(path) -> CropRecognizer:
    """insightface ArcFace IResNet (r18 ... r200) from its backbone.pth."""
    from f2d_jax.models.iresnet import load_iresnet

    model, variables = load_iresnet(path)
    return CropRecognizer("arcface", model, variables)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) (or (D,)) arrays."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)

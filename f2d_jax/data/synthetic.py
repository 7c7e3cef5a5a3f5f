"""Synthetic training features for CPU runs and tests: no files, the same every time.

Each example is what a prepared dataset with cached features holds: an identity feature, an
expression code, VAE latent moments and a head mask at latent resolution. The latent inside
the (elliptic) head is a smooth pattern fixed per identity, the background is random per
example, and the identity feature is a fixed random vector per identity plus a little noise:
the identity input tells what the head looks like, as a face recognizer's would.
"""
from __future__ import annotations

import numpy as np

LATENT_SCALE = 1 / 0.18215  # SD's VAE latents have about this spread before scaling by 0.18215
LOGVAR = -6.0  # small posterior variance, as a real VAE gives


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int = 4) -> np.ndarray:
    """A low-frequency random field (h, w, c) with unit-ish scale: coarse noise, bilinear-upsampled."""
    h, w, c = shape
    coarse = rng.standard_normal((cells + 1, cells + 1, c))
    y, x = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.minimum(y.astype(int), cells - 1), np.minimum(x.astype(int), cells - 1)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


class SyntheticFaces:
    """`num_examples` examples of `num_identities` identities (example i has identity i % n).

    `first_identity` shifts the identities, so a second instance can hold faces never seen in
    training (the held-out faces of the sample images). `shuffle_identity` gives every example
    the identity feature of a random identity instead of its own: the control for measuring
    what the identity input contributes.
    """

    def __init__(self, num_examples: int, num_identities: int, identity_dim: int, expression_dim: int,
                 latent_shape: tuple[int, int, int], seed: int = 0, first_identity: int = 0,
                 shuffle_identity: bool = False):
        self.num_examples, self.num_identities = num_examples, num_identities
        self.identity_dim, self.expression_dim = identity_dim, expression_dim
        self.latent_shape, self.seed, self.first_identity = tuple(latent_shape), seed, first_identity
        self.shuffle_identity = shuffle_identity

    def __len__(self) -> int:
        return self.num_examples

    def identity(self, identity: int) -> tuple[np.ndarray, np.ndarray]:
        """(feature (F,), head latent pattern (h, w, c)) of one identity."""
        rng = np.random.default_rng([self.seed, 1, identity])
        return rng.standard_normal(self.identity_dim).astype(np.float32), 1.5 * _smooth_field(rng, self.latent_shape, cells=self.latent_shape[0] - 1)

    def example(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} of {self.num_examples}")
        feature, head = self.identity(self.first_identity + index % self.num_identities)
        rng = np.random.default_rng([self.seed, 2, self.first_identity, index])
        if self.shuffle_identity:
            feature, _ = self.identity(self.first_identity + int(rng.integers(self.num_identities)))
        h, w, c = self.latent_shape
        cy, cx = h / 2 + rng.uniform(-0.1, 0.1) * h, w / 2 + rng.uniform(-0.1, 0.1) * w
        ry, rx = h * rng.uniform(0.3, 0.4), w * rng.uniform(0.22, 0.3)
        yy, xx = np.mgrid[:h, :w]
        mask = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).astype(np.float32)[..., None]
        mean = mask * head + (1 - mask) * _smooth_field(rng, self.latent_shape, cells=3)
        return {
            "identity": feature + 0.1 * rng.standard_normal(self.identity_dim).astype(np.float32),
            "expression": rng.standard_normal(self.expression_dim).astype(np.float32),
            "latent_moments": np.concatenate([LATENT_SCALE * mean, np.full_like(mean, LOGVAR)], axis=-1),
            "mask": mask,
        }

    def get(self, indices) -> dict[str, np.ndarray]:
        examples = [self.example(int(i)) for i in indices]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

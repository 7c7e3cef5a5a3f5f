"""Identity-labelled faces for MSID pretraining, and the verification pair sets.

Training sources follow `f2d_jax.data.loader.Source` (`len`, `get(indices)`) and yield
{"image": (B, 112, 112, 3) uint8 RGB, "label": (B,) int32 identity}:

* `f2d_jax.data.identities.IdentityData`: an `f2d_identities` tfds dataset in config.data.dir, built
  from a folder per identity or a RecordIO pack by `python -m f2d_jax.data.identities`.
* `RecordIOSource`: an insightface pack (train.rec / train.idx, e.g. MS1MV3) in config.data.dir,
  read in place.
* `SyntheticIdentities` (config.data.dir = ""): every identity is a fixed random smooth
  pattern; an example is its pattern shifted by a few pixels, with its own brightness and
  pixel noise, so that identities are separable but no two examples are alike.

Verification sets are {name: (images (2N, 112, 112, 3) uint8, issame (N,) bool)}, pair i being
images 2i and 2i + 1: insightface .bin files (config.data.verification), or for synthetic data
pairs of held-out examples of the training identities (half same, half different).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 112


class SyntheticIdentities:
    """`num_examples` examples of `num_identities` identities (example i has identity i % n)."""

    def __init__(self, num_identities: int, num_examples: int, seed: int = 0, shift: int = 3, noise: float = 16.0):
        self.num_identities, self.num_examples, self.seed = int(num_identities), int(num_examples), int(seed)
        self.shift, self.noise = shift, noise
        rng = np.random.default_rng([self.seed, 0])
        coarse = rng.integers(0, 256, (self.num_identities, 4, 4, 3), dtype=np.uint8)
        self.patterns = np.stack([np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
                                  for c in coarse])

    def __len__(self) -> int:
        return self.num_examples

    def example(self, index: int, label: int, stream: int = 1) -> np.ndarray:
        """One (112, 112, 3) uint8 example of identity `label`, a function of (seed, stream, index)."""
        rng = np.random.default_rng([self.seed, stream, int(index)])
        dy, dx = rng.integers(-self.shift, self.shift + 1, 2)
        image = np.roll(self.patterns[label], (int(dy), int(dx)), axis=(0, 1))
        image = image * rng.uniform(0.8, 1.2) + rng.normal(0.0, self.noise, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8)

    def get(self, indices) -> dict[str, np.ndarray]:
        labels = np.asarray(indices, np.int64) % self.num_identities
        images = np.stack([self.example(i, label) for i, label in zip(indices, labels)])
        return {"image": images, "label": labels.astype(np.int32)}

    def verification_pairs(self, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (2N, 112, 112, 3), issame (N,)): held-out examples (a stream training never
        draws from); even pairs share an identity, odd pairs do not."""
        rng = np.random.default_rng([self.seed, 2])
        images, issame = [], np.arange(num_pairs) % 2 == 0
        for i, same in enumerate(issame):
            a = int(rng.integers(self.num_identities))
            b = a if same else int((a + rng.integers(1, self.num_identities)) % self.num_identities)
            images += [self.example(2 * i, a, stream=3), self.example(2 * i + 1, b, stream=3)]
        return np.stack(images), issame


class RecordIOSource:
    """An insightface RecordIO pack as a `Source` (images at 112x112, labels as int32)."""

    def __init__(self, path):
        from f2d_jax.data.recordio import FaceRecordIO

        self.pack = FaceRecordIO(path)
        self.num_identities = self.pack.num_identities

    def __len__(self) -> int:
        return len(self.pack)

    def get(self, indices) -> dict[str, np.ndarray]:
        items = [self.pack[int(i)] for i in indices]
        for image, _ in items:
            if image.shape != (SIZE, SIZE, 3):
                raise ValueError(f"{self.pack} holds {image.shape} images; MSID trains on aligned 112x112 faces")
        return {"image": np.stack([image for image, _ in items]),
                "label": np.array([label for _, label in items], np.int32)}


def open_source(path):
    """The identity-labelled faces at `path`: an `f2d_identities` dataset or an insightface pack."""
    from f2d_jax.data import identities
    from f2d_jax.data.recordio import IDX_NAME, REC_NAME

    path = Path(path)
    if (path / identities.INFO_FILE).is_file():
        return identities.open_identities(path)
    if (path / REC_NAME).is_file() or (path.suffix == ".rec" and path.is_file()):
        return RecordIOSource(path)
    raise FileNotFoundError(
        f"data.dir {path} is {'missing' if not path.exists() else 'not an identity dataset'}: give an "
        f"f2d_identities dataset (built with `f2d-identities --source SRC --out DIR`, so "
        f"that DIR/{identities.INFO_FILE} exists) or an insightface pack folder ({REC_NAME} + {IDX_NAME})")


def training_source(config):
    """(source, config): the training `Source` config.data says, and `config` with
    arcface.num_identities resolved (0 = the source's number of identities)."""
    dc, ac = config.data, config.arcface
    source = open_source(dc.dir) if dc.dir else \
        SyntheticIdentities(dc.synthetic_identities, dc.synthetic_examples, config.seed)
    what = dc.dir or f"data.synthetic_identities={dc.synthetic_identities}"
    if not ac.num_identities:
        config = config.copy_and_resolve_references()
        config.arcface.num_identities = source.num_identities
    elif source.num_identities > ac.num_identities:
        raise ValueError(f"{what} has {source.num_identities} identities but arcface.num_identities="
                         f"{ac.num_identities}; raise it (or set 0 to take the data's count)")
    return source, config


def verification_sets(config, source) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (images, issame)}: the .bin files of config.data.verification (named by their stem),
    plus a synthetic pair set for synthetic training data."""
    from f2d_jax.data.verification import load_bin

    sets = {Path(path).stem: load_bin(path) for path in config.data.verification}
    if isinstance(source, SyntheticIdentities) and config.data.synthetic_pairs:
        sets["synthetic"] = source.verification_pairs(config.data.synthetic_pairs)
    return sets

"""insightface's face-verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...) and their
10-fold accuracy protocol, without mxnet or scikit-learn.

    images, issame = load_bin("data/faces_emore/lfw.bin")   # (12000, 112, 112, 3) uint8 RGB, (6000,) bool
    emb = embed(images)                                       # your model; pair i is images 2i and 2i+1
    result = verification_accuracy(emb[0::2], emb[1::2], issame)
    result["accuracy_mean"], result["accuracy_std"]

A .bin is a pickle of (bins, issame_list): 2N encoded images (JPEG/PNG bytes) and N booleans,
pair i being bins[2i] and bins[2i+1] (insightface's src/data/lfw2pack.py writes them;
recognition/arcface_torch/eval/verification.py reads them). insightface's evaluation adds the
embeddings of each image and of its horizontal flip before normalizing; do that in `embed` to
reproduce its "Accuracy-Flip" numbers.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from typing import Optional

import numpy as np

from f2d_jax.data.recordio import PathLike, decode_image, encode_image

IMAGE_SIZE = (112, 112)
THRESHOLDS = np.arange(0, 4, 0.01)   # insightface's calculate_roc grid over squared distances


class VerificationFileError(ValueError):
    """A file that is not an insightface verification .bin."""


# A .bin holds only bytes, lists, booleans and (in some packs) numpy arrays/scalars; nothing else is
# unpickled, so that a stray or hostile file cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("builtins", "bytearray"), ("__builtin__", "bytearray"),
}


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: PathLike):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:   # a pickle can fail in many ways: name them all as "not a .bin"
        raise VerificationFileError(
            f"{path}: not an insightface verification .bin (a pickle of (encoded images, issame list)): "
            f"{type(e).__name__}: {e}") from None


def load_bin(path: PathLike, image_size: Optional[tuple[int, int]] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (2N, H, W, 3) RGB, issame bool (N,)) from an insightface .bin.

    Images of another size are resized to `image_size` (bilinear); image_size=None requires them
    all to have the size of the first.
    """
    content = _read_pickle(path)
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise VerificationFileError(f"{path}: not an insightface verification .bin: expected a pickled pair "
                                    f"(encoded images, issame list), got {type(content).__name__}")
    bins, issame = content
    try:
        issame = np.asarray(issame, dtype=bool).reshape(-1)
    except (TypeError, ValueError) as e:
        raise VerificationFileError(f"{path}: its issame list is not booleans: {e}") from None
    if len(bins) != 2 * len(issame):
        raise VerificationFileError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected two per pair")
    import cv2

    images = None
    for i, data in enumerate(bins):
        if not isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
            raise VerificationFileError(f"{path}: image {i} is a {type(data).__name__}, not encoded image bytes")
        try:
            rgb = decode_image(data, where=f"{path}: image {i}")
        except ValueError as e:
            raise VerificationFileError(str(e)) from None
        if images is None:
            size = tuple(image_size) if image_size is not None else rgb.shape[:2]
            images = np.empty((len(bins), *size, 3), dtype=np.uint8)
        if rgb.shape[:2] != images.shape[1:3]:
            if image_size is None:
                raise VerificationFileError(f"{path}: image {i} is {rgb.shape[1]}x{rgb.shape[0]}, image 0 "
                                            f"{images.shape[2]}x{images.shape[1]}; pass image_size to resize")
            rgb = cv2.resize(rgb, (images.shape[2], images.shape[1]), interpolation=cv2.INTER_LINEAR)
        images[i] = rgb
    if images is None:
        images = np.empty((0, *(image_size or IMAGE_SIZE), 3), dtype=np.uint8)
    return images, issame


def write_bin(path: PathLike, images: Sequence[np.ndarray], issame: Sequence[bool], *,
              image_format: str = ".png", quality: int = 95) -> None:
    """Writes an insightface .bin: `images` (2N RGB uint8; pair i = images 2i, 2i+1) encoded as
    PNG (or JPEG) and the N `issame` booleans, pickled as (list of bytes, list of bool)."""
    issame = [bool(x) for x in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; expected two per pair")
    bins = [encode_image(np.asarray(image), image_format, quality) for image in images]
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)


# --------------------------------------------------------------------------- the protocol


def kfold_indices(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays as sklearn's KFold(n_splits=folds, shuffle=False) gives them:
    contiguous test folds, the first n % folds of them one longer. folds=1: train = test = all
    (insightface's LFold)."""
    if folds < 1:
        raise ValueError(f"folds must be at least 1, not {folds}")
    indices = np.arange(n)
    if folds == 1:
        return [(indices, indices)]
    if n < folds:
        raise ValueError(f"{folds} folds need at least {folds} pairs, got {n}")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(np.concatenate([indices[:start], indices[stop:]]), indices[start:stop])
            for start, stop in zip(bounds[:-1], bounds[1:])]


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)   # sklearn.preprocessing.normalize leaves zero rows at zero


def _accuracies(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """Accuracy, TPR and FPR of `dist < threshold` for every threshold (insightface's calculate_accuracy)."""
    predicted = dist[None, :] < thresholds[:, None]
    tp = np.sum(predicted & issame, axis=1)
    fp = np.sum(predicted & ~issame, axis=1)
    positives, negatives = issame.sum(), (~issame).sum()
    tn = negatives - fp
    accuracy = (tp + tn) / max(len(dist), 1)
    tpr = tp / positives if positives else np.zeros(len(thresholds))
    fpr = fp / negatives if negatives else np.zeros(len(thresholds))
    return accuracy, tpr, fpr


def verification_accuracy(embeddings1, embeddings2, issame, folds: int = 10,
                          thresholds: Optional[np.ndarray] = None) -> dict:
    """insightface's verification accuracy: pairs (embeddings1[i], embeddings2[i]), L2-normalized,
    compared by squared euclidean distance; for each of `folds` contiguous folds (KFold without
    shuffle) the threshold from `thresholds` (default np.arange(0, 4, 0.01)) with the best accuracy on
    the other folds (the first such, as np.argmax) is applied to that fold.

    Returns accuracy_mean / accuracy_std (over folds, np.std), threshold_mean / threshold_std, and
    per fold `accuracies`, `thresholds` and `fold_sizes`; `tpr`, `fpr` (mean over folds of the
    test-fold rates at each threshold, for an ROC curve) with `threshold_grid`.
    """
    e1 = np.asarray(embeddings1, dtype=np.float64)
    e2 = np.asarray(embeddings2, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"expected two (N, D) embedding arrays of one shape, got {e1.shape} and {e2.shape}")
    if len(issame) != len(e1):
        raise ValueError(f"{len(e1)} embedding pairs but {len(issame)} issame labels")
    grid = THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64).reshape(-1)
    dist = np.sum(np.square(_l2_normalize(e1) - _l2_normalize(e2)), axis=1)

    splits = kfold_indices(len(dist), folds)
    accuracies = np.zeros(len(splits))
    chosen = np.zeros(len(splits))
    tprs = np.zeros((len(splits), len(grid)))
    fprs = np.zeros((len(splits), len(grid)))
    for k, (train, test) in enumerate(splits):
        train_accuracy, _, _ = _accuracies(dist[train], issame[train], grid)
        best = int(np.argmax(train_accuracy))
        test_accuracy, tprs[k], fprs[k] = _accuracies(dist[test], issame[test], grid)
        accuracies[k] = test_accuracy[best]
        chosen[k] = grid[best]
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "threshold_mean": float(np.mean(chosen)),
        "threshold_std": float(np.std(chosen)),
        "accuracies": accuracies,
        "thresholds": chosen,
        "fold_sizes": np.array([len(test) for _, test in splits]),
        "tpr": tprs.mean(axis=0),
        "fpr": fprs.mean(axis=0),
        "threshold_grid": grid,
    }

"""A folder of face photos -> a tfds dataset for Face2Diffusion training.

    f2d-prepare --images photos/ --out data/faces [--config f2d_sd14]
        [--config.data.mask_source=files --config.data.mask_dir=masks/] [--cache-features]
        [--batch-size 32] [--workers 8] [--overwrite]

Every image under --images (recursively, sorted by relative path) is aligned: an FFHQ-style
training image of config.data.resolution, a head mask, the 112x112 ArcFace crop, the 224x224
Deep3DFaceRecon crop and the 68 landmarks (and the same for the mirrored photo when
config.data.flip). The first config.data.holdout usable photos (with their mirrors) form the
"holdout" split, the rest "train". --cache-features also stores the frozen encoders' outputs
(MSID identity features, expression codes, VAE latent moments) so that training skips them.

Photos are processed in chunks saved under OUT/.work/; an interrupted run resumes from the
finished chunks when re-run with the same options. The dataset is finished when
OUT/f2d_faces.json exists (written last); OUT/prepare_report.json says what was skipped.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
from tqdm import tqdm

import f2d_jax
from f2d_jax import usage
from f2d_jax.compile_cache import enable
from f2d_jax.config import check_config
from f2d_jax.data import builder as builder_lib
from f2d_jax.data.examples import (BAD_FACE, FLIP_SUFFIX, IMAGE_SUFFIXES, NO_FACE, UNREADABLE, Example,
                                   MaskFileError, PhotoResult, find_images, mask_file_path, process_photo)
from f2d_jax.data.read import (BASE_FIELDS, EXPRESSION_DIM, FEATURE_FIELDS, FORMAT, IMAGE_FIELDS, INFO_FILE,
                               feature_description)

CHUNK_PHOTOS = 64          # photos per resumable chunk
WORK_DIR = ".work"
OPTIONS_FILE = "options.json"
REPORT_FILE = "prepare_report.json"
LISTED = 5                 # names listed per category in the printed report
SKIP_REASONS = {NO_FACE: "no face", UNREADABLE: "unreadable", BAD_FACE: "unusable face"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")   # a Hugging Face hub id such as CompVis/stable-diffusion-v1-4


class PrepareError(Exception):
    """A user error (bad folder, refused re-run, missing mask file, nothing usable): the command
    line prints it as one `error:` line and exits with status 2."""


# --------------------------------------------------------------------------- work chunks

def _encode_png(array: np.ndarray) -> bytes:
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {array.shape}")
    return data.tobytes()


def _decode_png(data: bytes, channels: int) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if channels == 3:
        return array[:, :, ::-1]
    return array


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """write(file) into path.tmp, flushed to disk, then renamed to path."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(value, indent=2) + "\n"), mode="w")


def _pack(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), np.uint8), offsets


@dataclasses.dataclass
class Chunk:
    """The saved results of one chunk of photos."""

    photos: list[dict[str, Any]]      # per photo: name, index, skipped, message, faces, mirror_skipped
    names: np.ndarray                 # (N,) str, per example
    photo_index: np.ndarray           # (N,) int, the example's photo (index into the sorted photo list)
    landmarks: np.ndarray             # (N, 68, 2) float32
    png: dict[str, list[bytes]]       # per image field, N PNG files

    def __len__(self) -> int:
        return len(self.names)

    def images(self, field: str) -> np.ndarray:
        channels = 1 if field == "mask" else 3
        decoded = [_decode_png(b, channels) for b in self.png[field]]
        return np.stack(decoded) if decoded else np.zeros((0, 0, 0, channels), np.uint8)


def _save_chunk(path: Path, results: Sequence[PhotoResult], first_index: int) -> None:
    examples: list[tuple[int, Example]] = [(first_index + i, e) for i, r in enumerate(results) for e in r.examples]
    photos = [dict(name=r.name, index=first_index + i, skipped=r.skipped, message=r.message, faces=r.faces,
                   mirror_skipped=r.mirror_skipped) for i, r in enumerate(results)]
    arrays = {
        "photos": np.array(json.dumps(photos)),
        "names": np.array([e.name for _, e in examples] or [""], dtype=str)[:len(examples)],
        "photo_index": np.array([i for i, _ in examples], np.int64),
        "landmarks": np.array([e.landmarks for _, e in examples], np.float32).reshape(-1, 68, 2),
    }
    for field in IMAGE_FIELDS:
        data, offsets = _pack([_encode_png(getattr(e, field)) for _, e in examples])
        arrays[f"{field}_png"], arrays[f"{field}_offsets"] = data, offsets
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_chunk(path: Path, images: bool = True) -> Chunk:
    """The chunk at `path`; with images=False only its photo list, names and photo indices."""
    with np.load(path, allow_pickle=False) as z:
        png = {}
        for field in IMAGE_FIELDS if images else ():
            data, offsets = z[f"{field}_png"].tobytes(), z[f"{field}_offsets"]
            png[field] = [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        landmarks = z["landmarks"] if images else None
        return Chunk(json.loads(str(z["photos"])), z["names"], z["photo_index"], landmarks, png)


def _load_features(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in FEATURE_FIELDS}


# --------------------------------------------------------------------------- options

def _photo_list_digest(images_dir: Path, names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{(images_dir / name).stat().st_size}\n".encode())
    return digest.hexdigest()


def _describe_differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    parts = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) == now.get(key):
            continue
        if key == "photo_list":
            if before.get("photos") == now.get("photos"):
                parts.append("the image files changed")
            continue
        if key == "photos":
            parts.append(f"the number of images changed ({before.get(key)} before, {now.get(key)} now)")
        elif key == "features" and isinstance(before.get(key), dict) and isinstance(now.get(key), dict):
            for sub in sorted(set(before[key]) | set(now[key])):
                if before[key].get(sub) != now[key].get(sub):
                    parts.append(f"features.{sub} {before[key].get(sub)!r} before, {now[key].get(sub)!r} now")
        else:
            parts.append(f"{key} {before.get(key)!r} before, {now.get(key)!r} now")
    return "; ".join(parts)


# --------------------------------------------------------------------------- the pipeline

@dataclasses.dataclass
class _Photos:
    """Phase 1's outcome, from the saved chunks (without their images)."""

    chunks: list[Path]
    photos: list[dict[str, Any]]                 # every photo, in sorted order
    examples_per_chunk: list[int]
    example_photo: dict[str, int]                # example name -> its photo's index
    reused: int


def _features_path(chunk: Path) -> Path:
    return chunk.with_name(chunk.name.replace("photos_", "features_"))


def _process_chunks(images_dir: Path, work: Path, names: list[str], chunk_photos: int, *, resolution: int,
                    flip: bool, mask_source: str, mask_dir: str, detector, workers: int, progress: bool,
                    log) -> _Photos:
    starts = list(range(0, len(names), chunk_photos))
    paths = [work / f"photos_{i:05d}.npz" for i in range(len(starts))]
    loaded: dict[int, Chunk] = {}   # without images: the whole dataset does not fit in memory
    for i, path in enumerate(paths):
        if path.is_file():
            try:
                loaded[i] = _load_chunk(path, images=False)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                log(f"warning: redoing {path.name}, which cannot be read ({e})")
    process = functools.partial(process_photo, images_dir, resolution=resolution, flip=flip,
                                mask_source=mask_source, mask_dir=mask_dir, detector=detector)
    done = sum(len(names[starts[i]:starts[i] + chunk_photos]) for i in loaded)
    pool = None
    if workers > 1 and len(loaded) < len(paths):
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        with tqdm(total=len(names), initial=done, desc="photos", unit="photo", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i, (start, path) in enumerate(zip(starts, paths)):
                if i in loaded:
                    continue
                chunk_names = names[start:start + chunk_photos]
                results = []
                for result in (pool.map(process, chunk_names) if pool else map(process, chunk_names)):
                    results.append(result)
                    bar.update(1)
                _features_path(path).unlink(missing_ok=True)   # features of a redone chunk are stale
                _save_chunk(path, results, start)
                loaded[i] = _load_chunk(path, images=False)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    photos = [p for i in range(len(paths)) for p in loaded[i].photos]
    example_photo = {str(n): int(p) for i in range(len(paths)) for n, p in zip(loaded[i].names, loaded[i].photo_index)}
    return _Photos(paths, photos, [len(loaded[i]) for i in range(len(paths))], example_photo, reused=done)


def _cache_features(config, state: _Photos, batch_size: int, *, progress: bool, log) -> Optional[Any]:
    """Computes the features of every chunk that has none yet. Returns the models' FeatureModels
    when they had to be loaded (None when every chunk was done)."""
    todo = [i for i, path in enumerate(state.chunks) if not _features_path(path).is_file()]
    if not todo:
        return None
    from f2d_jax.data.features import FeatureExtractor, load_feature_models

    try:
        models = load_feature_models(config, log=log)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # missing files, mismatched weights
        raise PrepareError(f"cannot load the models for --cache-features: {e}") from e
    extractor = FeatureExtractor(models, batch_size)
    total = sum(extractor.batches(state.examples_per_chunk[i]) for i in todo)
    with tqdm(total=total, desc="features", unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        for i in todo:
            chunk = _load_chunk(state.chunks[i])
            if len(chunk):
                features = extractor(chunk.images("face"), chunk.images("expression_face"), chunk.images("image"),
                                     progress=bar.update)
            else:
                features = extractor.empty(int(config.data.resolution))
            _atomic_write(_features_path(state.chunks[i]), lambda f: np.savez(f, **features))
    return models


def _split_examples(state: _Photos, photo_set: set[int], cached: bool, exclude: bool) -> Iterator[tuple[str, dict]]:
    """(key, tfds example) for the examples whose photo is in (or, with `exclude`, not in) `photo_set`."""
    remaining = set(photo_set)
    for path, count in zip(state.chunks, state.examples_per_chunk):
        if not exclude and not remaining:
            return  # the held-out photos come first: the rest is all training data
        if not count:
            continue
        chunk = _load_chunk(path)
        wanted = [(j, int(p)) for j, p in enumerate(chunk.photo_index) if (int(p) in photo_set) != exclude]
        features = _load_features(_features_path(path)) if cached else None
        for j, photo in wanted:
            name = str(chunk.names[j])
            example = {field: chunk.png[field][j] for field in IMAGE_FIELDS}
            example.update(landmarks=chunk.landmarks[j], name=name)
            if features is not None:
                example.update({field: features[field][j] for field in FEATURE_FIELDS})
            yield name, example
        remaining -= {p for _, p in wanted}


def _remove_outputs(data_dir: Path) -> None:
    shutil.rmtree(data_dir / builder_lib.NAME, ignore_errors=True)
    shutil.rmtree(data_dir / WORK_DIR, ignore_errors=True)
    for name in (INFO_FILE, REPORT_FILE):
        (data_dir / name).unlink(missing_ok=True)


def _names_of(photos, predicate) -> list[str]:
    return [p["name"] for p in photos if predicate(p)]


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The validated `config.data` fields that shape the examples."""

    resolution: int
    mask_source: str
    mask_dir: str      # resolved; "" unless mask_source == "files"
    flip: bool
    holdout: int


def _settings(config, cache_features: bool) -> _Settings:
    check_config(config)  # the image size and the mask source among the rest
    data = config.data
    resolution, mask_source = int(data.resolution), str(data.mask_source)
    mask_dir = ""
    if mask_source == "files":
        if not data.mask_dir:
            raise PrepareError("config.data.mask_source='files' needs config.data.mask_dir (the folder of mask files)")
        if not Path(data.mask_dir).is_dir():
            raise PrepareError(f"mask folder not found: {data.mask_dir} (config.data.mask_dir)")
        mask_dir = str(Path(data.mask_dir).resolve())
    if cache_features:
        for name in ("msid", "expression", "sd"):
            path = str(config.weights[name])
            if path and not Path(path).expanduser().exists() and (name != "sd" or not _HUB_ID.match(path)):
                raise PrepareError(f"config.weights.{name}: no such file or directory: {path}")
    return _Settings(resolution, mask_source, mask_dir, bool(data.flip), int(data.holdout))


def _open_work(data_dir: Path, options: dict[str, Any], overwrite: bool) -> Path:
    """The work folder for `options`: refuses a finished dataset (unless `overwrite`) and an
    unfinished run with other options; resumes one with the same options."""
    if data_dir.exists() and not data_dir.is_dir():
        raise PrepareError(f"--out {data_dir} is a file, not a folder")
    if overwrite:
        _remove_outputs(data_dir)
    elif (data_dir / INFO_FILE).exists():
        raise PrepareError(f"{data_dir} already holds a finished dataset ({INFO_FILE}); pass --overwrite to replace it")
    work = data_dir / WORK_DIR
    options_path = work / OPTIONS_FILE
    if options_path.is_file():
        try:
            before = json.loads(options_path.read_text())
        except json.JSONDecodeError:
            before = {}
        if before != options:
            raise PrepareError(f"{data_dir} holds an unfinished run with other options "
                               f"({_describe_differences(before, options) or 'unreadable ' + OPTIONS_FILE}); "
                               "re-run with the same options to resume it, or pass --overwrite to start over")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _write_json(options_path, options)
    return work


def _dataset_spec(resolution: int, state: _Photos, models) -> builder_lib.DatasetSpec:
    """The dataset's shapes; with cached features, from the models or (all chunks reused) the stored ones."""
    if models is not None:
        return builder_lib.DatasetSpec(resolution, models.identity_dim, EXPRESSION_DIM, models.latent_shape(resolution))
    first = next(i for i, count in enumerate(state.examples_per_chunk) if count)
    stored = _load_features(_features_path(state.chunks[first]))
    return builder_lib.DatasetSpec(resolution, int(stored["identity"].shape[1]), int(stored["expression"].shape[1]),
                                   tuple(int(n) for n in stored["latent_moments"].shape[1:]))


def prepare_dataset(images_dir: str | os.PathLike, data_dir: str | os.PathLike, config, *,
                    cache_features: bool = False, overwrite: bool = False, batch_size: int = 32,
                    workers: int = 1, chunk_photos: Optional[int] = None, detector=None, progress: bool = True,
                    log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Builds the dataset of the photos under `images_dir` in `data_dir`; returns the report.

    Raises PrepareError for user errors (see the module docstring) and MissingTensorFlowError
    (an ImportError) without TensorFlow. `detector` replaces the default dlib landmark detector
    (only with workers=1); `chunk_photos` is the number of photos per resumable chunk.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    chunk_photos = int(chunk_photos or CHUNK_PHOTOS)
    images_dir, data_dir = Path(images_dir), Path(data_dir)
    if not images_dir.is_dir():
        raise PrepareError(f"images folder not found: {images_dir}")
    settings = _settings(config, cache_features)
    if batch_size < 1 or workers < 1:
        raise PrepareError(f"batch size and workers must be >= 1, got {batch_size} and {workers}")
    if workers > 1 and detector is not None:
        raise ValueError("a custom detector needs workers=1")
    builder_lib.require_tensorflow()
    names = find_images(images_dir)
    if not names:
        suffixes = ", ".join(suffix[1:] for suffix in IMAGE_SUFFIXES)
        raise PrepareError(f"no images under {images_dir} (looked for {suffixes} files)")
    options = {
        "format": FORMAT, "images_dir": str(images_dir.resolve()), "photos": len(names),
        "photo_list": _photo_list_digest(images_dir, names), "resolution": settings.resolution,
        "mask_source": settings.mask_source, "mask_dir": settings.mask_dir, "flip": settings.flip,
        "chunk_photos": chunk_photos, "cache_features": bool(cache_features),
        "features": feature_description(config) if cache_features else None,
    }
    work = _open_work(data_dir, options, overwrite)
    if settings.mask_source == "files":
        missing = [mask_file_path(settings.mask_dir, n) for n in names
                   if not os.path.isfile(mask_file_path(settings.mask_dir, n))]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise PrepareError(f"mask file not found: {missing[0]}{more}")

    # Phase 1: photos -> aligned examples, one saved chunk at a time.
    seconds = {}
    t0 = time.perf_counter()
    try:
        state = _process_chunks(images_dir, work, names, chunk_photos, resolution=settings.resolution,
                                flip=settings.flip, mask_source=settings.mask_source, mask_dir=settings.mask_dir,
                                detector=detector, workers=workers, progress=progress, log=log)
    except MaskFileError as e:
        raise PrepareError(str(e)) from e
    seconds["photos"] = time.perf_counter() - t0
    photos = state.photos
    usable = [p["index"] for p in photos if not p["skipped"]]
    if not usable:
        reasons = ", ".join(f"{SKIP_REASONS[r]}: {len(_names_of(photos, lambda p, r=r: p['skipped'] == r))}"
                            for r in SKIP_REASONS if any(p["skipped"] == r for p in photos))
        raise PrepareError(f"none of the {len(photos)} photos under {images_dir} gave an example ({reasons})")
    if len(usable) <= settings.holdout:
        raise PrepareError(f"only {len(usable)} photo(s) have a usable face and config.data.holdout={settings.holdout} "
                           "would hold them all out of training; add photos or lower --config.data.holdout")
    holdout_photos = set(usable[:settings.holdout])   # the first usable photos, by path

    # Phase 2: the frozen encoders' outputs.
    t0 = time.perf_counter()
    models = _cache_features(config, state, batch_size, progress=progress, log=log) if cache_features else None
    seconds["features"] = time.perf_counter() - t0

    # Phase 3: the tfds dataset, then the JSON that marks it finished.
    t0 = time.perf_counter()
    spec = _dataset_spec(settings.resolution, state, models) if cache_features else \
        builder_lib.DatasetSpec(settings.resolution)
    example_photo = state.example_photo
    counts = {"train": sum(p not in holdout_photos for p in example_photo.values())}
    splits = {"train": lambda: _split_examples(state, holdout_photos, cache_features, exclude=True)}
    if holdout_photos:
        counts["holdout"] = sum(p in holdout_photos for p in example_photo.values())
        splits["holdout"] = lambda: _split_examples(state, holdout_photos, cache_features, exclude=False)
    shutil.rmtree(data_dir / builder_lib.NAME, ignore_errors=True)  # an interrupted write's leftovers
    folder = builder_lib.write_dataset(data_dir, spec, splits, download_dir=work / "downloads", progress=progress)
    seconds["write"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started

    info = {
        "format": FORMAT, "name": builder_lib.NAME, "version": builder_lib.VERSION,
        "tfds_dir": Path(os.path.relpath(folder.resolve(), data_dir.resolve())).as_posix(),
        **dataclasses.asdict(settings),
        "features_cached": bool(cache_features), "features": options["features"],
        "identity_dim": spec.identity_dim, "expression_dim": spec.expression_dim,
        "latent_shape": list(spec.latent_shape) if spec.latent_shape else None,
        "fields": list(BASE_FIELDS) + (list(FEATURE_FIELDS) if cache_features else []),
        "splits": counts, "images_dir": options["images_dir"], "photos": len(names),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "f2d_jax_version": f2d_jax.__version__,
    }
    report = {
        "data_dir": str(data_dir), "dataset": str(folder), "images_dir": options["images_dir"],
        "photos_found": len(names), "photos_used": len(usable), "examples": counts,
        "mirrors": sum(n.endswith(FLIP_SUFFIX) for n in example_photo),
        "skipped": {reason: _names_of(photos, lambda p, r=reason: p["skipped"] == r) for reason in SKIP_REASONS},
        "skipped_messages": {p["name"]: p["message"] for p in photos if p["skipped"]},
        "several_faces": _names_of(photos, lambda p: not p["skipped"] and p["faces"] > 1),
        "mirrors_skipped": {p["name"]: p["mirror_skipped"] for p in photos if p["mirror_skipped"]},
        "features_cached": bool(cache_features), "resolution": settings.resolution,
        "mask_source": settings.mask_source, "chunks": len(state.chunks), "photos_reused": state.reused,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    _write_json(data_dir / INFO_FILE, info)          # from here on the dataset counts as finished
    _write_json(data_dir / REPORT_FILE, report)
    shutil.rmtree(work, ignore_errors=True)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary the command line prints."""
    def listed(names):
        shown = ", ".join(names[:LISTED])
        return f" ({shown}{', ...' if len(names) > LISTED else ''})" if names else ""

    examples = ", ".join(f"{split} {n}" for split, n in report["examples"].items())
    skipped = report["skipped"]
    total_skipped = sum(len(v) for v in skipped.values())
    lines = [
        f"dataset            {report['dataset']}",
        f"photos found       {report['photos_found']} ({report['photos_used']} used"
        + (f", {report['photos_reused']} from an earlier run" if report["photos_reused"] else "") + ")",
        f"examples written   {examples} (mirrors included: {report['mirrors']})",
        f"skipped            {total_skipped}" + "".join(
            f"; {SKIP_REASONS[reason]} {len(names)}{listed(names)}" for reason, names in skipped.items() if names),
        f"several faces      {len(report['several_faces'])}{listed(report['several_faces'])}"
        + (" (the largest face was used)" if report["several_faces"] else ""),
    ]
    if report["mirrors_skipped"]:
        names = list(report["mirrors_skipped"])
        lines.append(f"mirrors skipped    {len(names)}{listed(names)} (no face in the mirrored photo)")
    seconds = report["seconds"]
    lines.append(f"time               {seconds['total']:.1f} s (photos {seconds['photos']:.1f}, features "
                 f"{seconds['features']:.1f}, writing {seconds['write']:.1f})")
    lines.append(f"report             {Path(report['data_dir']) / REPORT_FILE}")
    return "\n".join(lines)


@usage.command
def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up log lines would bury the report
    from f2d_jax.config import add_config_arguments, config_from_args, f2d_config

    parser = argparse.ArgumentParser(prog="f2d-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of face photos (searched recursively)")
    parser.add_argument("--out", required=True, metavar="DATA_DIR",
                        help="dataset folder (the trainer's config.data.dir)")
    add_config_arguments(parser, default="f2d_sd14")
    parser.add_argument("--cache-features", action="store_true",
                        help="also store MSID identity features, expression codes and VAE latent moments")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="examples per feature batch, over all local devices (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes aligning photos (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished dataset, or discard an unfinished run with other options")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    usage.add_compile_cache(parser)
    try:
        args, config = config_from_args(parser, argv)
        f2d_config(config, args.config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cache_features:  # the features are computed by compiled models
        enable(args.compile_cache)
    try:
        report = prepare_dataset(args.images, args.out, config, cache_features=args.cache_features,
                                 overwrite=args.overwrite, batch_size=args.batch_size, workers=args.workers,
                                 progress=not args.no_progress)
    except (PrepareError, builder_lib.MissingTensorFlowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished chunks are kept in {Path(args.out) / WORK_DIR}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

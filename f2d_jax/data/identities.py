"""Identity-labelled face crops for MSID (ArcFace) pretraining: `f2d_identities` 1.0.0, array_record files.

    f2d-identities --source faces_emore/ --out data/ms1mv2 [--resize] [--overwrite]

    data = open_identities("data/ms1mv2")
    len(data), data.num_identities
    data[0]                              # {"image": uint8 (112, 112, 3) RGB, "label": int}
    data.get([3, 17])                    # {"image": (2, 112, 112, 3) uint8, "label": (2,) int32}

MSID pretraining reads it with --config.data.dir=DATA_DIR (configs/msid_arcface.py); the train
step does the horizontal flips.

The source is either
- a folder per identity, ROOT/<identity>/**.jpg|png: identities sorted by folder name get the
  labels 0..K-1 (folders without images are left out) and DATA_DIR/identities.txt lists the names,
  one per line, in label order; or
- an insightface pack (train.rec + train.idx, as MS1MV2/MS1MV3/Glint360K ship), read without
  mxnet by `recordio.FaceRecordIO`; labels as stored.

Images must already be aligned 112x112 crops (`--resize` resizes others instead of refusing
them). PNG and JPEG bytes are stored as they are (a JPEG from a pack is not re-encoded); other
formats, and PNG/JPEG files OpenCV would not read back as 8-bit RGB, are stored as PNG.
The dataset is finished when DATA_DIR/f2d_identities.json exists (written last).

Reading (`open_identities`) needs no TensorFlow.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

import f2d_jax
from f2d_jax import usage
from f2d_jax.data import builder as builder_lib
from f2d_jax.data.examples import find_images
from f2d_jax.data.read import read_records
from f2d_jax.data.recordio import IDX_NAME, REC_NAME, FaceRecordIO, decode_image, encode_image

NAME = "f2d_identities"
VERSION = "1.0.0"
FORMAT = 1
SIZE = 112
INFO_FILE = "f2d_identities.json"
NAMES_FILE = "identities.txt"
WORK_DIR = ".work"
FOLDER, RECORDIO = "folder", "recordio"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COMMAND = "f2d-identities"


class IdentitiesError(Exception):
    """A user error (missing, empty or unrecognised source, wrong image size, refused re-run): the
    command line prints it as one `error:` line and exits with status 2."""


# --------------------------------------------------------------------------- the tfds builder


def features_dict(num_identities: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIZE, SIZE, 3), doc="aligned 112x112 face crop, PNG or JPEG as given"),
        "label": tfds.features.ClassLabel(num_classes=num_identities, doc="identity, 0 .. num_identities - 1"),
    })


class F2DIdentities(builder_lib.F2DFaces, skip_registration=True):
    """Aligned 112x112 face crops labelled by identity (written by python -m f2d_jax.data.identities).

    Shares F2DFaces' split plumbing; only the features differ. Not registered with tfds (so that
    `python -m` can run this module): it is read with tfds.builder_from_directory."""

    name = NAME
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Aligned 112x112 face crops with identity labels."}

    def __init__(self, *, num_identities: int, splits: builder_lib.SplitGenerators, **kwargs):
        self._num_identities = int(num_identities)
        super().__init__(spec=None, splits=splits, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=features_dict(self._num_identities),
                                     disable_shuffling=True)   # source order; loaders shuffle


# --------------------------------------------------------------------------- images


def encoded_image_info(data: bytes) -> Optional[tuple[str, int, int, bool]]:
    """(format, height, width, plain) from a PNG or JPEG header without decoding it, or None for
    anything else. `plain`: OpenCV reads the bytes back as 8-bit grey or RGB (no alpha, palette,
    16 bits or CMYK), which is what tfds' Image feature needs to give (112, 112, 3)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height = struct.unpack(">II", data[16:24])
        return "png", height, width, data[24] == 8 and data[25] in (0, 2)
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:           # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:   # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # a start of frame
            if i + 10 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return "jpeg", height, width, data[i + 4] == 8 and data[i + 9] in (1, 3)
        else:
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def stored_image(data: bytes, where: str, resize: bool = False) -> bytes:
    """The bytes to store for the encoded image `data`: as they are when they are a plain 112x112
    PNG or JPEG, else re-encoded as PNG (resized first with `resize`). IdentitiesError naming
    `where` for an image of another size (without `resize`) or bytes that do not decode."""
    info = encoded_image_info(data)
    if info is not None and info[1:] == (SIZE, SIZE, True):
        return data
    if info is not None and info[1:3] != (SIZE, SIZE) and not resize:
        raise _size_error(where, info[1], info[2])
    try:
        rgb = decode_image(data, where=where)
    except ValueError as e:
        raise IdentitiesError(str(e)) from None
    if rgb.shape[:2] != (SIZE, SIZE):
        if not resize:
            raise _size_error(where, *rgb.shape[:2])
        import cv2

        interpolation = cv2.INTER_AREA if min(rgb.shape[:2]) > SIZE else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (SIZE, SIZE), interpolation=interpolation)
    return encode_image(rgb, ".png")


def _size_error(where: str, height: int, width: int) -> IdentitiesError:
    return IdentitiesError(f"{where}: the image is {width}x{height}; identity datasets hold aligned {SIZE}x{SIZE} "
                           f"face crops (align them first, or pass --resize to resize them)")


# --------------------------------------------------------------------------- sources


def _identity_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def detect_source(source: str | os.PathLike) -> str:
    """RECORDIO for a folder holding train.rec (or a .rec file), FOLDER for a folder of identity
    folders holding images; IdentitiesError for anything else (naming what was found)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".rec":
        return RECORDIO
    if not source.is_dir():
        raise IdentitiesError(f"source not found: {source}" if not source.exists() else
                              f"source {source} is a file, not a folder or a .rec file")
    if (source / REC_NAME).is_file():
        return RECORDIO
    folders = _identity_folders(source)
    if any(find_images(folder) for folder in folders):
        return FOLDER
    entries = [p for p in source.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise IdentitiesError(f"source {source} is empty: expected one folder of face images per identity, "
                              f"or an insightface pack ({REC_NAME} + {IDX_NAME})")
    loose = find_images(source)
    what = (f"its {len(loose)} image(s) are not in identity folders" if loose else
            f"its {len(folders)} folder(s) hold no images" if folders else "it holds no images and no folders")
    raise IdentitiesError(f"source {source} is neither a folder per identity (ROOT/<identity>/*.jpg|png) nor an "
                          f"insightface pack ({REC_NAME} + {IDX_NAME}): {what}")


class _Scan:
    """A source's examples: `count`, `num_identities`, `names` (folder sources) and `examples()`,
    yielding (encoded bytes, label, where) in dataset order."""

    def __init__(self, kind: str, count: int, num_identities: int, names: Optional[list[str]],
                 examples: Callable[[], Iterator[tuple[bytes, int, str]]]):
        self.kind, self.count, self.num_identities, self.names, self.examples = \
            kind, count, num_identities, names, examples


def _scan_folder(root: Path) -> _Scan:
    identities = [(folder, find_images(folder)) for folder in _identity_folders(root)]
    identities = [(folder, files) for folder, files in identities if files]

    def examples():
        for label, (folder, files) in enumerate(identities):
            for name in files:
                path = folder / name
                yield path.read_bytes(), label, str(path)

    return _Scan(FOLDER, sum(len(files) for _, files in identities), len(identities),
                 [folder.name for folder, _ in identities], examples)


def _scan_recordio(source: Path) -> _Scan:
    pack = FaceRecordIO(source)
    num_identities = int(pack.num_identities)

    def examples():
        for i in range(len(pack)):
            data, label = pack.read_encoded(i)
            where = f"{pack.reader.rec_path}: image {i} (record key {int(pack.image_keys[i])})"
            if not 0 <= label < num_identities:
                raise IdentitiesError(f"{where}: label {label} is outside 0 .. {num_identities - 1}, the pack's "
                                      f"identities")
            yield data, label, where

    return _Scan(RECORDIO, len(pack), num_identities, None, examples)


def scan_source(source: str | os.PathLike) -> _Scan:
    source = Path(source)
    kind = detect_source(source)
    scan = _scan_recordio(source) if kind == RECORDIO else _scan_folder(source)
    if not scan.count:
        raise IdentitiesError(f"source {source} holds no images")
    return scan


# --------------------------------------------------------------------------- writing


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_identities(source: str | os.PathLike, data_dir: str | os.PathLike, *, resize: bool = False,
                     overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Writes the `f2d_identities` dataset of `source` (see the module docstring) to `data_dir`;
    returns the dataset's info (also written to DATA_DIR/f2d_identities.json).

    IdentitiesError for user errors, MissingTensorFlowError (an ImportError) without TensorFlow.
    An interrupted write leaves no finished-looking dataset; run again to start over.
    """
    from tqdm import tqdm

    source, data_dir = Path(source), Path(data_dir)
    builder_lib.require_tensorflow()
    if data_dir.exists() and not data_dir.is_dir():
        raise IdentitiesError(f"--out {data_dir} is a file, not a folder")
    if (data_dir / INFO_FILE).exists() and not overwrite:
        raise IdentitiesError(f"{data_dir} already holds a finished dataset ({INFO_FILE}); "
                              "pass --overwrite to replace it")
    scan = scan_source(source)
    for name in (INFO_FILE, NAMES_FILE):
        (data_dir / name).unlink(missing_ok=True)
    for folder in (NAME, WORK_DIR):      # an earlier or interrupted write's leftovers
        shutil.rmtree(data_dir / folder, ignore_errors=True)

    def generate():
        with tqdm(total=scan.count, desc="images", unit="image", disable=not progress, dynamic_ncols=True) as bar:
            for i, (data, label, where) in enumerate(scan.examples()):
                yield i, {"image": stored_image(data, where, resize), "label": label}
                bar.update()

    data_dir.mkdir(parents=True, exist_ok=True)
    builder = F2DIdentities(num_identities=scan.num_identities, splits={"train": generate},
                            data_dir=os.fspath(data_dir), file_format=builder_lib.FILE_FORMAT)
    folder = builder_lib.prepare_builder(builder, download_dir=data_dir / WORK_DIR / "downloads")
    shutil.rmtree(data_dir / WORK_DIR, ignore_errors=True)
    if scan.names is not None:
        _write_text(data_dir / NAMES_FILE, "".join(name + "\n" for name in scan.names))
    info = {
        "format": FORMAT, "name": NAME, "version": VERSION,
        "tfds_dir": Path(os.path.relpath(folder.resolve(), data_dir.resolve())).as_posix(),
        "source": str(source.resolve()), "source_kind": scan.kind, "image_size": SIZE, "resized": bool(resize),
        "num_identities": scan.num_identities, "splits": {"train": scan.count},
        "identities_file": NAMES_FILE if scan.names is not None else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "f2d_jax_version": f2d_jax.__version__,
    }
    _write_text(data_dir / INFO_FILE, json.dumps(info, indent=2) + "\n")   # from here on: finished
    return info


# --------------------------------------------------------------------------- reading (no TensorFlow)


def read_identities_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a finished identity dataset; FileNotFoundError when there is none."""
    data_dir = Path(data_dir)
    path = data_dir / INFO_FILE
    if not path.is_file():
        state = "the folder does not exist" if not data_dir.is_dir() else \
            f"{INFO_FILE} is missing, so it was never built or its build did not finish"
        raise FileNotFoundError(f"no identity dataset at {data_dir}: {state}; build one with "
                                f"{_COMMAND} --source DIR --out {data_dir}")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT or info.get("name") != NAME:
        raise ValueError(f"{path} is not an {NAME} dataset of format {FORMAT} "
                         f"(name {info.get('name')!r}, format {info.get('format')!r})")
    return info


class IdentityData:
    """One split of an `f2d_identities` dataset: `len()`, `data[i]`, `get(indices)`,
    `num_identities` and (folder sources) `identity_names`. A `loader.Source`."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.info = read_identities_info(self.data_dir)
        if split not in self.info["splits"]:
            raise ValueError(f"no split {split!r} in {self.data_dir}; it has {', '.join(self.info['splits'])}")
        folder = self.data_dir / self.info["tfds_dir"]
        builder = tfds.builder_from_directory(os.fspath(folder))
        self.split = split
        # The image bytes are decoded here (OpenCV, always 8-bit RGB), not by tfds.
        self._source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        if len(self._source) != self.info["splits"][split]:
            raise FileNotFoundError(f"{folder} has {len(self._source)} {split} examples but {INFO_FILE} says "
                                    f"{self.info['splits'][split]}; build the dataset again with --overwrite")
        self._names = None

    @property
    def num_identities(self) -> int:
        return int(self.info["num_identities"])

    @property
    def identity_names(self) -> Optional[list[str]]:
        """The identity folders' names in label order; None for a dataset built from a pack."""
        if self._names is None and self.info.get("identities_file"):
            self._names = (self.data_dir / self.info["identities_file"]).read_text().splitlines()
        return self._names

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return (f"IdentityData({os.fspath(self.data_dir)!r}, split={self.split!r}, {len(self)} images of "
                f"{self.num_identities} identities)")

    def get(self, indices) -> dict[str, np.ndarray]:
        """{"image": (B, 112, 112, 3) uint8 RGB, "label": (B,) int32} for `indices`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        records = read_records(self._source, indices, self.split)
        images = np.zeros((len(indices), SIZE, SIZE, 3), np.uint8)
        for row, (i, record) in enumerate(zip(indices, records)):
            images[row] = decode_image(record["image"], where=f"{self.data_dir} {self.split} example {int(i)}")
        labels = np.array([int(r["label"]) for r in records], np.int32)
        return {"image": images, "label": labels}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"image": uint8 (112, 112, 3), "label": int}."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"IdentityData indices are integers, not {type(index).__name__}")
        index = int(index) + len(self) if index < 0 else int(index)
        batch = self.get([index])
        return {"image": batch["image"][0], "label": int(batch["label"][0])}


def open_identities(data_dir: str | os.PathLike, split: str = "train") -> IdentityData:
    """A split of the identity dataset built in `data_dir` (see `IdentityData`)."""
    return IdentityData(data_dir, split)


# --------------------------------------------------------------------------- command line


@usage.command
def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog=_COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, metavar="DIR",
                        help=f"a folder per identity, or an insightface pack folder ({REC_NAME} + {IDX_NAME})")
    parser.add_argument("--out", required=True, metavar="DATA_DIR", help="dataset folder")
    parser.add_argument("--resize", action="store_true", help=f"resize images that are not {SIZE}x{SIZE}")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        info = build_identities(args.source, args.out, resize=args.resize, overwrite=args.overwrite,
                                progress=not args.no_progress)
    except (IdentitiesError, builder_lib.MissingTensorFlowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was finished; run the same command again", file=sys.stderr)
        return 130
    names = f", names in {Path(args.out) / NAMES_FILE}" if info["identities_file"] else ""
    print(f"dataset      {Path(args.out) / info['tfds_dir']}\n"
          f"images       {info['splits']['train']} of {info['num_identities']} identities ({info['source_kind']} "
          f"source {info['source']}{names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

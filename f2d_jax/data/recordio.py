"""insightface's face-recognition training packs (MXNet RecordIO `train.rec` + `train.idx`), without mxnet.

    pack = FaceRecordIO("data/faces_emore")      # a folder holding train.rec and train.idx
    len(pack), pack.num_identities               # 5,822,653 images of 85,742 identities for MS1MV2
    rgb, label = pack[0]                         # uint8 (112, 112, 3) RGB, int identity

The format, as dmlc-core's RecordIOWriter/Reader and mxnet.recordio write and read it:

- `.rec`: records, each `uint32 magic 0xced7230a`, `uint32 lrecord` (upper 3 bits cflag, lower 29
  bits length), `length` payload bytes, zero padding to a multiple of 4. A payload that holds the
  magic word at a 4-aligned position is split there (the magic word itself is dropped):
  cflag 1 starts such a record, 2 continues it, 3 ends it; 0 is a whole record. A reader joins
  the parts with the magic word between them.
- `.idx`: text lines `key<TAB>byte offset of the record's first part`.
- An image record's payload (mxnet.recordio.pack): an `IRHeader` struct `<IfQQ` (flag uint32,
  label float32, id uint64, id2 uint64); when flag > 0, `flag` float32 labels follow it (and the
  label field is unused); then the encoded image (JPEG or PNG).
- insightface's layout (src/data/dir2rec.py, arcface_torch/dataset.py MXFaceDataset): key 0 is a
  header with flag > 0 and label (first identity key, end identity key); keys 1 .. first-1 are the
  images (label = identity, 0-based), keys first .. end-1 one record per identity whose label is
  its image-key range [start, end). A pack whose key 0 has flag 0 has no header: every key is an
  image.

Plain numpy + OpenCV; importing this module imports neither jax nor TensorFlow.
"""
from __future__ import annotations

import collections
import numbers
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")          # magic, lrecord
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_PART_LENGTH = _LENGTH_MASK         # dmlc's CHECK(size < 1 << 29)

_IR = struct.Struct("<IfQQ")           # mxnet.recordio's IRHeader: flag, label, id, id2
IR_HEADER_SIZE = _IR.size              # 24

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"             # insightface's "num_classes,height,width" file

PathLike = Union[str, os.PathLike]

IRHeader = collections.namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """mxnet.recordio's image-record header. `label` is a float when flag == 0, else a
float32 array of `flag` labels."""


class RecordIOError(ValueError):
    """A .rec/.idx file that is not (or no longer) valid MXNet RecordIO: the message names the file
    and the byte offset (and the record key, where there is one)."""


# --------------------------------------------------------------------------- framing


def _lrecord(cflag: int, length: int) -> int:
    return (cflag << _LENGTH_BITS) | length


def frame_record(payload: bytes) -> bytes:
    """`payload` framed as one logical RecordIO record, exactly as dmlc's RecordIOWriter::WriteRecord
    writes it: split at each 4-aligned occurrence of the magic word (cflag 1, 2, ..., 3), else one
    part with cflag 0; zero padding to 4 bytes after the last part."""
    payload = bytes(payload)
    size = len(payload)
    if size > MAX_PART_LENGTH:
        raise ValueError(f"a RecordIO record holds fewer than 2^29 bytes; this payload has {size}")
    lower_align = size & ~3
    out = []
    start = 0
    i = payload.find(_MAGIC_BYTES)
    while 0 <= i < lower_align:
        if i % 4:
            i = payload.find(_MAGIC_BYTES, i + 1)
            continue
        out.append(_FRAME.pack(MAGIC, _lrecord(1 if start == 0 else 2, i - start)))
        out.append(payload[start:i])
        start = i + 4
        i = payload.find(_MAGIC_BYTES, start)
    out.append(_FRAME.pack(MAGIC, _lrecord(3 if start else 0, size - start)))
    out.append(payload[start:])
    out.append(b"\0" * (-size % 4))
    return b"".join(out)


def _pread(fd: int, size: int, offset: int) -> bytes:
    if size <= 0:
        return b""
    chunks = []
    while size > 0:
        if hasattr(os, "pread"):
            chunk = os.pread(fd, size, offset)
        else:   # Windows: not thread-safe
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _describe_key(key) -> str:
    return "" if key is None else f" (record key {key})"


def _read_record(fd: int, path: str, offset: int, file_size: int, key=None,
                 payload: bool = True) -> tuple[bytes, int]:
    """The logical record whose first part starts at `offset` (b"" with payload=False: only the
    headers are read and the sizes checked), and the offset just past it."""
    parts = []
    pos = offset
    in_split = False
    while True:
        head = _pread(fd, _FRAME.size, pos)
        if len(head) < _FRAME.size:
            raise RecordIOError(
                f"{path}: truncated record header at offset {pos}{_describe_key(key)}: {len(head)} of 8 bytes "
                f"before the end of the file ({file_size} bytes); the file is cut short")
        magic, lrec = _FRAME.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: bad magic 0x{magic:08x} at offset {pos}{_describe_key(key)} (expected 0x{MAGIC:08x}); "
                f"the file is corrupt or not MXNet RecordIO, or the .idx offset is wrong")
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        if cflag > 3:
            raise RecordIOError(f"{path}: invalid part flag {cflag} at offset {pos}{_describe_key(key)} "
                                f"(lrecord 0x{lrec:08x}); the file is corrupt")
        if in_split != (cflag in (2, 3)):
            what = "continues a split record that never started" if cflag in (2, 3) else \
                "interrupts a split record that has not ended"
            raise RecordIOError(f"{path}: the part at offset {pos}{_describe_key(key)} (flag {cflag}) {what}; "
                                f"the file is corrupt or the .idx offset is wrong")
        padded = (length + 3) & ~3
        available = max(0, file_size - pos - _FRAME.size)
        if payload:
            data = _pread(fd, padded, pos + _FRAME.size)
            available = len(data)
            parts.append(data[:length])
        if available < padded:
            raise RecordIOError(
                f"{path}: truncated record at offset {pos}{_describe_key(key)}: the header announces {length} bytes "
                f"(padded to {padded}) but only {available} remain before the end of the file ({file_size} bytes)")
        pos += _FRAME.size + padded
        if cflag in (0, 3):
            return b"".join(parts), pos
        if payload:
            parts.append(_MAGIC_BYTES)
        in_split = True


def scan_offsets(rec_path: PathLike) -> np.ndarray:
    """The byte offsets of the records of a .rec file, from their headers alone (for a .rec without
    its .idx). Raises RecordIOError at the first damaged record."""
    offsets = []
    with open(rec_path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < file_size:
            offsets.append(pos)
            _, pos = _read_record(f.fileno(), str(rec_path), pos, file_size, payload=False)
    return np.asarray(offsets, dtype=np.int64)


# --------------------------------------------------------------------------- .idx


def _one_tab_a_line(data: bytes) -> bool:
    """Whether every line of `data` (some) is "text<TAB>text"."""
    chars = np.frombuffer(data, dtype=np.uint8)
    tabs = np.flatnonzero(chars == 9)
    ends = np.flatnonzero(chars == 10)
    if data and not data.endswith(b"\n"):
        ends = np.append(ends, len(chars))
    return len(tabs) > 0 and len(tabs) == len(ends) and bool(np.all(tabs < ends)) and \
        bool(np.all(tabs[1:] > ends[:-1]))


def _parse_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(idx_path, "rb") as f:
        data = f.read()
    if _one_tab_a_line(data):   # the fast path (millions of lines)
        lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # numpy 1.x only warns about unparsed text
            try:
                table = np.fromstring(data.decode("ascii"), dtype=np.int64, sep=" ")
            except (ValueError, UnicodeDecodeError, DeprecationWarning):
                table = None
        if table is not None and table.size == 2 * lines:
            return table[0::2].copy(), table[1::2].copy()
    keys, offsets = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        fields = line.strip().split(b"\t")
        try:
            if len(fields) != 2:
                raise ValueError
            keys.append(int(fields[0]))
            offsets.append(int(fields[1]))
        except ValueError:
            raise RecordIOError(f"{idx_path}: line {number} is {line[:80]!r}, not 'integer key<TAB>byte offset'; "
                                f"the file is corrupt or not an MXNet RecordIO index") from None
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def _default_idx(rec_path: Path) -> Path:
    return rec_path.with_suffix(".idx")


# --------------------------------------------------------------------------- reader


class RecordIOReader:
    """Random access to the records of an MXNet RecordIO file by key (mxnet's MXIndexedRecordIO 'r').

    `idx_path` defaults to the .rec path with the suffix .idx; when that does not exist either, the
    .rec is scanned and its records get the keys 0, 1, 2, ... in file order. Reads use pread, so a
    reader may be shared by threads; it reopens its file after a fork and can be pickled.
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"no RecordIO file at {self.rec_path}")
        self._file_size = self.rec_path.stat().st_size
        if idx_path is None and _default_idx(self.rec_path).is_file():
            idx_path = _default_idx(self.rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        if self.idx_path is None:
            offsets = scan_offsets(self.rec_path)
            keys = np.arange(len(offsets), dtype=np.int64)
        else:
            if not self.idx_path.is_file():
                raise FileNotFoundError(f"no RecordIO index at {self.idx_path}")
            keys, offsets = _parse_idx(str(self.idx_path))
            self._check_offsets(keys, offsets)
        self._keys = keys
        self._offsets = offsets
        if np.array_equal(keys, np.arange(len(keys))):
            self._order = None            # key k is entry k: no search needed
        else:
            self._order = np.argsort(keys, kind="stable")
            sorted_keys = keys[self._order]
            repeated = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
            if len(repeated):
                key = int(sorted_keys[repeated[0]])
                lines = (np.flatnonzero(keys == key)[:2] + 1).tolist()
                raise RecordIOError(f"{self.idx_path}: key {key} appears twice (lines {lines[0]} and {lines[1]}); "
                                    f"the index is corrupt")
            self._sorted_keys = sorted_keys
        self._fd = None
        self._pid = None
        self._lock = threading.Lock()

    def _check_offsets(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        bad = np.flatnonzero((offsets < 0) | (offsets + _FRAME.size > self._file_size) | (offsets % 4 != 0))
        if len(bad):
            i = int(bad[0])
            offset = int(offsets[i])
            why = "not 4-byte aligned" if 0 <= offset and offset % 4 else \
                f"past the end of {self.rec_path} ({self._file_size} bytes)"
            raise RecordIOError(f"{self.idx_path}: line {i + 1}: offset {offset} of record key {int(keys[i])} is "
                                f"{why}; the index does not belong to this .rec or one of them is corrupt")

    # -- pickling / fork safety
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fd=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            with self._lock:
                if self._fd is None or self._pid != pid:
                    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = pid
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- access
    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> np.ndarray:
        """The keys, int64, in the order of the index (file order when there is none)."""
        return self._keys

    def _position(self, key) -> int:
        key = int(key)
        if self._order is None:
            if 0 <= key < len(self._keys):
                return key
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
                return int(self._order[i])
        raise KeyError(f"{self.rec_path}: no record with key {key}")

    def __contains__(self, key) -> bool:
        try:
            self._position(key)
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
        return True

    def offset(self, key) -> int:
        """The byte offset of the record `key` in the .rec file."""
        return int(self._offsets[self._position(key)])

    def read(self, key) -> bytes:
        """The payload of the record `key` (split parts joined). KeyError for an unknown key,
        RecordIOError for a damaged record."""
        offset = self.offset(key)
        payload, _ = _read_record(self._descriptor(), str(self.rec_path), offset, self._file_size, key=int(key))
        return payload

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(key, payload) for every record, in index order."""
        for key in self._keys:
            yield int(key), self.read(key)


class RecordIOWriter:
    """Writes MXNet RecordIO (mxnet's MXIndexedRecordIO 'w'): `write(key, payload)` appends a record
    (split like dmlc's writer when the payload holds the magic word) and, with an `idx_path`, its
    "key<TAB>offset" line."""

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = None if self.idx_path is None else open(self.idx_path, "w")
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def write(self, key, payload: bytes) -> int:
        """Appends the record; returns its offset."""
        offset = self._pos
        framed = frame_record(payload)
        self._rec.write(framed)
        self._pos += len(framed)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        for f in (self._rec, self._idx):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- image records


def pack_record(label, data: bytes = b"", *, id: int = 0, id2: int = 0) -> bytes:
    """mxnet.recordio.pack: an IRHeader then `data`. A number `label` is stored in the header (flag 0);
    a sequence is stored as float32 labels after it (flag = its length)."""
    if isinstance(label, numbers.Number):
        return _IR.pack(0, float(label), id, id2) + bytes(data)
    labels = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(data)


def unpack_record(payload: bytes, *, where: str = "record") -> tuple[IRHeader, bytes]:
    """mxnet.recordio.unpack: (IRHeader, the bytes after the header and its labels)."""
    if len(payload) < IR_HEADER_SIZE:
        raise RecordIOError(f"{where}: {len(payload)} bytes, shorter than the {IR_HEADER_SIZE}-byte image header; "
                            f"this is not an insightface/mxnet image record")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    rest = payload[IR_HEADER_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"{where}: the header announces {flag} float32 labels ({4 * flag} bytes) but only "
                                f"{len(rest)} bytes follow it; the record is corrupt")
        label = np.frombuffer(rest, dtype="<f4", count=flag).astype(np.float32)
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), rest


def encode_image(rgb: np.ndarray, image_format: str = ".png", quality: int = 95) -> bytes:
    """An RGB uint8 (H, W, 3) image encoded as PNG or JPEG (`.jpg`) bytes."""
    import cv2

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    fmt = image_format.lower() if image_format.startswith(".") else "." + image_format.lower()
    if fmt in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == ".png":
        params = []
    else:
        raise ValueError(f"image_format must be '.png' or '.jpg', not {image_format!r}")
    ok, buf = cv2.imencode(fmt, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise RuntimeError(f"{fmt} encoding failed for an image of shape {rgb.shape}")
    return buf.tobytes()


def decode_image(data, *, where: str = "image") -> np.ndarray:
    """Encoded image bytes (JPEG/PNG/...) -> RGB uint8 (H, W, 3), as mx.image.imdecode gives them
    (grey images become 3 channels). ValueError naming `where` when they do not decode."""
    import cv2

    buf = np.frombuffer(bytes(data) if not isinstance(data, np.ndarray) else data.tobytes(), dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ValueError(f"{where}: cannot decode {buf.size} bytes (starting {bytes(buf[:8])!r}) as an image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)   # the channels reversed, several times faster than numpy's copy


def _first_label(label) -> float:
    return float(label) if isinstance(label, numbers.Number) else float(np.asarray(label).ravel()[0])


class FaceRecordIO:
    """An insightface face-recognition pack: `pack[i]` -> (RGB uint8 image, int identity label).

    `path` is a folder holding train.rec and train.idx, or a .rec file (its index: `idx_path`, else
    the .idx beside it). Indices run over the image keys as insightface's MXFaceDataset takes them:
    keys 1 .. header.label[0] - 1 when key 0 is a header (flag > 0), else every key of the index.
    Images are returned at their stored size (112x112 in insightface's packs).
    """

    def __init__(self, path: PathLike, idx_path: Optional[PathLike] = None):
        path = Path(path)
        rec_path = path / REC_NAME if path.is_dir() else path
        if path.is_dir() and not rec_path.is_file():
            raise FileNotFoundError(f"no {REC_NAME} in {path}: expected an insightface pack "
                                    f"({REC_NAME} + {IDX_NAME}, as MS1MV2/MS1MV3/Glint360K ship)")
        self.reader = RecordIOReader(rec_path, idx_path)
        self.root = rec_path.parent
        self._num_identities = None
        header = self.header(0) if 0 in self.reader else None
        if header is not None and header.flag > 0:
            if header.flag < 2:
                raise RecordIOError(f"{self._where(0)}: header record with {header.flag} label(s); insightface's "
                                    f"header has 2 (first identity key, end identity key)")
            first, end = int(header.label[0]), int(header.label[1])
            self.header0 = (first, end)
            self._image_keys = np.arange(1, first, dtype=np.int64)
            self._num_identities = end - first
            missing = self._missing(self._image_keys)
            if missing is not None:
                raise RecordIOError(f"{self.reader.idx_path or self.reader.rec_path}: no record with key {missing}, "
                                    f"which header record 0 says is an image (keys 1 .. {first - 1}); the index "
                                    f"does not belong to this pack or is incomplete")
        else:
            self.header0 = None
            self._image_keys = np.asarray(self.reader.keys, dtype=np.int64)

    def _missing(self, keys: np.ndarray):
        """The first of `keys` the index lacks, or None."""
        reader = self.reader
        if reader._order is None:
            bad = np.flatnonzero((keys < 0) | (keys >= len(reader)))
        else:
            pos = np.minimum(np.searchsorted(reader._sorted_keys, keys), len(reader) - 1)
            bad = np.flatnonzero(reader._sorted_keys[pos] != keys)
        return int(keys[bad[0]]) if len(bad) else None

    def _where(self, key) -> str:
        try:
            offset = self.reader.offset(key)
        except KeyError:
            offset = "?"
        return f"{self.reader.rec_path}: record key {key} at offset {offset}"

    def header(self, key) -> IRHeader:
        """The IRHeader of record `key`."""
        header, _ = unpack_record(self.reader.read(key), where=self._where(key))
        return header

    def __len__(self) -> int:
        return len(self._image_keys)

    @property
    def image_keys(self) -> np.ndarray:
        return self._image_keys

    @property
    def num_identities(self) -> int:
        """Identities in the pack: from header record 0 (insightface's layout); for a pack without one,
        from its `property` file ("num_classes,112,112"), else the largest label + 1 (reads every record)."""
        if self._num_identities is None:
            prop = self.root / PROPERTY_NAME
            if prop.is_file():
                self._num_identities = int(prop.read_text().strip().split(",")[0])
            else:
                self._num_identities = 1 + max((self.read_encoded(i)[1] for i in range(len(self))), default=-1)
        return self._num_identities

    def _key(self, index) -> int:
        if not isinstance(index, (numbers.Integral, np.integer)):
            raise TypeError(f"FaceRecordIO indices are integers, not {type(index).__name__}")
        n = len(self._image_keys)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {int(index)} out of range for a pack of {n} images")
        return int(self._image_keys[i])

    def read_encoded(self, index) -> tuple[bytes, int]:
        """(the encoded image bytes, the identity label) of image `index`, without decoding."""
        key = self._key(index)
        header, data = unpack_record(self.reader.read(key), where=self._where(key))
        return data, int(_first_label(header.label))

    def __getitem__(self, index) -> tuple[np.ndarray, int]:
        key = self._key(index)
        header, data = unpack_record(self.reader.read(key), where=self._where(key))
        try:
            rgb = decode_image(data, where=self._where(key))
        except ValueError as e:
            raise RecordIOError(str(e)) from None
        return rgb, int(_first_label(header.label))

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]


def write_face_recordio(directory: PathLike, images: Sequence[np.ndarray], labels: Sequence[int], *,
                        image_format: str = ".png", quality: int = 95) -> Path:
    """Writes `images` (RGB uint8) with identity `labels` as an insightface pack: DIR/train.rec,
    DIR/train.idx and DIR/property. Returns DIR.

    Labels are the identities 0 .. K-1, each with at least one image. Records are written in
    insightface's layout: key 0 the header (first identity key, end identity key), keys 1..N the
    images grouped by label (a stable sort: pack index i is image np.argsort(labels, kind="stable")[i]),
    then one record per identity with its image-key range.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"expected one label per image: {len(images)} images, labels of shape {labels.shape}")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise ValueError("labels must be integer identities")
        labels = labels.astype(np.int64)
    num_identities = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=num_identities) if len(labels) else np.zeros(0, np.int64)
    if len(labels) and (labels.min() < 0 or not np.all(counts > 0)):
        raise ValueError("labels must be the identities 0 .. K-1, each with at least one image")
    order = np.argsort(labels, kind="stable")
    n = len(labels)
    first_identity_key = n + 1
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(directory / REC_NAME, directory / IDX_NAME) as writer:
        writer.write(0, pack_record([first_identity_key, first_identity_key + num_identities]))
        for key, i in enumerate(order, 1):
            writer.write(key, pack_record(float(labels[i]), encode_image(images[i], image_format, quality), id=key))
        starts = 1 + np.concatenate([[0], np.cumsum(counts)])
        for identity in range(num_identities):
            key = first_identity_key + identity
            writer.write(key, pack_record([starts[identity], starts[identity + 1]], id=key))
    shape = np.asarray(images[0]).shape[:2] if n else (112, 112)
    (directory / PROPERTY_NAME).write_text(f"{num_identities},{shape[0]},{shape[1]}\n")
    return directory

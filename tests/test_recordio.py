"""insightface's data formats without mxnet: RecordIO packs (f2d_jax.data.recordio) and verification
.bin files with the 10-fold accuracy protocol (f2d_jax.data.verification)."""
import pickle
import struct

import numpy as np
import pytest

from f2d_jax.data.recordio import (IR_HEADER_SIZE, MAGIC, FaceRecordIO, RecordIOError, RecordIOReader,
                                   RecordIOWriter, encode_image, frame_record, pack_record, scan_offsets, unpack_record,
                                   write_face_recordio)
from f2d_jax.data.verification import (VerificationFileError, kfold_indices, load_bin, verification_accuracy,
                                       write_bin)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def faces(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def pack(tmp_path):
    images = faces(7)
    labels = np.array([0, 0, 1, 1, 1, 2, 3])
    return write_face_recordio(tmp_path / "pack", images, labels), images, labels


# --------------------------------------------------------------------------- RecordIO


def test_face_pack_round_trip(pack):
    directory, images, labels = pack
    data = FaceRecordIO(directory)
    assert len(data) == 7 and data.num_identities == 4
    assert data.header0 == (8, 12)   # insightface: key 0 labels (first identity key, end identity key)
    for i in range(len(data)):
        rgb, label = data[i]
        assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
        np.testing.assert_array_equal(rgb, images[i])   # PNG: lossless
        assert label == labels[i] and isinstance(label, int)
    assert data[-1][1] == 3
    with pytest.raises(IndexError):
        data[7]
    encoded, label = data.read_encoded(2)
    assert encoded[:4] == b"\x89PNG" and label == 1
    # identity records: image-key ranges [start, end)
    ranges = [tuple(int(x) for x in data.header(key).label) for key in range(8, 12)]
    assert ranges == [(1, 3), (3, 6), (6, 7), (7, 8)]
    # the .rec path works as well as the folder, and the .idx is the documented text
    assert len(FaceRecordIO(directory / "train.rec")) == 7
    lines = (directory / "train.idx").read_text().splitlines()
    assert lines[0] == "0\t0" and all(len(line.split("\t")) == 2 for line in lines)


def test_face_pack_groups_labels_and_reads_jpeg(tmp_path):
    ramp = np.linspace(0, 255, 32)
    images = np.stack([np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :] * k / 4, 128.0), -1)
                       for k in range(4)]).astype(np.uint8)   # smooth: JPEG keeps them close
    labels = [1, 0, 1, 0]
    data = FaceRecordIO(write_face_recordio(tmp_path, images, labels, image_format=".jpg"))
    order = np.argsort(labels, kind="stable")   # [1, 3, 0, 2]
    assert [data[i][1] for i in range(4)] == [0, 0, 1, 1]
    for i, j in enumerate(order):
        assert np.abs(data[i][0].astype(int) - images[j]).mean() < 4
    with pytest.raises(ValueError, match="0 .. K-1"):
        write_face_recordio(tmp_path / "bad", images, [0, 2, 0, 2])


def test_pack_without_header_uses_every_key(tmp_path):
    """flag 0 at key 0: no insightface header, every key is an image (MXFaceDataset's else branch)."""
    images = faces(3)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(2.0, encode_image(images[0])))   # a plain label: flag 0
        for image, key, label in zip(images[1:], (5, 9), (0, 1)):
            writer.write(key, pack_record([label, 7.0], encode_image(image)))   # label arrays: flag 2
    data = FaceRecordIO(tmp_path)
    assert len(data) == 3 and data.header0 is None
    assert [data[i][1] for i in range(3)] == [2, 0, 1]   # label arrays: the first element
    assert data.num_identities == 3


def test_split_records_round_trip(tmp_path):
    """Payloads holding the magic word are split as dmlc's writer does and joined on reading."""
    payloads = [
        b"plain",
        MAGIC_BYTES,                                       # magic at 0: empty start part
        b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"xy",   # two splits: start, middle, end
        b"ab" + MAGIC_BYTES + b"cd",                       # unaligned: not split
        b"abcd" + MAGIC_BYTES,                             # magic as the last aligned word
        b"",
    ]
    def part(cflag, data):   # magic, lrecord (cflag in the upper 3 bits), data
        return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data
    assert frame_record(payloads[2]) == part(1, b"abcd") + part(2, b"efgh") + part(3, b"xy") + b"\0\0"
    assert frame_record(b"plain") == part(0, b"plain") + b"\0\0\0"
    assert len(frame_record(payloads[3])) == 8 + 8          # one part, no split
    with RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
        for key, payload in enumerate(payloads):
            writer.write(key * 10, payload)
    reader = RecordIOReader(tmp_path / "x.rec")          # finds x.idx beside it
    assert list(reader.keys) == [0, 10, 20, 30, 40, 50]
    assert [reader.read(key) for key in reader.keys] == payloads
    assert [p for _, p in reader] == payloads
    with pytest.raises(KeyError):
        reader.read(3)
    # without the .idx: scanned, keys 0..n-1 in file order
    (tmp_path / "x.idx").unlink()
    reader = RecordIOReader(tmp_path / "x.rec")
    assert len(reader) == len(payloads) and [reader.read(k) for k in range(len(payloads))] == payloads
    assert len(scan_offsets(tmp_path / "x.rec")) == len(payloads)
    # readers survive pickling (for worker processes)
    assert pickle.loads(pickle.dumps(reader)).read(2) == payloads[2]


def test_image_record_header():
    record = pack_record(3.0, b"img", id=5)
    header, data = unpack_record(record)
    assert (header.flag, header.label, header.id, header.id2, data) == (0, 3.0, 5, 0, b"img")
    header, data = unpack_record(pack_record([1, 2.5], b"img"))
    assert header.flag == 2 and list(header.label) == [1.0, 2.5] and data == b"img"
    assert len(pack_record(1.0)) == IR_HEADER_SIZE == 24
    with pytest.raises(RecordIOError, match="shorter than the 24-byte image header"):
        unpack_record(b"short")


def test_corrupt_files_name_the_offset(pack, tmp_path):
    directory, _, _ = pack
    rec = directory / "train.rec"
    original = rec.read_bytes()
    offsets = [int(line.split("\t")[1]) for line in (directory / "train.idx").read_text().splitlines()]
    third = offsets[3]   # image key 3

    damaged = bytearray(original)
    damaged[third] ^= 0xFF
    rec.write_bytes(bytes(damaged))
    data = FaceRecordIO(directory)
    with pytest.raises(RecordIOError, match=rf"train\.rec: bad magic 0x[0-9a-f]{{8}} at offset {third} "
                                            r"\(record key 3\) \(expected 0xced7230a\)"):
        data[2]
    assert isinstance(RecordIOError("x"), ValueError)

    # a truncated file: the last identity record is cut in its payload; its idx offset still fits
    rec.write_bytes(original[:offsets[-1] + 12])
    reader = RecordIOReader(rec, directory / "train.idx")
    with pytest.raises(RecordIOError, match=rf"truncated record at offset {offsets[-1]} \(record key 11\)"):
        reader.read(11)
    # cut before it: the index points past the end, found on opening
    rec.write_bytes(original[:offsets[-1]])
    with pytest.raises(RecordIOError, match=rf"line 12: offset {offsets[-1]} of record key 11 is past the end"):
        RecordIOReader(rec, directory / "train.idx")
    with pytest.raises(RecordIOError, match="truncated"):
        scan_offsets(_cut(rec, original, offsets[-1] + 12))

    # an image that does not decode: the key and the offset
    bad = tmp_path / "bad"
    bad.mkdir()
    with RecordIOWriter(bad / "train.rec", bad / "train.idx") as writer:
        writer.write(0, pack_record([2, 3]))
        writer.write(1, pack_record(0.0, b"not an image"))
        writer.write(2, pack_record([0, 1]))
    with pytest.raises(RecordIOError, match=r"record key 1 at offset 40: cannot decode 12 bytes"):
        FaceRecordIO(bad)[0]

    # an idx that is not an index
    (bad / "train.idx").write_text("0\t0\nnonsense\n")
    with pytest.raises(RecordIOError, match="line 2 is b'nonsense'"):
        RecordIOReader(bad / "train.rec")


def _cut(rec, original, size):
    cut = rec.with_name("cut.rec")
    cut.write_bytes(original[:size])
    return cut


# --------------------------------------------------------------------------- verification


def test_bin_round_trip(tmp_path):
    images = faces(6)
    issame = [True, False, True]
    write_bin(tmp_path / "lfw.bin", images, issame)
    loaded, same = load_bin(tmp_path / "lfw.bin", image_size=None)
    np.testing.assert_array_equal(loaded, images)
    assert same.dtype == bool and same.tolist() == issame
    resized, _ = load_bin(tmp_path / "lfw.bin")   # default: insightface's 112x112
    assert resized.shape == (6, 112, 112, 3)

    # python-2 style content: bytes images and numpy booleans
    with open(tmp_path / "np.bin", "wb") as f:
        pickle.dump(([bytearray(encode_image(image)) for image in images], np.array(issame)), f, protocol=2)
    assert load_bin(tmp_path / "np.bin", image_size=None)[1].tolist() == issame

    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(VerificationFileError, match="junk.bin: not an insightface verification .bin"):
        load_bin(tmp_path / "junk.bin")
    with open(tmp_path / "other.bin", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(VerificationFileError, match="expected a pickled pair"):
        load_bin(tmp_path / "other.bin")
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump((pytest.raises, []), f)
    with pytest.raises(VerificationFileError, match="refusing to load"):
        load_bin(tmp_path / "evil.bin")


def _pairs_at_distances(dist):
    """Unit 2-D embedding pairs whose squared euclidean distance is `dist` (2 - 2 cos a)."""
    angle = np.arccos(1 - np.asarray(dist) / 2)
    e1 = np.stack([np.ones_like(angle), np.zeros_like(angle)], axis=1)
    e2 = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return e1, e2


def test_verification_accuracy_separable_and_random():
    rng = np.random.default_rng(0)
    n = 600
    issame = np.arange(n) % 2 == 0
    e1 = rng.normal(size=(n, 64))
    e2 = np.where(issame[:, None], e1 * 3.0 + 0.05 * rng.normal(size=(n, 64)), rng.normal(size=(n, 64)))
    result = verification_accuracy(e1, e2, issame)   # scale does not matter: normalized
    assert result["accuracy_mean"] == 1.0 and result["accuracy_std"] == 0.0
    assert 0 < result["threshold_mean"] < 2 and len(result["accuracies"]) == 10

    random = verification_accuracy(rng.normal(size=(n, 64)), rng.normal(size=(n, 64)), issame)
    assert abs(random["accuracy_mean"] - 0.5) < 0.08


def test_folds_choose_thresholds_on_training_folds_only():
    # fold 0 separates at distance 1, fold 1 at distance 3: each fold's threshold, chosen on the
    # other, is wrong for it; a protocol that looked at the test fold would score 1.0
    issame = np.array([True, False] * 10)
    dist = np.where(issame, 0.5, 1.5)
    dist[10:] += 2.0
    e1, e2 = _pairs_at_distances(dist)
    result = verification_accuracy(e1, e2, issame, folds=2)
    assert result["accuracy_mean"] == 0.5
    np.testing.assert_allclose(result["thresholds"], [2.51, 0.51])   # the first best on the other fold
    assert verification_accuracy(e1, e2, issame, folds=1)["accuracy_mean"] == 0.75

    # KFold(shuffle=False) sizes: contiguous, the first n % k folds one longer
    splits = kfold_indices(23, 10)
    assert [len(test) for _, test in splits] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate([test for _, test in splits]), np.arange(23))
    assert all(len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 23 for train, test in splits)
    with pytest.raises(ValueError, match="at least 10 pairs"):
        verification_accuracy(e1[:5], e2[:5], issame[:5])

"""Identity-labelled face datasets (f2d_jax.data.identities): building from a folder per identity and
from an insightface RecordIO pack, reading back without TensorFlow, errors."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from f2d_jax.data import identities as identities_module
from f2d_jax.data.identities import (IdentitiesError, build_identities, detect_source, encoded_image_info, main,
                                     open_identities)
from f2d_jax.data.loader import BatchLoader, batch_indices
from f2d_jax.data.recordio import FaceRecordIO, decode_image, encode_image, write_face_recordio

NAMES = ["amy", "bob", "zed"]   # folder names, in label order


def face(seed: int, size: int = 112) -> np.ndarray:
    """A smooth synthetic RGB image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    channels = [np.sin(x * rng.uniform(2, 6) + y * rng.uniform(1, 3) + rng.uniform(0, 6)) * 100 + 127 + 20 * x
                for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_image(rgb, path.suffix))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """zed/ 1 image, amy/ 2 (one in a subfolder), bob/ 2 (PNG and JPEG), empty/ none, a stray text file."""
    root = tmp_path_factory.mktemp("folder")
    write(root / "zed" / "a.png", face(0))
    write(root / "amy" / "b.png", face(1))
    write(root / "amy" / "more" / "c.png", face(2))
    write(root / "bob" / "d.jpg", face(3))
    write(root / "bob" / "e.png", face(4))
    (root / "empty").mkdir()
    (root / "bob" / "notes.txt").write_text("not an image")
    return root


FOLDER_FILES = [("amy/b.png", 0), ("amy/more/c.png", 0), ("bob/d.jpg", 1), ("bob/e.png", 1), ("zed/a.png", 2)]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    images = [face(10 + i) for i in range(6)]
    return write_face_recordio(tmp_path_factory.mktemp("pack"), images, [2, 0, 1, 0, 3, 2], image_format=".jpg")


@pytest.fixture(scope="module")
def built(folder, pack, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    build_identities(folder, out / "folder", progress=False)
    build_identities(pack, out / "pack", progress=False)
    return out / "folder", out / "pack"


def test_detect_source(folder, pack, tmp_path):
    assert detect_source(folder) == "folder"
    assert detect_source(pack) == "recordio"
    assert detect_source(pack / "train.rec") == "recordio"


def test_encoded_image_info():
    rgb = face(5, 96)[:80]
    assert encoded_image_info(encode_image(rgb, ".png")) == ("png", 80, 96, True)
    assert encoded_image_info(encode_image(rgb, ".jpg")) == ("jpeg", 80, 96, True)
    rgba = cv2.imencode(".png", np.zeros((4, 4, 4), np.uint8))[1].tobytes()
    assert encoded_image_info(rgba) == ("png", 4, 4, False)
    assert encoded_image_info(b"not an image") is None


def test_folder_dataset(built, folder):
    data = open_identities(built[0])
    assert len(data) == len(FOLDER_FILES) and data.num_identities == 3
    assert data.identity_names == NAMES
    assert (built[0] / "identities.txt").read_text() == "amy\nbob\nzed\n"
    for i, (name, label) in enumerate(FOLDER_FILES):
        example = data[i]
        assert example["label"] == label
        np.testing.assert_array_equal(example["image"], decode_image((folder / name).read_bytes()))
    batch = data.get([4, 0, 2])
    assert batch["image"].shape == (3, 112, 112, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].tolist() == [2, 0, 1]
    np.testing.assert_array_equal(data[-1]["image"], data[4]["image"])
    with pytest.raises(IndexError):
        data.get([5])


def test_pack_dataset_keeps_the_jpeg_bytes(built, pack):
    source = FaceRecordIO(pack)
    data = open_identities(built[1])
    assert len(data) == len(source) == 6 and data.num_identities == 4 and data.identity_names is None
    raw = tfds.builder_from_directory(str(built[1] / data.info["tfds_dir"])).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})
    for i in range(len(source)):
        rgb, label = source[i]
        assert data[i]["label"] == label
        np.testing.assert_array_equal(data[i]["image"], rgb)
        assert raw[i]["image"] == source.read_encoded(i)[0]   # stored as given, not re-encoded


def test_reading_needs_no_tensorflow(built):
    code = ("import sys, json; from f2d_jax.data.identities import open_identities; "
            f"d = open_identities({str(built[1])!r}); b = d.get([3, 0, 5]); "
            "print(json.dumps([len(d), d.num_identities, b['label'].tolist(), int(b['image'].sum()), "
            "'tensorflow' in sys.modules]))")
    printed = subprocess.check_output([sys.executable, "-c", code], text=True, timeout=300)   # stderr: pytest's
    batch = open_identities(built[1]).get([3, 0, 5])
    assert json.loads(printed.splitlines()[-1]) == [6, 4, batch["label"].tolist(), int(batch["image"].sum()), False]


def test_batch_loader(built):
    data = open_identities(built[0])
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    loader = BatchLoader(data, 4, seed=5, sharding=sharding, start_step=2)
    try:
        for expected_step in (2, 3):
            step, batch = next(loader)
            assert step == expected_step
            want = data.get(batch_indices(step, 4, len(data), 5))
            assert batch["image"].shape == (4, 112, 112, 3) and batch["label"].dtype == np.int32
            np.testing.assert_array_equal(np.asarray(batch["image"]), want["image"])
            np.testing.assert_array_equal(np.asarray(batch["label"]), want["label"])
    finally:
        loader.close()


def test_wrong_size_names_the_file_unless_resized(tmp_path):
    root = tmp_path / "faces"
    write(root / "ann" / "ok.png", face(0))
    write(root / "ann" / "small.jpg", face(1, 100))
    with pytest.raises(IdentitiesError, match=r"small\.jpg: the image is 100x100.*--resize"):
        build_identities(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / identities_module.INFO_FILE).exists()
    build_identities(root, tmp_path / "out", resize=True, progress=False)
    data = open_identities(tmp_path / "out")
    assert len(data) == 2 and data[1]["image"].shape == (112, 112, 3) and data.info["resized"]


def test_source_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdentitiesError, match="is empty"):
        build_identities(tmp_path / "empty", tmp_path / "out", progress=False)
    write(tmp_path / "loose" / "a.png", face(0))
    with pytest.raises(IdentitiesError, match=r"neither a folder per identity .* nor an insightface pack .*: its 1 "
                                              r"image\(s\) are not in identity folders"):
        build_identities(tmp_path / "loose", tmp_path / "out", progress=False)
    (tmp_path / "hollow" / "ann").mkdir(parents=True)
    with pytest.raises(IdentitiesError, match="hold no images"):
        build_identities(tmp_path / "hollow", tmp_path / "out", progress=False)
    with pytest.raises(IdentitiesError, match="source not found"):
        build_identities(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no identity dataset"):
        open_identities(tmp_path / "out")
    assert main(["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: source")


def test_command_line(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--source", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert "5 of 3 identities (folder source" in capsys.readouterr().out
    assert len(open_identities(out)) == 5
    assert main(["--source", str(folder), "--out", str(out)]) == 2
    assert "already holds a finished dataset" in capsys.readouterr().err

"""Dataset preparation (python -m f2d_jax.data.prepare) and reading (f2d_jax.data.open_prepared).

Photo folders are built from the test portraits (tests/data/faces) and skimage's astronaut, with
mirrored/cropped variants, a photo without a face and an unreadable file; configs/tiny.py gives
64 px training images and tiny random-init encoders.
"""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from f2d_jax.config import load_config
from f2d_jax.data import (FEATURE_FIELDS, INFO_FILE, compatibility_problems, landmark_head_mask, latent_mask,
                          open_prepared, read_info, training_affine, transform_points, warp_image)
from f2d_jax.data import examples as examples_module
from f2d_jax.data import prepare as prepare_module
from f2d_jax.data.examples import find_images
from f2d_jax.data.masks import head_polygons, load_mask_file, warp_mask
from f2d_jax.data.prepare import PrepareError, main, prepare_dataset
from f2d_jax.data.read import feature_description
from f2d_jax.faces import align_face, load_image

ROOT = Path(__file__).resolve().parent.parent
FACES = ROOT / "tests" / "data" / "faces"
TINY = str(ROOT / "configs" / "tiny.py")
R = 64  # configs/tiny.py's data.resolution


def tiny(**data):
    config = load_config(TINY)
    config.data.update(data)
    return config


def save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Sorted: astronaut.png (2 faces found), biden.jpg, broken.jpg (unreadable), flat.png (no face),
    obama.jpg, obama2.jpg, obama3.jpg, variants/OBAMA_CROP.JPG, variants/obama_mirrored.png."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg"):
        (root / name).write_bytes((FACES / name).read_bytes())
    save(root / "astronaut.png", skimage.data.astronaut())
    obama, obama2 = load_image(FACES / "obama.jpg")[0], load_image(FACES / "obama2.jpg")[0]
    save(root / "variants" / "obama_mirrored.png", np.ascontiguousarray(obama2[:, ::-1]))
    save(root / "variants" / "OBAMA_CROP.JPG", obama[60:480, 40:470])
    save(root / "flat.png", np.full((240, 320, 3), (120, 140, 160), np.uint8))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


USABLE = ["astronaut.png", "biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg", "variants/OBAMA_CROP.JPG",
          "variants/obama_mirrored.png"]


@pytest.fixture(scope="module")
def prepared(photos, tmp_path_factory):
    """The photos prepared without cached features (see test_cached_features), 4 photos per chunk."""
    out = tmp_path_factory.mktemp("prepared")
    report = prepare_dataset(photos, out, tiny(), chunk_photos=4, progress=False)
    return out, report


def test_find_images(photos):
    assert find_images(photos) == ["astronaut.png", "biden.jpg", "broken.jpg", "flat.png", "obama.jpg", "obama2.jpg",
                                   "obama3.jpg", "variants/OBAMA_CROP.JPG", "variants/obama_mirrored.png"]


@pytest.mark.slow
def test_splits_report_and_shapes(prepared):
    out, report = prepared
    assert report["photos_found"] == 9 and report["photos_used"] == 7
    assert report["skipped"] == {"no_face": ["flat.png"], "unreadable": ["broken.jpg"], "unusable_face": []}
    assert report["several_faces"] == ["astronaut.png"]
    assert report["examples"] == {"train": 10, "holdout": 4} and report["mirrors"] == 7
    assert json.loads((out / "prepare_report.json").read_text()) == report
    assert not (out / ".work").exists() and not (out / "downloads").exists()

    info = json.loads((out / INFO_FILE).read_text())
    assert info["resolution"] == R and info["splits"] == {"train": 10, "holdout": 4}
    assert not info["features_cached"] and info["features"] is None and info["identity_dim"] is None
    assert info["mask_source"] == "landmarks" and info["flip"] and info["holdout"] == 2
    assert (out / info["tfds_dir"] / "dataset_info.json").is_file()

    # Holdout: the first two usable photos by path, with their mirrors; train: the rest, in sorted order.
    holdout = open_prepared(out, "holdout").get(range(4))
    assert list(holdout["name"]) == ["astronaut.png", "astronaut.png#flip", "biden.jpg", "biden.jpg#flip"]
    train = open_prepared(out)
    assert len(train) == 10
    batch = train.get(np.arange(10))
    assert list(batch["name"]) == [n + s for n in USABLE[2:] for s in ("", "#flip")]
    expected = {"image": ((10, R, R, 3), np.uint8), "mask": ((10, R, R, 1), np.uint8),
                "face": ((10, 112, 112, 3), np.uint8), "expression_face": ((10, 224, 224, 3), np.uint8),
                "landmarks": ((10, 68, 2), np.float32)}
    assert set(batch) == {*expected, "name"}
    for field, (shape, dtype) in expected.items():
        assert batch[field].shape == shape and batch[field].dtype == dtype, field
    assert set(np.unique(batch["mask"])) == {0, 255}
    # Landmarks are in training-image pixels: the face sits in the middle with level eyes.
    eyes = np.stack([batch["landmarks"][:, 36:42].mean(1), batch["landmarks"][:, 42:48].mean(1)], 1)
    assert np.all(np.abs(eyes[:, 0, 1] - eyes[:, 1, 1]) < 0.06 * R)
    assert np.all(np.abs(eyes.mean(1) - [R / 2, 0.45 * R]) < 0.1 * R)
    # One example, unbatched, and only the requested fields.
    one = train[3]
    assert one["name"] == "obama2.jpg#flip" and one["image"].shape == (R, R, 3)
    assert set(open_prepared(out, fields=["name", "mask"]).get([0])) == {"name", "mask"}
    assert open_prepared(out, fields=["image"]).get([])["image"].shape == (0, R, R, 3)


@pytest.mark.slow
def test_training_image_is_the_aligned_photo(prepared, photos):
    """The stored image, crops and landmarks are those of the library functions on the photo."""
    out, _ = prepared
    example = open_prepared(out, "holdout")[2]   # biden.jpg
    rgb = load_image(photos / "biden.jpg")[0]
    face = align_face(rgb)
    affine = training_affine(face.landmarks, R)
    np.testing.assert_array_equal(example["image"], warp_image(rgb, affine, R))
    np.testing.assert_array_equal(example["face"], face.crop)
    np.testing.assert_array_equal(example["expression_face"], face.expression_crop)
    landmarks = transform_points(affine, face.landmarks)
    np.testing.assert_allclose(example["landmarks"], landmarks, atol=1e-4)
    np.testing.assert_array_equal(example["mask"][..., 0], landmark_head_mask(landmarks, R))


def _rasterize(polygon: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, np.round(polygon).astype(np.int32), 1)
    return mask.astype(bool)


@pytest.mark.slow
def test_landmark_mask_covers_head_not_corners(prepared):
    out, _ = prepared
    batch = open_prepared(out, fields=["mask", "landmarks", "name"]).get(range(10))
    for mask, lm, name in zip(batch["mask"][..., 0] > 0, batch["landmarks"], batch["name"]):
        hull = cv2.convexHull(lm.astype(np.float32))[:, 0]
        assert mask[_rasterize(hull, R)].all(), f"{name}: the landmarks' hull is not all head"
        # A band above the eyebrows: 15-30% of the brow-to-chin height higher, across the brows' width.
        brows, chin = lm[17:27], lm[8]
        height = chin[1] - brows[:, 1].mean()
        for lift in (0.15, 0.3):
            for x in np.linspace(brows[:, 0].min(), brows[:, 0].max(), 7):
                y = brows[:, 1].mean() - lift * height
                assert mask[int(round(y)), int(round(x))], f"{name}: forehead at ({x:.0f}, {y:.0f}) not head"
        # FFHQ framing puts the chin near the bottom edge: the neck is at most the last rows.
        assert mask[min(int(chin[1]) + 2, R - 1), int(chin[0])], f"{name}: no neck below the chin"
        assert not mask[[0, 0, -1, -1], [0, -1, 0, -1]].any(), f"{name}: a corner is head"
        assert 0.25 < mask.mean() < 0.75, f"{name}: head covers {mask.mean():.0%} of the image"


def test_landmark_mask_construction():
    """Synthetic landmarks: the mask is the hull + skull + neck polygons dilated by the hair margin."""
    lm = align_face(FACES / "obama.jpg").landmarks
    lm = transform_points(training_affine(lm, 256), lm)
    hull, neck, radius = head_polygons(lm)
    mask = landmark_head_mask(lm, 256) > 0
    core = _rasterize(hull, 256) | _rasterize(neck, 256)
    assert mask[core].all()
    # Dilation: everything within the radius (minus a pixel) of the core is head, nothing beyond.
    distance = cv2.distanceTransform((~core).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert mask[distance <= radius - 1.5].all() and not mask[distance >= radius + 2].any()
    skull_top = hull[:, 1].min()
    brow = lm[17:27, 1].mean()
    assert brow - skull_top == pytest.approx(0.8 * (lm[8, 1] - brow), rel=0.1)
    # Any size; mirrored landmarks give the mirrored mask.
    assert landmark_head_mask(lm / 4, (64, 80)).shape == (64, 80)
    mirrored = lm.copy()
    mirrored[:, 0] = 255 - mirrored[:, 0]
    assert np.mean(landmark_head_mask(mirrored, 256)[:, ::-1] != landmark_head_mask(lm, 256)) < 0.01


def test_training_affine_geometry():
    """The crop is invariant to moving, turning and scaling the photo, and lands where it should."""
    lm = align_face(FACES / "obama.jpg").landmarks
    base = training_affine(lm, 128)
    angle, scale, shift = 0.4, 1.7, np.array([30.0, -12.0])
    move = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    moved = lm @ move.T + shift
    np.testing.assert_allclose(transform_points(training_affine(moved, 128), moved), transform_points(base, lm),
                               atol=1e-9)
    # Centre and size: the square is max(2 eye distances, 1.8 eye-to-mouth) from the centre to each side.
    eyes = np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])
    mouth = (lm[48] + lm[54]) / 2
    half = max(2 * np.hypot(*(eyes[1] - eyes[0])), 1.8 * np.hypot(*(mouth - eyes.mean(0))))
    centre = eyes.mean(0) + 0.1 * (mouth - eyes.mean(0))
    np.testing.assert_allclose(transform_points(base, centre[None])[0], [63.5, 63.5], atol=1e-9)
    assert np.sqrt(np.linalg.det(base[:, :2])) == pytest.approx(128 / (2 * half))


@pytest.mark.parametrize("scale", [0.23, 1.6])
def test_warp_image_keeps_points_in_place(scale):
    """Dots drawn in a photo land at transform_points of their centres (downscaling goes through
    an INTER_AREA pre-shrink, whose pixel convention the affine must follow)."""
    size = int(round(64 / scale))
    dots = np.array([[0.3, 0.3], [0.7, 0.35], [0.5, 0.75]]) * size
    photo = np.zeros((size, size), np.uint8)
    for x, y in dots:
        cv2.circle(photo, (int(x * 16), int(y * 16)), int(6 / scale * 16), 255, -1, cv2.LINE_AA, 4)
    linear = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]) * scale
    affine = np.concatenate([linear, (31.5 - linear @ [size / 2, size / 2])[:, None]], axis=1)
    warped = warp_image(photo, affine, 64).astype(np.float64)
    assert warped.shape == (64, 64)
    for target in transform_points(affine, dots):
        ys, xs = np.mgrid[:64, :64]
        near = np.hypot(xs - target[0], ys - target[1]) < 9
        weights = warped * near
        centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
        assert np.hypot(*(centroid - target)) < 0.15, (centroid, target)


@pytest.mark.slow
def test_flipped_examples_mirror_the_photo(prepared):
    out, _ = prepared
    data = open_prepared(out)
    for i in range(0, 10, 2):
        pair = data.get([i, i + 1])
        assert pair["name"][1] == pair["name"][0] + "#flip"
        image, mirror = pair["image"].astype(np.float64)
        # The mirror's detection is its own, so the two agree up to a pixel or so of alignment.
        assert np.abs(mirror[:, ::-1] - image).mean() < 12, pair["name"][0]
        nose, nose_mirror = pair["landmarks"][:, 30]
        assert abs(nose_mirror[0] - (R - 1 - nose[0])) < 1.5 and abs(nose_mirror[1] - nose[1]) < 1.5
        masks = pair["mask"][..., 0] > 0
        assert np.mean(masks[1][:, ::-1] != masks[0]) < 0.05
    # variants/obama_mirrored.png holds exactly the pixels of the mirrored obama2.jpg: same example.
    names = list(data.get(range(10))["name"])
    same = data.get([names.index("obama2.jpg#flip"), names.index("variants/obama_mirrored.png")])
    for field in ("image", "mask", "face", "expression_face", "landmarks"):
        np.testing.assert_array_equal(same[field][0], same[field][1], err_msg=field)


@pytest.mark.slow
def test_cached_features(tmp_path, monkeypatch):
    """identity / expression / latent_moments equal the encoders applied to the stored crops and
    images; 2 photos per chunk and feature batches of 3 exercise padding and chunk boundaries.
    Reading them decodes no image and imports no TensorFlow."""
    from f2d_jax.data.features import image_input, load_feature_models, vae_moments
    from f2d_jax.faces import expression_input, msid_input

    images = tmp_path / "images"
    for name in ("biden.jpg", "obama.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes((FACES / name).read_bytes())
    save(images / "astronaut.png", skimage.data.astronaut())
    save(images / "flat.png", np.full((90, 90, 3), 200, np.uint8))
    out = tmp_path / "out"
    messages = []
    run = dict(cache_features=True, batch_size=3, chunk_photos=2, progress=False, log=messages.append)
    # Interrupted just before the dataset is marked finished; the re-run reuses every chunk's features.
    write_json = prepare_module._write_json
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "_write_json", lambda path, value: (
            (_ for _ in ()).throw(KeyboardInterrupt) if path.name == INFO_FILE else write_json(path, value)))
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset(images, out, tiny(holdout=1), **run)
    assert sorted(p.name for p in (out / ".work").glob("features_*.npz")) == ["features_00000.npz",
                                                                              "features_00001.npz"]
    assert any("weights.sd is empty" in m for m in messages)
    assert any("weights.msid and config.weights.expression are empty" in m for m in messages)
    with monkeypatch.context() as patch:
        patch.setattr("f2d_jax.data.features.load_feature_models", lambda *args, **kwargs: 1 / 0)
        report = prepare_dataset(images, out, tiny(holdout=1), **run)
    assert report["examples"] == {"train": 4, "holdout": 2} and report["photos_reused"] == 4
    info = read_info(out)
    assert info["features_cached"] and info["identity_dim"] == 128 and info["latent_shape"] == [8, 8, 8]
    assert info["features"]["weights"] == {"sd": "", "msid": "", "expression": ""} and info["features"]["seed"] == 0
    assert info["features"]["msid"]["width"] == 32

    splits = [open_prepared(out, split) for split in ("holdout", "train")]
    batch = {k: np.concatenate([s.get(range(len(s)))[k] for s in splits]) for k in splits[0].fields}
    assert list(batch["name"]) == ["astronaut.png", "astronaut.png#flip", "biden.jpg", "biden.jpg#flip",
                                   "obama.jpg", "obama.jpg#flip"]
    for field, shape in {"identity": (6, 128), "expression": (6, 64), "latent_moments": (6, 8, 8, 8)}.items():
        assert batch[field].shape == shape and batch[field].dtype == np.float32, field

    models = load_feature_models(tiny(), log=lambda message: None)
    encoders, variables = models.encoders, models.variables
    identity = jax.jit(encoders.identity_features)(variables, msid_input(batch["face"]))
    expression = jax.jit(encoders.expression_codes)(variables, expression_input(batch["expression_face"]))
    moments = jax.jit(lambda p, x: vae_moments(models.vae, p, x))(models.vae_params, image_input(batch["image"]))
    np.testing.assert_allclose(batch["identity"], identity, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(batch["expression"], expression, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(batch["latent_moments"], moments, atol=2e-5, rtol=1e-5)
    assert np.std(batch["identity"], axis=0).mean() > 1e-3  # per-example values, not a constant
    # The VAE's input is the image in [-1, 1]; the moments are its posterior's mean | logvar.
    assert image_input(np.array([[0, 255]], np.uint8)).tolist() == [[-1.0, 1.0]]
    posterior = models.vae.apply(models.vae_params, jnp.transpose(image_input(batch["image"][:2]), (0, 3, 1, 2)),
                                 method=models.vae.encode)
    np.testing.assert_allclose(batch["latent_moments"][:2, ..., :4], posterior.mean, atol=2e-5)
    np.testing.assert_allclose(batch["latent_moments"][:2, ..., 4:], posterior.logvar, atol=2e-5)

    # Reading cached features decodes no PNG.
    def fail(self, example):
        raise AssertionError("an image was decoded")

    with monkeypatch.context() as patch:
        patch.setattr(tfds.features.Image, "decode_example_np", fail)
        assert open_prepared(out, fields=list(FEATURE_FIELDS)).get([0, 3])["latent_moments"].shape == (2, 8, 8, 8)
        with pytest.raises(AssertionError, match="an image was decoded"):
            open_prepared(out, fields=["mask"]).get([0])

    # ... and needs no TensorFlow.
    code = ("import sys; from f2d_jax.data import open_prepared, latent_mask; "
            f"d = open_prepared({str(out)!r}, fields=['mask', 'identity', 'name']); b = d.get([0, 1]); "
            "assert latent_mask(b['mask']).shape == (2, 8, 8, 1) and b['identity'].shape == (2, 128); "
            "print(len(d), 'tensorflow' in sys.modules, 'diffusers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "False", "False"]


@pytest.mark.slow
def test_open_prepared_errors(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_prepared(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="f2d_faces.json is missing"):
        open_prepared(tmp_path)
    with pytest.raises(ValueError, match="no split 'test'.*train, holdout"):
        open_prepared(out, "test")
    with pytest.raises(ValueError, match="unknown field"):
        open_prepared(out, fields=["depth"])
    with pytest.raises(ValueError, match="features were not cached: prepare with --cache-features"):
        open_prepared(out, fields=["identity"])
    with pytest.raises(IndexError):
        open_prepared(out).get([10])


@pytest.mark.slow
def test_compatibility_problems(prepared):
    out, _ = prepared
    info = open_prepared(out).info
    assert compatibility_problems(info, tiny()) == []
    assert compatibility_problems(info, tiny(resolution=128, mask_source="files")) == [
        "resolution: dataset 64, config.data.resolution 128",
        "mask source: dataset 'landmarks', config.data.mask_source 'files'"]
    cached = dict(info, features_cached=True, features=feature_description(tiny()))
    config = tiny()
    config.model.msid.depth = 6
    assert compatibility_problems(cached, tiny()) == []
    assert [p.split(":")[0] for p in compatibility_problems(cached, config)] == ["cached features msid"]


def test_latent_mask():
    mask = np.zeros((2, 16, 16), np.uint8)
    mask[0, :8, :8] = 255
    mask[1, :4, :] = 255
    out = latent_mask(mask)
    assert out.shape == (2, 2, 2, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, ..., 0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(out[1, ..., 0], [[0.5, 0.5], [0, 0]])
    np.testing.assert_array_equal(latent_mask(mask[..., None], factor=4)[1, 0, :, 0], [1, 1, 1, 1])
    np.testing.assert_allclose(latent_mask(jnp.asarray(mask)), out)
    with pytest.raises(ValueError, match="divisible by 8"):
        latent_mask(np.zeros((12, 12), np.uint8))


@pytest.mark.slow
def test_mask_files(tmp_path, capsys):
    """Mask files follow the photo through the warp and the mirror (processed by 2 workers)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("obama.jpg", "sub/biden.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes((FACES / Path(name).name).read_bytes())
        height, width = load_image(images / name)[0].shape[:2]
        left = np.zeros((height, width, 3), np.uint8)
        left[:, : width // 2] = (0, 0, 7)         # any non-zero channel is head
        save(masks / Path(name).with_suffix(".png"), left)
    report = prepare_dataset(images, tmp_path / "out", tiny(mask_source="files", mask_dir=str(masks), holdout=0),
                             workers=2, progress=False)
    assert report["examples"] == {"train": 4}
    batch = open_prepared(tmp_path / "out").get(range(4))
    assert list(batch["name"]) == ["obama.jpg", "obama.jpg#flip", "sub/biden.jpg", "sub/biden.jpg#flip"]
    for name, mask, lm in zip(batch["name"], batch["mask"][..., 0] > 0, batch["landmarks"]):
        columns = mask.mean(axis=0)
        # The photo's left half is head: in the image, the left side (the right side for mirrors).
        head_side = columns[R // 2:] if name.endswith("#flip") else columns[:R // 2]
        other_side = columns[:R // 2] if name.endswith("#flip") else columns[R // 2:]
        assert head_side.mean() > 0.4 and other_side.mean() < 0.1, name
    # Exactly the warp of the file with the photo's own alignment.
    rgb = load_image(images / "sub/biden.jpg")[0]
    affine = training_affine(align_face(np.ascontiguousarray(rgb[:, ::-1])).landmarks, R)
    expected = warp_mask(load_mask_file(masks / "sub/biden.png")[:, ::-1], affine, R)
    np.testing.assert_array_equal(batch["mask"][3, ..., 0], expected)

    (masks / "obama.png").unlink()
    capsys.readouterr()
    args = ["--images", str(images), "--out", str(tmp_path / "out2"), "--config", TINY, "--no-progress",
            "--config.data.mask_source=files", f"--config.data.mask_dir={masks}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: mask file not found: {masks / 'obama.png'}\n"


def _five_photos(root: Path) -> Path:
    """a, b (chunk 0), c, d = no face (chunk 1), e (chunk 2) with chunks of 2 photos."""
    root.mkdir(parents=True, exist_ok=True)
    for letter, source in zip("abce", ("obama.jpg", "biden.jpg", "obama2.jpg", "obama3.jpg")):
        (root / f"{letter}.jpg").write_bytes((FACES / source).read_bytes())
    save(root / "d.png", np.full((90, 90, 3), 200, np.uint8))
    return root


def test_resume_refuse_and_overwrite(tmp_path, monkeypatch):
    images = _five_photos(tmp_path / "images")
    out = tmp_path / "out"
    config = tiny(flip=False, holdout=1)
    run = dict(chunk_photos=2, progress=False)

    # 1. Interrupted after the first chunk.
    save_chunk = prepare_module._save_chunk
    def save_then_stop(path, *args):
        if path.name != "photos_00000.npz":
            raise KeyboardInterrupt
        save_chunk(path, *args)
    monkeypatch.setattr(prepare_module, "_save_chunk", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(images, out, config, **run)
    monkeypatch.setattr(prepare_module, "_save_chunk", save_chunk)
    assert sorted(p.name for p in (out / ".work").iterdir()) == ["options.json", "photos_00000.npz"]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_prepared(out)

    # 2. Other options: refused, saying what differs.
    with pytest.raises(PrepareError, match=r"resolution 64 before, 128 now.*--overwrite"):
        prepare_dataset(images, out, tiny(flip=False, holdout=1, resolution=128), **run)

    # 3. Resumed, then interrupted after tfds but before the JSON that marks the dataset finished.
    calls = []
    def counting_align(image, **kwargs):
        calls.append(image.shape)
        return align_face(image, **kwargs)
    monkeypatch.setattr(examples_module, "align_face", counting_align)
    write_json = prepare_module._write_json
    def no_info(path, value):
        if path.name == INFO_FILE:
            raise KeyboardInterrupt
        write_json(path, value)
    monkeypatch.setattr(prepare_module, "_write_json", no_info)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(images, out, config, **run)
    assert len(calls) == 3  # c, d and e: a and b were not detected again
    assert (out / "f2d_faces" / "1.0.0" / "dataset_info.json").is_file() and not (out / INFO_FILE).exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_prepared(out)

    # 4. Resumed again: every chunk is reused.
    monkeypatch.setattr(prepare_module, "_write_json", write_json)
    report = prepare_dataset(images, out, config, **run)
    assert len(calls) == 3 and report["photos_reused"] == 5
    assert report["examples"] == {"train": 3, "holdout": 1} and report["skipped"]["no_face"] == ["d.png"]
    assert list(open_prepared(out).get(range(3))["name"]) == ["b.jpg", "c.jpg", "e.jpg"]
    assert not (out / ".work").exists()

    # 5. A finished dataset is refused, then replaced with --overwrite.
    with pytest.raises(PrepareError, match="already holds a finished dataset.*--overwrite"):
        prepare_dataset(images, out, config, **run)
    report = prepare_dataset(images, out, tiny(flip=False, holdout=0, resolution=32), overwrite=True, **run)
    assert len(calls) == 3 + 5 and report["examples"] == {"train": 4}
    assert open_prepared(out).get([0])["image"].shape == (1, 32, 32, 3)


def test_changed_photos_are_refused(tmp_path, monkeypatch):
    images = _five_photos(tmp_path / "images")
    out = tmp_path / "out"
    monkeypatch.setattr(prepare_module, "_save_chunk", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(images, out, tiny(flip=False), chunk_photos=2, progress=False)
    (images / "f.jpg").write_bytes((FACES / "obama.jpg").read_bytes())
    with pytest.raises(PrepareError, match=r"number of images changed \(5 before, 6 now\)"):
        prepare_dataset(images, out, tiny(flip=False), chunk_photos=2, progress=False)


def test_command_line(photos, tmp_path, capsys, monkeypatch):
    def run(*args):
        code = main(["--config", TINY, "--no-progress", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    images = tmp_path / "images"
    images.mkdir()
    (images / "obama.jpg").write_bytes((FACES / "obama.jpg").read_bytes())
    (images / "biden.jpg").write_bytes((FACES / "biden.jpg").read_bytes())
    save(images / "wall.png", np.full((80, 80, 3), 50, np.uint8))
    out = tmp_path / "out"

    code, stdout, err = run("--images", str(images), "--out", str(out), "--config.data.holdout=1")
    assert code == 0, err
    assert "examples written   train 2, holdout 2 (mirrors included: 2)" in stdout
    assert "skipped            1; no face 1 (wall.png)" in stdout
    assert json.loads((out / "prepare_report.json").read_text())["photos_found"] == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "walls").mkdir()
    save(tmp_path / "walls" / "wall.png", np.full((80, 80, 3), 50, np.uint8))
    (tmp_path / "walls" / "bad.bmp").write_bytes(b"BM nonsense")
    cases = [
        (["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")],
         f"error: images folder not found: {tmp_path / 'missing'}"),
        (["--images", str(empty), "--out", str(tmp_path / "o2")], f"error: no images under {empty}"),
        (["--images", str(tmp_path / "walls"), "--out", str(tmp_path / "o3")],
         "error: none of the 2 photos under"),
        (["--images", str(images), "--out", str(out)], f"error: {out} already holds a finished dataset"),
        (["--images", str(images), "--out", str(tmp_path / "o4"), "--config.data.holdout=5"],
         "error: only 2 photo(s) have a usable face and config.data.holdout=5"),
        (["--images", str(images), "--out", str(tmp_path / "o5"), "--config.data.resolution=60"],
         "error: data.resolution=60: it must be a positive multiple of 8"),
        (["--images", str(images), "--out", str(tmp_path / "o6"), "--config.data.nothing=1"],
         "error: --config.data.nothing: data has no field 'nothing'"),
    ]
    for args, message in cases:
        code, stdout, err = run(*args)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, (args, err)
    assert "(no face: 1, unreadable: 1)" in run("--images", str(tmp_path / "walls"), "--out", str(tmp_path / "o3"))[2]

    monkeypatch.setitem(sys.modules, "tensorflow", None)
    code, _, err = run("--images", str(images), "--out", str(tmp_path / "o7"))
    assert code == 2 and err.count("\n") == 1 and "pip install 'f2d-jax[data]'" in err

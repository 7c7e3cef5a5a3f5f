"""Tests for f2d_jax.faces: image loading, landmark detection and the two aligned crops."""

import functools
import importlib.util
import pathlib
import re
import sys
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from f2d_jax.faces import (
    ARCFACE_TEMPLATE_112,
    AlignedFace,
    DlibLandmarkDetector,
    NoFaceError,
    align_face,
    default_detector,
    expression_crop,
    expression_input,
    five_points,
    load_image,
    msid_input,
    similarity_matrix,
    warp_to_template,
)
from f2d_jax.faces import detect as detect_module
from f2d_jax.faces.align import LM3D_STD

DATA = pathlib.Path(__file__).parent / "data" / "faces"
PHOTOS = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face.jpg"]

# Measured on the photos above (see test_arcface_alignment): the 5-point similarity fit
# leaves 3.3-7.7 px residuals in the 112 px crop (a smiling mouth is wider than the template,
# heads are turned), so "within 2 px" holds only for points that are exactly a similarity
# image of the template (test_similarity_matrix_exact). 9 px bounds the real-photo residuals.
MAX_ARCFACE_RESIDUAL_PX = 9.0
# Measured: the 5 points land 2-26 px (nose tip of the tilted obama3 head) from where a
# frontal mean face would put them; 30 px still catches any sign or scale mistake (~100 px).
MAX_FRONTAL_EXPRESSION_PX = 30.0


@functools.cache
def aligned(name: str) -> AlignedFace:
    """Detection is the slow part, so each photo is aligned once per test session."""
    return align_face(DATA / name)


@functools.cache
def rgb(name: str) -> np.ndarray:
    return load_image(DATA / name)[0]


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ matrix.T
    return p[:, :2] / p[:, 2:]


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity x' = a x - b y + tx, y' = b x + a y + ty, solved linearly."""
    a = np.zeros((2 * len(src), 4))
    a[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(len(src)), np.zeros(len(src))]
    a[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(len(src)), np.ones(len(src))]
    k = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)[0]
    return np.array([[k[0], -k[1], k[2]], [k[1], k[0], k[3]], [0, 0, 1]])


def deep3d_points(lm: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's 5 points (eye = mean of its two corners), image coordinates."""
    return np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]])


def expression_frame(image_shape, lm):
    """Re-derives the expression crop geometry: (crop coords of the 5 points, s, (left, up))."""
    height, width = image_shape[:2]
    p = deep3d_points(lm)
    flipped = np.c_[p[:, 0], height - 1 - p[:, 1]]
    # Scaled orthographic fit of the mean 3D face, solved independently as x = P X + t.
    x = np.c_[LM3D_STD, np.ones(5)]
    sol = np.linalg.lstsq(x, flipped, rcond=None)[0]  # (4, 2): P^T stacked over t
    s = 102.0 / ((np.linalg.norm(sol[:3, 0]) + np.linalg.norm(sol[:3, 1])) / 2)
    t = sol[3]
    w, h = int(width * s), int(height * s)
    left = int(w / 2 - 112 + (t[0] - width / 2) * s)
    up = int(h / 2 - 112 + (height / 2 - t[1]) * s)
    in_crop = np.c_[p[:, 0] * w / width - left, p[:, 1] * h / height - up]
    return in_crop, s, (w, h, left, up)


# --- real photos -------------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_arcface_alignment(name):
    face = aligned(name)
    image = rgb(name)
    assert face.source == str(DATA / name)
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float64
    assert face.matrix.shape == (3, 3)
    # Landmarks are a plausible face inside (or for the partial face, at the edge of) the photo.
    size = face.landmarks.max(axis=0) - face.landmarks.min(axis=0)
    assert 50 < size.min() < 400, size

    points = five_points(face.landmarks)
    mapped = apply(face.matrix, points)
    residual = np.linalg.norm(mapped - ARCFACE_TEMPLATE_112, axis=1)
    print(f"{name}: ArcFace 5-point residuals (px) {np.round(residual, 2)}")
    assert residual.max() < MAX_ARCFACE_RESIDUAL_PX
    # The matrix is the least-squares optimum: same as an independent linear solve.
    np.testing.assert_allclose(
        face.matrix, lstsq_similarity(points, ARCFACE_TEMPLATE_112.astype(np.float64)),
        atol=1e-6, rtol=1e-6,
    )

    assert face.crop.shape == (112, 112, 3) and face.crop.dtype == np.uint8
    expected = cv2.warpPerspective(image, face.matrix, (112, 112), flags=cv2.INTER_AREA)
    np.testing.assert_array_equal(face.crop, expected)
    # Independent check of the warp direction: sample the photo where each crop pixel comes from.
    grid = np.stack(np.meshgrid(np.arange(112.0), np.arange(112.0)), axis=-1).reshape(-1, 2)
    src = apply(np.linalg.inv(face.matrix), grid).reshape(112, 112, 2).astype(np.float32)
    sampled = cv2.remap(image, src[..., 0], src[..., 1], cv2.INTER_LINEAR)
    assert np.abs(sampled.astype(float) - face.crop).mean() < 0.5


@pytest.mark.parametrize("name", PHOTOS)
def test_expression_crop_geometry(name):
    face = aligned(name)
    image = rgb(name)
    crop = face.expression_crop
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8

    in_crop, s, (w, h, left, up) = expression_frame(image.shape, face.landmarks)
    # The fit maps the mean face's (X, Y) to 112 + 102 * (X, -Y) for a frontal head.
    frontal = np.c_[112 + 102 * LM3D_STD[:, 0], 112 - 102 * LM3D_STD[:, 1]]
    distance = np.linalg.norm(in_crop - frontal, axis=1)
    print(f"{name}: expression 5 points vs frontal mean face (px) {np.round(distance, 1)}")
    assert distance.max() < MAX_FRONTAL_EXPRESSION_PX
    # Rotation-free check: refitting the mean face to the points inside the crop gives the
    # method's fixed scale (102 px per unit) and puts the fitted centre at (112, 112 - s): the
    # method flips y with H - 1 but centres with H / 2, a 1 px source shift. Integer truncation
    # of w, h, left and up adds up to ~1.5 px (measured: at most 1.0 px).
    flipped = np.c_[in_crop[:, 0], 223 - in_crop[:, 1]]
    sol = np.linalg.lstsq(np.c_[LM3D_STD, np.ones(5)], flipped, rcond=None)[0]
    scale = (np.linalg.norm(sol[:3, 0]) + np.linalg.norm(sol[:3, 1])) / 2
    assert abs(scale / 102 - 1) < 0.01, scale
    centre = np.array([sol[3, 0], 223 - sol[3, 1]])
    centre_error = np.abs(centre - [112, 112 - s]).max()
    print(f"{name}: expression crop centre error {centre_error:.2f} px (s = {s:.3f})")
    assert centre_error < 1.5, centre

    # The pixels are the photo scaled by (w/W, h/H) and shifted by (left, up), black outside:
    # an independent OpenCV resampling agrees to < 1.5 grey levels on average (1 px off: > 4).
    sx, sy = w / image.shape[1], h / image.shape[0]
    affine = np.array([[sx, 0, 0.5 * (sx - 1) - left], [0, sy, 0.5 * (sy - 1) - up]])
    flags = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    reference = cv2.warpAffine(image, affine, (224, 224), flags=flags)
    assert np.abs(reference.astype(float) - crop).mean() < 1.5


def test_expression_crop_exact_integer_math():
    """Landmarks that are exactly the mean face seen frontally at 40 px per unit.

    Deep3DFaceRecon's arithmetic by hand: s = 102 / 40 = 2.55; w = int(201 * 2.55) = 512;
    h = int(299 * 2.55) = 762; left = int(256 - 112 + (41.8 - 100.5) * 2.55) = int(-5.685) = -5
    (truncated towards zero, not floored); up = int(381 - 112 + (149.5 - 240) * 2.55) = 38.
    """
    height, width = 299, 201
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    points_up = 40 * LM3D_STD[:, :2] + [41.8, 240.0]  # y-up frame of the method
    points = np.c_[points_up[:, 0], height - 1 - points_up[:, 1]]
    lm = np.full((68, 2), 100.0)
    lm[[36, 39]], lm[[42, 45]], lm[30], lm[48], lm[54] = points
    expected = Image.fromarray(image).resize((512, 762), Image.Resampling.BICUBIC)
    expected = np.asarray(expected.crop((-5, 38, 219, 262)))
    np.testing.assert_array_equal(expression_crop(image, lm), expected)
    assert (expected[:, :5] == 0).all()  # left of the photo is black


def test_no_face(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((200, 300, 3), 128, np.uint8)).save(path)
    with pytest.raises(NoFaceError, match="no face found in " + re.escape(str(path))):
        align_face(path)
    noise = np.random.default_rng(1).integers(0, 256, (120, 160), dtype=np.uint8)
    with pytest.raises(NoFaceError, match=r"<array 120x160>"):
        align_face(noise)
    assert issubclass(NoFaceError, ValueError)


def face_patch(name: str, side: int) -> np.ndarray:
    """A square cut around the detected face of a test photo, resized to side x side."""
    lm = aligned(name).landmarks
    centre, radius = (lm.min(0) + lm.max(0)) / 2, (lm.max(0) - lm.min(0)).max()
    x0, y0 = (centre - radius).astype(int)
    x1, y1 = (centre + radius).astype(int)
    return cv2.resize(rgb(name)[y0:y1, x0:x1], (side, side), interpolation=cv2.INTER_AREA)


def test_several_faces_uses_largest():
    canvas = np.full((360, 560, 3), 128, np.uint8)
    canvas[150:270, 380:500] = face_patch("biden.jpg", 120)
    canvas[20:260, 20:260] = face_patch("obama.jpg", 240)
    with pytest.warns(UserWarning, match=r"2 faces found in <array 360x560x3>; using the largest"):
        face = align_face(canvas)
    assert (face.landmarks.min(0) > 20).all() and (face.landmarks.max(0) < 260).all()


def test_largest_face_not_just_first():
    small = aligned("obama.jpg").landmarks * 0.5
    large = aligned("obama.jpg").landmarks
    with pytest.warns(UserWarning, match="3 faces found"):
        face = align_face(rgb("obama.jpg"), detector=lambda image: [small, small + 1, large])
    np.testing.assert_array_equal(face.landmarks, large)


@pytest.mark.parametrize(
    "orientation, stored_rotation",
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
    ids=["orientation6", "orientation8"],
)
def test_exif_orientation(tmp_path, orientation, stored_rotation):
    # Pixel data stored sideways, with the tag telling viewers how to turn it upright.
    upright = Image.fromarray(rgb("obama.jpg"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "sideways.png"
    upright.transpose(stored_rotation).save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == upright.size[::-1]

    face = align_face(path)
    reference = aligned("obama.jpg")
    np.testing.assert_array_equal(face.landmarks, reference.landmarks)
    np.testing.assert_array_equal(face.crop, reference.crop)
    np.testing.assert_array_equal(face.expression_crop, reference.expression_crop)


@pytest.mark.parametrize("mode, suffix", [("L", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"),
                                          ("I;16", ".png"), ("P", ".png")])
def test_other_modes_load_and_align(tmp_path, mode, suffix):
    image = Image.fromarray(rgb("obama.jpg"))
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    else:
        converted = image.convert(mode)
    assert converted.mode == mode
    path = tmp_path / f"photo{suffix}"
    converted.save(path, quality=95)
    loaded, name = load_image(path)
    assert loaded.shape == rgb("obama.jpg").shape and loaded.dtype == np.uint8
    assert name == str(path)
    face = align_face(path)
    reference = aligned("obama.jpg")
    assert np.abs(face.landmarks - reference.landmarks).max() < 4
    if mode in ("L", "I;16"):
        gray = np.asarray(image.convert("L"))
        np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))
    elif mode == "RGBA":
        np.testing.assert_array_equal(face.crop, reference.crop)
    elif mode == "CMYK":  # lossy JPEG round trip; measured 4.9 grey levels
        assert np.abs(face.crop.astype(float) - reference.crop).mean() < 8


def test_load_image_arrays():
    image = rgb("biden.jpg")
    out, name = load_image(image)
    np.testing.assert_array_equal(out, image)
    assert name == "<array 640x282x3>"
    rgba = np.concatenate([image, np.zeros_like(image[..., :1])], axis=2)
    np.testing.assert_array_equal(load_image(rgba)[0], image)
    gray = image[..., 0]
    for array in (gray, gray[..., None]):
        out, _ = load_image(array)
        assert out.shape == image.shape
        np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("bad", [
    np.zeros((32, 32, 3), np.float32),
    np.zeros((32, 32, 3), np.uint16),
    np.zeros((32, 32, 2), np.uint8),
    np.zeros((32, 32, 5), np.uint8),
    np.zeros((2, 32, 32, 3), np.uint8),
    np.zeros((32,), np.uint8),
    np.zeros((0, 32, 3), np.uint8),
])
def test_load_image_bad_arrays(bad):
    with pytest.raises(ValueError, match=r"expected a uint8 array of shape \(H, W\), \(H, W, 1\)"):
        load_image(bad)


def test_load_image_bad_files(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_image(missing)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image " + re.escape(str(junk))):
        load_image(str(junk))
    with pytest.raises(TypeError):
        load_image(Image.new("RGB", (8, 8)))


def test_landmarks_skip_detection():
    def must_not_run(image):
        raise AssertionError("detector called although landmarks were given")

    reference = aligned("obama2.jpg")
    face = align_face(DATA / "obama2.jpg", landmarks=reference.landmarks, detector=must_not_run)
    np.testing.assert_array_equal(face.crop, reference.crop)
    np.testing.assert_array_equal(face.expression_crop, reference.expression_crop)
    np.testing.assert_array_equal(face.matrix, reference.matrix)
    with pytest.raises(ValueError, match=r"shape \(68, 2\)"):
        align_face(DATA / "obama2.jpg", landmarks=reference.landmarks[:5], detector=must_not_run)


def test_custom_detector_is_used():
    calls = []
    lm = aligned("obama3.jpg").landmarks

    def detector(image):
        calls.append(image)
        return [lm]

    face = align_face(DATA / "obama3.jpg", detector=detector)
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], rgb("obama3.jpg"))
    np.testing.assert_array_equal(face.crop, aligned("obama3.jpg").crop)
    with pytest.raises(ValueError, match=r"detector output must have shape \(68, 2\)"):
        align_face(rgb("obama3.jpg"), detector=lambda image: [lm[:10]])


def test_downscaled_detection_matches():
    # Detecting on a 320 px copy must give (nearly) the full-resolution landmarks.
    image = rgb("obama.jpg")
    (lm,) = DlibLandmarkDetector(max_detect_side=320)(image)
    assert np.abs(lm - aligned("obama.jpg").landmarks).max() < 4
    assert default_detector() is default_detector()


def test_missing_backend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail
    with pytest.raises(ImportError, match=r"pip install 'f2d-jax\[faces\]'"):
        detect_module._dlib_models.__wrapped__()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'f2d-jax\[faces\]'"):
        detect_module.predictor_model_path()


# --- pure functions ----------------------------------------------------------------------


def test_five_points_order():
    lm = np.arange(136, dtype=np.float64).reshape(68, 2)
    expected = [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]
    np.testing.assert_array_equal(five_points(lm), np.array(expected))
    with pytest.raises(ValueError):
        five_points(lm[:67])


def test_similarity_matrix_exact():
    # Points that are an exact similarity image of the template map back onto it.
    angle, scale, shift = 0.3, 2.5, np.array([140.0, 60.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE_112 @ (scale * rotation).T + shift
    matrix = similarity_matrix(points)
    assert matrix.shape == (3, 3) and matrix.dtype == np.float64
    assert np.abs(apply(matrix, points) - ARCFACE_TEMPLATE_112).max() < 1e-4
    np.testing.assert_allclose(matrix[:2, :2], rotation.T / scale, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scikit-image deprecation warnings
        similarity_matrix(points)


def test_warp_to_template():
    image = np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    shift = np.array([[1, 0, -30], [0, 1, -40], [0, 0, 1]], np.float64)
    out = warp_to_template(image, shift)
    assert out.dtype == np.uint8 and out.shape == (112, 112, 3)
    np.testing.assert_array_equal(out, image[40:152, 30:142])
    assert warp_to_template(image, shift, size=64).shape == (64, 64, 3)


def test_model_inputs():
    crops = np.array([0, 255], np.uint8)[:, None, None, None] * np.ones((2, 112, 112, 3), np.uint8)
    x = msid_input(crops)
    assert x.dtype == np.float32 and x.shape == (2, 112, 112, 3)
    assert x[0].min() == -1 and x[1].max() == 1
    x = msid_input(np.full((112, 112, 3), 128, np.uint8))
    np.testing.assert_allclose(x, (128 / 255 - 0.5) / 0.5, atol=1e-6)
    y = expression_input(aligned("obama.jpg").expression_crop)
    assert y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    np.testing.assert_allclose(y * 255, aligned("obama.jpg").expression_crop, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        msid_input(np.zeros((112, 112, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(\.\.\., 224, 224, 3\)"):
        expression_input(np.zeros((112, 112, 3), np.uint8))

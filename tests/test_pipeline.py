"""F2DPipeline and sample.py on tiny random models; the JAX images against diffusers' PyTorch pipeline."""
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from f2d_jax.cli import sample
from f2d_jax.config import load_config
from f2d_jax.convert import save_mapping, save_msid
from f2d_jax.encoders import Encoders
from f2d_jax.faces import NoFaceError, align_face
from f2d_jax import InputWarning
from f2d_jax.sampling import F2DPipeline, NonFiniteImagesError, WeightsError
from f2d_jax.text import PromptError, identifier_prompts, token_ids

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
FACE = str(resources.files("f2d_jax").joinpath("assets/face.jpg"))


@pytest.fixture(scope="module")
def pipe():
    return F2DPipeline.from_config(TINY)


@pytest.fixture(scope="module")
def face():
    return align_face(FACE)


def assert_same_pictures(a, b):
    """The same pictures up to float32 rounding of other batch shapes (1/255)."""
    np.testing.assert_allclose(a.astype(int), b.astype(int), atol=1)


@pytest.mark.slow
def test_generates_images_and_reuses_the_compiled_program(pipe, face):
    images = pipe(face, "a photo of f l", num_images=2, steps=3, height=64, width=64, scheduler="ddim",
                  progress=False)
    assert len(images) == 2 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    compiled = pipe.programs.generate._cache_size()
    again = pipe.generate(face, "a photo of f l", num_images=2, steps=3, height=64, width=64, scheduler="ddim",
                          seed=1, guidance_scale=3.0, progress=False)
    assert pipe.programs.generate._cache_size() == compiled  # new seed and guidance: same program
    assert not np.array_equal(again, np.stack([np.asarray(im) for im in images]))


@pytest.mark.slow
def test_several_prompts_photos_and_an_expression(pipe, face, monkeypatch):
    prompts = ["a photo of f l", "f l eating bread in front of the Eiffel Tower"]
    embeddings = pipe.encode_prompt(face, prompts)["context"]
    tiny = pipe  # its expression encoder given explicitly (from_config loads one only with weights)
    random_expression = pipe.models.encoders.init(jax.random.key(2), ("expression",))
    pipe = F2DPipeline(pipe.models, {**pipe.variables, **random_expression}, pipe.config)
    assert embeddings.shape == (2, 77, 32)
    # Several photos of one person: their identity features are averaged.
    flipped = align_face(np.ascontiguousarray(np.asarray(Image.open(FACE).convert("RGB"))[:, ::-1]))
    both = pipe.identity([face, flipped])
    np.testing.assert_allclose(both, (pipe.identity(face) + pipe.identity(flipped)) / 2, atol=1e-5)
    # An expression photo's code replaces null_exp (a random tiny expression encoder's code is ~0,
    # as null_exp is at init, so the check also feeds a code of ones).
    code = pipe.expression(flipped)
    assert code.shape == (1, 64)
    ids, positions = identifier_prompts(prompts, pipe.tokenizer)
    encoders, variables = pipe.models.encoders, pipe.variables
    for expression in (code, jnp.ones((1, 64))):
        monkeypatch.setattr(pipe, "expression", lambda image: expression)
        tokens = encoders.identity_tokens(variables, jnp.repeat(pipe.identity(face), 2, 0), jnp.repeat(expression, 2, 0))
        np.testing.assert_allclose(pipe.encode_prompt(face, prompts, expression_image=flipped)["context"],
                                   encoders.prompt_embeddings(variables, ids, positions, tokens)["context"], atol=1e-5)
    assert not np.allclose(pipe.encode_prompt(face, prompts, expression_image=flipped)["context"], embeddings,
                           atol=1e-3)
    images = tiny.generate([face, flipped], prompts, num_images=3, steps=2, height=64, width=64, progress=False)
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("config", ["tiny", "tiny_sdxl"])
@pytest.mark.slow
def test_identity_scale_moves_the_tokens_from_the_class_words_to_the_person(pipe, face, config):
    """1: the conditioning as without the knob, bit for bit; 0: that of the prompt with "a person" for "f l"
    (only the identifier's "f l": the second prompt has another); 0.5: the tokens' midpoint. On SDXL each
    encoder's slice of the tokens moves toward that encoder's own class words. One program for every scale."""
    pipe = pipe if config == "tiny" else F2DPipeline.from_config(str(ROOT / "configs" / f"{config}.py"))
    prompts = ["a photo of f l", "f l surfing, drawn by f l"]
    ids, positions = identifier_prompts(prompts, pipe.tokenizer)
    encoders, variables = pipe.models.encoders, pipe.variables
    tokens = encoders.identity_tokens(variables, jnp.repeat(pipe.identity(face), 2, 0))

    def injected(v, identity, ids, positions):  # the conditioning without the knob
        tokens = encoders.identity_tokens(v, jnp.broadcast_to(identity, (ids.shape[0], identity.shape[-1])))
        return encoders.prompt_embeddings(v, ids, positions, tokens)

    compiled = pipe.programs.condition._cache_size()
    at = {s: pipe.encode_prompt(face, prompts, identity_scale=s) for s in (0, 0.5, 1)}
    assert pipe.programs.condition._cache_size() <= compiled + 1  # one program (at most) for the three scales
    person = jax.jit(injected)(variables, pipe.identity(face), ids, positions)
    classes = pipe.programs.embed(variables, token_ids(["a photo of a person", "a person surfing, drawn by f l"],
                                                       pipe.tokenizer))
    midpoint = (encoders.class_tokens(variables, ids, positions, pipe.class_ids) + tokens) / 2
    halfway = encoders.prompt_embeddings(variables, ids, positions, midpoint)
    assert set(at[1]) == set(person) == ({"context", "text_embeds"} if config == "tiny_sdxl" else {"context"})
    for key in person:
        np.testing.assert_array_equal(at[1][key], person[key])
        np.testing.assert_allclose(at[0][key], classes[key], rtol=0, atol=1e-6)  # measured: equal
        np.testing.assert_allclose(at[0.5][key], halfway[key], rtol=0, atol=1e-5)
        assert not np.allclose(at[0][key], at[1][key], atol=0.1)


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf")])
@pytest.mark.slow
def test_identity_scale_must_be_finite_and_not_negative(pipe, face, scale):
    with pytest.raises(ValueError, match=f"the identity scale must be a finite number of at least 0 .*, got {scale}"):
        pipe.encode_prompt(face, "a photo of f l", identity_scale=scale)


@pytest.mark.slow
def test_identity_scale_above_one_extrapolates_with_a_warning(pipe, face):
    with pytest.warns(UserWarning, match="identity scale 1.5 > 1 extrapolates"):
        beyond = pipe.encode_prompt(face, "a photo of f l", identity_scale=1.5)["context"]
    person, middle = (pipe.encode_prompt(face, "a photo of f l", identity_scale=s)["context"] for s in (1, 0.5))
    assert not np.allclose(beyond, person, atol=1e-3) and not np.allclose(middle, person, atol=1e-3)


@pytest.mark.slow
def test_an_expression_photo_needs_expression_weights(pipe, face):
    """A random-init expression encoder's code means nothing: without weights.expression there is none."""
    assert "expression" not in pipe.variables
    with pytest.raises(WeightsError, match="expression_image needs the expression encoder's weights"):
        pipe.encode_prompt(face, "a photo of f l", expression_image=face)


@pytest.mark.slow
def test_an_image_depends_on_its_seed_not_on_its_batch(pipe, face):
    """Image j of a call is seed + j's image (Euler-A draws noise at every step, per image); up to float32
    rounding of other batch shapes (1/255)."""
    args = dict(steps=2, height=64, width=64, progress=False)
    batch = pipe.generate(face, ["a photo of f l", "f l surfing"], num_images=3, seed=5, **args)
    alone = pipe.generate(face, "f l surfing", num_images=1, seed=7, **args)
    assert_same_pictures(batch[5], alone[0])
    context = pipe.encode_prompt(face, ["f l surfing", "a photo of f l"])
    assert_same_pictures(pipe.sample(context, [7, 6], **args), batch[[5, 1]])
    assert not np.allclose(batch[5], batch[4], atol=8)
    with pytest.raises(ValueError, match="2 conditionings but 3 seeds"):
        pipe.sample(context, [1, 2, 3], **args)
    with pytest.raises(ValueError, match=r"seeds must be between 0 and 4294967295 \(2\^32 - 1\), got 1099511627776"):
        pipe.sample(context, [7, 2 ** 40], **args)  # not wrapped onto seed 0


@pytest.mark.slow
def test_the_batch_size_changes_neither_seeds_nor_pictures(pipe, face):
    """5 images in batches of 1, 3 (the last one padded) and 5; the batches of a call share one program."""
    args = dict(num_images=5, seed=11, steps=3, height=64, width=64, progress=False)
    whole = pipe.generate(face, "f l surfing", batch_size=5, **args)
    compiled = pipe.programs.generate._cache_size()
    assert_same_pictures(pipe.generate(face, "f l surfing", batch_size=3, **args), whole)
    assert pipe.programs.generate._cache_size() == compiled + 1
    assert_same_pictures(pipe.generate(face, "f l surfing", batch_size=1, **args), whole)
    assert_same_pictures(pipe.generate(face, "f l surfing", batch_size=100, **args), whole)  # one batch of 5


def test_given_latents_make_the_seed_irrelevant(pipe, face):
    latents = jax.random.normal(jax.random.key(3), (1, 4, 8, 8))
    a, b = (pipe.generate(face, "a photo of f l", num_images=1, steps=2, height=64, width=64, scheduler="ddim",
                          latents=latents, seed=s, progress=False) for s in (0, 1))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(height=60), ValueError, "height=60 is not possible: height and width must be positive multiples of 16"),
    (dict(width=100), ValueError, "width=100 is not possible"),
    (dict(prompt="a photo of a person"), PromptError, "the prompt has no identifier 'f l'"),
    (dict(prompt="a photo of " + "very " * 80 + "f l"), PromptError, "the identifier 'f l' is cut off"),
    (dict(scheduler="heun"), ValueError, "unknown scheduler 'heun'"),
    (dict(num_images=0), ValueError, "num_images must be at least 1"),
    (dict(steps=0), ValueError, "steps must be between 1 and 1000, got 0"),
    (dict(guidance_scale=float("nan")), ValueError, "the guidance scale must be a finite number, got nan"),
    (dict(guidance_scale=float("inf")), ValueError, "the guidance scale must be a finite number, got inf"),
    (dict(batch_size=0), ValueError, "the batch size must be at least 1, got 0"),
    (dict(seed=-1), ValueError, r"seeds must be between 0 and 4294967295 \(2\^32 - 1\), got -1"),
    (dict(seed=2 ** 40), ValueError, "seeds must be between 0 and 4294967295 .*, got 1099511627776"),
    (dict(seed=2 ** 32 - 1, num_images=2), ValueError, r"got 4294967295 to 4294967296 \(image j uses seed \+ j"),
    (dict(latents=np.zeros((2, 4, 8, 8))), ValueError, r"latents must have shape \(1, 4, 8, 8\)"),
])
@pytest.mark.slow
def test_bad_input_is_a_clear_error(pipe, face, kwargs, error, message):
    args = dict(image=face, prompt="a photo of f l", num_images=1, steps=2, height=64, width=64, progress=False)
    with pytest.raises(error, match=message):
        pipe.generate(**{**args, **kwargs})


@pytest.mark.slow
def test_non_finite_images_are_an_error_not_black_pictures(pipe):
    """NaN in the conditioning (as NaN weights or an overflowing dtype would give) reaches the latents."""
    context = np.zeros((3, 77, 32), np.float32)
    context[1] = np.nan
    with pytest.raises(NonFiniteImagesError, match=r"^images 1 \(seed 8\) came out NaN or infinite, so none was "
                                                   r"kept; check the weights"):
        pipe.sample(context, [7, 8, 9], steps=2, height=64, width=64, progress=False, batch_size=2)


def test_a_prompt_with_the_identifier_twice_is_a_warning():
    with pytest.warns(InputWarning, match="the prompt has the identifier 'f l' twice; only the first stands for "
                                          "the person, the second is read as the words f and l"):
        ids, positions = identifier_prompts("f l meets f l")
    assert positions.tolist() == [1]


@pytest.mark.slow
def test_no_face_names_the_file(pipe, tmp_path):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (200, 200), (90, 120, 150)).save(blank)
    with pytest.raises(NoFaceError, match="no face found in .*wall.png"):
        pipe.encode_prompt(str(blank), "a photo of f l")


def test_pretrained_needs_identity_weights(tmp_path):
    with pytest.raises(WeightsError, match="needs msid and mapping weights"):
        F2DPipeline.from_pretrained(sd=str(tmp_path))


# ----------------------------------------------------------------------------- sample.py

def run_sample(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *argv], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_sample_py_writes_a_grid_with_its_settings(tmp_path):
    out = tmp_path / "grid.png"
    result = run_sample("--config", TINY, "--image", FACE, "--prompt", "a photo of f l", "--prompt",
                        "f l on the moon", "-n", "2", "--seed", "3", "--steps", "2", "--batch-size", "3", "--out",
                        str(out),
                        "--out-dir", str(tmp_path / "single"), "--identity-scale", "1.5")
    assert result.returncode == 0, result.stderr
    assert "InputWarning: identity scale 1.5 > 1 extrapolates" in result.stderr
    grid = Image.open(out)
    assert grid.size == (2 * 64, 2 * 64)  # rows: prompts, columns: images
    settings = json.loads(grid.text["f2d_jax"])
    assert settings["prompts"] == ["a photo of f l", "f l on the moon"] and settings["steps"] == 2
    assert settings["scheduler"] == "euler_a" and settings["seeds"] == [3, 4] and settings["identity_scale"] == 1.5
    assert settings["config"] == TINY and settings["images"] == [FACE]
    assert grid.text["parameters"].startswith("a photo of f l | f l on the moon\n")
    assert grid.text["parameters"].endswith("Seed: 3-4, Size: 64x64, Identity scale: 1.5")
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [
        "p00_000.png", "p00_001.png", "p01_000.png", "p01_001.png"]
    for name, prompt, seed in [("p00_000", "a photo of f l", 3), ("p00_001", "a photo of f l", 4),
                               ("p01_000", "f l on the moon", 3), ("p01_001", "f l on the moon", 4)]:
        image = Image.open(tmp_path / "single" / f"{name}.png")  # the prompt and seed that make it again
        recorded = json.loads(image.text["f2d_jax"])
        assert (recorded["prompt"], recorded["seed"]) == (prompt, seed)
        assert image.text["parameters"].startswith(f"{prompt}\nNegative prompt: \nSteps: 2, Sampler: euler_a, CFG "
                                                   f"scale: 7.0, Seed: {seed}, Size: 64x64")


def sample_errors(capsys, argv) -> list[str]:
    """sample.py's stderr lines for a run that must end with a user error (status 2, one `error:` line)."""
    assert sample.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("error") for line in err) == 1 and not any("Traceback" in line for line in err), err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "a photo of a person"], "error: the prompt has no identifier 'f l'"),
    (["--height", "100"], "error: height=100 is not possible"),
    (["--width", "100"], "error: width=100 is not possible"),
    (["--image", "{wall}"], "error: no face found in "),
    (["--out", "grid.jpg"], "error: --out must be a .png file"),
    (["--out", "{file}/o.png"], "error: --out {file}/o.png cannot be written: {file} is a file, not a directory"),
    (["--out-dir", "{file}/single"], "error: --out-dir {file}/single cannot be written: {file} is a file"),
    (["--out", "{folder}"], "error: --out {folder} is a directory, not a file"),
    (["--guidance", "nan"], "error: the guidance scale must be a finite number, got nan"),
    (["--guidance", "inf"], "error: the guidance scale must be a finite number, got inf"),
    (["--steps", "0"], "error: steps must be between 1 and 1000, got 0"),
    (["--steps", "100000"], "error: steps must be between 1 and 1000, got 100000"),
    (["--scheduler", "heun"], "error: unknown scheduler 'heun': choose one of euler_a, euler, ddim, dpm++2m"),
    (["--batch-size", "0"], "error: the batch size must be at least 1, got 0"),
    (["-n", "0"], "error: num_images must be at least 1, got 0"),
    (["--seed", "-1"], "error: seeds must be between 0 and 4294967295 (2^32 - 1), got -1"),
    (["--seed", str(2 ** 40)], "error: seeds must be between 0 and 4294967295 (2^32 - 1), got 1099511627776"),
    (["--seed", "4294967295", "-n", "2"], "error: seeds must be between 0 and 4294967295 (2^32 - 1), got "
     "4294967295 to 4294967296 (image j uses seed + j, for 2 images)"),
    (["--identity-scale", "-1"], "error: the identity scale must be a finite number of at least 0 (0: the class "
     "'a person', 1: the person as trained), got -1.0"),
    (["--identity-scale", "nan"], "error: the identity scale must be a finite number of at least 0"),
    (["--expression-image", FACE], "error: --expression-image needs the expression encoder's weights: give "
     "--expression"),
    (["--height", "0"], "error: height=0 is not possible: height and width must be positive multiples of 16"),
    (["--height", "8"], "error: height=8 is not possible: height and width must be positive multiples of 16"),
    (["--width", "24"], "error: width=24 is not possible: height and width must be positive multiples of 16"),
    pytest.param(["--image", "{huge}"], "error: image {huge} is too large (400 megapixels): photos may have up to "
                 "179 megapixels; downscale it", marks=pytest.mark.slow),
])
def test_sample_py_checks_everything_before_loading_weights(tmp_path, capsys, monkeypatch, argv, message):
    """Each mistake is one line and status 2, found before any weights load: nothing is computed and lost."""
    monkeypatch.setattr(F2DPipeline, "load", classmethod(lambda *args, **kwargs: pytest.fail("weights loaded")))
    places = dict(wall=tmp_path / "wall.png", file=tmp_path / "file", folder=tmp_path / "d.png",
                  huge=tmp_path / "huge.png")
    Image.new("RGB", (120, 120), (200, 200, 200)).save(places["wall"])
    if "{huge}" in argv:  # 400 megapixels, 1.2 MB of PNG
        Image.new("RGB", (20000, 20000), (120, 120, 120)).save(places["huge"])
    places["file"].write_text("a file")
    places["folder"].mkdir()
    base = {"--config": TINY, "--image": FACE, "--prompt": "a photo of f l", "--out": str(tmp_path / "o.png"),
            "--steps": "1", "-n": "1"}
    merged = {**base, **{k: v.format(**places) for k, v in zip(argv[::2], argv[1::2])}}
    err = sample_errors(capsys, [x for item in merged.items() for x in item])
    assert err[-1].startswith(message.format(**places)), err


@pytest.mark.slow
def test_sample_py_refuses_non_finite_weights_naming_the_tensor(tmp_path, capsys):
    from f2d_jax.convert import io

    mapping = Encoders.from_config(load_config(TINY).model).init(jax.random.key(0), ("mapping",))["mapping"]
    state = save_mapping(mapping, tmp_path / "nan.safetensors") and io.read_state_dict(tmp_path / "nan.safetensors")
    state["i2t_first.fc_out.weight"][0, 0] = np.nan
    io.write_state_dict(state, tmp_path / "nan.safetensors")
    err = sample_errors(capsys, ["--config", TINY, "--mapping", str(tmp_path / "nan.safetensors"), "--image", FACE,
                                 "--prompt", "a photo of f l", "--out", str(tmp_path / "o.png")])
    assert err[-1] == (f"error: mapping weights {tmp_path / 'nan.safetensors'}: 1 tensor(s) hold NaN or infinite "
                       "values (i2t_first.fc_out.weight); these weights cannot be used: a run that diverged, or a "
                       "damaged file")
    assert not (tmp_path / "o.png").exists()


def test_sample_py_without_weights_says_which_to_give(tmp_path, capsys):
    err = sample_errors(capsys, ["--image", FACE, "--prompt", "a photo of f l", "--out", str(tmp_path / "o.png")])
    assert err[-1] == ("error: no weights: give --model DIR (a packaged model), --checkpoint WORKDIR (a training run), "
                       "--config NAME (e.g. tiny: random models, offline) or --msid and --mapping (the official "
                       "msid.pt and mapping.pt, with --sd)")


def test_sample_py_expression_weights_from_a_flag_or_the_config(tmp_path):
    argv = ["--image", FACE, "--prompt", "a photo of f l", "--out", "o.png", "--expression-image", FACE]
    sample.check(sample.parse_args([*argv, "--config", TINY, "--expression", "epoch_20.pth"]))
    config = tmp_path / "with_expression.py"
    config.write_text("from f2d_jax.configs import tiny\n\n\ndef get_config():\n    config = tiny.get_config()\n"
                      "    config.weights.expression = 'epoch_20.pth'\n    return config\n")
    sample.check(sample.parse_args([*argv, "--config", str(config)]))


def test_sample_py_missing_sd_directory_is_one_line(tmp_path, capsys):
    err = sample_errors(capsys, ["--msid", "missing/msid.pt", "--mapping", "missing/mapping.pt", "--sd",
                                 "./missing/sd", "--image", FACE, "--prompt", "a photo of f l", "--out",
                                 str(tmp_path / "o.png"), "--steps", "1", "-n", "1"])
    assert err[-1].startswith("error: no Stable Diffusion directory at missing/sd"), err


def test_sample_py_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    sampling = SimpleNamespace(config=load_config(TINY), generate=interrupt,
                               settings=lambda *args: (7.0, "euler_a", 64, 64))
    monkeypatch.setattr(F2DPipeline, "load", classmethod(lambda *args, **kwargs: sampling))
    argv = ["--config", TINY, "--image", FACE, "--prompt", "a photo of f l", "--out", str(tmp_path / "o.png")]
    assert sample.main(argv) == 130
    assert capsys.readouterr().err.strip() == "interrupted: nothing was written"


# ----------------------------------------------------------------------------- against diffusers (PyTorch)

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def assert_images_match(mine: np.ndarray, reference: np.ndarray, what: str, parity, minimum: float = 35.0) -> None:
    """Our uint8 images against a diffusers pipeline's float ones in [0, 1]: PSNR at least `minimum` dB, recorded
    with the largest difference (in 1/255)."""
    reference = np.round(reference * 255).astype(np.uint8)
    value = psnr(mine, reference)
    difference = np.abs(mine.astype(int) - reference.astype(int)).max() / 255
    parity(f"{what}, PSNR {value:.1f} dB (max diff / 255)", difference, 0.1)
    assert value >= minimum, f"PSNR {value:.1f} dB < {minimum} dB"


@pytest.fixture(scope="module")
def tiny_sd_pipelines(tmp_path_factory):
    """The same tiny random SD in diffusers format, loaded by F2DPipeline (JAX) and diffusers (PyTorch)."""
    import sd_fixtures

    root = tmp_path_factory.mktemp("f2d")
    tiny = sd_fixtures.write_tiny_sd(root / "sd", seed=0)
    encoders = Encoders.from_config(load_config(TINY).model)
    variables = encoders.init(jax.random.key(7), ("msid", "mapping"))
    save_msid(variables["msid"], root / "msid.safetensors")
    save_mapping(variables["mapping"], root / "mapping.safetensors")
    ours = F2DPipeline.from_pretrained(sd=str(tiny.path), msid=str(root / "msid.safetensors"),
                                       mapping=str(root / "mapping.safetensors"), config=TINY, dtype="float32")
    return ours, tiny.path


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
@pytest.mark.slow
def test_images_match_diffusers_pytorch(tiny_sd_pipelines, face, scheduler, parity):
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    ours, path = tiny_sd_pipelines
    theirs = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}
    theirs.scheduler = kind[scheduler].from_config(theirs.scheduler.config)
    prompts = ["a photo of f l", "f l eating bread in front of the Eiffel Tower"]
    latents = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 8, 8)))
    mine = ours.generate(face, prompts, num_images=1, steps=10, guidance_scale=7.0, scheduler=scheduler,
                         latents=latents, height=64, width=64, progress=False)
    context = np.asarray(ours.encode_prompt(face, prompts)["context"])
    uncond = np.asarray(ours.models.encoders.prompt_embeddings(ours.variables, jnp.asarray(
        token_ids(["", ""], ours.tokenizer)))["context"])
    with torch.no_grad():
        reference = theirs(prompt_embeds=torch.from_numpy(context), negative_prompt_embeds=torch.from_numpy(uncond),
                           latents=torch.from_numpy(latents), num_inference_steps=10, guidance_scale=7.0,
                           height=64, width=64, output_type="np").images
    assert_images_match(mine, reference, f"images vs diffusers, {scheduler} 10 steps", parity)


@pytest.mark.parametrize("msid, message", [
    ("nowhere.safetensors", "error: "),
    ("mapping.safetensors", "error: msid weights "),
])
@pytest.mark.slow
def test_sample_py_missing_or_wrong_weights(tiny_sd_pipelines, tmp_path, capsys, msid, message):
    _, path = tiny_sd_pipelines
    root = path.parent
    argv = ["--config", TINY, "--sd", str(path), "--msid", str(root / msid), "--mapping",
            str(root / "mapping.safetensors"), "--image", FACE, "--prompt", "a photo of f l", "--out",
            str(tmp_path / "o.png"), "--steps", "1", "-n", "1"]
    error = next(line for line in sample_errors(capsys, argv) if line.startswith("error"))
    assert error.startswith(message) and msid in error, error


@pytest.mark.slow
def test_euler_ancestral_steps_match_diffusers_with_the_same_noise(tiny_sd_pipelines, face, monkeypatch, parity):
    """UNet + guidance + the Euler-ancestral update, the noise we draw injected into diffusers."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    from f2d_jax.sampling import denoise, make_scheduler

    ours, path = tiny_sd_pipelines
    theirs = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = EulerAncestralDiscreteScheduler.from_config(theirs.scheduler.config)
    prompts = ["a photo of f l", "f l surfing"]
    context = ours.encode_prompt(face, prompts)
    uncond = ours.models.encoders.prompt_embeddings(ours.variables, jnp.asarray(token_ids(["", ""], ours.tokenizer)))
    latents = jax.random.normal(jax.random.key(0), (2, 4, 8, 8))
    keys, sd = jax.random.split(jax.random.key(5), 2), ours.models.sd  # one per image
    for steps in (1, 2):  # one step (its noise is drawn, sigma_up = 0 at the end) and two (noise injected once)
        scheduler = make_scheduler("euler_a", sd.scheduler_config, steps)
        mine = denoise(sd.unet, ours.variables["unet"], scheduler, latents, context, uncond, 7.0, keys)
        noise = iter([np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), (4, 8, 8)))(keys))
                      for i in range(steps)])
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                            lambda shape, **kwargs: torch.from_numpy(next(noise)))
        with torch.no_grad():
            reference = theirs(prompt_embeds=torch.from_numpy(np.asarray(context["context"])),
                               negative_prompt_embeds=torch.from_numpy(np.asarray(uncond["context"])),
                               latents=torch.from_numpy(np.asarray(latents)), num_inference_steps=steps,
                               guidance_scale=7.0, output_type="latent").images
        parity(f"Euler-ancestral guided step(s) vs diffusers, {steps} step(s), latents", float(
            np.abs(np.asarray(mine) - reference.numpy()).max()), 1e-4)

"""Face2Diffusion on FLUX.1: a FLUX folder loads as the base, the identity tokens split between CLIP's pooled vector
and T5's sequence, images against diffusers' FluxPipeline given our embeddings, and the tiny FLUX chain: train,
resume, 8 devices against one, sample, package."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flux_fixtures
from f2d_jax.config import load_config
from f2d_jax.convert import save_mapping, save_msid
from f2d_jax.encoders import Encoders
from f2d_jax.models.flux_bundle import load_flux
from f2d_jax.models.flux_latents import pack_latents
from f2d_jax.sampling import F2DPipeline

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "tiny_flux.py")
FACE = str(ROOT / "f2d_jax" / "assets" / "face.jpg")
PROMPTS = ["a photo of f l", "f l eating bread in front of the eiffel tower"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(F2DPipeline on a tiny PyTorch FLUX folder, diffusers' FluxPipeline of the same folder)."""
    from diffusers import FluxPipeline

    root = tmp_path_factory.mktemp("flux")
    flux_fixtures.write_tiny_flux(root / "flux", seed=3)
    encoders = Encoders.from_config(load_config(CONFIG).model, load_flux(root / "flux")[0].text_encoders)
    variables = encoders.init(jax.random.key(7), ("msid", "mapping"))
    save_msid(variables["msid"], root / "msid.safetensors")
    save_mapping(variables["mapping"], root / "mapping.safetensors")
    ours = F2DPipeline.from_pretrained(sd=str(root / "flux"), msid=str(root / "msid.safetensors"),
                                       mapping=str(root / "mapping.safetensors"), config=CONFIG, dtype="float32")
    return ours, FluxPipeline.from_pretrained(root / "flux")


def test_a_flux_folder_is_the_base(flux):
    ours, _ = flux
    base = ours.models.sd
    assert base.base == "flux" and base.guidance_embeds and base.max_sequence_length == 32
    assert (base.vae.latent_channels, base.vae.shift_factor, base.vae_scale_factor, base.size_multiple) == \
        (16, 0.1159, 8, 16)
    assert ours.defaults == dict(scheduler="euler", guidance_scale=3.5, height=64, width=64)


def test_the_tokens_split_between_clip_and_t5(flux):
    """The mapping network's 64-wide tokens: the first 32 go into CLIP (its pooled state), the other 32 into T5 at
    the tokens carrying "f" and "l" (its states)."""
    ours, _ = flux
    encoders, variables, base = ours.models.encoders, ours.variables, ours.models.sd
    ids, positions = base.prompt_ids(PROMPTS)
    tokens = jax.random.normal(jax.random.key(1), (2, 2, 64))
    out = encoders.prompt_embeddings(variables, ids, positions, tokens)
    assert out["context"].shape == (2, 32, 32) and out["pooled"].shape == (2, 32)
    _, pooled = encoders.text_encoder.apply(variables["text_encoder"], ids["text_encoder"], tokens[..., :32],
                                            positions["text_encoder"])
    states = encoders.text_encoder_2.apply(variables["text_encoder_2"], ids["text_encoder_2"], tokens[..., 32:],
                                           positions["text_encoder_2"])
    np.testing.assert_array_equal(out["pooled"], pooled)
    np.testing.assert_array_equal(out["context"], states)
    other = encoders.prompt_embeddings(variables, ids, positions, tokens.at[..., 32:].multiply(-1.0))
    np.testing.assert_array_equal(other["pooled"], out["pooled"])
    assert not np.allclose(other["context"], out["context"], atol=1e-3)


@pytest.mark.slow
def test_identity_scale_zero_is_the_class_prompt(flux):
    """Scale 0 writes what the encoders' inputs hold where "a person" stands: the conditioning of the prompt with
    "a person" in place of "f l", for CLIP and T5 alike."""
    ours, _ = flux
    scaled = ours.encode_prompt(FACE, "a photo of f l", identity_scale=0.0)
    person = ours.programs.embed(ours.variables, ours.models.sd.plain_ids(["a photo of a person"]))
    for key in ("context", "pooled"):
        np.testing.assert_allclose(scaled[key], person[key], atol=1e-5)


def test_flux_sampling_errors(flux):
    ours, _ = flux
    cond = ours.encode_prompt(FACE, "a photo of f l")
    with pytest.raises(ValueError, match=r"^scheduler 'ddim': FLUX.1 samples with the flow-matching Euler sampler"):
        ours.sample(cond, [0], steps=1, scheduler="ddim")
    with pytest.raises(ValueError, match=r"^FLUX.1 reads a negative prompt only with true classifier-free guidance: "
                                         r"give a true CFG scale above 1"):
        ours.sample(cond, [0], steps=1, negative_prompt="blurry")
    for scale in (0.5, float("nan")):
        with pytest.raises(ValueError, match=r"^the true classifier-free guidance scale must be a finite number of "
                                             r"at least 1 \(1: none\), got"):
            ours.sample(cond, [0], steps=1, true_cfg_scale=scale)
    with pytest.raises(ValueError, match=r"this FLUX model's conditioning has \['context', 'pooled'\], got"):
        ours.sample(cond["context"], [0], steps=1)
    with pytest.raises(ValueError, match=r"height=72 is not possible: .* multiples of 16"):
        ours.sample(cond, [0], steps=1, height=72)


@pytest.mark.slow
def test_images_match_diffusers_flux_pipeline_given_our_embeddings(flux, parity):
    import torch
    from test_pipeline import assert_images_match

    ours, theirs = flux
    latents = np.asarray(jax.random.normal(jax.random.key(0), (2, 16, 8, 8)))
    mine = ours.generate(FACE, PROMPTS, num_images=1, steps=6, latents=latents, progress=False)
    cond = ours.encode_prompt(FACE, PROMPTS)
    with torch.no_grad():
        reference = theirs(prompt_embeds=torch.from_numpy(np.asarray(cond["context"])),
                           pooled_prompt_embeds=torch.from_numpy(np.asarray(cond["pooled"])),
                           latents=torch.from_numpy(np.asarray(pack_latents(jnp.asarray(latents)))),
                           num_inference_steps=6, guidance_scale=3.5, height=64, width=64, output_type="np").images
    assert_images_match(mine, reference, "tiny FLUX images vs diffusers' FluxPipeline, 6 steps", parity)


@pytest.mark.slow
def test_schnell_samples_without_the_guidance_embedding_as_diffusers(tmp_path, parity):
    """The FLUX.1-schnell structure: no guidance embedding (its guidance default 0, unused) and the unshifted
    schedule; images from our embeddings against FluxPipeline's."""
    import torch
    from diffusers import FluxPipeline
    from test_pipeline import assert_images_match

    flux_fixtures.write_tiny_flux(tmp_path / "schnell", seed=4, schnell=True)
    ours = F2DPipeline.from_config(load_config(CONFIG, [f"weights.sd={tmp_path / 'schnell'}"]), dtype="float32",
                                   log=lambda msg: None)
    assert not ours.models.sd.guidance_embeds and ours.defaults["guidance_scale"] == 0.0
    latents = np.asarray(jax.random.normal(jax.random.key(3), (1, 16, 8, 8)))
    mine = ours.generate(FACE, PROMPTS[:1], num_images=1, steps=4, latents=latents, progress=False)
    cond = ours.encode_prompt(FACE, PROMPTS[:1])
    with torch.no_grad():
        reference = FluxPipeline.from_pretrained(tmp_path / "schnell")(
            prompt_embeds=torch.tensor(np.asarray(cond["context"])),
            pooled_prompt_embeds=torch.tensor(np.asarray(cond["pooled"])),
            latents=torch.tensor(np.asarray(pack_latents(jnp.asarray(latents)))), num_inference_steps=4,
            guidance_scale=0.0, height=64, width=64, output_type="np").images
    assert_images_match(mine, reference, "tiny FLUX schnell images vs FluxPipeline, 4 steps", parity)


@pytest.mark.slow
def test_true_classifier_free_guidance_matches_diffusers(flux, parity):
    """true_cfg_scale above 1 with a negative prompt: the velocity moves away from the negative prompt's, as
    FluxPipeline's true_cfg_scale; without a negative prompt, away from the empty prompt's."""
    import torch
    from test_pipeline import assert_images_match

    ours, theirs = flux
    latents = np.asarray(jax.random.normal(jax.random.key(2), (1, 16, 8, 8)))
    settings = dict(num_images=1, steps=4, latents=latents, progress=False, true_cfg_scale=4.0)
    mine = ours.generate(FACE, PROMPTS[:1], negative_prompt="a painting", **settings)
    cond = ours.encode_prompt(FACE, PROMPTS[:1])
    negative = ours.programs.embed(ours.variables, ours.models.sd.plain_ids(["a painting"]))
    embeds = dict(prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"],
                  negative_prompt_embeds=negative["context"], negative_pooled_prompt_embeds=negative["pooled"])
    with torch.no_grad():
        reference = theirs(**{k: torch.tensor(np.asarray(v)) for k, v in embeds.items()}, true_cfg_scale=4.0,
                           latents=torch.tensor(np.asarray(pack_latents(jnp.asarray(latents)))),
                           num_inference_steps=4, guidance_scale=3.5, height=64, width=64, output_type="np").images
    assert_images_match(mine, reference, "tiny FLUX images with true CFG 4 vs FluxPipeline, 4 steps", parity)
    plain = ours.generate(FACE, PROMPTS[:1], num_images=1, steps=4, latents=latents, progress=False)
    empty = ours.generate(FACE, PROMPTS[:1], negative_prompt="", **settings)
    np.testing.assert_array_equal(ours.generate(FACE, PROMPTS[:1], **settings), empty)
    assert np.abs(empty.astype(int) - plain.astype(int)).max() > 8


@pytest.mark.slow
def test_true_cfg_is_flux_only():
    pipe = F2DPipeline.from_config("tiny", dtype="float32", log=lambda msg: None)
    with pytest.raises(ValueError, match=r"^true_cfg_scale=2 is FLUX.1's; a Stable Diffusion base's classifier-free "
                                         r"guidance is the guidance scale"):
        pipe.generate(FACE, "a photo of f l", num_images=1, steps=1, true_cfg_scale=2.0, progress=False)


@pytest.mark.slow
def test_tiny_flux_trains_resumes_shards_samples_and_packages(tmp_path, capsys, parity):
    """Tiny FLUX: 2 + 2 resumed steps equal 4; 2 steps on a 4 x 2 mesh of 8 devices, the frozen transformer and
    encoders FSDP-sharded, equal 2 on one; the run samples, packages, and eval generate makes its images."""
    from test_bases import assert_generates, assert_packaged
    from test_train import _assert_close, _metrics, _train

    from f2d_jax.train.launch import run
    from f2d_jax.workdir import load_trained

    config = load_config(CONFIG, ["train.steps=4", "log.every=2", "log.sample_every=4", "checkpoint.every=2"])
    half = load_config(CONFIG, ["train.steps=2", "log.every=2", "log.sample_every=0", "checkpoint.every=2"])
    assert run(config, tmp_path / "whole") == 0
    assert run(half, tmp_path / "resumed") == 0 and run(config, tmp_path / "resumed") == 0
    assert "sd: tiny random-init FLUX.1 (weights.sd is empty)" in capsys.readouterr().err
    whole, resumed = (load_trained(tmp_path / name)[1] for name in ("whole", "resumed"))
    _assert_close(whole, resumed, atol=1e-6)
    metrics = _metrics(tmp_path / "whole")
    assert [m["step"] for m in metrics] == [2, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    assert (tmp_path / "whole" / "samples" / "samples_0000004.png").is_file()
    assert whole["mapping"]["params"]["i2t_first"]["fc_out"]["kernel"].shape == (64, 64)
    assert_packaged(tmp_path / "whole", tmp_path / "model", parity)

    _train(tmp_path / "sharded", "--config.train.steps=2", "--config.log.every=2", "--config.checkpoint.every=2",
           "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.mesh.frozen=fsdp", devices=8, config=CONFIG)
    sharded, single = _metrics(tmp_path / "sharded"), _metrics(tmp_path / "resumed")[:1]
    assert [m["step"] for m in sharded] == [m["step"] for m in single] == [2]
    for name in ("loss", "loss_fg", "loss_bg", "grad_norm"):
        np.testing.assert_allclose(sharded[0][name], single[0][name], rtol=1e-5, err_msg=name)
    _assert_close(load_trained(tmp_path / "sharded")[1], load_trained(tmp_path / "resumed", 2)[1], atol=1e-6)

    assert_generates(tmp_path / "whole", tmp_path, (3.5, "euler"))


@pytest.mark.parametrize("argv, message", [
    (["--config", "tiny_flux", "--negative-prompt", "blurry"],
     "error: FLUX.1 reads a negative prompt only with true classifier-free guidance: give a true CFG scale above 1"),
    (["--config", "tiny_flux", "--true-cfg", "0.5"],
     "error: the true classifier-free guidance scale must be a finite number of at least 1 (1: none), got 0.5"),
    (["--config", "tiny", "--true-cfg", "2"],
     "error: --true-cfg is FLUX.1's; a Stable Diffusion base's classifier-free guidance is --guidance"),
    (["--config", "tiny_flux", "--height", "72"], "error: height=72 is not possible: height and width must be "
                                                  "positive multiples of 16"),
])
def test_sample_py_flux_mistakes_are_one_line_before_loading(tmp_path, capsys, argv, message):
    from test_pipeline import sample_errors

    err = sample_errors(capsys, [*argv, "--image", FACE, "--prompt", "a photo of f l", "--out",
                                 str(tmp_path / "o.png"), "--steps", "1", "-n", "1"])
    assert err[-1].startswith(message) and not any(line.startswith("sd:") for line in err), err


@pytest.mark.slow
def test_the_demo_runs_on_the_tiny_flux(capsys):
    from f2d_jax.demo import main as demo_main

    assert demo_main(["--config", "tiny_flux"]) == 0
    out = capsys.readouterr().out
    assert "mapping    'f l' tokens (null exp)    (1, 2, 64)" in out
    assert "T5         text embedding             (1, 32, 32)  (the transformer's encoder_hidden_states)" in out
    assert "CLIP       pooled embedding           (1, 32)  (its pooled_projections)" in out

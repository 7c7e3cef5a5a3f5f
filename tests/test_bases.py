"""Stable Diffusion bases beyond SD v1.4: SD 1.5, SD 2.x and SDXL directories, Face2Diffusion's
conditioning on each, images against diffusers' pipelines, and training on the tiny SDXL structure."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import sd_fixtures
from f2d_jax.config import load_config
from f2d_jax.convert import save_mapping, save_msid
from f2d_jax.encoders import Encoders
from f2d_jax.eval.__main__ import main as eval_main
from f2d_jax.eval.manifest import read_manifest
from f2d_jax.models.stable_diffusion import load_stable_diffusion
from f2d_jax.sampling import F2DPipeline
from f2d_jax.text import identifier_prompts, token_ids

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"sd2": str(ROOT / "configs" / "tiny_sd2.py"), "sdxl": str(ROOT / "configs" / "tiny_sdxl.py")}
FACE = str(ROOT / "f2d_jax" / "assets" / "face.jpg")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """base -> (F2DPipeline on the tiny PyTorch directory of that base, the diffusers pipeline)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for i, (base, config) in enumerate(CONFIGS.items()):
        written = sd_fixtures.write_tiny_base(root / base, base, seed=10 * i)
        extra = dict(add_watermarker=False) if base == "sdxl" else dict(safety_checker=None)
        theirs = type(written).from_pretrained(root / base, **extra)   # its configs as a user's load gives them
        encoders = Encoders.from_config(load_config(config).model, load_stable_diffusion(root / base)[0].text_encoders)
        variables = encoders.init(jax.random.key(7), ("msid", "mapping"))
        save_msid(variables["msid"], root / f"{base}_msid.safetensors")
        save_mapping(variables["mapping"], root / f"{base}_mapping.safetensors")
        ours = F2DPipeline.from_pretrained(sd=str(root / base), msid=str(root / f"{base}_msid.safetensors"),
                                           mapping=str(root / f"{base}_mapping.safetensors"), config=config,
                                           dtype="float32")
        out[base] = ours, theirs
    return out


@pytest.mark.slow
def test_the_base_is_read_from_the_directory(bases):
    sd2, sdxl = bases["sd2"][0].models.sd, bases["sdxl"][0].models.sd
    assert sd2.text_encoder_2 is None and not sd2.text_encoder.penultimate
    assert sd2.text_encoder.pad_token_id == 0 and sd2.text_encoder.activation == "gelu"   # "!" pads SD 2's ids
    assert sd2.scheduler_config["prediction_type"] == "v_prediction" and sd2.unet.use_linear_projection
    assert sdxl.text_encoder.penultimate and sdxl.text_encoder_2.penultimate
    assert sdxl.text_encoder.pad_token_id == 49407 and sdxl.text_encoder_2.pad_token_id == 0
    assert sdxl.text_encoder_2.projection_dim == 48 and sdxl.force_zeros_for_empty_prompt
    assert sdxl.unet.addition_embed_type == "text_time" and sdxl.vae_scaling_factor == 0.13025
    assert bases["sdxl"][0].defaults == dict(scheduler="euler", guidance_scale=5.0, height=64, width=64)
    assert bases["sd2"][0].defaults == dict(scheduler="ddim", guidance_scale=7.5, height=64, width=64)


def test_an_sd15_style_directory_loads(tmp_path):
    """SD v1.5's directory: the v1 structure with a safety checker and feature extractor beside it."""
    tiny = sd_fixtures.write_tiny_sd(tmp_path / "sd15", seed=3)
    index = json.loads((tiny.path / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (tiny.path / "model_index.json").write_text(json.dumps(index))
    for folder, file in (("safety_checker", "config.json"), ("feature_extractor", "preprocessor_config.json")):
        (tiny.path / folder).mkdir()
        (tiny.path / folder / file).write_text("{}")
    sd, params = load_stable_diffusion(tiny.path)
    assert sd.text_encoder_2 is None and set(params) == {"unet", "vae", "text_encoder"}
    assert not sd.force_zeros_for_empty_prompt and sd.default_size == 64


@pytest.mark.slow
@pytest.mark.slow
def test_sdxl_tokenizers_share_one_vocabulary_in_either_file_format(tmp_path):
    """The two tokenizers' vocabularies are compared whether a folder has vocab.json and merges.txt (published
    repositories) or tokenizer.json alone (what transformers 5 saves); a different one, or none, is refused."""
    from f2d_jax.models.stable_diffusion import UnsupportedConfigError
    from f2d_jax.text import _bpe_files

    root = tmp_path / "sdxl"
    sd_fixtures.write_tiny_base(root, "sdxl", seed=5)
    assert (root / "tokenizer_2" / "tokenizer.json").is_file() and not (root / "tokenizer_2" / "vocab.json").exists()
    (root / "tokenizer" / "tokenizer.json").unlink()
    _bpe_files(root / "tokenizer")   # the same vocabulary as vocab.json and merges.txt
    assert load_stable_diffusion(root)[0].text_encoder_2.pad_token_id == 0
    saved = json.loads((root / "tokenizer_2" / "tokenizer.json").read_text())
    saved["model"]["merges"] = saved["model"]["merges"][:-1]
    (root / "tokenizer_2" / "tokenizer.json").write_text(json.dumps(saved))
    with pytest.raises(UnsupportedConfigError, match=r"^tokenizer_2/tokenizer.json differs from tokenizer/merges.txt"):
        load_stable_diffusion(root)
    (root / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2 has no vocabulary: vocab.json and merges.txt, or "):
        load_stable_diffusion(root)


def test_sdxl_tokens_split_between_the_two_encoders(bases):
    """The mapping network's 80-wide tokens: the first 32 go into CLIP-L, the other 48 into bigG; the
    conditioning is both penultimate states side by side, plus bigG's projected pooled state."""
    pipe = bases["sdxl"][0]
    encoders, variables = pipe.models.encoders, pipe.variables
    ids, positions = identifier_prompts(["a photo of f l", "f l surfing"], pipe.tokenizer)
    tokens = jax.random.normal(jax.random.key(1), (2, 2, 80))
    out = encoders.prompt_embeddings(variables, ids, positions, tokens)
    assert out["context"].shape == (2, 77, 80) and out["text_embeds"].shape == (2, 48)
    first, _ = encoders.text_encoder.apply(variables["text_encoder"], ids, tokens[..., :32], positions)
    second, pooled = encoders.text_encoder_2.apply(variables["text_encoder_2"], ids, tokens[..., 32:], positions)
    np.testing.assert_array_equal(out["context"], jnp.concatenate([first, second], -1))
    np.testing.assert_array_equal(out["text_embeds"], pooled)
    # the tokens reach the pooled embedding through the causal mask (the end token follows them)
    other = encoders.prompt_embeddings(variables, ids, positions, tokens.at[..., 32:].multiply(-1.0))
    assert not np.allclose(other["text_embeds"], out["text_embeds"], atol=1e-3)
    np.testing.assert_array_equal(other["context"][..., :32], out["context"][..., :32])
    with pytest.raises(ValueError, match=r"this SDXL model's conditioning has \['context', 'text_embeds'\], "
                                         r"got \['context'\]"):
        pipe.sample(out["context"], [0, 1], steps=1)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("base", ["sd2", "sdxl"])
@pytest.mark.slow
def test_images_match_diffusers_pipelines_given_our_embeddings(bases, base, scheduler, parity):
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    from test_pipeline import assert_images_match

    ours, theirs = bases[base]
    theirs.scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler].from_config(
        theirs.scheduler.config)
    prompts = ["a photo of f l", "f l eating bread in front of the Eiffel Tower"]
    latents = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 8, 8)))
    guidance = ours.defaults["guidance_scale"]
    mine = ours.generate(FACE, prompts, num_images=1, steps=10, scheduler=scheduler, latents=latents,
                         progress=False)
    sd = ours.models.sd
    cond = ours.encode_prompt(FACE, prompts)
    uncond = sd.negative_conditioning(ours.programs.embed(ours.variables, token_ids(["", ""], ours.tokenizer)), None)
    embeds = dict(prompt_embeds=cond["context"], negative_prompt_embeds=uncond["context"])
    if base == "sdxl":   # no negative prompt: zeros, as diffusers' force_zeros_for_empty_prompt
        assert not np.any(uncond["context"]) and not np.any(uncond["text_embeds"])
        embeds.update(pooled_prompt_embeds=cond["text_embeds"], negative_pooled_prompt_embeds=uncond["text_embeds"])
    with torch.no_grad():
        reference = theirs(**{k: torch.from_numpy(np.asarray(v)) for k, v in embeds.items()},
                           latents=torch.from_numpy(latents), num_inference_steps=10, guidance_scale=guidance,
                           height=64, width=64, output_type="np").images
    assert_images_match(mine, reference, f"tiny {base} images vs diffusers, {scheduler} 10 steps", parity, 40.0)


def assert_packaged(workdir, out, parity):
    """`f2d-convert package` of a run: the folder loads to the checkpoint's own conditioning."""
    from f2d_jax.convert.__main__ import main as convert_main

    assert convert_main(["package", str(workdir), "--out", str(out)]) == 0
    packaged = F2DPipeline.from_pretrained(model=out).encode_prompt(FACE, "a photo of f l")
    trained = F2DPipeline.from_checkpoint(workdir).encode_prompt(FACE, "a photo of f l")
    assert packaged.keys() == trained.keys()
    error = max(float(np.max(np.abs(packaged[k] - trained[k]))) for k in trained)
    parity(f"packaged {load_config(out / 'config.json').model.tiny_base} run vs its workdir, conditioning", error, 1e-6)


def assert_generates(workdir, tmp_path, defaults) -> list[str]:
    """`f2d-eval generate` from a run makes one 48 x 64 image of one face with the base's (guidance, sampler)
    `defaults` in tmp_path/gen; returns its arguments but --out."""
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(FACE, faces)
    (tmp_path / "prompts.txt").write_text("a photo of f l\n")
    args = ["generate", "--config", str(workdir), "--faces", str(faces), "--prompts", str(tmp_path / "prompts.txt"),
            "--seeds", "1", "--steps", "2", "--height", "64", "--width", "48"]
    assert eval_main([*args, "--out", str(tmp_path / "gen")]) == 0
    settings, entries = read_manifest(tmp_path / "gen")
    assert (settings["guidance_scale"], settings["scheduler"]) == defaults
    assert len(entries) == 1 and Image.open(entries[0].image).size == (48, 64)
    return args


@pytest.mark.slow
def test_tiny_sd2_run_packages_as_one_folder(tmp_path, parity):
    from f2d_jax.train.launch import run

    assert run(load_config(CONFIGS["sd2"], ["train.steps=1", "log.sample_every=0"]), tmp_path / "run") == 0
    assert_packaged(tmp_path / "run", tmp_path / "model", parity)


@pytest.mark.slow
def test_tiny_sdxl_trains_resumes_shards_and_exports(tmp_path, capsys, parity):
    """Tiny SDXL: 2 + 2 resumed steps equal 4; 2 steps on a 4 x 2 mesh of 8 devices, the frozen UNet and text
    encoders FSDP-sharded, equal 2 on one; the export loads strictly in PyTorch and the package in JAX; the
    run samples."""
    import torch
    from test_train import _assert_close, _metrics, _train

    import torch_reference as ref
    from f2d_jax.convert.__main__ import main as convert_main
    from f2d_jax.train.launch import run
    from f2d_jax.workdir import load_trained

    config = load_config(CONFIGS["sdxl"], ["train.steps=4", "log.every=2", "log.sample_every=4",
                                           "checkpoint.every=2"])
    half = load_config(CONFIGS["sdxl"], ["train.steps=2", "log.every=2", "log.sample_every=0",
                                         "checkpoint.every=2"])
    assert run(config, tmp_path / "whole") == 0
    assert run(half, tmp_path / "resumed") == 0 and run(config, tmp_path / "resumed") == 0
    assert "sd: tiny random-init Stable Diffusion of the sdxl structure" in capsys.readouterr().err
    whole, resumed = (load_trained(tmp_path / name)[1] for name in ("whole", "resumed"))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    metrics = _metrics(tmp_path / "whole")
    assert [m["step"] for m in metrics] == [2, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    assert (tmp_path / "whole" / "samples" / "samples_0000004.png").is_file()
    assert whole["mapping"]["params"]["i2t_first"]["fc_out"]["kernel"].shape == (64, 80)

    assert convert_main(["export", str(tmp_path / "whole"), "--out", str(tmp_path / "export")]) == 0
    reference = ref.Mapping(identity=128, hidden=64, out=80, exp=64)
    reference.load_state_dict(torch.load(tmp_path / "export" / "mapping.pt", weights_only=True), strict=True)
    assert_packaged(tmp_path / "whole", tmp_path / "model", parity)

    _train(tmp_path / "sharded", "--config.train.steps=2", "--config.log.every=2", "--config.checkpoint.every=2",
           "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.mesh.frozen=fsdp", devices=8,
           config=CONFIGS["sdxl"])
    sharded, single = _metrics(tmp_path / "sharded"), _metrics(tmp_path / "resumed")[:1]
    assert [m["step"] for m in sharded] == [m["step"] for m in single] == [2]
    for name in ("loss", "loss_fg", "loss_bg", "grad_norm"):
        np.testing.assert_allclose(sharded[0][name], single[0][name], rtol=1e-5, err_msg=name)
    _assert_close(load_trained(tmp_path / "sharded")[1], load_trained(tmp_path / "resumed", 2)[1], atol=1e-6)
    shutil.rmtree(tmp_path / "resumed")
    # eval generate samples from the run with the base's defaults (SDXL's size conditioning from the size)
    args = assert_generates(tmp_path / "whole", tmp_path, (5.0, "euler"))
    capsys.readouterr()
    assert eval_main([*args, "--guidance", "6", "--out", str(tmp_path / "gen")]) == 2
    assert "other settings (guidance_scale: 5.0 -> 6.0)" in capsys.readouterr().err


def test_the_velocity_target_is_diffusers(parity):
    """SD 2.1's v-prediction target, against diffusers' DDPMScheduler.get_velocity on its noise schedule."""
    import torch
    from diffusers import DDPMScheduler

    from f2d_jax.models.stable_diffusion import TINY_SD2_CONFIGS, alphas_cumprod
    from f2d_jax.train.step import prediction_target

    config = {k: v for k, v in TINY_SD2_CONFIGS["scheduler"].items() if not k.startswith("_")}
    theirs = DDPMScheduler.from_config(config)
    rng = np.random.default_rng(0)
    z0, eps = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 999])
    abar = alphas_cumprod(TINY_SD2_CONFIGS["scheduler"])[t][:, None, None, None]
    ours = prediction_target("v_prediction", z0, eps, abar)
    reference = theirs.get_velocity(torch.from_numpy(z0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
    parity("v-prediction training target (velocity)", float(np.abs(ours - reference).max()), 1e-5)
    np.testing.assert_array_equal(prediction_target("epsilon", z0, eps, abar), eps)

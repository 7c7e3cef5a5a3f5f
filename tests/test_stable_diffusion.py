"""The Stable Diffusion bundle: loading a diffusers directory (safetensors, Flax msgpack, no torch),
parity with diffusers' / transformers' PyTorch models on the same random weights, clear errors,
and the tiny random-init bundle."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sd_fixtures
from f2d_jax.convert.layout import CheckpointMismatchError
from f2d_jax.models import stable_diffusion as sdm
from f2d_jax.models.bases import SD14_SCHEDULER

PROMPTS = ["a photo of f l", "an oil painting of f l wearing a red hat, highly detailed"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sd_fixtures.write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny):
    return sdm.load_stable_diffusion(tiny.path)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _copy(tiny, tmp_path, drop=()):
    """A copy of the fixture directory without the files in `drop` (relative paths)."""
    path = tmp_path / "copy"
    shutil.copytree(tiny.path, path)
    for name in drop:
        (path / name).unlink()
    return path


def _edit_config(path, component, **changes):
    name = path / component / sdm.CONFIG_FILES[component]
    name.write_text(json.dumps({**json.loads(name.read_text()), **changes}))


# --------------------------------------------------------------------------- parity

@pytest.mark.slow
def test_full_size_sd14_unet_matches_diffusers_pytorch(tmp_path, parity):
    """SD v1.4's UNet at full width (860M parameters) on a small latent, from a diffusers folder, with
    the default attention ("auto": the cpu implementation here): every attention shape of SD's
    levels but the largest token count."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(sample_size=64, cross_attention_dim=768)  # with diffusers' defaults: SD v1.x's UNet
    theirs = sd_fixtures.randomize(UNet2DConditionModel(**config), 0)
    theirs.save_pretrained(tmp_path / "unet")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, 77, 768)).astype(np.float32)
    timesteps = np.array([10, 900], np.int32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(latents), torch.from_numpy(timesteps).long(),
                          torch.from_numpy(context)).sample.numpy()
    del theirs
    unet, params = sdm.load_unet(tmp_path / "unet")
    ours = jax.jit(unet.apply)(params, latents, timesteps, context)
    assert np.abs(expected).max() > 0.1
    parity("SD v1.4 UNet noise prediction (full size, 16x16 latents)", _max_err(ours, expected), 5e-5)


def test_unet_matches_diffusers_pytorch(tiny, loaded, parity):
    sd, params = loaded
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((4, 77, 32)).astype(np.float32)
    timesteps = np.array([0, 1, 500, 999], np.int32)
    with torch.no_grad():
        theirs = tiny.unet(torch.from_numpy(latents), torch.from_numpy(timesteps).long(),
                           torch.from_numpy(context)).sample.numpy()

    def run(unet):
        return jax.jit(unet.apply)(params["unet"], latents, timesteps, context)

    ours = run(sd.unet)
    assert ours.shape == (4, 4, 8, 8) and np.abs(theirs).max() > 0.1
    parity("SD UNet noise prediction (tiny, t in 0..999)", _max_err(ours, theirs), 1e-5)


def test_vae_matches_diffusers_pytorch(tiny, loaded, parity):
    sd, params = loaded
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)

    @jax.jit
    def moments(variables, images):
        return sd.vae.apply(variables, images, method=sd.vae.encode)

    mean, logvar = moments(params["vae"], images)
    decoded = jax.jit(lambda p, z: sd.vae.apply(p, z, method=sd.vae.decode))(params["vae"], latents)
    with torch.no_grad():
        theirs = tiny.vae.encode(torch.from_numpy(images)).latent_dist
        theirs_decoded = tiny.vae.decode(torch.from_numpy(latents)).sample.numpy()
    nchw = lambda x: np.transpose(x, (0, 3, 1, 2))  # noqa: E731  (our posterior is channels-last)
    assert mean.shape == (2, 8, 8, 4) and decoded.shape == (2, 3, 64, 64)
    parity("SD VAE encode: latent mean (tiny)", _max_err(nchw(mean), theirs.mean.numpy()), 1e-4)
    parity("SD VAE encode: latent logvar (tiny)", _max_err(nchw(logvar), theirs.logvar.numpy()), 1e-4)
    parity("SD VAE decode (tiny)", _max_err(decoded, theirs_decoded), 1e-4)


def test_text_encoder_matches_transformers(tiny, loaded, parity):
    sd, params = loaded
    ids = np.asarray(sd.tokenizer()(PROMPTS, padding="max_length", max_length=77).input_ids, np.int32)
    hidden, _ = jax.jit(sd.text_encoder.apply)(params["text_encoder"], ids)
    with torch.no_grad():
        theirs = tiny.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert hidden.shape == (2, 77, 32)
    parity("SD CLIP text encoder last_hidden_state (tiny)", _max_err(hidden, theirs), 1e-4)


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDPMScheduler

    for config in (SD14_SCHEDULER, {**SD14_SCHEDULER, "beta_schedule": "linear"}):
        theirs = DDPMScheduler.from_config(config).alphas_cumprod.numpy()
        ours = sdm.alphas_cumprod(config)
        assert ours.shape == (1000,) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- formats

def test_loaded_bundle_settings(tiny, loaded):
    sd, params = loaded
    assert sd.tokenizer_path == str(tiny.path / "tokenizer") and sd.vae_scaling_factor == 0.18215
    assert sd.vae_scale_factor == 8 and sd.scheduler_config["beta_schedule"] == "scaled_linear"
    assert sd.tokenizer()("a photo of f l").input_ids == [49406, 320, 1125, 539, 325, 331, 49407]


@pytest.mark.slow
def test_flax_msgpack_weights_load_identically(tiny, loaded, tmp_path):
    """A directory written by save_stable_diffusion (Flax msgpack weights, diffusers' Flax format) loads back to
    the same variables and modules. (Hugging Face's Flax layout of CLIP: test_clip_text.py.)"""
    sd, params = loaded
    path = sdm.save_stable_diffusion(sd, params, tmp_path / "flax")
    assert (path / "unet" / "diffusion_flax_model.msgpack").is_file()
    assert (path / "text_encoder" / "flax_model.msgpack").is_file()

    flax_sd, flax_params = sdm.load_stable_diffusion(path)
    assert flax_sd.unet == sd.unet and flax_sd.vae == sd.vae
    jax.tree.map(np.testing.assert_array_equal, flax_params["unet"], params["unet"])
    jax.tree.map(np.testing.assert_array_equal, flax_params["vae"], params["vae"])
    ids = np.asarray(sd.tokenizer()(PROMPTS, padding="max_length", max_length=77).input_ids, np.int32)
    np.testing.assert_array_equal(flax_sd.text_encoder.apply(flax_params["text_encoder"], ids)[0],
                                  sd.text_encoder.apply(params["text_encoder"], ids)[0])


def test_old_vae_attention_names_and_conv_shapes(tiny, loaded, tmp_path):
    """Older PyTorch VAEs name the attention projections query/key/value/proj_attn, the oldest as 1x1 convs."""
    path = _copy(tiny, tmp_path)
    weights = path / "vae" / "diffusion_pytorch_model.safetensors"
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in load_file(weights).items():
        for new_name, old_name in names.items():
            if f".attentions.0.{new_name}." in key:
                key = key.replace(f".{new_name}.", f".{old_name}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        old[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, weights)
    _, params = sdm.load_stable_diffusion(path)
    jax.tree.map(np.testing.assert_array_equal, params["vae"], loaded[1]["vae"])


@pytest.mark.slow
def test_loading_needs_no_torch(tiny, tmp_path):
    bin_only = _copy(tiny, tmp_path, drop=["text_encoder/model.safetensors"])
    torch.save({k: torch.from_numpy(v) for k, v in load_file(tiny.path / "text_encoder/model.safetensors").items()},
               bin_only / "text_encoder" / "pytorch_model.bin")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # importing torch now fails
        import jax
        import jax.numpy as jnp
        from f2d_jax.models.stable_diffusion import load_component, load_stable_diffusion
        sd, params = load_stable_diffusion({str(tiny.path)!r}, dtype=jnp.bfloat16)
        assert params["unet"]["params"]["conv_in"]["kernel"].dtype == jnp.bfloat16
        assert sd.unet.dtype == jnp.bfloat16 and sd.text_encoder.dtype == jnp.bfloat16
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["text_encoder"])
        try:
            load_component("text_encoder", {str(bin_only / "text_encoder")!r}, target)
        except ImportError as e:
            assert "needs torch" in str(e), e
        else:
            raise AssertionError(".bin weights loaded without torch")
        loaded = [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]
        assert not loaded, loaded
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_hub_id_downloads_configs_tokenizer_and_one_weight_format(tiny, loaded, tmp_path, monkeypatch):
    calls = sd_fixtures.fake_hub(monkeypatch, {"someone/tiny-sd": tiny.path}, tmp_path / "snapshots")
    sd, params = sdm.load_stable_diffusion("someone/tiny-sd", revision="main")
    (repo_id, revision, patterns), = calls
    assert (repo_id, revision) == ("someone/tiny-sd", "main")
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and "tokenizer/*" in patterns
    assert not [p for p in patterns if p.endswith((".bin", ".msgpack"))]
    jax.tree.map(np.testing.assert_array_equal, params["vae"], loaded[1]["vae"])
    with pytest.raises(FileNotFoundError, match="'nobody/nothing' is neither a local directory nor a downloadable"):
        sdm.load_stable_diffusion("nobody/nothing")


# --------------------------------------------------------------------------- errors

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Stable Diffusion directory at .*nowhere"):
        sdm.load_stable_diffusion(tmp_path / "nowhere")


def test_missing_subfolder(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    shutil.rmtree(path / "scheduler")
    with pytest.raises(FileNotFoundError, match="has no scheduler/ subfolder"):
        sdm.load_stable_diffusion(path)


def test_missing_weight_file(tiny, tmp_path):
    path = _copy(tiny, tmp_path, drop=["vae/diffusion_pytorch_model.safetensors"])
    with pytest.raises(FileNotFoundError, match=r"no vae weights in .*vae: expected one of "
                                                r"diffusion_flax_model.msgpack, diffusion_pytorch_model.safetensors"):
        sdm.load_stable_diffusion(path)


def test_wrong_shaped_weight(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
    del state["time_embedding.linear_1.bias"]
    save_file(state, weights)
    with pytest.raises(CheckpointMismatchError) as error:
        sdm.load_stable_diffusion(path)
    message = str(error.value)
    assert "unet weights" in message and "conv_in.weight (32, 4, 5, 5) (model wants (32, 4, 3, 3))" in message
    assert "missing keys: time_embedding.linear_1.bias" in message


@pytest.mark.parametrize("component, changes, message", [
    ("unet", {"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift' is not supported.*"
     "always computes resnet_time_scale_shift='default'"),
    ("unet", {"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
    ("unet", {"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
     "down_block_types=.*only builds .*not \\['SimpleCrossAttnDownBlock2D'\\]"),
    ("unet", {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type=.*only builds"),
    ("unet", {"future_option": 3}, "unknown option future_option=3"),
    ("unet", {"addition_embed_type": "text"}, "addition_embed_type='text': the Flax model only builds"),
    ("unet", {"transformer_layers_per_block": [[1], [2, 2]]}, "transformer_layers_per_block=.*one count per block"),
    ("vae", {"act_fn": "gelu"}, "act_fn='gelu': the Flax model only builds"),
    ("vae", {"latents_mean": [0.0] * 4}, "latents_mean=.* is not supported"),
    ("text_encoder", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ("scheduler", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2' is not supported"),
])
def test_unsupported_config(component, changes, message):
    configs = {**sdm.TINY_CONFIGS, component: {**sdm.TINY_CONFIGS[component], **changes}}
    with pytest.raises(sdm.UnsupportedConfigError, match=f"{component} config: {message}"):
        sdm.build(configs)


def test_unsupported_config_in_directory(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    _edit_config(path, "unet", time_cond_proj_dim=256)
    with pytest.raises(sdm.UnsupportedConfigError, match="time_cond_proj_dim=256 is not supported"):
        sdm.load_stable_diffusion(path)


def test_upcast_attention_in_any_dtype():
    for value, upcast in ((True, True), (False, False), (None, False)):  # SD 2.1 sets True, SDXL null
        configs = {**sdm.TINY_CONFIGS, "unet": {**sdm.TINY_CONFIGS["unet"], "upcast_attention": value}}
        unet = sdm.build(configs, dtype=jnp.bfloat16).unet
        assert unet.dtype == jnp.bfloat16 and unet.upcast_attention is upcast
        assert unet.config["upcast_attention"] is upcast


# --------------------------------------------------------------------------- tiny bundle

@pytest.mark.slow
def test_tiny_stable_diffusion_runs(loaded):
    sd, params = sdm.tiny_stable_diffusion(jax.random.key(0))

    @jax.jit
    def generate(params, ids, latents, timesteps):
        hidden, pooled = sd.text_encoder.apply(params["text_encoder"], ids)
        noise = sd.unet.apply(params["unet"], latents, timesteps, hidden)
        return hidden, pooled, noise, sd.vae.apply(params["vae"], noise, method=sd.vae.decode)

    ids = jnp.asarray(sd.tokenizer()(PROMPTS, padding="max_length", max_length=77).input_ids)
    hidden, pooled, noise, images = generate(params, ids, jnp.ones((2, 4, 8, 8)), jnp.array([1, 999]))
    assert hidden.shape == (2, 77, 32) and pooled.shape == (2, 32)
    assert noise.shape == (2, 4, 8, 8) and images.shape == (2, 3, 64, 64)
    assert np.isfinite(images).all() and 0.05 < float(np.std(images)) < 10
    assert sd.tokenizer_path is None and sd.vae_scale_factor == 8
    # The same structure as the PyTorch fixture written from TINY_CONFIGS.
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, loaded[1])


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
@pytest.mark.slow
def test_remat_recomputes_each_layer_and_changes_no_gradient(base):
    """`UNet.remat` (training's remat_unet): one checkpointed call per ResNet block and transformer layer,
    whose recomputation in the backward pass gives the gradients of the plain UNet."""
    sd, params = sdm.tiny_stable_diffusion(jax.random.key(0), base=base)
    x, t = jax.random.normal(jax.random.key(1), (2, 4, 8, 8)), jnp.array([10, 500])
    conditioning = {"context": jax.random.normal(jax.random.key(2), (2, 77, sd.unet.cross_attention_dim))}
    if base == "sdxl":
        pooled = jax.random.normal(jax.random.key(3), (2, sd.text_encoder_2.projection_dim))
        conditioning = sd.with_size({**conditioning, "text_embeds": pooled}, 64, 64)

    def grad(unet):
        return jax.jit(jax.grad(lambda c: jnp.sum(sdm.unet_output(unet, params["unet"], x, t, c) ** 2)))

    remat = sd.unet.clone(remat=True)
    for a, b in zip(jax.tree.leaves(grad(sd.unet)(conditioning)), jax.tree.leaves(grad(remat)(conditioning))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))
    checkpointed = str(jax.make_jaxpr(grad(remat))(conditioning)).count("remat2[")
    paths = {"/".join(str(k.key) for k in path[:-1]) for path, _ in jax.tree_util.tree_leaves_with_path(params["unet"])}
    layers = {re.sub(r"(resnets_\d+|transformer_blocks_\d+)/.*", r"\1", p) for p in paths
              if re.search(r"/(resnets|transformer_blocks)_\d+/", p)}
    assert checkpointed == len(layers) > 0, (checkpointed, sorted(layers))

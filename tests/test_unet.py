"""The UNets of SD 2.x (linear projections, per-level head counts, upcast attention) and SDXL (several
transformer layers per block, the "text_time" added embedding) loaded alone with `load_unet`: parity
with diffusers' PyTorch UNet2DConditionModel on the same random weights, folder handling and errors,
and upcast attention in bfloat16."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sd_fixtures
from f2d_jax.models import stable_diffusion as sdm
from f2d_jax.models import unet as unet_module


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _write_unet(config: dict, path, seed: int = 0):
    """diffusers' PyTorch UNet of `config` with every parameter random, saved (safetensors) to `path`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = sd_fixtures.randomize(UNet2DConditionModel(**config), seed)
    unet.save_pretrained(path, safe_serialization=True)
    return unet


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2-unet")
    return path, _write_unet(sdm.TINY_SD2_CONFIGS["unet"], path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-unet")
    return path, _write_unet(sdm.TINY_SDXL_CONFIGS["unet"], path, seed=1)


def _inputs(context_width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, context_width)).astype(np.float32)
    return latents, np.array([3, 900], np.int32), context


def _apply(unet, params, *args, **kwargs):
    return jax.jit(lambda params, *args, **kwargs: unet.apply(params, *args, **kwargs))(params, *args, **kwargs)


def _torch(model, latents, timesteps, context, **kwargs):
    with torch.no_grad():
        return model(torch.from_numpy(latents), torch.from_numpy(timesteps).long(), torch.from_numpy(context),
                     **kwargs).sample.numpy()


def test_sd2_unet_matches_diffusers_pytorch(sd2, parity):
    path, theirs = sd2
    unet, params = sdm.load_unet(path)
    assert unet.upcast_attention and unet.use_linear_projection and unet.attention_head_dim == (2, 4)
    latents, timesteps, context = _inputs(32)
    ours = _apply(unet, params, latents, timesteps, context)
    expected = _torch(theirs, latents, timesteps, context)
    assert ours.shape == (2, 4, 8, 8) and np.abs(expected).max() > 0.1
    parity("SD 2 UNet noise prediction (tiny, linear proj., upcast attention)", _max_err(ours, expected), 1e-4)


def test_sdxl_unet_matches_diffusers_pytorch(sdxl, parity):
    path, theirs = sdxl
    unet, params = sdm.load_unet(path)
    assert unet.addition_embed_type == "text_time" and unet.transformer_layers_per_block == (1, 2)
    assert "add_embedding" in params["params"]
    latents, timesteps, context = _inputs(80, seed=1)
    text_embeds = np.random.default_rng(2).standard_normal((2, 48)).astype(np.float32)
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [1024, 768, 16, 48, 1024, 1024]], np.float32)
    ours = _apply(unet, params, latents, timesteps, context,
                  added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
    expected = _torch(theirs, latents, timesteps, context, added_cond_kwargs={
        "text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)})
    assert ours.shape == (2, 4, 8, 8) and np.abs(expected).max() > 0.1
    parity("SDXL UNet noise prediction (tiny, text_time added embedding)", _max_err(ours, expected), 1e-4)
    # The added embedding matters: other time ids move the output.
    moved = _torch(theirs, latents, timesteps, context, added_cond_kwargs={
        "text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids[::-1].copy())})
    assert _max_err(moved, expected) > 1e-3


def test_load_unet_from_a_stable_diffusion_directory(tmp_path):
    tiny = sd_fixtures.write_tiny_sd(tmp_path / "sd")
    sd, params = sdm.load_stable_diffusion(tiny.path)
    for unet, unet_params in (sdm.load_unet(tiny.path), sdm.load_unet(tiny.path, subfolder="unet"),
                              sdm.load_unet(tiny.path / "unet")):
        assert unet == sd.unet  # the same module: same config, attention and upcast fields
        assert jax.tree.all(jax.tree.map(np.array_equal, unet_params, params["unet"]))
    assert sdm.load_unet(tiny.path, attention="reference")[0].attention == "reference"


def test_load_unet_errors(sd2, tmp_path):
    with pytest.raises(FileNotFoundError, match="no UNet folder at .*missing"):
        sdm.load_unet(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no UNet config at .*empty/config.json or .*empty/unet/config.json"):
        sdm.load_unet(empty)
    with pytest.raises(FileNotFoundError, match="no UNet config at .*empty/weights/config.json"):
        sdm.load_unet(empty, subfolder="weights")
    (empty / "config.json").write_text((sd2[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no unet weights in .*empty: expected one of diffusion_flax_model"
                                                ".msgpack, diffusion_pytorch_model.safetensors, "
                                                "diffusion_pytorch_model.bin"):
        sdm.load_unet(empty)


def test_load_unet_from_the_hub(sd2, tmp_path, monkeypatch):
    """A hub repo holding a UNet alone, or a Stable Diffusion repo: configs and one weight format."""
    sd_repo = tmp_path / "sd-repo"
    shutil.copytree(sd2[0], sd_repo / "unet")
    (sd_repo / "model_index.json").write_text("{}")
    calls = sd_fixtures.fake_hub(monkeypatch, {"someone/unet": sd2[0], "someone/sd": sd_repo}, tmp_path / "hub")
    _, expected = sdm.load_unet(sd2[0])
    for repo, subfolder in (("someone/unet", None), ("someone/sd", None), ("someone/sd", "unet")):
        calls.clear()
        unet, params = sdm.load_unet(repo, subfolder=subfolder, revision="main")
        assert unet.upcast_attention and jax.tree.all(jax.tree.map(np.array_equal, params, expected))
        (repo_id, revision, patterns), = calls
        assert (repo_id, revision) == (repo, "main") and not [p for p in patterns if p.endswith((".bin", ".msgpack"))]
        assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(patterns)
        assert ("config.json" in patterns) == (subfolder is None)
    with pytest.raises(FileNotFoundError, match="'nobody/nothing' is neither a local directory nor a downloadable"):
        sdm.load_unet("nobody/nothing")


@pytest.mark.slow
def test_upcast_attention_in_bfloat16(sd2, monkeypatch):
    """bfloat16 weights and activations; with upcast_attention the attention runs in float32."""
    unet, params = sdm.load_unet(sd2[0], dtype=jnp.bfloat16)
    assert unet.dtype == jnp.bfloat16 and unet.upcast_attention
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    seen = []
    attention = unet_module.multi_head_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(unet_module, "multi_head_attention", spy)
    latents, timesteps, context = _inputs(32)
    upcast = _apply(unet, params, latents, timesteps, context)
    assert upcast.dtype == jnp.bfloat16 and bool(jnp.isfinite(upcast).all())
    assert len(seen) == 8 and set(seen) == {(jnp.dtype(jnp.float32),) * 3}  # self + cross, 4 transformers
    seen.clear()
    plain = _apply(unet.clone(upcast_attention=False), params, latents, timesteps, context)
    assert set(seen) == {(jnp.dtype(jnp.bfloat16),) * 3}
    assert _max_err(plain, upcast) > 0  # P V in float32, not in bfloat16
    for implementation in ("reference", "xla"):  # both take the float32 inputs
        other = _apply(unet.clone(attention=implementation), params, latents, timesteps, context)
        assert other.dtype == jnp.bfloat16 and _max_err(other, upcast) < 0.05 * float(jnp.abs(upcast).max())


# The published configs (diffusers' config.json of SD 2.1 768-v, SDXL base 1.0 and refiner 1.0), sizes apart.
_COMMON = dict(act_fn="silu", center_input_sample=False, downsample_padding=1, dual_cross_attention=False,
               flip_sin_to_cos=True, freq_shift=0, in_channels=4, mid_block_scale_factor=1, norm_eps=1e-05,
               norm_num_groups=32, num_class_embeds=None, only_cross_attention=False, out_channels=4,
               use_linear_projection=True, _class_name="UNet2DConditionModel")
_SDXL = dict(_COMMON, addition_embed_type="text_time", addition_embed_type_num_heads=64, class_embed_type=None,
             class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3, cross_attention_norm=None,
             encoder_hid_dim=None, encoder_hid_dim_type=None, mid_block_only_cross_attention=None,
             mid_block_type="UNetMidBlock2DCrossAttn", num_attention_heads=None, resnet_out_scale_factor=1.0,
             resnet_skip_time_act=False, resnet_time_scale_shift="default", time_cond_proj_dim=None,
             time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
             timestep_post_act=None, upcast_attention=None, addition_time_embed_dim=256, sample_size=128)
PUBLISHED = {
    "sd2.1": dict(_COMMON, attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                  cross_attention_dim=1024, layers_per_block=2, sample_size=96, upcast_attention=True,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "sdxl-base": dict(_SDXL, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                      cross_attention_dim=2048, layers_per_block=2, projection_class_embeddings_input_dim=2816,
                      transformer_layers_per_block=[1, 2, 10],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    "sdxl-refiner": dict(_SDXL, attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
                         cross_attention_dim=1280, layers_per_block=2, projection_class_embeddings_input_dim=2560,
                         transformer_layers_per_block=4,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_are_accepted(name):
    unet = sdm.build_unet(PUBLISHED[name], dtype=jnp.bfloat16)
    assert unet.upcast_attention is (name == "sd2.1") and unet.dtype == jnp.bfloat16
    assert unet.attention_head_dim == tuple(PUBLISHED[name]["attention_head_dim"])


def test_upcast_attention_survives_save(tmp_path):
    sd = sdm.build(sdm.TINY_SD2_CONFIGS)
    assert sd.unet.upcast_attention
    sdm.save_stable_diffusion(sd, sdm.random_params(sdm.abstract_params(sd), jax.random.key(0)), tmp_path)
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["upcast_attention"] is True
    assert sdm.load_unet(tmp_path)[0].upcast_attention

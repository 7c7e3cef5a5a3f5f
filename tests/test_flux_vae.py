"""FLUX.1's VAE (16 latent channels, no quant convs) against diffusers' PyTorch AutoencoderKL on the same random
weights, its config through vae_options, and the latent packing and normalization against FluxPipeline's."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import FluxPipeline
from flax import traverse_util

import sd_fixtures
from f2d_jax.models import flux_latents
from f2d_jax.models.sd_bundle import abstract_module
from f2d_jax.models.sd_config import FLUX_VAE, TINY_FLUX_VAE, UnsupportedConfigError, vae_options
from f2d_jax.models.stable_diffusion import load_component
from f2d_jax.models.vae import AutoencoderKL


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny PyTorch FLUX VAE with random weights, saved as a diffusers folder, and ours loaded from it."""
    torch.manual_seed(0)
    theirs = sd_fixtures.randomize(TorchAutoencoderKL(**TINY_FLUX_VAE), 1)
    folder = tmp_path_factory.mktemp("flux") / "vae"
    theirs.save_pretrained(folder, safe_serialization=True)
    ours = AutoencoderKL(**vae_options(json.loads((folder / "config.json").read_text())))
    return theirs, ours, load_component("vae", folder, abstract_module(ours))


def test_tiny_flux_vae_matches_diffusers_pytorch(tiny, parity):
    theirs, vae, params = tiny
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    latents = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    mean, logvar = jax.jit(lambda p, x: vae.apply(p, x, method=vae.encode))(params, images)
    decoded = jax.jit(lambda p, z: vae.apply(p, z, method=vae.decode))(params, latents)
    with torch.no_grad():
        posterior = theirs.encode(torch.from_numpy(images)).latent_dist
        theirs_decoded = theirs.decode(torch.from_numpy(latents)).sample.numpy()
    nchw = lambda x: np.transpose(x, (0, 3, 1, 2))  # noqa: E731  (our posterior is channels-last)
    assert mean.shape == (2, 8, 8, 16) and decoded.shape == (2, 3, 64, 64)
    assert np.abs(posterior.mean.numpy()).max() > 0.1 and np.abs(theirs_decoded).max() > 0.1
    parity("FLUX VAE encode: latent mean (tiny)", _max_err(nchw(mean), posterior.mean.numpy()), 1e-4)
    parity("FLUX VAE encode: latent logvar (tiny)", _max_err(nchw(logvar), posterior.logvar.numpy()), 1e-4)
    parity("FLUX VAE decode (tiny)", _max_err(decoded, theirs_decoded), 1e-4)


def test_flux_vae_config_and_parameters(tiny):
    """No quant convs in the tree; the config holds what diffusers' does and builds the same module again."""
    _, vae, params = tiny
    assert (vae.latent_channels, vae.use_quant_conv, vae.use_post_quant_conv) == (16, False, False)
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert set(params["params"]) == {"encoder", "decoder"}
    assert AutoencoderKL(**vae_options(vae.config)) == vae
    flux = AutoencoderKL(**vae_options(FLUX_VAE))
    tree = traverse_util.flatten_dict(abstract_module(flux)["params"])
    assert tree[("encoder", "conv_out", "kernel")].shape == (3, 3, 512, 32)
    assert tree[("decoder", "conv_in", "kernel")].shape == (3, 3, 16, 512)
    with torch.device("meta"):
        count = sum(p.numel() for p in TorchAutoencoderKL(**FLUX_VAE).parameters())
    assert sum(int(np.prod(leaf.shape)) for leaf in tree.values()) == count


@pytest.mark.parametrize("changes, message", [
    ({"latents_mean": [0.0] * 16}, "latents_mean=.* is not supported"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention=False is not supported"),
])
def test_vae_options_refuse(changes, message):
    with pytest.raises(UnsupportedConfigError, match=f"vae config: {message}"):
        vae_options(dict(TINY_FLUX_VAE, **changes))


def test_pack_and_unpack_match_flux_pipeline():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 6, 10)).astype(np.float32)
    packed = flux_latents.pack_latents(jnp.asarray(latents))
    theirs = FluxPipeline._pack_latents(torch.from_numpy(latents), 2, 16, 6, 10).numpy()
    assert packed.shape == (2, 15, 64)
    np.testing.assert_array_equal(packed, theirs)
    unpacked = flux_latents.unpack_latents(packed, 48, 80, 8)   # a 48x80 image over the VAE's 8
    np.testing.assert_array_equal(unpacked, FluxPipeline._unpack_latents(torch.from_numpy(theirs), 48, 80, 8).numpy())
    np.testing.assert_array_equal(unpacked, latents)
    # Image sides that are not multiples of 16 round down, as diffusers'.
    np.testing.assert_array_equal(flux_latents.unpack_latents(packed, 50, 95, 8), latents)


def test_latent_image_ids_match_flux_pipeline():
    ids = flux_latents.latent_image_ids(6, 10)
    theirs = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    assert ids.shape == (15, 3) and ids.dtype == jnp.float32
    np.testing.assert_array_equal(ids, theirs)


def test_latent_normalization_matches_flux_pipeline():
    """to_latents as FLUX's image-to-image and training scripts encode, from_latents as FluxPipeline decodes."""
    z = np.random.default_rng(0).standard_normal((2, 16, 4, 4)).astype(np.float32)
    scale, shift = FLUX_VAE["scaling_factor"], FLUX_VAE["shift_factor"]
    latents = flux_latents.to_latents(jnp.asarray(z), scale, shift)
    np.testing.assert_allclose(latents, ((torch.from_numpy(z) - shift) * scale).numpy(), rtol=0, atol=1e-6)
    back = flux_latents.from_latents(latents, scale, shift)
    np.testing.assert_allclose(back, (torch.from_numpy(np.array(latents)) / scale + shift).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(back, z, atol=1e-6)
    np.testing.assert_array_equal(flux_latents.to_latents(jnp.asarray(z), 0.18215, None), jnp.asarray(z) * 0.18215)

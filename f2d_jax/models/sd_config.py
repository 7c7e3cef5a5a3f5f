"""Stable Diffusion configs: what a diffusers config may ask of our models, the tiny bundles' configs, and the
training noise schedule.

`unet_options` and `vae_options` take a component's config.json and return the options our modules
(`f2d_jax.models.unet`, `f2d_jax.models.vae`) are built with; an option they do not compute, or a value
that would change the output, raises UnsupportedConfigError rather than being dropped.
`clip_text_fields` maps a Hugging Face CLIPTextConfig to our `CLIPTextEncoder`'s fields.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from f2d_jax.models import unet as unet_module
from f2d_jax.models import vae as vae_module
from f2d_jax.models.bases import SD14_SCHEDULER, SD14_VAE
from f2d_jax.models.clip_text import CLIPTextEncoder

SECOND_ENCODER = "text_encoder_2"   # SDXL's OpenCLIP bigG, beside CLIP ViT-L

# The tiny bundle, as the config files of a diffusers directory would hold it (tests/sd_fixtures.py writes
# PyTorch models from the same numbers). Latents 8x8 <-> images 64x64: the VAE downsamples 3 times, as SD's.
TINY_CONFIGS = {
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
    "vae": dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
                layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32),
    "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5),
    "scheduler": SD14_SCHEDULER,
}

# Tiny bundles of the SD 2.x and SDXL structures, in the same form. SD 2: one GELU text encoder whose
# tokenizer pads with "!", linear projections in the UNet's transformers, upcast attention and
# v-prediction as SD 2.1 (768 px). SDXL: a CLIP-L-like (32 wide) and a bigG-like (48 wide, with a
# text projection) text encoder, the UNet's context their two penultimate states side by side (80), its
# added embedding the projected pooled state (48) and six time ids (6 x 8), and SDXL's scheduler.
_TINY_VAE = TINY_CONFIGS["vae"]
TINY_SD2_CONFIGS = {
    "unet": dict(TINY_CONFIGS["unet"], attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    "vae": _TINY_VAE,
    "text_encoder": dict(TINY_CONFIGS["text_encoder"], hidden_act="gelu"),
    "scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
                  "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "clip_sample": False},
    "tokenizer": {"pad_token": "!"},
}
TINY_SDXL_CONFIGS = {
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 48),
    "vae": dict(_TINY_VAE, scaling_factor=0.13025, force_upcast=True),
    "text_encoder": TINY_CONFIGS["text_encoder"],
    "text_encoder_2": dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                           projection_dim=48, architectures=["CLIPTextModelWithProjection"]),
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
                  "prediction_type": "epsilon", "interpolation_type": "linear", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "use_karras_sigmas": False, "clip_sample": False},
    "tokenizer": {}, "tokenizer_2": {"pad_token": "!"},
}

TINY_BASES = {"sd1": TINY_CONFIGS, "sd2": TINY_SD2_CONFIGS, "sdxl": TINY_SDXL_CONFIGS}

# FLUX.1's VAE (black-forest-labs/FLUX.1-dev and -schnell, vae/config.json): SD's structure with 16 latent
# channels, no 1x1 convolutions around the latent, latents normalized as (z - 0.1159) * 0.3611. The tiny one
# is the tiny SD VAE (64x64 images <-> 8x8 latents) in the same form.
FLUX_VAE = dict(SD14_VAE, sample_size=1024, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, latents_mean=None, latents_std=None,
                force_upcast=True, mid_block_add_attention=True)
TINY_FLUX_VAE = dict(_TINY_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                     use_post_quant_conv=False)


class UnsupportedConfigError(ValueError):
    """A model config asks for something our models do not compute."""


# PyTorch options our modules do not take, with the value they compute; any other value would change the
# output. Options that are neither these nor a module field are an error too.
_UNET_TORCH_DEFAULTS = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
_VAE_TORCH_DEFAULTS = {"latents_mean": None, "latents_std": None, "mid_block_add_attention": True}
# The values our modules build of these options.
_BUILDS = {
    "unet": {"down_block_types": set(unet_module.DOWN_BLOCKS), "up_block_types": set(unet_module.UP_BLOCKS),
             "mid_block_type": set(unet_module.MID_BLOCKS), "addition_embed_type": {None, "text_time"}},
    "vae": {"down_block_types": set(vae_module.DOWN_BLOCKS), "up_block_types": set(vae_module.UP_BLOCKS),
            "act_fn": {"silu"}},
}
# Bookkeeping, hints to pipelines that do not change the model's output, and dropout (the frozen models run
# deterministically, as PyTorch's in eval mode).
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "dropout"}
_EQUIVALENT = {"act_fn": {"swish": "silu"}}
_ACTIVATIONS = ("quick_gelu", "gelu")


def config_options(name: str, config: dict, module, torch_defaults: dict) -> dict:
    """The config's options that `module` (a Flax module class) takes; raises for any that would be computed
    differently."""
    accepted = {f.name for f in dataclasses.fields(module)} - {"parent", "name", *module.OURS}
    kept = {}
    for key, value in config.items():
        value = _EQUIVALENT.get(key, {}).get(value, value) if isinstance(value, str) else value
        value = tuple(value) if isinstance(value, list) else value
        if key in _IGNORED:
            continue
        if key in _BUILDS.get(name, {}):
            allowed = _BUILDS[name][key]
            bad = sorted({v for v in (value if isinstance(value, tuple) else (value,)) if v not in allowed}, key=str)
            if bad:
                raise UnsupportedConfigError(f"{name} config: {key}={value!r}: the Flax model only builds "
                                             f"{sorted(allowed, key=str)}, not {bad}")
        if key in accepted:
            kept[key] = value
        elif key not in torch_defaults:
            raise UnsupportedConfigError(f"{name} config: unknown option {key}={value!r}; the Flax "
                                         f"{module.__name__} has no such setting")
        elif value != torch_defaults[key]:
            raise UnsupportedConfigError(f"{name} config: {key}={value!r} is not supported: the Flax "
                                         f"{module.__name__} always computes {key}={torch_defaults[key]!r}")
    return kept


def unet_options(config: dict) -> dict:
    """The UNet2DConditionModel fields of a diffusers UNet config (SD 1.x, 2.x, SDXL)."""
    kept = config_options("unet", config, unet_module.UNet2DConditionModel, _UNET_TORCH_DEFAULTS)
    layers = kept.get("transformer_layers_per_block", 1)
    if not all(isinstance(n, int) for n in (layers if isinstance(layers, tuple) else (layers,))):
        raise UnsupportedConfigError(f"unet config: transformer_layers_per_block={layers!r}: the Flax UNet takes "
                                     "one count per block, not per layer")
    return {**kept, "upcast_attention": bool(kept.get("upcast_attention"))}   # SDXL's config has null


def vae_options(config: dict) -> dict:
    """The AutoencoderKL fields of a diffusers VAE config."""
    return config_options("vae", config, vae_module.AutoencoderKL, _VAE_TORCH_DEFAULTS)


# Hugging Face CLIPTextConfig entry -> CLIPTextEncoder field.
_CLIP_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "width", "intermediate_size": "mlp_dim",
                "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "max_position_embeddings": "max_length", "hidden_act": "activation", "layer_norm_eps": "layer_norm_eps"}


_WITH_PROJECTION = "CLIPTextModelWithProjection"


def clip_text_fields(config: dict) -> dict:
    """Hugging Face CLIPTextConfig entries -> CLIPTextEncoder fields; `projection_dim` is set for a
    CLIPTextModelWithProjection (its "architectures"), else None."""
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"text_encoder config: hidden_act={activation!r} is not supported "
                                     f"(use one of {', '.join(_ACTIVATIONS)})")
    defaults = {f.name: f.default for f in dataclasses.fields(CLIPTextEncoder)}
    fields = {ours: config.get(theirs, defaults[ours]) for theirs, ours in _CLIP_FIELDS.items()}
    with_projection = _WITH_PROJECTION in (config.get("architectures") or ())
    fields["projection_dim"] = config.get("projection_dim", 512) if with_projection else None  # 512: HF's default
    return fields


def clip_text_config(encoder: CLIPTextEncoder) -> dict:
    """The Hugging Face CLIPTextConfig entries of `encoder` (inverse of `clip_text_fields`)."""
    config = {theirs: getattr(encoder, ours) for theirs, ours in _CLIP_FIELDS.items()}
    if encoder.projection_dim is not None:
        config.update(projection_dim=encoder.projection_dim, architectures=[_WITH_PROJECTION])
    return config


def alphas_cumprod(scheduler_config: dict) -> np.ndarray:
    """(T,) float32 cumulative products of 1 - beta_t: the DDPM training noise schedule of the config."""
    steps = scheduler_config.get("num_train_timesteps", 1000)
    start, end = scheduler_config.get("beta_start", 0.0001), scheduler_config.get("beta_end", 0.02)
    schedule = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise UnsupportedConfigError("scheduler config: rescale_betas_zero_snr=True is not supported")
    if scheduler_config.get("trained_betas") is not None:
        betas = np.asarray(scheduler_config["trained_betas"], np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    else:
        raise UnsupportedConfigError(f"scheduler config: beta_schedule={schedule!r} is not supported "
                                     "(use 'scaled_linear' or 'linear')")
    return np.cumprod(1.0 - betas).astype(np.float32)



def size_multiple(configs: dict) -> int:
    """The multiple of image sides for the "vae" and "unet" configs of a diffusers directory: the VAE's
    downsampling (8 for SD) times the UNet's (2 per level below the first: 8 for SD 1.x and 2.x, 4 for SDXL)."""
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1) * 2 ** (len(configs["unet"]["block_out_channels"]) - 1)

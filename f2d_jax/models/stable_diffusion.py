"""The frozen Stable Diffusion bundle: UNet, VAE, CLIP text encoder and the training noise schedule.

`load_stable_diffusion` reads a diffusers-format directory (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) or a hub id and returns the modules with their parameters: diffusers' Flax UNet and VAE,
our `CLIPTextEncoder`, the scheduler config. `load_unet` reads a UNet folder alone (SD 1.x, 2.x or
SDXL), or the unet/ of such a directory. Weights may be Flax msgpack or PyTorch safetensors (no
torch needed) or PyTorch .bin (needs torch); PyTorch weights go through the project's converter, so
any mismatch is reported key by key. A config option the Flax models cannot represent raises rather
than being dropped. `tiny_stable_diffusion` builds a random-init bundle of the same structure for
tests and CPU demos.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from f2d_jax.convert import io
from f2d_jax.convert.checkpoints import CLIP_LAYOUT
from f2d_jax.convert.layout import TorchLayout, check_tree, from_torch
from f2d_jax.models.attention import check_implementation
from f2d_jax.models.bases import PUBLISHED, SD14_SCHEDULER
from f2d_jax.models.clip_text import CLIPTextEncoder
from f2d_jax.models.layers import multi_head_attention


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("Flax classes are deprecated")


# diffusers logs "Flax classes are deprecated" from every Flax module's class body and setup (at import
# and on every trace) through its library handler, which `import diffusers` sets up before any Flax module.
import diffusers  # noqa: E402, F401

for _handler in logging.getLogger("diffusers").handlers:
    _handler.addFilter(_DropFlaxDeprecation())

from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: E402
from diffusers.configuration_utils import flax_register_to_config  # noqa: E402
from diffusers.models.attention_flax import (  # noqa: E402
    FlaxAttention, FlaxBasicTransformerBlock, FlaxGEGLU, FlaxTransformer2DModel)
from diffusers.models.resnet_flax import FlaxResnetBlock2D  # noqa: E402

COMPONENTS = ("unet", "vae", "text_encoder")
SECOND_ENCODER = "text_encoder_2"   # SDXL's OpenCLIP bigG, beside CLIP ViT-L
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json", SECOND_ENCODER: "config.json"}
# Per component, in order of preference: Flax msgpack, safetensors, PyTorch pickle.
WEIGHT_FILES = {
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"),
}
WEIGHT_FILES[SECOND_ENCODER] = WEIGHT_FILES["text_encoder"]


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

# PyTorch-only options and the PyTorch defaults (diffusers 0.39) the Flax models compute; any other value
# would change the output. Keys not listed and not accepted by the Flax class are an error too.
_UNET_TORCH_DEFAULTS = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_VAE_TORCH_DEFAULTS = {
    "shift_factor": None, "latents_mean": None, "latents_std": None, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# Options the Flax classes accept but do not honour (they always build these).
_FLAX_FIXED = {
    "unet": {"down_block_types": {"CrossAttnDownBlock2D", "DownBlock2D"},
             "up_block_types": {"CrossAttnUpBlock2D", "UpBlock2D"},
             "mid_block_type": {"UNetMidBlock2DCrossAttn", None},
             "addition_embed_type": {None, "text_time"}, "num_attention_heads": {None}},
    "vae": {"down_block_types": {"DownEncoderBlock2D"}, "up_block_types": {"UpDecoderBlock2D"},
            "act_fn": {"silu", "swish"}},
}
# Bookkeeping, or hints to pipelines that do not change the model's output.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast"}
# Options our subclass honours beyond the Flax class's fields (`build_unet` reads them).
_OURS = {"unet": {"upcast_attention"}}
_EQUIVALENT = {"act_fn": {"swish": "silu"}}
_ACTIVATIONS = ("quick_gelu", "gelu")


def _torch_numerics(next_fun, args, kwargs, context, *, implementation="auto", upcast=False, remat=False):
    """Method interceptor giving diffusers' Flax UNet layers PyTorch's numerics and our attention (see UNet)."""
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
        return next_fun(*args, **kwargs)
    if remat and isinstance(module, (FlaxBasicTransformerBlock, FlaxResnetBlock2D)) and module.path:
        return _recomputed(module, args, kwargs)
    if isinstance(module, FlaxAttention):
        return _attention_layer(module, implementation, upcast, *args, **kwargs)
    if isinstance(module, FlaxGEGLU):  # GEGLU with exact GELU
        hidden, deterministic = args[0], (args[1:] or [kwargs.get("deterministic", True)])[0]
        value, gate = jnp.split(module.proj(hidden), 2, axis=-1)
        return module.dropout_layer(value * jax.nn.gelu(gate, approximate=False), deterministic=deterministic)
    if isinstance(module, nn.GroupNorm) and isinstance(module.parent, FlaxTransformer2DModel):
        return module.clone(parent=None, epsilon=1e-6).apply({"params": module.variables["params"]}, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _recomputed(module: nn.Module, args, kwargs):
    """module(*args, **kwargs) under jax.checkpoint: the backward pass keeps only the layer's inputs and
    computes its forward pass again (its weights gathered again where they are sharded), one layer at a
    time. The layer runs as a clone at the root of its own parameters, whose call this interceptor passes."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

    def layer(params, *values):
        filled = list(leaves)
        for i, value in zip(arrays, values):
            filled[i] = value
        call_args, call_kwargs = jax.tree.unflatten(tree, filled)
        return module.clone(parent=None).apply({"params": params}, *call_args, **call_kwargs)

    return jax.checkpoint(layer)(module.variables["params"], *(leaves[i] for i in arrays))


def _attention_layer(module: FlaxAttention, implementation: str, upcast: bool, hidden_states, context=None,
                     deterministic=True):
    """FlaxAttention's computation (same parameters) through f2d_jax.models.attention; with `upcast`,
    q k^T, the softmax and P V in float32 (PyTorch's upcast_attention), the result in the input dtype."""
    context = hidden_states if context is None else context
    q, k, v = module.query(hidden_states), module.key(context), module.value(context)
    dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = multi_head_attention(q, k, v, module.heads, implementation=implementation).astype(dtype)
    out = module.proj_attn(out)
    return module.dropout_layer(out, deterministic=deterministic)


@flax_register_to_config
class UNet(FlaxUNet2DConditionModel):
    """diffusers' Flax UNet computing what PyTorch's UNet2DConditionModel computes.

    Same parameters and config; three layers differ in the Flax original: its GEGLU feed-forward
    uses the tanh approximation of GELU (PyTorch: exact erf GELU) and its transformer input
    GroupNorm has eps 1e-5 (PyTorch: 1e-6), each moving the tiny UNet's output by a few 1e-5; and
    its attention is replaced by f2d_jax.models.attention (`attention` names the implementation).
    `upcast_attention` (PyTorch's config option, SD 2.1 768-v) computes the attention scores, the
    softmax and P V in float32 whatever the module dtype; the Flax original has no such option.
    `remat` recomputes each transformer layer and ResNet block in the backward pass, one at a time
    (training's `remat_unet`). None of these fields is part of the diffusers Flax config: `build_unet`
    sets the first two.

    SD 2.x (linear projections, per-level head counts) and SDXL (several transformer layers per
    block, the "text_time" added embedding) compute as PyTorch with no further change: the
    sinusoidal embedding of SDXL's added time ids is PyTorch's formula (flip_sin_to_cos, freq_shift);
    its frequencies differ from torch's by at most one float32 ulp (XLA's exp against torch's), as
    the timestep embedding's do: at most 3e-5 in the 256-wide embedding of ids up to 1024 (6e-5 in
    the 320-wide one of timesteps up to 999), about 1e-6 at the tiny UNets' output.
    """

    attention: str = "auto"
    upcast_attention: bool = False
    remat: bool = False
    _flax_internal_args = (*FlaxUNet2DConditionModel._flax_internal_args, "attention", "upcast_attention", "remat")

    def register_to_config(self, **kwargs):
        # What clone passes beyond the config: the Flax internals and our fields.
        super().register_to_config(**{k: v for k, v in kwargs.items() if k not in self._flax_internal_args})

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(functools.partial(_torch_numerics, implementation=self.attention,
                                                    upcast=self.upcast_attention, remat=self.remat)):
            return super().__call__(*args, **kwargs)


def unet_output(unet: UNet, params, x, t, conditioning: dict):
    """The UNet's prediction for latents x (B, C, h, w) at timesteps t (B,) under a conditioning
    {"context": (B, 77, D)} (SDXL adds "text_embeds" and "time_ids"; a bare array is the context),
    computed in the UNet's dtype."""
    conditioning = conditioning if isinstance(conditioning, dict) else {"context": conditioning}
    cond = {k: v.astype(unet.dtype) for k, v in conditioning.items()}
    added = {k: cond[k] for k in ("text_embeds", "time_ids")} if "time_ids" in cond else None
    return unet.apply(params, x.astype(unet.dtype), t, cond["context"], added_cond_kwargs=added).sample


class UnsupportedConfigError(ValueError):
    """A model config asks for something the Flax model does not compute."""


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The frozen Stable Diffusion modules and settings; parameters travel separately.

    SD 1.x and 2.x have one text encoder; SDXL has two (`text_encoder_2` is bigG, with its text
    projection), whose penultimate hidden states side by side are the UNet's context, and whose
    projected pooled state and the image size (`time_ids`) are the UNet's added conditioning."""

    unet: UNet
    vae: FlaxAutoencoderKL
    text_encoder: CLIPTextEncoder
    scheduler_config: dict
    vae_scaling_factor: float = 0.18215
    tokenizer_path: str | None = None   # directory with the tokenizer files; None: the bundled SD v1 one
    text_encoder_2: CLIPTextEncoder | None = None
    force_zeros_for_empty_prompt: bool = False   # SDXL: no negative prompt means a conditioning of zeros

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of this: the VAE's downsampling times the UNet's."""
        return size_multiple({"vae": {"block_out_channels": self.vae.block_out_channels},
                              "unet": {"block_out_channels": self.unet.block_out_channels}})

    @property
    def text_encoders(self) -> dict[str, CLIPTextEncoder]:
        """The text encoders by variables key, in the order their states are concatenated."""
        second = {SECOND_ENCODER: self.text_encoder_2} if self.text_encoder_2 is not None else {}
        return {"text_encoder": self.text_encoder, **second}

    @property
    def base(self) -> str:
        """"sdxl" (two text encoders), "sd2" (OpenCLIP's GELU text encoder) or "sd1" (CLIP ViT-L's quick GELU)."""
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if self.text_encoder.activation == "gelu" else "sd1"

    def with_size(self, conditioning: dict, height: int, width: int) -> dict:
        """The conditioning with SDXL's size micro-conditioning, `time_ids` (B, 6): original size, crop
        top-left, target size, as diffusers' SDXL pipeline makes them by default ((h, w, 0, 0, h, w)).
        Unchanged for a UNet without added time ids."""
        if self.unet.addition_embed_type != "text_time":
            return conditioning
        rows = conditioning["context"].shape[0]
        ids = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
        return {**conditioning, "time_ids": jnp.broadcast_to(ids, (rows, 6))}

    def negative_conditioning(self, conditioning: dict, negative_prompt: str | None) -> dict:
        """The unconditional branch's conditioning, given the negative prompt's (the empty prompt's when it is
        None): zeros for SDXL when none is given (diffusers' force_zeros_for_empty_prompt), else unchanged."""
        if negative_prompt is not None or not self.force_zeros_for_empty_prompt:
            return conditioning
        return jax.tree.map(jnp.zeros_like, conditioning)

    @property
    def default_size(self) -> int:
        """The image side the UNet was trained at (512 for SD 1.x and 2.1-base, 768 for 2.1, 1024 for SDXL)."""
        return self.unet.sample_size * self.vae_scale_factor

    def tokenizer(self):
        from f2d_jax.text import load_tokenizer
        return load_tokenizer(self.tokenizer_path)


# --------------------------------------------------------------------------- configs

def _check_config(name: str, config: dict, flax_class, torch_defaults: dict) -> dict:
    """The config's options that `flax_class` takes; raises for any that would be computed differently.
    Options our subclasses honour themselves (_OURS) are left out."""
    accepted = {f.name for f in dataclasses.fields(flax_class)} - {"parent", "name", "dtype"}
    kept = {}
    for key, value in config.items():
        value = _EQUIVALENT.get(key, {}).get(value, value) if isinstance(value, str) else value
        value = tuple(value) if isinstance(value, list) else value
        if key in _IGNORED or key in _OURS.get(name, ()):
            continue
        if key in _FLAX_FIXED.get(name, {}):
            allowed = _FLAX_FIXED[name][key]
            bad = sorted({v for v in (value if isinstance(value, tuple) else (value,)) if v not in allowed}, key=str)
            if bad:
                raise UnsupportedConfigError(f"{name} config: {key}={value!r}: the Flax model only builds "
                                             f"{sorted(allowed, key=str)}, not {bad}")
        if key in accepted:
            kept[key] = value
        elif key not in torch_defaults:
            raise UnsupportedConfigError(f"{name} config: unknown option {key}={value!r}; the Flax "
                                         f"{flax_class.__name__} has no such setting")
        elif value != torch_defaults[key]:
            raise UnsupportedConfigError(f"{name} config: {key}={value!r} is not supported: the Flax "
                                         f"{flax_class.__name__} always computes {key}={torch_defaults[key]!r}")
    return kept


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


def build_unet(config: dict, *, dtype=jnp.float32, attention: str = "auto") -> UNet:
    """The UNet module of a diffusers UNet2DConditionModel config (SD 1.x, 2.x, SDXL) computing in `dtype`;
    `attention` names the attention implementation. Raises UnsupportedConfigError as `build`."""
    kept = _check_config("unet", config, FlaxUNet2DConditionModel, _UNET_TORCH_DEFAULTS)
    layers = kept.get("transformer_layers_per_block", 1)
    if not all(isinstance(n, int) for n in (layers if isinstance(layers, tuple) else (layers,))):
        raise UnsupportedConfigError(f"unet config: transformer_layers_per_block={layers!r}: the Flax UNet takes "
                                     "one count per block, not per layer")
    if kept.get("addition_embed_type") == "text_time" and kept.get("addition_time_embed_dim", 0) % 2:
        raise UnsupportedConfigError(f"unet config: addition_time_embed_dim={kept['addition_time_embed_dim']}: "
                                     "the Flax UNet's sinusoidal embedding needs an even width")
    return UNet.from_config(kept, dtype=dtype).clone(attention=check_implementation(attention),
                                                     upcast_attention=bool(config.get("upcast_attention")))


def _text_encoder(config: dict, tokenizer: dict | None, *, sdxl: bool, dtype, attention: str) -> CLIPTextEncoder:
    """A text encoder as the base's pipeline uses it: SDXL reads the penultimate hidden state, and each
    encoder re-pads the ids with its own tokenizer's pad token (all SD tokenizers share one vocabulary)."""
    from f2d_jax.text import load_tokenizer
    pad = (tokenizer or {}).get("pad_token")
    pad_id = None if pad is None else load_tokenizer().convert_tokens_to_ids(pad)
    return CLIPTextEncoder(**clip_text_fields(config), dtype=dtype, attention=attention, penultimate=sdxl,
                           pad_token_id=pad_id)


def build(configs: dict, *, dtype=jnp.float32, tokenizer_path: str | None = None,
          attention: str = "auto", force_zeros_for_empty_prompt: bool | None = None) -> StableDiffusion:
    """The bundle's modules from the component configs {"unet", "vae", "text_encoder", "scheduler"}, SDXL's
    "text_encoder_2", and the tokenizers' settings {"tokenizer", "tokenizer_2": {"pad_token"}} where they
    pad with another token than end-of-text; `attention` names every model's attention implementation.
    `force_zeros_for_empty_prompt` (model_index.json's) defaults to True for SDXL, as diffusers'."""
    unet = build_unet(configs["unet"], dtype=dtype, attention=attention)
    vae = FlaxAutoencoderKL.from_config(
        _check_config("vae", configs["vae"], FlaxAutoencoderKL, _VAE_TORCH_DEFAULTS), dtype=dtype)
    sdxl = SECOND_ENCODER in configs
    encoders = [_text_encoder(configs[name], configs.get(tokenizer), sdxl=sdxl, dtype=dtype, attention=attention)
                for name, tokenizer in (("text_encoder", "tokenizer"), (SECOND_ENCODER, "tokenizer_2"))
                if name in configs]
    if sdxl and encoders[1].projection_dim is None:
        raise UnsupportedConfigError(f"{SECOND_ENCODER} config: SDXL's second text encoder is a "
                                     "CLIPTextModelWithProjection (architectures names it)")
    alphas_cumprod(configs["scheduler"])  # an unsupported schedule fails now, not in training
    zeros = sdxl if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt
    return StableDiffusion(unet, vae, encoders[0], dict(configs["scheduler"]),
                           float(configs["vae"].get("scaling_factor", 0.18215)), tokenizer_path,
                           encoders[1] if sdxl else None, bool(zeros))


def abstract_params(sd: StableDiffusion, dtype=None) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} variable trees as ShapeDtypeStructs (nothing is
    allocated), float leaves in `dtype` where given (as `random_params` and the loaders cast them)."""
    key = jax.random.key(0)
    tokens = jnp.zeros((1, sd.text_encoder.max_length), jnp.int32)
    tree = {"unet": _abstract_unet(sd.unet),
            "vae": {"params": jax.eval_shape(sd.vae.init_weights, key)},
            **{name: jax.eval_shape(encoder.init, key, tokens) for name, encoder in sd.text_encoders.items()}}
    return tree if dtype is None else jax.eval_shape(lambda t: _cast(t, dtype), tree)


def _abstract_unet(unet: UNet) -> dict[str, Any]:
    return {"params": jax.eval_shape(unet.init_weights, jax.random.key(0))}


def _cast(variables, dtype):
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, variables)


def random_params(abstract: Any, rng, dtype=jnp.float32) -> Any:
    """Random variables shaped like `abstract`, drawn without compiling the models' init (which takes XLA
    many seconds on CPU): Flax's default scheme, lecun-normal kernels, zero biases, unit norm scales,
    and N(0, 0.02) embeddings as CLIP's."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    noise = np.asarray(jax.random.normal(rng, (sum(leaf.size for _, leaf in leaves),), jnp.float32))
    values, offset = [], 0
    for path, leaf in leaves:
        name, shape = path[-1].key, leaf.shape
        draw = noise[offset:offset + leaf.size].reshape(shape)
        offset += leaf.size
        if name == "kernel":  # Dense (in, out), scan-stacked Dense (L, in, out), Conv (H, W, in, out)
            fan_in = np.prod(shape[:-1]) if len(shape) == 4 else shape[-2]
            values.append(draw / np.sqrt(fan_in))
        elif name == "embedding":
            values.append(0.02 * draw)
        else:
            values.append(np.full(shape, 1.0 if name == "scale" else 0.0, np.float32))
    return _cast(jax.tree_util.tree_unflatten(treedef, values), dtype)


TINY_BASES = {"sd1": TINY_CONFIGS, "sd2": TINY_SD2_CONFIGS, "sdxl": TINY_SDXL_CONFIGS}


def tiny_stable_diffusion(rng, *, dtype=jnp.float32, attention: str = "auto",
                          base: str = "sd1") -> tuple[StableDiffusion, dict]:
    """A random-init bundle of TINY_BASES[base]'s sizes (latents 8x8x4, images 64x64, 32-wide CLIP)."""
    if base not in TINY_BASES:
        raise ValueError(f"no tiny Stable Diffusion of base {base!r}; choose one of {', '.join(TINY_BASES)}")
    sd = build(TINY_BASES[base], dtype=dtype, attention=attention)
    return sd, random_params(abstract_params(sd), rng, dtype)


# --------------------------------------------------------------------------- weights

# PyTorch VAE attention: current diffusers names to_q/to_k/to_v/to_out.0, older checkpoints
# query/key/value/proj_attn (the Flax names), the oldest store them as 1x1 convolutions.
_VAE_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.")
_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def normalize_vae_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A PyTorch AutoencoderKL state dict with the attention projections named and shaped as the Flax VAE's."""
    out = {}
    for key, value in state.items():
        match = _VAE_ATTENTION.match(key)
        if match:
            name = _VAE_ATTENTION_NAMES.get(match[2], match[2])
            key = f"{match[1]}{name}.{key[match.end():]}"
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


# The generic rules cover the UNet; only its time embeddings' `linear_1`/`linear_2` are literal PyTorch
# names, not `linear.1`: identity renames keep the reverse mapping (missing-key reports) right.
_UNET_LAYOUT = TorchLayout(renames=tuple((f"{m}.linear_{i}", f"{m}.linear_{i}")
                                         for m in ("time_embedding", "add_embedding") for i in (1, 2)))
_TORCH_LAYOUTS = {"unet": _UNET_LAYOUT, "vae": TorchLayout(), "text_encoder": CLIP_LAYOUT, SECOND_ENCODER: CLIP_LAYOUT}


def _clip_from_hf_flax(tree: dict) -> dict:
    """transformers' FlaxCLIPTextModel[WithProjection] params (text_model/encoder/layers/<i>/..., text_projection)
    -> our tree (layers stacked)."""
    projection = {"text_projection": tree["text_projection"]} if "text_projection" in tree else {}
    tree = tree.get("text_model", tree)
    if "encoder" not in tree:
        return {**tree, **projection}  # already our layout (or not CLIP at all: check_tree will say)
    embeddings, layers = tree.get("embeddings", {}), tree["encoder"].get("layers", {})
    flat = [traverse_util.flatten_dict(layers[i]) for i in sorted(layers, key=int)]
    stacked = {path: np.stack([np.asarray(f[path]) for f in flat]) for path in (flat[0] if flat else {})
               if all(path in f and np.shape(f[path]) == np.shape(flat[0][path]) for f in flat)}
    ours = {k: embeddings[k] for k in ("token_embedding", "position_embedding") if k in embeddings}
    ours["layers"] = traverse_util.unflatten_dict(stacked)
    if "final_layer_norm" in tree:
        ours["final_layer_norm"] = tree["final_layer_norm"]
    return {**ours, **projection}


def _weight_file(name: str, folder: Path) -> Path | None:
    return next((folder / f for f in WEIGHT_FILES[name] if (folder / f).is_file()), None)


def load_component(name: str, folder, target: dict, dtype=jnp.float32) -> dict:
    """{"params": ...} for component `name` from the best weight file in `folder`, shaped like `target`."""
    folder = Path(folder)
    path = _weight_file(name, folder)
    if path is None:
        raise FileNotFoundError(f"no {name} weights in {folder}: expected one of {', '.join(WEIGHT_FILES[name])}")
    what = f"{name} weights {path}"
    if path.suffix == ".msgpack":
        tree = io.read_flax(path)
        tree = tree["params"] if set(tree) == {"params"} else tree
        variables = {"params": _clip_from_hf_flax(tree) if name.startswith("text_encoder") else tree}
        check_tree(variables, target, what)
    else:
        state = io.read_state_dict(path)
        if name == "vae":
            state = normalize_vae_state(state)
        variables = from_torch(state, target, _TORCH_LAYOUTS[name], what)
    return _cast(variables, dtype)


def save_stable_diffusion(sd: StableDiffusion, params: dict, directory) -> Path:
    """Write the bundle as a diffusers-format directory with Flax weights, which
    `load_stable_diffusion` reads back (e.g. a tiny SD whose UNet was trained here)."""
    directory = Path(directory)
    sd.unet.save_pretrained(directory / "unet", params=params["unet"]["params"])
    if sd.unet.upcast_attention:  # not a Flax config field: written as PyTorch's config has it
        config = directory / "unet" / CONFIG_FILES["unet"]
        config.write_text(json.dumps({**json.loads(config.read_text()), "upcast_attention": True}, indent=2))
    sd.vae.save_pretrained(directory / "vae", params=params["vae"]["params"])
    tokenizer = copy.deepcopy(sd.tokenizer())   # the loaded one is shared
    for (name, encoder), folder in zip(sd.text_encoders.items(), ("tokenizer", "tokenizer_2")):
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / CONFIG_FILES[name]).write_text(json.dumps(clip_text_config(encoder), indent=2))
        io.write_flax(params[name]["params"], directory / name / WEIGHT_FILES[name][0])
        if encoder.pad_token_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(encoder.pad_token_id)
        tokenizer.save_pretrained(directory / folder)
    index = {"force_zeros_for_empty_prompt": sd.force_zeros_for_empty_prompt} if sd.text_encoder_2 else {}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    (directory / "scheduler").mkdir(exist_ok=True)
    (directory / "scheduler" / CONFIG_FILES["scheduler"]).write_text(json.dumps(sd.scheduler_config, indent=2))
    return directory


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _tokenizer_settings(folder: Path, vocabulary: Path | None = None) -> dict:
    """{"pad_token": ...} of a Hugging Face tokenizer folder (its special tokens map or config), checking
    that its vocabulary and merges are those of `vocabulary` (the first tokenizer's folder)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder.parent} has no {folder.name}/ subfolder")
    if vocabulary is not None:
        for file in ("vocab.json", "merges.txt"):
            if (folder / file).read_bytes().strip() != (vocabulary / file).read_bytes().strip():
                raise UnsupportedConfigError(f"{folder.name}/{file} differs from {vocabulary.name}/{file}: the "
                                             "text encoders are fed the same token ids, so both need one vocabulary")
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = _read_json(folder / file).get("pad_token") if (folder / file).is_file() else None
        if pad is not None:
            return {"pad_token": pad["content"] if isinstance(pad, dict) else pad}
    return {}


def _read_config(root: Path, name: str) -> dict:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no {name}/ subfolder; a diffusers Stable Diffusion directory "
                                "has unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    path = folder / CONFIG_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"no {name} config at {path}")
    return _read_json(path)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _components(root: Path) -> tuple[str, ...]:
    """The models of the directory: SDXL's have a second text encoder."""
    return (*COMPONENTS, SECOND_ENCODER) if (root / SECOND_ENCODER).is_dir() else COMPONENTS


def _local_or_hub(path_or_hub_id, what: str) -> tuple[Path | None, str | None]:
    """(the local directory, None) or (None, the hub id); raises for a path that is neither."""
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; expected a diffusers {what}")
        return path, None
    name = os.fspath(path_or_hub_id)
    if not _HUB_ID.match(name) or name.startswith("."):
        raise FileNotFoundError(f"no {what} at {path}")
    return None, name


def _download(name: str, revision: str | None, patterns: list[str], folders: dict[str, str]) -> Path:
    """Snapshot of hub repo `name` with `patterns` and, for each folder ("unet/": "unet", folder prefix ->
    component) whose config it has, one weight format: safetensors, else Flax msgpack, else PyTorch .bin."""
    import huggingface_hub

    root, missing = None, list(folders)
    for weights in (1, 0, 2):
        allow = [*patterns, *(f"{f}{CONFIG_FILES[folders[f]]}" for f in folders),
                 *(f"{f}{WEIGHT_FILES[folders[f]][weights]}" for f in missing)]
        try:
            root = Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=allow))
        except Exception as e:
            raise FileNotFoundError(f"{name!r} is neither a local directory nor a downloadable hub id: {e}") from e
        missing = [f for f, c in folders.items()
                   if (root / f / CONFIG_FILES[c]).is_file() and _weight_file(c, root / f) is None]
        if not missing:
            break
    return root  # with weights missing, the loader names what it expected


def size_multiple(configs: dict) -> int:
    """The multiple of image sides for the "vae" and "unet" configs of a diffusers directory: the VAE's
    downsampling (8 for SD) times the UNet's (2 per level below the first: 8 for SD 1.x and 2.x, 4 for SDXL)."""
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1) * 2 ** (len(configs["unet"]["block_out_channels"]) - 1)


def read_size_multiple(path_or_hub_id, tiny_base: str = "sd1", revision: str | None = None) -> int:
    """`size_multiple` of a Stable Diffusion directory or hub id read from its configs alone (a hub id's are
    downloaded, not its weights); of the tiny random Stable Diffusion of `tiny_base` for an empty one."""
    if not path_or_hub_id:
        return size_multiple(TINY_BASES[tiny_base])
    root, name = _local_or_hub(path_or_hub_id, "Stable Diffusion directory")
    if root is None:
        root = _download(name, revision, [f"{c}/{CONFIG_FILES[c]}" for c in ("unet", "vae")], {})
    return size_multiple({c: _read_config(root, c) for c in ("unet", "vae")})


def resolve(path_or_hub_id, revision: str | None = None) -> Path:
    """A local diffusers directory, or a hub id downloaded with only configs, tokenizer and one weight format."""
    path, name = _local_or_hub(path_or_hub_id, "Stable Diffusion directory")
    if path is not None:
        return path
    return _download(name, revision, ["model_index.json", "tokenizer/*", "tokenizer_2/*",
                                      f"scheduler/{CONFIG_FILES['scheduler']}"],
                     {f"{c}/": c for c in (*COMPONENTS, SECOND_ENCODER)})


def bundle_configs(path_or_hub_id, revision: str | None = None) -> tuple[dict, dict]:
    """(the component configs `build` takes, its other keyword arguments) of a Stable Diffusion directory or
    hub id, from its config files alone: no weights are read, and a hub id of a base the named configs use
    needs no download either (models/bases.py)."""
    if os.fspath(path_or_hub_id) in PUBLISHED and not Path(os.fspath(path_or_hub_id)).exists():
        return copy.deepcopy(PUBLISHED[os.fspath(path_or_hub_id)]), {}
    root, name = _local_or_hub(path_or_hub_id, "Stable Diffusion directory")
    if root is None:
        root = _download(name, revision, ["model_index.json", "tokenizer/*", "tokenizer_2/*",
                                          *(f"{c}/{CONFIG_FILES[c]}" for c in (*COMPONENTS, SECOND_ENCODER, "scheduler"))],
                         {})
    return _configs(root)


def _configs(root: Path) -> tuple[dict, dict]:
    components = _components(root)
    configs = {name: _read_config(root, name) for name in (*components, "scheduler")}
    tokenizer = root / "tokenizer"
    configs["tokenizer"] = _tokenizer_settings(tokenizer)
    if SECOND_ENCODER in components:
        configs["tokenizer_2"] = _tokenizer_settings(root / "tokenizer_2", vocabulary=tokenizer)
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    return configs, dict(tokenizer_path=str(tokenizer),
                         force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"))


def load_stable_diffusion(path_or_hub_id, *, dtype=jnp.float32, revision: str | None = None,
                          attention: str = "auto") -> tuple[StableDiffusion, dict]:
    """(bundle, {"unet", "vae", "text_encoder"[, "text_encoder_2"]: {"params": ...}}) from a diffusers
    directory or hub id of SD 1.x, 2.x or SDXL (the base is read from the directory: SDXL's has
    text_encoder_2/ and tokenizer_2/).

    Float weights (and the modules' compute dtype) become `dtype`. Raises FileNotFoundError for a
    missing directory, subfolder, config or weight file, UnsupportedConfigError for a config the Flax
    models would compute differently, CheckpointMismatchError for weights that do not fit.
    """
    root = resolve(path_or_hub_id, revision)
    configs, options = _configs(root)
    sd = build(configs, dtype=dtype, attention=attention, **options)
    targets = abstract_params(sd)
    params = {name: load_component(name, root / name, targets[name], dtype) for name in _components(root)}
    return sd, params


def _unet_folder(root: Path, subfolder: str | None) -> Path:
    """The folder under `root` holding the UNet's config: `subfolder`, else root itself, else root/unet."""
    config = CONFIG_FILES["unet"]
    candidates = [root / subfolder] if subfolder is not None else [root, root / "unet"]
    folder = next((c for c in candidates if (c / config).is_file()), None)
    if folder is None:
        where = " or ".join(str(c / config) for c in candidates)
        raise FileNotFoundError(f"no UNet config at {where}: expected a diffusers UNet folder (config.json and "
                                f"{' / '.join(WEIGHT_FILES['unet'])}) or a Stable Diffusion directory with unet/")
    return folder


def load_unet(path_or_hub_id, *, dtype=jnp.float32, attention: str = "auto", subfolder: str | None = None,
              revision: str | None = None) -> tuple[UNet, dict]:
    """(module, {"params": ...}) of a diffusers UNet2DConditionModel (SD 1.x, 2.x, SDXL) alone.

    `path_or_hub_id` is a UNet folder (config.json and diffusion_pytorch_model.safetensors, .bin or
    diffusion_flax_model.msgpack), a whole Stable Diffusion directory (its unet/ is read) or a hub id
    of either; `subfolder` names the folder inside it explicitly. The module is the one
    `load_stable_diffusion` builds: `module.apply(params, latents, timesteps, context,
    added_cond_kwargs=...)` (SDXL: {"text_embeds": (B, P), "time_ids": (B, 6)}) gives `.sample`.
    Float weights and the compute dtype become `dtype`. Raises FileNotFoundError for a missing
    folder, config or weight file, UnsupportedConfigError, CheckpointMismatchError as that does.
    """
    root, name = _local_or_hub(path_or_hub_id, "UNet folder")
    if root is None:
        prefixes = [f"{subfolder.strip('/')}/"] if subfolder is not None else ["", "unet/"]
        root = _download(name, revision, [], {p: "unet" for p in prefixes})
    folder = _unet_folder(root, subfolder)
    unet = build_unet(_read_json(folder / CONFIG_FILES["unet"]), dtype=dtype, attention=attention)
    return unet, load_component("unet", folder, _abstract_unet(unet), dtype)

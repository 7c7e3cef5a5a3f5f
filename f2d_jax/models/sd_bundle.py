"""The frozen Stable Diffusion bundle: UNet, VAE, CLIP text encoder(s) and the scheduler config.

`build` makes the modules from the component configs of a diffusers directory (`sd_config` checks
them): our `UNet2DConditionModel`, `AutoencoderKL` and `CLIPTextEncoder`. Parameters travel
separately: `abstract_params` gives their shapes (nothing allocated), `random_params` random ones,
`tiny_stable_diffusion` a random-init bundle of the tiny configs for tests and CPU demos. Reading and
writing diffusers folders and the hub is `stable_diffusion.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.models.attention import check_implementation
from f2d_jax.models.clip_text import CLIPTextEncoder
from f2d_jax.models.sd_config import (SECOND_ENCODER, TINY_BASES, UnsupportedConfigError, alphas_cumprod,
                                      clip_text_fields, size_multiple, unet_options, vae_options)
from f2d_jax.models.unet import UNet2DConditionModel
from f2d_jax.models.vae import AutoencoderKL


def unet_output(unet: UNet2DConditionModel, params, x, t, conditioning: dict):
    """The UNet's prediction for latents x (B, C, h, w) at timesteps t (B,) under a conditioning
    {"context": (B, 77, D)} (SDXL adds "text_embeds" and "time_ids"; a bare array is the context),
    computed in the UNet's dtype."""
    conditioning = conditioning if isinstance(conditioning, dict) else {"context": conditioning}
    cond = {k: v.astype(unet.dtype) for k, v in conditioning.items()}
    added = {k: cond[k] for k in ("text_embeds", "time_ids")} if "time_ids" in cond else None
    return unet.apply(params, x.astype(unet.dtype), t, cond["context"], added)



@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The frozen Stable Diffusion modules and settings; parameters travel separately.

    SD 1.x and 2.x have one text encoder; SDXL has two (`text_encoder_2` is bigG, with its text
    projection), whose penultimate hidden states side by side are the UNet's context, and whose
    projected pooled state and the image size (`time_ids`) are the UNet's added conditioning."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    scheduler_config: dict
    vae_scaling_factor: float = 0.18215
    tokenizer_path: str | None = None   # directory with the tokenizer files; None: the bundled SD v1 one
    text_encoder_2: CLIPTextEncoder | None = None
    force_zeros_for_empty_prompt: bool = False   # SDXL: no negative prompt means a conditioning of zeros

    denoiser = "unet"   # the variables key of the model that denoises

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels

    @property
    def vae_shift_factor(self) -> float:
        return 0.0

    def predict(self, params, latents, t, conditioning: dict, guidance=None):
        """The UNet's prediction for latents (B, C, h, w) at timesteps t (B,) under a conditioning without the
        size micro-conditioning (added here for SDXL from the latents' size); `guidance` is FLUX's, unused."""
        size = [n * self.vae_scale_factor for n in latents.shape[2:]]
        return unet_output(self.unet, params, latents, t, self.with_size(conditioning, *size))

    def with_remat(self) -> StableDiffusion:
        """The bundle with its UNet recomputing each layer in the backward pass (`UNet2DConditionModel.remat`)."""
        return dataclasses.replace(self, unet=self.unet.clone(remat=True))

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

    def prompt_ids(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """((N, 77) ids, (N,) positions of "f") of prompts with the identifier (`text.identifier_prompts`)."""
        from f2d_jax.text import identifier_prompts
        return identifier_prompts(prompts, self.tokenizer())

    def plain_ids(self, prompts) -> np.ndarray:
        """(N, 77) ids of prompts as they are (`text.token_ids`)."""
        from f2d_jax.text import token_ids
        return token_ids(prompts, self.tokenizer())

    def class_ids(self) -> np.ndarray:
        """(2,) ids of the class words ("a person"): what identity scale 0 writes in place of "f l"."""
        from f2d_jax.text import class_ids
        return np.asarray(class_ids(self.tokenizer()), np.int32)

    @property
    def conditioning_keys(self) -> tuple[str, ...]:
        """The entries of a conditioning (before `with_size`): the context, and SDXL's pooled "text_embeds"."""
        return ("context", "text_embeds") if self.text_encoder_2 is not None else ("context",)


def build_unet(config: dict, *, dtype=jnp.float32, attention: str = "auto") -> UNet2DConditionModel:
    """The UNet module of a diffusers UNet2DConditionModel config (SD 1.x, 2.x, SDXL) computing in `dtype`;
    `attention` names the attention implementation. Raises UnsupportedConfigError as `build`."""
    return UNet2DConditionModel(**unet_options(config), attention=check_implementation(attention), dtype=dtype)


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
    vae = AutoencoderKL(**vae_options(configs["vae"]), attention=check_implementation(attention), dtype=dtype)
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
    tree = {"unet": abstract_module(sd.unet), "vae": abstract_module(sd.vae),
            **{name: jax.eval_shape(encoder.init, key, tokens) for name, encoder in sd.text_encoders.items()}}
    return tree if dtype is None else jax.eval_shape(lambda t: cast(t, dtype), tree)


def abstract_module(module) -> dict[str, Any]:
    """{"params": ...} of a UNet or VAE as ShapeDtypeStructs."""
    return jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())


def cast(variables, dtype):
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
    return cast(jax.tree_util.tree_unflatten(treedef, values), dtype)


def tiny_stable_diffusion(rng, *, dtype=jnp.float32, attention: str = "auto",
                          base: str = "sd1") -> tuple[StableDiffusion, dict]:
    """A random-init bundle of TINY_BASES[base]'s sizes (latents 8x8x4, images 64x64, 32-wide CLIP)."""
    if base not in TINY_BASES:
        raise ValueError(f"no tiny Stable Diffusion of base {base!r}; choose one of {', '.join(TINY_BASES)}")
    sd = build(TINY_BASES[base], dtype=dtype, attention=attention)
    return sd, random_params(abstract_params(sd), rng, dtype)

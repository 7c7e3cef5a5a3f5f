"""The frozen FLUX.1 bundle: the transformer, the 16-channel VAE, CLIP ViT-L (its pooled vector modulates the
transformer) and T5 (its token states are the transformer's text stream), the scheduler config.

`Flux` is to FLUX.1 what `sd_bundle.StableDiffusion` is to Stable Diffusion: the modules and settings,
parameters travelling separately as {"transformer", "vae", "text_encoder", "text_encoder_2": {"params": ...}}.
Its `predict` is the transformer as training and sampling call it: (B, 16, h, w) latents in, their velocity out,
packed into 2x2 patches and unpacked around the transformer (`flux_latents`). `build_flux` makes the modules from
a FLUX pipeline folder's component configs, `load_flux` reads a folder or hub id, `tiny_flux` is a random-init
bundle of `TINY_FLUX_CONFIGS` for tests and CPU runs.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.models.attention import check_implementation
from f2d_jax.models.bases import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER
from f2d_jax.models.clip_text import CLIPTextEncoder
from f2d_jax.models.flux import (FLUX_DEV_TRANSFORMER, FLUX_SCHNELL_TRANSFORMER, TINY_FLUX_TRANSFORMER,
                                 FluxTransformer2DModel, build_transformer, load_transformer)
from f2d_jax.models.flux_latents import latent_image_ids, pack_latents, unpack_latents
from f2d_jax.models.sd_bundle import abstract_module, cast, random_params
from f2d_jax.models.bases import SD14_CLIP
from f2d_jax.models.sd_config import (FLUX_VAE, TINY_CONFIGS, TINY_FLUX_VAE, UnsupportedConfigError, clip_text_fields,
                                      vae_options)
from f2d_jax.models.stable_diffusion import download, local_or_hub, read_json, load_component
from f2d_jax.models.t5 import T5_XXL, TINY_T5, T5Encoder, load_t5, t5_fields
from f2d_jax.models.vae import AutoencoderKL

PIPELINE_CLASSES = ("FluxPipeline",)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# The tiny FLUX of tests and CPU runs, as a FLUX folder's configs would hold it: a 2-double, 2-single-block
# transformer 32 wide, the tiny SD VAE with 16 latent channels, a 32-wide CLIP and a 32-wide T5 whose
# vocabulary is the tiny T5 tokenizer's (`text_t5.tiny_t5_tokenizer`); FLUX.1-dev's scheduler.
TINY_FLUX_CONFIGS = {
    "transformer": TINY_FLUX_TRANSFORMER, "vae": TINY_FLUX_VAE, "text_encoder": TINY_CONFIGS["text_encoder"],
    "text_encoder_2": TINY_T5, "scheduler": FLUX_DEV_SCHEDULER,
}
# The published FLUX.1 folders' component configs, by hub id: programs build from them with no download.
FLUX_DEV = {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE, "text_encoder": SD14_CLIP, "text_encoder_2": T5_XXL,
            "scheduler": FLUX_DEV_SCHEDULER}
FLUX_SCHNELL = dict(FLUX_DEV, transformer=FLUX_SCHNELL_TRANSFORMER, scheduler=FLUX_SCHNELL_SCHEDULER)
PUBLISHED = {"black-forest-labs/FLUX.1-dev": FLUX_DEV, "black-forest-labs/FLUX.1-schnell": FLUX_SCHNELL}
TINY_MAX_SEQUENCE_LENGTH = 32   # the tiny T5's prompts: 32 tokens


@dataclasses.dataclass(frozen=True)
class Flux:
    """The frozen FLUX.1 modules and settings; parameters travel separately.

    `text_encoder` is CLIP ViT-L (pooled vector), `text_encoder_2` T5 (the token sequence, `max_sequence_length`
    tokens); `tokenizer_path` and `t5_tokenizer_path` are their tokenizers' folders (None: the bundled CLIP one and
    the tiny T5 one)."""

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    text_encoder_2: T5Encoder
    scheduler_config: dict
    tokenizer_path: str | None = None
    t5_tokenizer_path: str | None = None
    max_sequence_length: int = 512

    denoiser = "transformer"   # the variables key of the model that denoises
    base = "flux"

    @property
    def vae_scaling_factor(self) -> float:
        return self.vae.scaling_factor

    @property
    def vae_shift_factor(self) -> float:
        return self.vae.shift_factor or 0.0

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def size_multiple(self) -> int:
        return size_multiple({"vae": {"block_out_channels": self.vae.block_out_channels}})

    @property
    def default_size(self) -> int:
        return self.vae.sample_size

    @property
    def guidance_embeds(self) -> bool:
        """FLUX.1-dev's guidance embedding (schnell has none)."""
        return self.transformer.guidance_embeds

    @property
    def text_encoders(self) -> dict[str, Any]:
        """The text encoders by variables key, in the order they take their slices of the identity tokens."""
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def with_size(self, conditioning: dict, height: int, width: int) -> dict:
        """Unchanged: FLUX has no size conditioning (the same call as Stable Diffusion's)."""
        return conditioning

    def negative_conditioning(self, conditioning: dict, negative_prompt: str | None) -> dict:
        """The unconditional branch's conditioning: the negative (or empty) prompt's, unchanged."""
        return conditioning

    def predict(self, params, latents, sigma, conditioning: dict, guidance=None):
        """The velocity (B, C, h, w) of latents (B, C, h, w) at sigmas (B,) in [0, 1] under a conditioning
        {"context": (B, L, 4096) T5 states, "pooled": (B, 768) CLIP pooled}, `guidance` (B,) or a scalar for
        the guidance embedding (FLUX.1-dev; ignored without it), computed in the transformer's dtype."""
        b, _, h, w = latents.shape
        dtype = self.transformer.dtype
        context = conditioning["context"]
        guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,)) if self.guidance_embeds else None
        out = self.transformer.apply(
            params, hidden_states=pack_latents(latents).astype(dtype), encoder_hidden_states=context.astype(dtype),
            pooled_projections=conditioning["pooled"].astype(dtype),
            timestep=jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)).astype(dtype),
            img_ids=latent_image_ids(h, w), txt_ids=jnp.zeros((context.shape[1], 3), jnp.float32), guidance=guidance)
        return unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor)

    conditioning_keys = ("context", "pooled")

    def with_remat(self) -> Flux:
        """The bundle with its transformer recomputing each block in the backward pass."""
        return dataclasses.replace(self, transformer=self.transformer.clone(remat=True))

    def tokenizer(self):
        """CLIP's tokenizer."""
        from f2d_jax.text import load_tokenizer
        return load_tokenizer(self.tokenizer_path)

    def t5_tokenizer(self):
        from f2d_jax.text_t5 import load_t5_tokenizer, tiny_t5_tokenizer
        return tiny_t5_tokenizer() if self.t5_tokenizer_path is None else load_t5_tokenizer(self.t5_tokenizer_path)

    def prompt_ids(self, prompts) -> tuple[dict, dict]:
        """Prompts with the identifier -> ({"text_encoder": (N, 77) CLIP ids, "text_encoder_2": (N, L) T5 ids},
        {"text_encoder": (N,) positions of "f", "text_encoder_2": (N, 2) positions of "f" and "l"})."""
        from f2d_jax.text import identifier_prompts
        from f2d_jax.text_t5 import t5_identifier_prompts
        clip = identifier_prompts(prompts, self.tokenizer())
        t5 = t5_identifier_prompts(prompts, self.t5_tokenizer(), self.max_sequence_length)
        return {"text_encoder": clip[0], "text_encoder_2": t5[0]}, {"text_encoder": clip[1], "text_encoder_2": t5[1]}

    def plain_ids(self, prompts) -> dict:
        """Prompts as they are -> {"text_encoder": (N, 77) CLIP ids, "text_encoder_2": (N, L) T5 ids}."""
        from f2d_jax.text import token_ids
        from f2d_jax.text_t5 import t5_token_ids
        return {"text_encoder": token_ids(prompts, self.tokenizer()),
                "text_encoder_2": t5_token_ids(prompts, self.t5_tokenizer(), self.max_sequence_length)}

    def class_ids(self) -> dict:
        """The class words' ids ("a person"), by encoder: what identity scale 0 writes in place of "f l"."""
        from f2d_jax.text import class_ids
        from f2d_jax.text_t5 import t5_class_ids
        return {"text_encoder": np.asarray(class_ids(self.tokenizer()), np.int32),
                "text_encoder_2": np.asarray(t5_class_ids(self.t5_tokenizer()), np.int32)}


def size_multiple(configs: dict) -> int:
    """Image sides are multiples of this, from the VAE's config: its downsampling times the 2x2 packing."""
    return 2 ** len(configs["vae"]["block_out_channels"])


def build_flux(configs: dict, *, dtype=jnp.float32, attention: str = "auto", tokenizer_path: str | None = None,
               t5_tokenizer_path: str | None = None, max_sequence_length: int = 512) -> Flux:
    """The bundle's modules from the component configs {"transformer", "vae", "text_encoder", "text_encoder_2",
    "scheduler"} of a FLUX pipeline folder; `attention` names every model's attention implementation."""
    attention = check_implementation(attention)
    transformer = build_transformer(configs["transformer"], dtype=dtype, attention=attention)
    vae = AutoencoderKL(**vae_options(configs["vae"]), attention=attention, dtype=dtype)
    clip = CLIPTextEncoder(**clip_text_fields(configs["text_encoder"]), dtype=dtype, attention=attention)
    t5 = T5Encoder(**t5_fields(configs["text_encoder_2"]), dtype=dtype)
    for what, width, expected in (("T5", t5.width, transformer.joint_attention_dim),
                                  ("CLIP", clip.width, transformer.pooled_projection_dim)):
        if width != expected:
            raise UnsupportedConfigError(f"the {what} text encoder is {width} wide; the transformer takes {expected}")
    return Flux(transformer, vae, clip, t5, dict(configs["scheduler"]), tokenizer_path, t5_tokenizer_path,
                max_sequence_length)


def abstract_params(flux: Flux, dtype=None, names=COMPONENTS) -> dict[str, Any]:
    """The variable trees of `names` (of "transformer", "vae", "text_encoder", "text_encoder_2") as
    ShapeDtypeStructs."""
    key = jax.random.key(0)
    shapes = {"transformer": lambda: abstract_module(flux.transformer), "vae": lambda: abstract_module(flux.vae),
              "text_encoder": lambda: jax.eval_shape(flux.text_encoder.init, key, jnp.zeros((1, 77), jnp.int32)),
              "text_encoder_2": lambda: jax.eval_shape(flux.text_encoder_2.init, key, jnp.zeros((1, 8), jnp.int32))}
    tree = {name: shapes[name]() for name in names}
    return tree if dtype is None else jax.eval_shape(lambda t: cast(t, dtype), tree)


def tiny_flux(rng, *, dtype=jnp.float32, attention: str = "auto") -> tuple[Flux, dict]:
    """A random-init bundle of TINY_FLUX_CONFIGS (latents 8x8x16, images 64x64, 32-wide encoders)."""
    flux = build_flux(TINY_FLUX_CONFIGS, dtype=dtype, attention=attention,
                      max_sequence_length=TINY_MAX_SEQUENCE_LENGTH)
    return flux, random_params(abstract_params(flux), rng, dtype)


def is_flux(path_or_hub_id) -> bool:
    """Whether a local folder is a FLUX pipeline's (its model_index.json names a FLUX pipeline, or it holds
    transformer/ and text_encoder_2/); hub ids: whether the id names FLUX.1."""
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if not path.is_dir():
        return "flux" in os.fspath(path_or_hub_id).lower()
    index = path / "model_index.json"
    if index.is_file():
        return read_json(index).get("_class_name") in PIPELINE_CLASSES
    return (path / "transformer").is_dir() and (path / "text_encoder_2").is_dir()


def resolve(path_or_hub_id, revision: str | None = None) -> Path:
    """A local FLUX folder, or a hub id downloaded with the configs, tokenizers and safetensors weights."""
    root, name = local_or_hub(path_or_hub_id, "FLUX pipeline folder")
    if root is not None:
        return root
    files = [f"{c}/*{suffix}" for c in COMPONENTS for suffix in (".json", ".safetensors")]
    return download(name, revision, ["model_index.json", "tokenizer/*", "tokenizer_2/*", "scheduler/*.json", *files],
                    {})


def flux_bundle_configs(path_or_hub_id, revision: str | None = None) -> dict:
    """The component configs `build_flux` takes, of a FLUX folder or hub id, from its config files alone (no
    weights read; the published FLUX.1 ids need no download at all)."""
    name = os.fspath(path_or_hub_id)
    if name in PUBLISHED and not Path(name).exists():
        return copy.deepcopy(PUBLISHED[name])
    root, hub_id = local_or_hub(path_or_hub_id, "FLUX pipeline folder")
    if root is None:
        root = download(hub_id, revision, ["model_index.json", "scheduler/*.json",
                                            *(f"{c}/config.json" for c in COMPONENTS)], {})
    return flux_configs(root)


def flux_configs(root: Path) -> dict:
    configs = {name: read_json(root / name / "config.json") for name in COMPONENTS}
    configs["scheduler"] = read_json(root / "scheduler" / "scheduler_config.json")
    return configs


def load_flux(path_or_hub_id, *, dtype=jnp.float32, revision: str | None = None, attention: str = "auto",
              max_sequence_length: int = 512) -> tuple[Flux, dict]:
    """(bundle, {"transformer", "vae", "text_encoder", "text_encoder_2": {"params": ...}}) from a FLUX pipeline
    folder or hub id (diffusers' layout: transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ (T5),
    tokenizer/, tokenizer_2/, scheduler/). Float weights and the compute dtype become `dtype`."""
    root = resolve(path_or_hub_id, revision)
    for name in (*COMPONENTS, "scheduler"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root} has no {name}/: expected a FLUX pipeline folder ({', '.join(COMPONENTS)},"
                                    " scheduler, tokenizer, tokenizer_2)")
    flux = build_flux(flux_configs(root), dtype=dtype, attention=attention, tokenizer_path=str(root / "tokenizer"),
                      t5_tokenizer_path=str(root / "tokenizer_2"), max_sequence_length=max_sequence_length)
    targets = abstract_params(flux, names=("vae", "text_encoder"))   # the transformer and T5: their own loaders
    _, transformer = load_transformer(root / "transformer", dtype=dtype, attention=attention)
    _, t5 = load_t5(root / "text_encoder_2", dtype=dtype)
    params = {"transformer": transformer, "text_encoder_2": t5,
              **{name: load_component(name, root / name, targets[name], dtype) for name in ("vae", "text_encoder")}}
    return flux, params

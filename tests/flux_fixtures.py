"""A tiny FLUX.1 text side for tests, made offline: the tiny T5 tokenizer (built with the `tokenizers` library) and a
randomized transformers T5EncoderModel of `f2d_jax.models.t5.TINY_T5`'s sizes, each saved with save_pretrained.
Needs torch and transformers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from sd_fixtures import randomize
from transformers import T5Config, T5EncoderModel

from f2d_jax import text_t5
from f2d_jax.models.t5 import TINY_T5


def tiny_t5_tokenizer(folder) -> Path:
    """Write the tiny FLUX's T5 tokenizer (`f2d_jax.text_t5.tiny_t5_tokenizer`) as a T5TokenizerFast folder."""
    text_t5.tiny_t5_tokenizer().save_pretrained(folder)
    return Path(folder)


def tiny_t5(folder, seed: int = 0, **changes) -> T5EncoderModel:
    """Write a T5EncoderModel of TINY_T5 (with `changes`) with seeded random weights, every norm perturbed, through
    save_pretrained (model.safetensors); returns the model."""
    torch.manual_seed(seed)
    model = randomize(T5EncoderModel(T5Config(**{**TINY_T5, **changes})), seed)
    model.save_pretrained(folder)
    return model


def write_tiny_flux(path, seed: int = 0, schnell: bool = False):
    """Write a tiny PyTorch FLUX.1 folder of `flux_bundle.TINY_FLUX_CONFIGS`' sizes (the dev structure: guidance
    embedding; with `schnell`, FLUX.1-schnell's: none, and its unshifted scheduler) with seeded random weights,
    SD v1's CLIP tokenizer and the tiny T5 tokenizer, through FluxPipeline.save_pretrained (safetensors); returns
    the pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from f2d_jax.models.bases import FLUX_SCHNELL_SCHEDULER
    from f2d_jax.models.flux_bundle import TINY_FLUX_CONFIGS
    from f2d_jax.text import load_tokenizer

    configs = TINY_FLUX_CONFIGS
    if schnell:
        configs = dict(configs, transformer=dict(configs["transformer"], guidance_embeds=False),
                       scheduler=FLUX_SCHNELL_SCHEDULER)
    torch.manual_seed(seed)
    transformer = randomize(FluxTransformer2DModel(**configs["transformer"]), seed)
    vae = randomize(AutoencoderKL(**configs["vae"]), seed + 1)
    clip = randomize(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], bos_token_id=49406, eos_token_id=49407,
                                                  pad_token_id=49407)), seed + 2)
    t5 = randomize(T5EncoderModel(T5Config(**configs["text_encoder_2"])), seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in configs["scheduler"].items()
                                                   if not k.startswith("_")})
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=load_tokenizer(),
                            text_encoder_2=t5, tokenizer_2=text_t5.tiny_t5_tokenizer(), transformer=transformer)
    pipeline.save_pretrained(path, safe_serialization=True)
    return pipeline

"""A tiny PyTorch Stable Diffusion in diffusers' directory layout, for loading and parity tests.

`write_tiny_sd(path)` saves UNet2DConditionModel, AutoencoderKL and CLIPTextModel of the sizes in
`f2d_jax.models.stable_diffusion.TINY_CONFIGS` with seeded random weights (every parameter
non-trivial: norms and any constant-initialised tensor are perturbed), the real SD v1 tokenizer
and SD v1.4's PNDM scheduler config, through StableDiffusionPipeline.save_pretrained (safetensors).
Needs torch, diffusers and transformers.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from f2d_jax.models.stable_diffusion import TINY_CONFIGS
from f2d_jax.text import load_tokenizer


@dataclasses.dataclass
class TinySD:
    path: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def _scheduler_kwargs() -> dict:
    return {k: v for k, v in TINY_CONFIGS["scheduler"].items() if not k.startswith("_")}


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every constant-initialised parameter (norm scales and biases, zero-init layers) random values."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(param + 0.1 * noise)
    return module.eval()


def torch_models(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_CONFIGS["unet"])
    vae = AutoencoderKL(**TINY_CONFIGS["vae"])
    config = CLIPTextConfig(**TINY_CONFIGS["text_encoder"], bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    text_encoder = CLIPTextModel(config)
    return tuple(randomize(m, seed + i) for i, m in enumerate((unet, vae, text_encoder)))


def write_tiny_sd(path, seed: int = 0) -> TinySD:
    """Write the tiny PyTorch SD directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    path = Path(path)
    unet, vae, text_encoder = torch_models(seed)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
                                       scheduler=PNDMScheduler.from_config(_scheduler_kwargs()), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return TinySD(path, unet, vae, text_encoder)


def _tokenizer(pad: str | None):
    """The SD v1 tokenizer, padding with `pad` (SD 2's and SDXL's second pad with "!")."""
    import copy

    tokenizer = copy.deepcopy(load_tokenizer())
    if pad is not None:
        tokenizer.pad_token = pad
    return tokenizer


def _text_encoder(config: dict, seed: int):
    from transformers import CLIPTextModelWithProjection

    config = dict(config)
    kind = CLIPTextModelWithProjection if config.pop("architectures", None) else CLIPTextModel
    torch.manual_seed(seed)
    return randomize(kind(CLIPTextConfig(**config, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)), seed)


def write_tiny_base(path, base: str, seed: int = 0):
    """Write a tiny PyTorch SD 2 ("sd2") or SDXL ("sdxl") directory of `TINY_BASES[base]`'s sizes through
    StableDiffusionPipeline / StableDiffusionXLPipeline.save_pretrained; returns the pipeline."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from f2d_jax.models.stable_diffusion import TINY_BASES

    configs = TINY_BASES[base]
    torch.manual_seed(seed)
    unet = randomize(UNet2DConditionModel(**configs["unet"]), seed)
    vae = randomize(AutoencoderKL(**{k: v for k, v in configs["vae"].items()}), seed + 1)
    scheduler = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}
    common = dict(vae=vae, unet=unet, text_encoder=_text_encoder(configs["text_encoder"], seed + 2),
                  tokenizer=_tokenizer(configs.get("tokenizer", {}).get("pad_token")))
    if base == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            **common, text_encoder_2=_text_encoder(configs["text_encoder_2"], seed + 3),
            tokenizer_2=_tokenizer(configs["tokenizer_2"]["pad_token"]),
            scheduler=EulerDiscreteScheduler.from_config(scheduler), add_watermarker=False)
    else:
        pipeline = StableDiffusionPipeline(**common, scheduler=DDIMScheduler.from_config(scheduler),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return pipeline


def fake_hub(monkeypatch, repos: dict, root) -> list:
    """Replace huggingface_hub.snapshot_download by a stand-in serving `repos` (hub id -> local directory),
    filtered by allow_patterns, into root/<hub id>; returns the calls (repo_id, revision, patterns) made."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        calls.append((repo_id, revision, list(allow_patterns)))
        if repo_id not in repos:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 {repo_id}")
        snapshot = Path(root) / repo_id
        for file in Path(repos[repo_id]).rglob("*"):
            name = file.relative_to(repos[repo_id]).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls

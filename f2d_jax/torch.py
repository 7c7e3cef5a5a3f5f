"""PyTorch side: Face2Diffusion's encoders conditioning diffusers' Stable Diffusion and FLUX.1 pipelines.

Export a JAX training run's mapping network in the official layout (MSID is frozen in training:
use the official msid.pt; official mapping.pt files load the same way), then drive diffusers:

    python -m f2d_jax.convert export runs/f2d --out weights        # -> weights/mapping.pt
    (or `python -m f2d_jax.convert package runs/f2d --out my-model` and from_pretrained(model="my-model"))

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from f2d_jax.torch import Face2DiffusionEncoder

    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4").to("cuda")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    f2d = Face2DiffusionEncoder.from_pretrained(msid="msid.pt", mapping="weights/mapping.pt", device="cuda")
    identity = f2d.identity(["me.jpg", "me_too.jpg"])             # photos of one person, averaged
    embeds = f2d.pipeline_embeds(pipe, "f l as a knight, oil painting", identity)
    image = pipe(**embeds, guidance_scale=7.0, num_inference_steps=30).images[0]

`pipeline_embeds` gives every keyword the pipeline's own `encode_prompt` would compute: `prompt_embeds`
and `negative_prompt_embeds` (the negative prompt's, the empty prompt's when none is given, as in the
official code), for SDXL also `pooled_prompt_embeds` and `negative_pooled_prompt_embeds`. On SDXL the
mapping network's tokens are as wide as both text encoders together (768 + 1280): the first 768 of each
go into CLIP ViT-L, the rest into OpenCLIP bigG; with no negative prompt the unconditional branch is
zeros (the pipeline's force_zeros_for_empty_prompt):

    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                                     torch_dtype=torch.float16).to("cuda")
    f2d = Face2DiffusionEncoder.from_pretrained(msid="msid.pt", mapping="sdxl/mapping.pt", device="cuda",
                                                dtype=torch.float16)
    embeds = f2d.pipeline_embeds(pipe, "f l as a knight, oil painting", f2d.identity("me.jpg"),
                                 negative_prompt="blurry")
    image = pipe(**embeds, num_inference_steps=30).images[0]

On FLUX.1 (a FluxPipeline: T5 as text_encoder_2 and a transformer) the tokens are 768 + 4096 wide: the first
768 go into CLIP ViT-L at "f l", whose pooled output is `pooled_prompt_embeds`, the rest into T5's input
embeddings at the two tokens carrying "f" and "l", whose last hidden state is `prompt_embeds` (prompts padded
to `max_sequence_length`, 512 as FluxPipeline's). FLUX takes no negative prompt; one given is encoded as
`negative_prompt_embeds` and `negative_pooled_prompt_embeds` (used with true_cfg_scale > 1):

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    f2d = Face2DiffusionEncoder.from_pretrained(model="my-flux-model", device="cuda")
    embeds = f2d.pipeline_embeds(pipe, "f l as a knight, oil painting", f2d.identity("me.jpg"))
    image = pipe(**embeds, guidance_scale=3.5, num_inference_steps=28).images[0]

`prompt_embeds(text_encoder, tokenizer, ...)` is the SD v1 route through one text encoder alone.
Needs only torch (the `torch` extra), transformers and the face aligner; jax is never imported.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from torch import nn

from f2d_jax.convert import io
from f2d_jax.faces import align_face, msid_input
from f2d_jax.text import identifier_prompts, token_ids
from f2d_jax.text_t5 import MAX_LENGTH, t5_identifier_prompts, t5_token_ids

# ----------------------------------------------------------------------------- MSID (timm ViT)


class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, hidden), nn.Linear(hidden, width), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp, nn.GELU())

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MSID(nn.Module):
    """The official MSID encoder: timm VisionTransformer keys + the `norms.layer_{i}` taps.

    (B, 3, H, W) faces in [-1, 1] -> (B, len(taps) * width) identity features.
    """

    def __init__(self, image_size=112, patch=8, width=384, depth=12, heads=12, mlp_ratio=4, taps=(2, 5, 8, 11)):
        super().__init__()
        self.taps = tuple(taps)
        self.features = len(self.taps) * width
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, round(width * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)  # in the checkpoint, unused by MSID
        self.norms = nn.ModuleDict({f"layer_{i}": nn.Sequential(nn.BatchNorm1d(width), nn.LayerNorm(width))
                                    for i in self.taps})

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(self.norms[f"layer_{i}"](x[:, 0]))
        return torch.cat(feats, 1)


# ----------------------------------------------------------------------------- mapping network


class MappingMLP(nn.Module):
    def __init__(self, dim_in, hidden, dim_out, n_layer=2, dropout=0.1):
        super().__init__()
        dims = [dim_in] + [hidden] * n_layer
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.Dropout(dropout), nn.LeakyReLU(0.2))
                                      for a, b in zip(dims[:-1], dims[1:])])
        self.fc_out = nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc_out(self.layers(x))


class Mapping(nn.Module):
    """IMG2TEXTwithEXP, the official mapping network: (B, identity) [+ (B, exp)] -> (first, last) (B, out).

    `null_exp` replaces the expression where `mask` is 0, and everywhere when none is given.
    """

    def __init__(self, identity=1536, hidden=1536, out=768, n_layer=2, dropout=0.1, exp=64):
        super().__init__()
        self.i2t_first = MappingMLP(identity + exp, hidden, out, n_layer, dropout)
        self.i2t_last = MappingMLP(identity + exp, hidden, out, n_layer, dropout)
        self.null_exp = nn.Parameter(torch.zeros(exp))

    def forward(self, x, exp=None, mask=None):
        if exp is None:
            exp = self.null_exp[None]
        mask = torch.ones(len(x), device=x.device) if mask is None else mask
        mask = mask.reshape(-1, 1).to(self.null_exp.dtype)
        exp = exp * mask + self.null_exp[None] * (1 - mask)
        x = torch.cat([x, exp.expand(len(x), -1)], -1)
        return self.i2t_first(x), self.i2t_last(x)


# ----------------------------------------------------------------------------- checkpoints


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: lists its missing keys, unexpected keys and bad shapes."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
        parts = [f"{len(items)} {title}: {', '.join(items)}" for title, items in (
            ("missing keys", self.missing), ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched)) if items]
        super().__init__(f"{what} does not fit the official structure:\n  " + "\n  ".join(parts))


def read_weights(path) -> dict[str, torch.Tensor]:
    """The state dict in an official .pt/.pth file (loaded with weights_only=True) or a .safetensors one."""
    return {k: torch.from_numpy(v) for k, v in io.read_state_dict(path).items()}


def _shape(state, key: str, what: str) -> tuple[int, ...]:
    """The shape of `state[key]`, a tensor the model's sizes are read from."""
    if key not in state:
        raise WeightsMismatchError(what, missing=[key])
    return tuple(state[key].shape)


def _indices(state, pattern: str) -> list[int]:
    """Sorted distinct N of the keys matching `pattern` (a regex with one group for N)."""
    return sorted({int(m[1]) for m in map(re.compile(pattern).match, state) if m})


def _count(state, pattern: str) -> int:
    """1 + the largest N of the keys matching `pattern` (so that a gap shows as missing keys)."""
    return max(_indices(state, pattern), default=-1) + 1


def msid_sizes(state, what: str = "MSID weights", heads: int | None = None) -> dict:
    """MSID constructor arguments read off an official state dict's shapes.

    The head count leaves no trace in the shapes: None means the official head size (32).
    """
    width, _, patch, _ = _shape(state, "patch_embed.proj.weight", what)
    heads = heads if heads is not None else width // 32
    if heads < 1 or width % heads:
        raise ValueError(f"{what}: {heads} attention heads do not divide the width {width}; pass msid_heads=")
    grid = round((_shape(state, "pos_embed", what)[1] - 1) ** 0.5)
    hidden = _shape(state, "blocks.0.mlp.fc1.weight", what)[0]
    return dict(image_size=grid * patch, patch=patch, width=width, depth=_count(state, r"blocks\.(\d+)\."),
                heads=heads, mlp_ratio=hidden / width, taps=_indices(state, r"norms\.layer_(\d+)\."))


def mapping_sizes(state, identity: int, what: str = "mapping weights") -> dict:
    """Mapping constructor arguments read off an official state dict, for `identity`-dim features."""
    hidden, inputs = _shape(state, "i2t_first.layers.0.0.weight", what)
    if inputs <= identity:
        raise ValueError(f"{what} take {inputs} inputs, fewer than the {identity} identity features of the MSID "
                         f"weights plus an expression code: the two files do not belong together")
    return dict(identity=identity, hidden=hidden, out=_shape(state, "i2t_first.fc_out.weight", what)[0],
                n_layer=_count(state, r"i2t_first\.layers\.(\d+)\."), exp=inputs - identity)


def load_strict(module: nn.Module, state, what: str) -> nn.Module:
    """`module.load_state_dict(state)` that lists every missing/unexpected key and shape mismatch.

    BatchNorm's `num_batches_tracked` counters are skipped (eval outputs do not use them).
    """
    own, state = ({k: v for k, v in d.items() if not k.endswith("num_batches_tracked")}
                  for d in (module.state_dict(), state))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} (model wants {tuple(v.shape)})"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(what, missing, unexpected, mismatched)
    module.load_state_dict(state, strict=False)
    return module


# ----------------------------------------------------------------------------- text conditioning


def text_transformer(text_encoder):
    """The CLIPTextModel that embeds and encodes: a CLIPTextModelWithProjection's `text_model`, else the model."""
    return getattr(text_encoder, "text_model", text_encoder)


def encode_text(text_encoder, input_ids, positions=None, tokens=None):
    """transformers CLIPTextModel(WithProjection)'s whole output for (B, 77) ids, with every hidden state
    (`last_hidden_state`, `hidden_states[-2]`, and `text_embeds` for the projected model), with `tokens`
    (B, K, D) written over the token + position embeddings at positions[b] .. positions[b] + K - 1
    before the layers run."""
    device = text_encoder.device
    input_ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)

    def inject(module, args, hidden):  # (B, 77, D) embeddings
        columns = torch.as_tensor(np.asarray(positions), dtype=torch.long, device=device)[:, None] + \
            torch.arange(tokens.shape[1], device=device)
        return _write_tokens(hidden.clone(), columns, tokens)

    handle = text_transformer(text_encoder).embeddings.register_forward_hook(inject) if tokens is not None else None
    try:
        return text_encoder(input_ids, output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()


def encode_t5(text_encoder, input_ids, positions=None, tokens=None) -> torch.Tensor:
    """transformers T5EncoderModel's last hidden state (B, L, D) for (B, L) ids (FluxPipeline's `prompt_embeds`),
    with `tokens` (B, K, D) written over the input embeddings at (B, K) `positions` before the blocks run (T5 adds
    no position embedding: its attention's relative bias places every token)."""
    device = text_encoder.device
    input_ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
    hidden = text_encoder.get_input_embeddings()(input_ids)  # (B, L, D)
    if tokens is not None:
        hidden = _write_tokens(hidden, torch.as_tensor(np.asarray(positions), dtype=torch.long, device=device), tokens)
    return text_encoder(inputs_embeds=hidden).last_hidden_state


def _write_tokens(hidden, columns, tokens) -> torch.Tensor:
    """(B, T, D) `hidden` with hidden[b, columns[b, k]] = tokens[b, k] (columns (B, K), tokens (B, K, D)), in place."""
    rows = torch.arange(len(hidden), device=hidden.device)[:, None]
    hidden[rows, columns] = tokens.to(device=hidden.device, dtype=hidden.dtype)
    return hidden


@torch.no_grad()
def text_embeds(text_encoder, tokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Plain prompts (no identity) -> (B, 77, D), e.g. a negative prompt for an SD v1 pipeline's
    `negative_prompt_embeds` (`Face2DiffusionEncoder.pipeline_embeds` makes those for any pipeline)."""
    return encode_text(text_encoder, token_ids(prompts, tokenizer)).last_hidden_state


def is_flux_pipeline(pipe) -> bool:
    """Whether a diffusers pipeline is FLUX.1's: a T5 text_encoder_2 (transformers' T5EncoderModel) and a
    transformer."""
    from transformers import T5EncoderModel

    return isinstance(getattr(pipe, "text_encoder_2", None), T5EncoderModel) and \
        getattr(pipe, "transformer", None) is not None


def pipeline_text_encoders(pipe) -> list[tuple]:
    """A diffusers pipeline's (text encoder, tokenizer) pairs, in the order their states are concatenated:
    SDXL's CLIP ViT-L then OpenCLIP bigG, the one CLIP text encoder of SD 1.x and 2.x."""
    pairs = [(getattr(pipe, encoder, None), getattr(pipe, tokenizer, None))
             for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))]
    return [(encoder, tokenizer) for encoder, tokenizer in pairs if encoder is not None]


def _states(output, penultimate: bool) -> torch.Tensor:
    """What the pipeline conditions on: SDXL's hidden_states[-2] (no final norm), else last_hidden_state."""
    return output.hidden_states[-2] if penultimate else output.last_hidden_state


def _pooled(outputs) -> torch.Tensor | None:
    """SDXL's pooled embedding, as its encode_prompt picks it: the first output whose [0] is 2-D (the
    projected encoder's text_embeds)."""
    return next((output[0] for output in outputs if output[0].ndim == 2), None)


# ----------------------------------------------------------------------------- the encoder


class Face2DiffusionEncoder(nn.Module):
    """MSID + mapping network: face photos -> identity features -> "f l" tokens -> prompt embeddings."""

    def __init__(self, msid: MSID, mapping: Mapping, max_sequence_length: int = MAX_LENGTH):
        super().__init__()
        self.msid, self.mapping = msid, mapping
        self.max_sequence_length = max_sequence_length   # FLUX: T5's prompt length, the one the model trained with

    @classmethod
    def from_pretrained(cls, msid=None, mapping=None, *, model=None, msid_heads: int | None = None, device=None,
                        dtype: torch.dtype = torch.float32) -> Face2DiffusionEncoder:
        """From msid.pt and mapping.pt (official layout, .pt/.pth or .safetensors), or a packaged `model`
        folder (`f2d-convert package`: its msid.safetensors and mapping.safetensors, and its config's head
        count and, trained on FLUX.1, its T5 prompt length), loaded strictly.

        Model sizes come from the weights' shapes; `msid_heads` is the MSID's attention head count
        (not visible in the shapes; default: the packaged config's, else heads of size 32, as the
        official 12 of width 384).
        """
        length = MAX_LENGTH
        if model is not None:
            from f2d_jax.convert.package import package_config, package_weights

            weights = package_weights(model)
            msid, mapping = msid or weights["msid"], mapping or weights["mapping"]
            config = package_config(model)
            msid_heads = msid_heads or config["model"]["msid"]["num_heads"]
            length = (config.get("flux") or {}).get("max_sequence_length", MAX_LENGTH)
        if msid is None or mapping is None:
            raise ValueError("Face2DiffusionEncoder.from_pretrained needs msid= and mapping= weights, or model=")
        msid_state, mapping_state = read_weights(msid), read_weights(mapping)
        encoder = MSID(**msid_sizes(msid_state, f"MSID weights {msid}", msid_heads))
        load_strict(encoder, msid_state, f"MSID weights {msid}")
        network = Mapping(**mapping_sizes(mapping_state, encoder.features, f"mapping weights {mapping}"))
        load_strict(network, mapping_state, f"mapping weights {mapping}")
        return cls(encoder, network, length).to(device=device, dtype=dtype).eval()

    @property
    def device(self) -> torch.device:
        return self.mapping.null_exp.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mapping.null_exp.dtype

    @torch.no_grad()
    def identity(self, images, *, detector=None) -> torch.Tensor:
        """Face photos of one person (a path, PIL image or uint8 (H, W, 3) array, or a list of them)
        -> (1, F) MSID features, averaged over the photos. Each photo is aligned with f2d_jax.faces
        (`detector`: its landmark detector; default dlib)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("identity() needs at least one face photo")
        crops = np.stack([align_face(_rgb(image), detector=detector).crop for image in images])  # (N, 112, 112, 3)
        faces = torch.from_numpy(msid_input(crops)).permute(0, 3, 1, 2)
        features = self.msid(faces.to(device=self.device, dtype=self.dtype))
        return features.mean(0, keepdim=True)

    def identity_tokens(self, identity, expression=None) -> torch.Tensor:
        """(B, F) identity features [+ (B, 64) expression codes] -> (B, 2, D) embeddings of "f" and "l"."""
        identity, expression = (None if x is None else torch.as_tensor(x, device=self.device, dtype=self.dtype)
                                for x in (identity, expression))
        if identity.ndim != 2 or identity.shape[1] != self.msid.features:
            raise ValueError(f"identity must be (B, {self.msid.features}) MSID features (from identity()), "
                             f"got {tuple(identity.shape)}")
        return torch.stack(self.mapping(identity, expression), 1)

    @torch.no_grad()
    def prompt_embeds(self, text_encoder, tokenizer, prompts: str | list[str], identity,
                      expression=None) -> torch.Tensor:
        """Prompts with "f l" -> (B, 77, D) `prompt_embeds` for the pipeline of `text_encoder`/`tokenizer`
        (SD v1: the last hidden state of one CLIP text encoder).

        `identity` is (1, F) (shared by every prompt) or (B, F); raises f2d_jax.text.PromptError for a
        prompt without the identifier.
        """
        return _states(self._encode([(text_encoder, tokenizer)], prompts, identity, expression)[0], False)

    @torch.no_grad()
    def pipeline_embeds(self, pipe, prompts: str | list[str], identity, expression=None,
                        negative_prompt: str | list[str] | None = None, *,
                        max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """Prompts with "f l" -> the keyword arguments of `pipe(...)` (a diffusers StableDiffusionPipeline,
        StableDiffusionXLPipeline or FluxPipeline): `prompt_embeds` and `negative_prompt_embeds`, for SDXL also
        `pooled_prompt_embeds` and `negative_pooled_prompt_embeds`; for FLUX `prompt_embeds` and
        `pooled_prompt_embeds` (see `_flux_embeds`; `max_sequence_length`: T5's prompt length, FluxPipeline's
        keyword of that name; default: the packaged model's training length, else FluxPipeline's 512).

        The same as the pipeline's own `encode_prompt` with the "f l" tokens injected: each tokenizer's ids
        and padding; SD 1.x/2.x the text encoder's last hidden state; SDXL both encoders' hidden_states[-2]
        side by side (the tokens' first widths into the first encoder, the rest into the second) and the
        second's projected pooled state. The negative branch is `negative_prompt` encoded (one string, or one
        per prompt), the empty prompt when None, or zeros when None and the pipeline's config sets
        force_zeros_for_empty_prompt (SDXL). `identity` is (1, F) or (B, F), as in `prompt_embeds`.
        """
        if is_flux_pipeline(pipe):
            return self._flux_embeds(pipe, prompts, identity, expression, negative_prompt,
                                     max_sequence_length or self.max_sequence_length)
        pairs = pipeline_text_encoders(pipe)
        penultimate = hasattr(pipe, "text_encoder_2")
        outputs = self._encode(pairs, prompts, identity, expression)
        embeds = torch.cat([_states(output, penultimate) for output in outputs], -1)
        pooled = _pooled(outputs) if penultimate else None
        if negative_prompt is None and pipe.config.get("force_zeros_for_empty_prompt", False):
            negative, negative_pooled = torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled)
        else:
            negatives = _negatives("" if negative_prompt is None else negative_prompt, len(embeds))
            uncond = [encode_text(encoder, token_ids(negatives, tokenizer)) for encoder, tokenizer in pairs]
            negative = torch.cat([_states(output, penultimate) for output in uncond], -1)
            negative_pooled = _pooled(uncond) if penultimate else None
        dtype = pipe.text_encoder_2.dtype if penultimate and pipe.text_encoder_2 is not None else pipe.unet.dtype
        out = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
        if penultimate:
            out.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        return {name: value.to(dtype) for name, value in out.items()}

    def _flux_embeds(self, pipe, prompts, identity, expression, negative_prompt,
                     max_sequence_length: int) -> dict[str, torch.Tensor]:
        """`pipeline_embeds` for a diffusers FluxPipeline: `prompt_embeds` (B, max_sequence_length, 4096) and
        `pooled_prompt_embeds` (B, 768), in T5's and CLIP's dtypes, as the pipeline's own `encode_prompt`
        computes them with the "f l" tokens injected.

        CLIP: ids as FluxPipeline makes them (77, padded to max length), the tokens' first width written at "f l"
        (token + position embeddings), its `pooler_output`. T5: ids from the pipeline's tokenizer_2 padded to
        `max_sequence_length` (as the pipeline's keyword), the rest of the width written into the input
        embeddings at the two tokens carrying "f" and "l", its last hidden state. A `negative_prompt` (one
        string, or one per prompt; FLUX uses it with true_cfg_scale > 1) adds `negative_prompt_embeds` and
        `negative_pooled_prompt_embeds`, its plain encodings.
        """
        clip, t5 = pipe.text_encoder, pipe.text_encoder_2
        width = clip.config.hidden_size
        clip_ids, clip_positions = identifier_prompts(prompts, pipe.tokenizer)
        t5_ids, t5_positions = t5_identifier_prompts(prompts, pipe.tokenizer_2, max_sequence_length)
        tokens = self._tokens(identity, expression, [width, t5.config.d_model], len(clip_ids), "base model")
        out = dict(prompt_embeds=encode_t5(t5, t5_ids, t5_positions, tokens[..., width:]).to(t5.dtype),
                   pooled_prompt_embeds=encode_text(clip, clip_ids, clip_positions,
                                                    tokens[..., :width]).pooler_output.to(clip.dtype))
        if negative_prompt is not None:
            negatives = _negatives(negative_prompt, len(clip_ids))
            out.update(negative_prompt_embeds=encode_t5(
                           t5, t5_token_ids(negatives, pipe.tokenizer_2, max_sequence_length)).to(t5.dtype),
                       negative_pooled_prompt_embeds=encode_text(
                           clip, token_ids(negatives, pipe.tokenizer)).pooler_output.to(clip.dtype))
        return out

    def _tokens(self, identity, expression, widths: list[int], count: int, base: str) -> torch.Tensor:
        """(count, 2, sum(widths)) "f l" tokens for `count` prompts, checked against the text encoders' widths."""
        tokens = self.identity_tokens(identity, expression)
        if tokens.shape[-1] != sum(widths):
            wide = (f"text encoder is {widths[0]} wide" if len(widths) == 1 else
                    f"text encoders are {' + '.join(map(str, widths))} = {sum(widths)} wide together")
            raise ValueError(f"the mapping network writes {tokens.shape[-1]}-dim tokens but the {wide}: "
                             f"weights for another {base}")
        if len(tokens) not in (1, count):
            raise ValueError(f"{len(tokens)} identities for {count} prompts; give one or one per prompt")
        return tokens.expand(count, -1, -1)

    def _encode(self, pairs, prompts, identity, expression) -> list:
        """Each (text encoder, tokenizer)'s `encode_text` output for the prompts, with its slice of the "f l"
        tokens' width (in order) written at the identifier that tokenizer finds."""
        widths = [encoder.config.hidden_size for encoder, _ in pairs]
        tokens, outputs, offset = None, [], 0
        for (encoder, tokenizer), width in zip(pairs, widths):
            input_ids, positions = identifier_prompts(prompts, tokenizer)
            if tokens is None:
                tokens = self._tokens(identity, expression, widths, len(input_ids), "Stable Diffusion")
            outputs.append(encode_text(encoder, input_ids, positions, tokens[..., offset:offset + width]))
            offset += width
        return outputs


def _negatives(negative_prompt: str | list[str], count: int) -> list[str]:
    """One negative prompt per prompt: a string repeated `count` times, or a list of `count`."""
    negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != count:
        raise ValueError(f"{len(negatives)} negative prompts for {count} prompts; give one or one per prompt")
    return negatives

def _rgb(image):
    """A PIL image as an RGB uint8 array; paths and arrays go to align_face as they are."""
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image

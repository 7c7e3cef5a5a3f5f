"""The CLIP score: cosine similarity between an image and a text in CLIP's joint embedding space.

CLIP (OpenAI ViT-L/14 by default) from a Hugging Face CLIPModel directory or hub id: its config.json
and model.safetensors, flax_model.msgpack or pytorch_model.bin (or their shards) are read into our
text and image towers (CLIPTextEncoder, CLIPVisionEncoder) through f2d_jax.convert, so that weights
that do not fit the config are reported key by key. Images are prepared as CLIP's processor does:
the shorter side resized to the model's input size (PIL bicubic), a centre crop, then CLIP's mean/std.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from f2d_jax.convert import io
from f2d_jax.convert.layout import TorchLayout, cast_like, from_torch
from f2d_jax.models.clip_text import CLIP_LAYOUT, CLIPTextEncoder
from f2d_jax.models.clip_vision import CLIPVisionEncoder
from f2d_jax.models.layers import ACTIVATIONS

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
TINY = "tiny"  # a small random-init CLIP: the chain runs offline, its scores mean nothing
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) float32, as CLIPImageProcessor."""
    height, width = image.shape[:2]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if height <= width else (new_long, size)  # (height, width)
    resized = np.asarray(Image.fromarray(image).resize(new_size[::-1], Image.BICUBIC, reducing_gap=None))
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    crop = resized[top:top + size, left:left + size].astype(np.float32) / np.float32(255)
    return ((crop - MEAN) / STD).transpose(2, 0, 1)


# In order of preference; a sharded checkpoint is read through its index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_WEIGHTS = ("model*.safetensors*", "flax_model.msgpack", "pytorch_model*.bin*")  # downloaded in this order

# Hugging Face CLIPTextConfig / CLIPVisionConfig entry -> our encoder's field, for both towers.
_TOWER_FIELDS = {"hidden_size": "width", "intermediate_size": "mlp_dim", "num_hidden_layers": "num_layers",
                 "num_attention_heads": "num_heads", "hidden_act": "activation", "layer_norm_eps": "layer_norm_eps"}

# CLIPVisionModel's keys live under `vision_model.` (CLIPVisionModelWithProjection's `visual_projection` beside);
# its layers are stacked and its keys ignored as the text tower's.
CLIP_VISION_LAYOUT = dataclasses.replace(CLIP_LAYOUT, renames=(
    ("vision_model.embeddings", "embeddings"),
    ("vision_model.pre_layrnorm", "pre_layrnorm"),
    ("vision_model.encoder.layers", "layers"),
    ("vision_model.post_layernorm", "post_layernorm")))


def _tower_layout(layout: TorchLayout, name: str, projection: str) -> TorchLayout:
    """`layout` of one tower, its projection included, for the tower kept under `name`."""
    renames = (*layout.renames, (projection, projection))
    return TorchLayout(renames=tuple((theirs, f"{name}.{ours}") for theirs, ours in renames),
                       stacked=tuple(f"{name}.{path}" for path in layout.stacked), ignore=layout.ignore)


_TEXT = _tower_layout(CLIP_LAYOUT, "text", "text_projection")
_VISION = _tower_layout(CLIP_VISION_LAYOUT, "vision", "visual_projection")
# A CLIPModel state dict onto CLIP's variables; the temperature `logit_scale` plays no part in the score.
CLIP_MODEL_LAYOUT = TorchLayout(renames=_TEXT.renames + _VISION.renames, stacked=_TEXT.stacked + _VISION.stacked,
                                ignore=(*_TEXT.ignore, r"^logit_scale$"))


class CLIP(nn.Module):
    """CLIPModel's two towers: `image_features` and `text_features` are its get_image_features and
    get_text_features (the projected pooled outputs, not normalized)."""

    text: CLIPTextEncoder
    vision: CLIPVisionEncoder

    def image_features(self, pixels):
        """(B, H, W, 3) CLIP-normalized pixels -> (B, projection_dim)."""
        return self.vision(pixels)[1]

    def text_features(self, input_ids):
        """(B, T) token ids -> (B, projection_dim)."""
        return self.text(input_ids)[1]

    def __call__(self, pixels, input_ids):
        return self.image_features(pixels), self.text_features(input_ids)


def _example(model: CLIP) -> tuple:
    """Inputs for `model.init` (only their shapes matter)."""
    size = model.vision.image_size
    return jnp.zeros((1, size, size, 3)), jnp.zeros((1, model.text.max_length), jnp.int32)


def abstract_variables(model: CLIP):
    """The model's variable tree as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), *_example(model))


def _tower(module, config, projection_dim: int, attention: str, **fields):
    """`module` (an encoder class) built from a Hugging Face tower config; `fields`: more {ours: theirs}."""
    values = {ours: getattr(config, theirs) for theirs, ours in _TOWER_FIELDS.items()}
    values |= {ours: getattr(config, theirs) for ours, theirs in fields.items()}
    if values["activation"] not in ACTIVATIONS:
        raise ValueError(f"CLIP config: hidden_act={values['activation']!r} is not supported "
                         f"(use one of {', '.join(ACTIVATIONS)})")
    return module(**values, projection_dim=projection_dim, attention=attention)


def clip_model(config, attention: str = "auto") -> CLIP:
    """CLIP of a transformers CLIPConfig."""
    text = _tower(CLIPTextEncoder, config.text_config, config.projection_dim, attention,
                  vocab_size="vocab_size", max_length="max_position_embeddings")
    vision = _tower(CLIPVisionEncoder, config.vision_config, config.projection_dim, attention,
                    image_size="image_size", patch_size="patch_size")
    return CLIP(text, vision)


def _flax_state_dict(tree) -> dict[str, np.ndarray]:
    """The parameters of a flax_model.msgpack (transformers' layout) -> the PyTorch state dict they stand
    for (same names; a kernel, scale or embedding is a weight, kernels in PyTorch's layout)."""
    tree = tree["params"] if set(tree) == {"params"} else tree
    state = {}
    for path, value in traverse_util.flatten_dict(tree).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
        state[".".join((*path[:-1], leaf))] = value
    return state


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The PyTorch state dict of a weight file of WEIGHT_FILES (all shards of an index)."""
    if path.suffix == ".msgpack":
        return _flax_state_dict(io.read_flax(path))
    return io.read_state_dict(path)


def _weight_file(folder: Path) -> Path | None:
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def _download(hub_id: str) -> Path:
    """Snapshot of hub repo `hub_id` with one weight format: safetensors, else flax_model.msgpack, else PyTorch
    .bin."""
    import huggingface_hub

    for weights in _HUB_WEIGHTS:
        folder = Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=["*.json", weights]))
        if _weight_file(folder) is not None:
            break
    return folder  # with no weights, the loader names what it expected


def load_clip(path: str, attention: str = "auto") -> tuple[CLIP, dict]:
    """(CLIP, its variables) of a Hugging Face CLIPModel directory or hub id."""
    from transformers import CLIPConfig

    if os.path.exists(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"--clip {path} is a file; give a CLIP model directory or a hub id")
    config = CLIPConfig.from_pretrained(path)  # transformers says what is missing, locally or on the hub
    folder = Path(path) if os.path.isdir(path) else _download(path)
    weights = _weight_file(folder)
    if weights is None:
        raise FileNotFoundError(f"no CLIP weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    model = clip_model(config, attention)
    target = abstract_variables(model)
    variables = from_torch(read_weights(weights), target, CLIP_MODEL_LAYOUT, f"CLIP weights {weights}")
    return model, cast_like(variables, target)


class ClipScorer:
    """`scores(images, texts)`: the CLIP score of each (image, text) pair. The towers run the
    f2d_jax.models.attention implementation they were built with."""

    def __init__(self, model: CLIP, variables, tokenizer, name: str, batch_size: int = 16):
        self.model, self.variables, self.tokenizer, self.name, self.batch_size = \
            model, variables, tokenizer, name, batch_size
        self.image_size = model.vision.image_size

        def unit(method):
            def run(variables, x):
                out = model.apply(variables, x, method=method)
                return out / jnp.linalg.norm(out, axis=-1, keepdims=True)
            return jax.jit(run)

        self._images = unit(CLIP.image_features)
        self._texts = unit(CLIP.text_features)

    @classmethod
    def load(cls, path: str = DEFAULT_CLIP, batch_size: int = 16, attention: str = "auto") -> ClipScorer:
        """From a local directory (WEIGHT_FILES) or a hub id; `"tiny"`: random init."""
        from transformers import CLIPTokenizer

        if path == TINY:
            return cls.tiny(batch_size=batch_size, attention=attention)
        model, variables = load_clip(path, attention)
        return cls(model, variables, CLIPTokenizer.from_pretrained(path), path, batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, batch_size: int = 16, attention: str = "auto") -> ClipScorer:
        """A small random-init CLIP with the real CLIP tokenizer (the one Stable Diffusion v1 uses)."""
        from f2d_jax.text import load_tokenizer

        small = dict(width=32, mlp_dim=64, num_layers=2, num_heads=4, projection_dim=16, attention=attention)
        model = CLIP(CLIPTextEncoder(**small), CLIPVisionEncoder(**small, image_size=64, patch_size=16))
        variables = jax.jit(model.init)(jax.random.key(seed), *_example(model))
        return cls(model, variables, load_tokenizer(), TINY, batch_size)

    def image_embeddings(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = np.stack([preprocess(image, self.image_size).transpose(1, 2, 0) for image in images])
        return self._batched(lambda i, j: self._images(self.variables, jnp.asarray(pixels[i:j])), len(pixels))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        length = self.model.text.max_length
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                                return_tensors="np")
        ids = tokens["input_ids"].astype(np.int32)  # no mask: the pooled token attends to no padding (causal)
        return self._batched(lambda i, j: self._texts(self.variables, ids[i:j]), len(ids))

    def scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarities of image i and text i."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return np.sum(self.image_embeddings(images) * self.text_embeddings(texts), axis=-1)

    def _batched(self, fn, n: int) -> np.ndarray:
        return np.concatenate([np.asarray(fn(i, i + self.batch_size)) for i in range(0, n, self.batch_size)])

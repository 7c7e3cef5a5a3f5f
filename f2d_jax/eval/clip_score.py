"""The CLIP score: cosine similarity between an image and a text in CLIP's joint embedding space.

Flax CLIP (transformers' FlaxCLIPModel, OpenAI ViT-L/14 by default) from a local directory or a hub id.
Images are prepared as CLIP's processor does: the shorter side resized to the model's input size
(PIL bicubic), a centre crop, then CLIP's mean/std.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from f2d_jax.models.layers import multi_head_attention

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


def _clip_attention(implementation: str):
    """Method interceptor running transformers' FlaxCLIPAttention through f2d_jax.models.attention
    (same parameters; attention weights are not returned, dropout is not applied)."""
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPAttention

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, FlaxCLIPAttention) or context.method_name != "__call__" or \
                module.is_initializing() or kwargs.get("output_attentions"):
            return next_fun(*args, **kwargs)
        given = dict(zip(("hidden_states", "attention_mask"), args)) | kwargs
        hidden, mask = given["hidden_states"], given.get("attention_mask")
        out = multi_head_attention(module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden),
                                   module.num_heads, causal=module.causal,
                                   mask=None if mask is None else mask[:, None, None, :] > 0,
                                   implementation=implementation)
        return (module.out_proj(out),)

    return intercept


class ClipScorer:
    """`scores(images, texts)`: the CLIP score of each (image, text) pair. `attention` names the
    f2d_jax.models.attention implementation the towers run."""

    def __init__(self, model, params, tokenizer, name: str, batch_size: int = 16, attention: str = "auto"):
        self.model, self.params, self.tokenizer, self.name, self.batch_size = model, params, tokenizer, name, batch_size
        self.image_size = model.config.vision_config.image_size
        interceptor = _clip_attention(attention)

        def features(method):
            def run(*args):
                with nn.intercept_methods(interceptor):
                    out = method(*args)
                return out / jnp.linalg.norm(out, axis=-1, keepdims=True)
            return jax.jit(run)

        self._images = features(lambda p, x: model.get_image_features(x, params=p))
        self._texts = features(lambda p, ids, mask: model.get_text_features(ids, mask, params=p))

    @classmethod
    def load(cls, path: str = DEFAULT_CLIP, batch_size: int = 16, attention: str = "auto") -> ClipScorer:
        """From a local directory (Flax or PyTorch weights) or a hub id; `"tiny"`: random init."""
        from transformers import CLIPTokenizer, FlaxCLIPModel

        if path == TINY:
            return cls.tiny(batch_size=batch_size, attention=attention)
        from_pt = os.path.isdir(path) and not os.path.isfile(os.path.join(path, "flax_model.msgpack"))
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileNotFoundError(f"--clip {path} is a file; give a CLIP model directory or a hub id")
        model = FlaxCLIPModel.from_pretrained(path, from_pt=from_pt)
        return cls(model, model.params, CLIPTokenizer.from_pretrained(path), path, batch_size, attention)

    @classmethod
    def tiny(cls, seed: int = 0, batch_size: int = 16, attention: str = "auto") -> ClipScorer:
        """A small random-init CLIP with the real CLIP tokenizer (the one Stable Diffusion v1 uses)."""
        from transformers import CLIPConfig, FlaxCLIPModel

        from f2d_jax.text import load_tokenizer

        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        config = CLIPConfig(text_config=dict(small, vocab_size=49408), vision_config=dict(small, image_size=64,
                            patch_size=16), projection_dim=16)
        model = FlaxCLIPModel(config, seed=seed)
        return cls(model, model.params, load_tokenizer(), TINY, batch_size, attention)

    def image_embeddings(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = np.stack([preprocess(image, self.image_size) for image in images])
        return self._batched(lambda i, j: self._images(self.params, jnp.asarray(pixels[i:j])), len(pixels))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="np")
        ids, mask = tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
        return self._batched(lambda i, j: self._texts(self.params, ids[i:j], mask[i:j]), len(ids))

    def scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarities of image i and text i."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return np.sum(self.image_embeddings(images) * self.text_embeddings(texts), axis=-1)

    def _batched(self, fn, n: int) -> np.ndarray:
        return np.concatenate([np.asarray(fn(i, i + self.batch_size)) for i in range(0, n, self.batch_size)])

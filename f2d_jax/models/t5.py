"""FLUX.1's T5 text encoder in Flax: transformers' T5EncoderModel (T5 v1.1 as FLUX ships it, and T5 v1.0's ReLU
feed-forward), computing what PyTorch computes, with Face2Diffusion's identity tokens written into its input
embeddings.

What is computed, as transformers does: the ids' embeddings (`shared`, no position embedding, no scaling), then
`num_layers` pre-norm blocks, each self-attention then a feed-forward with a residual around each, then a final
norm. The norms are T5's RMS norm: x / sqrt(mean(x^2) + eps) with the mean taken in float32, times a scale, no
bias, no mean subtracted. The attention has no 1/sqrt(d_kv) scaling; its scores get a relative position bias,
one value per head for each bucket of (key position - query position), computed from the first block's
`relative_attention_bias` and shared by every block. The feed-forward is `wo(gelu_tanh(wi_0 x) * wi_1 x)`
("gated-gelu", T5 v1.1) or `wo(relu(wi x))` ("relu", T5 v1.0). No dense layer has a bias. No attention mask is
applied, as FluxPipeline calls the encoder: the padding tokens are attended to. The scores and the softmax are
float32 whatever the compute dtype (the bias is added in float32), the rest runs in `dtype`; float16's clamping
of infinities is not done (use bfloat16 or float32).

Face2Diffusion's injection: `tokens` (B, K, d_model) replace the input embeddings at `positions` (B, K) before the
first block; the positions need not be adjacent ("f" and "l" are two tokens each carried by its own piece,
`f2d_jax.text_t5`).

The parameter tree carries transformers' module names under the generic rules of `f2d_jax.convert.layout`
(`shared/embedding`, `blocks/layer_0/SelfAttention/q/kernel`, `blocks/layer_1/DenseReluDense/wi_0/kernel`, stacked
over the blocks by nn.scan), the first block's relative position bias at the top (`relative_attention_bias`), so
`from_torch(state, target, T5_LAYOUT)` reads a transformers state dict. `t5_state_dict` writes one back: the
generic rules would name the gated projections `wi.0`, `wi.1`. `load_t5` reads a T5EncoderModel folder (one
safetensors file or the shards of FLUX.1-dev's text_encoder_2), a FLUX pipeline folder or a hub id.
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.convert import io
from f2d_jax.convert.layout import TorchLayout, from_torch, to_torch
from f2d_jax.models.sd_bundle import cast
from f2d_jax.models.sd_config import UnsupportedConfigError
from f2d_jax.models.stable_diffusion import download, local_or_hub, read_json

CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SUBFOLDER = "text_encoder_2"   # the T5 encoder of a FLUX pipeline folder

T5_LAYOUT = TorchLayout(
    renames=(("encoder.block.0.layer.0.SelfAttention.relative_attention_bias", "relative_attention_bias"),
             ("encoder.block", "blocks"),
             ("encoder.final_layer_norm", "final_layer_norm")),
    stacked=("blocks",),
    ignore=(r"^encoder\.embed_tokens\.weight$",))  # tied to shared.weight

# feed_forward_proj -> (activation, gated). "gated-gelu" is transformers' "gelu_new", the tanh approximation.
FEED_FORWARDS = {"gated-gelu": (functools.partial(jax.nn.gelu, approximate=True), True),
                 "relu": (jax.nn.relu, False)}

# google/t5-v1_1-xxl's config.json as FLUX.1 ships it in text_encoder_2/.
T5_XXL = dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096, d_kv=64,
              d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, is_encoder_decoder=True,
              tie_word_embeddings=False, use_cache=True, output_past=True, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0, classifier_dropout=0.0)
# A tiny T5 v1.1 for tests; its vocabulary holds the tiny tokenizer's (tests/flux_fixtures.py). Few buckets and a
# short maximum distance, so that a few dozen tokens meet the exact, the logarithmic and the last bucket.
TINY_T5 = dict(model_type="t5", vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, layer_norm_epsilon=1e-6,
               feed_forward_proj="gated-gelu")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of each (query i, key j) pair, as transformers' bidirectional
    `T5Attention._relative_position_bucket` of j - i: half the buckets for keys after the query; in each half,
    exact distances below a quarter of num_buckets, then logarithmically wider bins up to `max_distance`,
    beyond which all share the last bucket. Computed in float32 as PyTorch does."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)
    log = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    far = np.minimum(exact + log.astype(np.int64), half - 1)
    return ((relative > 0) * half + np.where(distance < exact, distance, far)).astype(np.int32)


def inject_at(hidden, tokens, positions):
    """hidden (B, T, D) with hidden[b, positions[b, k]] replaced by tokens[b, k] (tokens (B, K, D), positions
    (B, K) int). Differentiable in `tokens`."""
    rows = jnp.arange(hidden.shape[0])[:, None]
    return hidden.at[rows, jnp.asarray(positions)].set(tokens.astype(hidden.dtype))


class T5LayerNorm(nn.Module):
    """T5's RMS norm: x / sqrt(mean(x^2) + eps), the mean in float32, times `scale`; no bias, no centring."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class T5Attention(nn.Module):
    """Self-attention with T5's unscaled scores plus the relative position bias (1, H, T, T) float32."""

    num_heads: int
    d_kv: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        b, t, d = x.shape
        dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (dense(self.num_heads * self.d_kv, n)(x).reshape(b, t, self.num_heads, self.d_kv) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias  # (B, H, T, T)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, self.num_heads * self.d_kv)
        return dense(d, "o")(out)


class T5FeedForward(nn.Module):
    """transformers' DenseReluDense: wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x)); no biases."""

    d_ff: int
    feed_forward_proj: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        activation, gated = FEED_FORWARDS[self.feed_forward_proj]
        dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        if gated:
            h = activation(dense(self.d_ff, "wi_0")(x)) * dense(self.d_ff, "wi_1")(x)
        else:
            h = activation(dense(self.d_ff, "wi")(x))
        return dense(x.shape[-1], "wo")(h)


class T5Block(nn.Module):
    """One encoder block, scanned over the layers: (hidden, bias) -> (hidden, None); `part` builds one of its
    two residual sub-layers instead."""

    num_heads: int
    d_kv: int
    d_ff: int
    feed_forward_proj: str
    epsilon: float
    dtype: Any = jnp.float32
    part: str | None = None   # "attention" or "feed_forward": that sub-layer alone

    @nn.compact
    def __call__(self, x, bias):
        if self.part is None:  # T5Block itself, not type(self): under nn.remat the sub-layers are not remat'd again
            sub_layer = functools.partial(T5Block, self.num_heads, self.d_kv, self.d_ff, self.feed_forward_proj,
                                          self.epsilon, self.dtype)
            x = sub_layer(part="attention", name="layer_0")(x, bias)
            return sub_layer(part="feed_forward", name="layer_1")(x, bias), None
        # x + sub-layer(norm(x)): transformers' T5LayerSelfAttention (layer.0), T5LayerFF (layer.1)
        h = T5LayerNorm(self.epsilon, self.dtype, name="layer_norm")(x)
        if self.part == "attention":
            return x + T5Attention(self.num_heads, self.d_kv, self.dtype, name="SelfAttention")(h, bias)
        return x + T5FeedForward(self.d_ff, self.feed_forward_proj, self.dtype, name="DenseReluDense")(h)


class T5Encoder(nn.Module):
    """(B, T) ids [+ tokens (B, K, d_model) at positions (B, K)] -> last hidden state (B, T, d_model).

    The fields are transformers' T5Config entries with its defaults (T5 v1.0 small), so a config.json builds the
    module through `t5_fields`; `dtype` (compute dtype) and `remat` (recompute each block in the backward pass)
    are ours. feed_forward_proj other than "gated-gelu" and "relu" raises UnsupportedConfigError.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARDS:
            raise UnsupportedConfigError(f"T5 config: feed_forward_proj={self.feed_forward_proj!r}: the Flax T5 "
                                         f"encoder computes {sorted(FEED_FORWARDS)} only")
        super().__post_init__()

    @property
    def width(self) -> int:
        return self.d_model

    def setup(self):
        self.shared = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(1.0),
                               dtype=self.dtype)
        self.relative_attention_bias = nn.Embed(self.relative_attention_num_buckets, self.num_heads, dtype=self.dtype)
        block = nn.remat(T5Block) if self.remat else T5Block
        self.blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                              length=self.num_layers)(self.num_heads, self.d_kv, self.d_ff, self.feed_forward_proj,
                                                      self.layer_norm_epsilon, self.dtype)
        self.final_layer_norm = T5LayerNorm(self.layer_norm_epsilon, self.dtype)

    def embed(self, input_ids):
        """(B, T) ids -> (B, T, d_model) input embeddings."""
        return self.shared(input_ids)

    def position_bias(self, length: int):
        """(1, num_heads, length, length) float32 relative position bias of a sequence of `length` tokens."""
        buckets = relative_position_buckets(length, self.relative_attention_num_buckets,
                                            self.relative_attention_max_distance)
        return self.relative_attention_bias(jnp.asarray(buckets)).astype(jnp.float32).transpose(2, 0, 1)[None]

    def __call__(self, input_ids, tokens=None, positions=None):
        if (tokens is None) != (positions is None):
            raise ValueError("injected tokens need their positions and positions their tokens: pass both or neither")
        hidden = self.embed(input_ids)  # (B, T, d_model)
        if tokens is not None:
            hidden = inject_at(hidden, tokens, positions)
        hidden, _ = self.blocks(hidden, self.position_bias(input_ids.shape[-1]))
        return self.final_layer_norm(hidden)


def t5_fields(config: dict) -> dict:
    """T5Encoder's fields from a transformers T5Config dict (config.json as read); raises UnsupportedConfigError
    for another model's config or a feed-forward the module does not compute."""
    model_type = config.get("model_type", "t5")
    if model_type != "t5":
        raise UnsupportedConfigError(f"T5 config: model_type {model_type!r}; expected a transformers T5 config "
                                     "(model_type 't5')")
    names = [f for f in T5Encoder.__dataclass_fields__ if f not in ("parent", "name", "dtype", "remat")]
    fields = {name: config[name] for name in names if name in config}
    T5Encoder(**fields)  # checks feed_forward_proj
    return fields


def t5_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """transformers' T5EncoderModel state dict of our {"params": ...}: to_torch with T5_LAYOUT, the gated
    feed-forward's projections named `wi_0` and `wi_1` as transformers names them, and the tied
    `encoder.embed_tokens.weight`, so that a strict `load_state_dict` succeeds."""
    state = {re.sub(r"\.DenseReluDense\.wi\.([01])\.", r".DenseReluDense.wi_\1.", key): value
             for key, value in to_torch(variables, T5_LAYOUT).items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    return state


def _t5_folder(root: Path) -> Path:
    """The folder holding the encoder's config: root itself, else root/text_encoder_2 (a FLUX pipeline folder)."""
    candidates = (root, root / SUBFOLDER)
    folder = next((c for c in candidates if (c / CONFIG_FILE).is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"no T5 encoder config at {' or '.join(str(c / CONFIG_FILE) for c in candidates)}: "
                                f"expected a transformers T5EncoderModel folder (config.json and {WEIGHT_FILES[0]} or "
                                f"{WEIGHT_FILES[1]} with its shards) or a FLUX pipeline folder with {SUBFOLDER}/")
    return folder


def load_t5(path_or_hub_id, *, dtype=jnp.float32, revision: str | None = None) -> tuple[T5Encoder, dict]:
    """(module, {"params": ...}) of a transformers T5EncoderModel: FLUX.1's text_encoder_2 (T5-XXL v1.1).

    `path_or_hub_id` is a T5EncoderModel folder (config.json and model.safetensors, or the shards with their
    model.safetensors.index.json; pytorch_model.bin[.index.json] with torch installed), a FLUX pipeline folder
    (its text_encoder_2/ is read) or a hub id of either (only that folder's config and safetensors are
    downloaded). Float weights and the compute dtype become `dtype`. Raises FileNotFoundError for a missing
    folder, config or weight file, UnsupportedConfigError for a config the module does not compute,
    CheckpointMismatchError for weights that do not fit the config.
    """
    root, name = local_or_hub(path_or_hub_id, "T5EncoderModel folder or FLUX pipeline folder")
    if root is None:
        files = (CONFIG_FILE, WEIGHT_FILES[0], WEIGHT_FILES[1], "model-*.safetensors")
        root = download(name, revision, [f"{prefix}{file}" for prefix in ("", f"{SUBFOLDER}/") for file in files], {})
    folder = _t5_folder(root)
    module = T5Encoder(**t5_fields(read_json(folder / CONFIG_FILE)), dtype=dtype)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no T5 encoder weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    variables = from_torch(io.read_state_dict(weights), target, T5_LAYOUT, f"T5 encoder weights {weights}")
    return module, cast(variables, dtype)

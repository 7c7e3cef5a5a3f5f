"""FLUX.1's transformer in Flax: diffusers' FluxTransformer2DModel (FLUX.1-dev and FLUX.1-schnell), computing
what PyTorch computes.

The fields are the entries of diffusers' config.json with its defaults, so a config builds the module as it
is: `FluxTransformer2DModel(**config, dtype=...)`. The parameter tree carries diffusers' PyTorch module names
under the generic rules of `f2d_jax.convert.layout` (`transformer_blocks_0/attn/to_q/kernel`,
`single_transformer_blocks_3/proj_mlp/kernel`, `norm_out/linear/kernel`), so `FLUX_LAYOUT` converts a
diffusers state dict both ways (`from_torch`, `to_torch`); its only renames keep the literal `linear_1` and
`linear_2` of the time, guidance and pooled-text embedders. `load_transformer` reads a diffusers transformer
folder (one safetensors file or FLUX.1-dev's shards), a FLUX pipeline folder or a hub id, and
`save_transformer` writes a folder diffusers loads.

What is computed, as diffusers does: the packed latents and the text embeddings are projected to the model
width (x_embedder, context_embedder); the conditioning is the timestep's (x 1000) sinusoidal embedding
through an MLP, plus the guidance scale's (x 1000) where `guidance_embeds`, plus the pooled text projection.
Each double block modulates image and text tokens apart (AdaLayerNormZero: parameter-free LayerNorm, eps
1e-6, scaled and shifted by a projection of SiLU(conditioning)), attends over the joint sequence (text first)
with RMSNorm'd queries and keys, and runs a tanh-GELU feed-forward per stream, each gated. Each single
block runs attention and an MLP side by side on the joint sequence and projects their concatenation back
(gated). The output is the image tokens, modulated once more (AdaLayerNormContinuous) and projected to
patch_size^2 * out_channels. Every attention goes through `f2d_jax.models.attention.attention`.

Rotary position embedding: each head's width is split by `axes_dims_rope`, and axis i of the position ids
(text ids, then image ids) turns pairs (2j, 2j+1) of its part of the queries and keys by the angle
id_i * 10000^(-2j / dim_i). The angles, their cosines and sines are computed here in float32 (the
frequencies are float64 constants rounded once); diffusers computes them in float64 on CPU and rounds the
cosines and sines to float32. Over the image ids of FLUX.1's (16, 56, 56) axes the two differ by at most
2.2e-6 for ids 0 to 63 (1024 x 1024 images), 6.5e-6 for 0 to 127 (2048 x 2048), 1.3e-5 for 0 to 255: about
one float32 ulp of the largest angle. The rotation is applied in float32 whatever the compute dtype, as
diffusers does.

Three fields are ours, not the config's: `attention` names the attention implementation, `remat` recomputes
each double and single block in the backward pass under the `jax.checkpoint_policies` policy `remat_policy`
names, and `dtype` is the compute dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.convert import io
from f2d_jax.convert.layout import TorchLayout, from_torch, to_torch
from f2d_jax.models.attention import attention, check_implementation
from f2d_jax.models.layers import LayerNorm
from f2d_jax.models.sd_bundle import abstract_module, cast
from f2d_jax.models.sd_config import UnsupportedConfigError, config_options
from f2d_jax.models.stable_diffusion import download, local_or_hub, read_json, write_config
from f2d_jax.models.unet import TimestepEmbedding, timestep_embedding

CLASS_NAME = "FluxTransformer2DModel"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SHARDED_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors.index.json"
ROPE_THETA = 10000.0

# The embedders' `linear_1`/`linear_2` are literal PyTorch names (not `linear.1`): identity renames keep the
# reverse mapping (to_torch, missing-key reports) right.
FLUX_LAYOUT = TorchLayout(renames=tuple((f"time_text_embed.{m}.linear_{i}",) * 2
                                        for m in ("timestep_embedder", "guidance_embedder", "text_embedder")
                                        for i in (1, 2)))

TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}


# --------------------------------------------------------------------------- rotary embedding

def rotary_embedding(ids, axes_dims, theta: float = ROPE_THETA):
    """(S, n_axes) position ids -> (cos, sin), each (S, sum(axes_dims) / 2) float32: pair j of axis i's part of
    a head turns by ids[:, i] * theta^(-2j / axes_dims[i])."""
    ids = jnp.asarray(ids, jnp.float32)
    angles = [ids[:, i, None] * (theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
              for i, dim in enumerate(axes_dims)]
    angles = jnp.concatenate(angles, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """(B, S, H, D) queries or keys with each pair (2j, 2j+1) of features turned by the angle of (S, D / 2)
    `cos`, `sin`; computed in float32, returned in x's dtype."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    turned = jnp.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return turned.reshape(x.shape).astype(x.dtype)


def _position_ids(ids):
    """(S, 3) ids; of a (B, S, 3) array, which diffusers still accepts, the first row."""
    ids = jnp.asarray(ids)
    return ids[0] if ids.ndim == 3 else ids


# --------------------------------------------------------------------------- layers

class AdaLayerNorm(nn.Module):
    """A parameter-free LayerNorm (eps 1e-6) of x, scaled and shifted by chunks of linear(SiLU(emb)):
    x * (1 + scale) + shift. diffusers' AdaLayerNormZero (`chunks` 6), AdaLayerNormZeroSingle (3): shift
    and scale are the first two chunks, the rest (gates, the feed-forward's shift and scale) are returned
    beside; AdaLayerNormContinuous (2, `continuous`): scale first, then shift."""

    chunks: int
    continuous: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        emb = nn.Dense(self.chunks * x.shape[-1], dtype=self.dtype, name="linear")(nn.silu(emb))
        parts = jnp.split(emb[:, None, :], self.chunks, axis=-1)  # each (B, 1, D)
        shift, scale = (parts[1], parts[0]) if self.continuous else (parts[0], parts[1])
        return modulate(plain_layer_norm(self.dtype, "norm")(x), shift, scale), parts[2:]


def plain_layer_norm(dtype, name: str) -> nn.Module:
    """PyTorch's LayerNorm(eps=1e-6, elementwise_affine=False): no parameters."""
    return LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TanhGELU(nn.Module):
    """diffusers' GELU activation module with approximate="tanh": proj, then the tanh form of GELU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return jax.nn.gelu(nn.Dense(self.features, dtype=self.dtype, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
    """diffusers' FeedForward with "gelu-approximate": net_0 (TanhGELU) to 4x the width, net_2 back."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = TanhGELU(4 * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class FluxAttention(nn.Module):
    """Attention of FLUX's blocks over (text, image) tokens: to_q/to_k/to_v (with bias) of `x`, queries and keys
    RMSNorm'd per head (norm_q, norm_k, eps 1e-6). With `context` (double blocks) the text tokens get their own
    add_q_proj/add_k_proj/add_v_proj and norm_added_q/norm_added_k, go ahead of x, and each part is projected
    back (to_add_out for the text, to_out_0 for x): returns (x, context). Without it (single blocks, x is
    the joint sequence) the heads' output is returned unprojected. Rotary embedding (`rotary`: cos, sin of the
    whole sequence) turns the queries and keys."""

    heads: int
    head_dim: int
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rotary, context=None):
        def project(source, names, norms):
            b, t, _ = source.shape
            q, k, v = (nn.Dense(self.heads * self.head_dim, dtype=self.dtype, name=name)(source)
                       .reshape(b, t, self.heads, self.head_dim) for name in names)
            q, k = (nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name=name)(y) for name, y in zip(norms, (q, k)))
            return q, k, v

        q, k, v = project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if context is not None:
            text = project(context, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate([c, y], axis=1) for c, y in zip(text, (q, k, v)))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = attention(q, k, v, implementation=self.implementation)
        out = out.reshape(*out.shape[:2], -1).astype(self.dtype)  # (B, T, H * D)
        if context is None:
            return out
        width = x.shape[-1]
        text_out, image_out = out[:, :context.shape[1]], out[:, context.shape[1]:]
        return (nn.Dense(width, dtype=self.dtype, name="to_out_0")(image_out),
                nn.Dense(width, dtype=self.dtype, name="to_add_out")(text_out))


class FluxTransformerBlock(nn.Module):
    """A double block: image (x) and text (context) tokens modulated apart (norm1, norm1_context), joint
    attention, then a feed-forward per stream (ff, ff_context) after a parameter-free LayerNorm modulated by
    the conditioning; the attention and feed-forward outputs gated into each stream's residual."""

    heads: int
    head_dim: int
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, temb, rotary):
        norm_x, (gate, shift_mlp, scale_mlp, gate_mlp) = AdaLayerNorm(6, dtype=self.dtype, name="norm1")(x, temb)
        norm_c, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = AdaLayerNorm(
            6, dtype=self.dtype, name="norm1_context")(context, temb)
        attn_x, attn_c = FluxAttention(self.heads, self.head_dim, self.implementation, self.dtype, name="attn")(
            norm_x, rotary, norm_c)

        def feed_forward(h, shift, scale, gate, stream):
            norm = plain_layer_norm(self.dtype, f"norm2{stream}")(h)
            return h + gate * FeedForward(self.dtype, name=f"ff{stream}")(modulate(norm, shift, scale))

        x = feed_forward(x + gate * attn_x, shift_mlp, scale_mlp, gate_mlp, "")
        context = feed_forward(context + c_gate * attn_c, c_shift_mlp, c_scale_mlp, c_gate_mlp, "_context")
        return x, context


class FluxSingleTransformerBlock(nn.Module):
    """A single block on the joint (text, image) sequence: one modulation (norm), attention and a tanh-GELU
    MLP (proj_mlp, 4x the width) side by side, their concatenation projected back (proj_out) and gated into
    the residual."""

    heads: int
    head_dim: int
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, rotary):
        width = h.shape[-1]
        norm, (gate,) = AdaLayerNorm(3, dtype=self.dtype, name="norm")(h, temb)
        mlp = jax.nn.gelu(nn.Dense(4 * width, dtype=self.dtype, name="proj_mlp")(norm), approximate=True)
        attn = FluxAttention(self.heads, self.head_dim, self.implementation, self.dtype, name="attn")(norm, rotary)
        return h + gate * nn.Dense(width, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))


class ConditioningEmbedding(nn.Module):
    """diffusers' CombinedTimestep[Guidance]TextProjEmbeddings: the timesteps' 256-wide sinusoidal embedding
    (cos first) through timestep_embedder (linear_1, SiLU, linear_2), plus the guidance scales' through
    guidance_embedder where given, plus the pooled text embedding through text_embedder (the same MLP)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep, pooled, guidance=None):
        embed = lambda t, name: TimestepEmbedding(self.features, self.dtype, name=name)(  # noqa: E731
            timestep_embedding(t, 256))
        emb = embed(timestep, "timestep_embedder")
        if guidance is not None:
            emb = emb + embed(guidance, "guidance_embedder")
        return emb + TimestepEmbedding(self.features, self.dtype, name="text_embedder")(pooled)


# --------------------------------------------------------------------------- the model

class FluxTransformer2DModel(nn.Module):
    """(B, S_img, in_channels) packed latents, (B, S_txt, joint_attention_dim) text embeddings,
    (B, pooled_projection_dim) pooled text embedding, (B,) timesteps in [0, 1], (S_img, 3) image and (S_txt, 3)
    text position ids [, (B,) guidance scales] -> (B, S_img, patch_size^2 * out_channels), diffusers'
    `.sample`."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)
    # Ours: not part of the config.
    attention: str = "auto"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32

    OURS = ("attention", "remat", "remat_policy", "dtype")

    @property
    def config(self) -> dict:
        """The module's diffusers config entries (the fields less ours)."""
        return {name: getattr(self, name) for name in FLUX_DEV_TRANSFORMER}

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        if self.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer embeds the guidance scale (guidance_embeds, FLUX.1-dev): "
                             "pass guidance, one scale per sample (e.g. 3.5)")
        if not self.guidance_embeds and guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedding (guidance_embeds is false, "
                             "FLUX.1-schnell): pass guidance=None")
        width = self.num_attention_heads * self.attention_head_dim
        batch = hidden_states.shape[0]
        scaled = lambda t: jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,)) * 1000  # noqa: E731
        temb = ConditioningEmbedding(width, self.dtype, name="time_text_embed")(
            scaled(timestep), pooled_projections, None if guidance is None else scaled(guidance))
        x = nn.Dense(width, dtype=self.dtype, name="x_embedder")(hidden_states)
        context = nn.Dense(width, dtype=self.dtype, name="context_embedder")(encoder_hidden_states)
        rotary = rotary_embedding(jnp.concatenate([_position_ids(txt_ids), _position_ids(img_ids)], axis=0),
                                  self.axes_dims_rope)

        # Each block recomputed in the backward pass under the named policy when `remat` is set.
        policy = getattr(jax.checkpoint_policies, self.remat_policy)
        layer = (lambda block: nn.remat(block, policy=policy)) if self.remat else (lambda block: block)
        heads = (self.num_attention_heads, self.attention_head_dim, self.attention, self.dtype)
        for i in range(self.num_layers):
            x, context = layer(FluxTransformerBlock)(*heads, name=f"transformer_blocks_{i}")(x, context, temb, rotary)
        h = jnp.concatenate([context, x], axis=1)
        for i in range(self.num_single_layers):
            h = layer(FluxSingleTransformerBlock)(*heads, name=f"single_transformer_blocks_{i}")(h, temb, rotary)
        x, _ = AdaLayerNorm(2, continuous=True, dtype=self.dtype, name="norm_out")(h[:, context.shape[1]:], temb)
        out_channels = self.out_channels or self.in_channels
        return nn.Dense(self.patch_size ** 2 * out_channels, dtype=self.dtype, name="proj_out")(x)

    def example_inputs(self) -> tuple:
        """Zero inputs of the shapes `init` needs (one image token, one text token)."""
        ids = jnp.zeros((1, 3), jnp.float32)
        return (jnp.zeros((1, 1, self.in_channels), jnp.float32),
                jnp.zeros((1, 1, self.joint_attention_dim), jnp.float32),
                jnp.zeros((1, self.pooled_projection_dim), jnp.float32),
                jnp.ones((1,), jnp.float32), ids, ids,
                jnp.ones((1,), jnp.float32) if self.guidance_embeds else None)


# --------------------------------------------------------------------------- folders and the hub

class TransformerFolderError(FileNotFoundError, ValueError):
    """A folder that is not a diffusers FluxTransformer2DModel folder: no config.json or no weights."""


def build_transformer(config: dict, *, dtype=jnp.float32, attention: str = "auto") -> FluxTransformer2DModel:
    """The module of a diffusers FluxTransformer2DModel config (config.json as read, or one of the dicts
    above) computing in `dtype`. Raises UnsupportedConfigError for another class's config or an option the
    module does not have."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise UnsupportedConfigError(f"transformer config: _class_name {name!r}; expected a {CLASS_NAME} config")
    options = config_options("transformer", config, FluxTransformer2DModel, {})
    return FluxTransformer2DModel(**options, attention=check_implementation(attention), dtype=dtype)


def _transformer_folder(root: Path) -> Path:
    """The folder holding the transformer's config: root itself, else root/transformer (a pipeline folder)."""
    candidates = (root, root / "transformer")
    folder = next((c for c in candidates if (c / CONFIG_FILE).is_file()), None)
    if folder is None:
        raise TransformerFolderError(f"no transformer config at {' or '.join(str(c / CONFIG_FILE) for c in candidates)}"
                                     f": expected a diffusers {CLASS_NAME} folder (config.json and {WEIGHTS_FILE} or "
                                     f"{SHARDED_WEIGHTS_FILE}) or a FLUX pipeline folder with transformer/")
    return folder


def load_transformer(path_or_hub_id, *, dtype=jnp.float32, attention: str = "auto",
                     revision: str | None = None) -> tuple[FluxTransformer2DModel, dict]:
    """(module, {"params": ...}) of a diffusers FluxTransformer2DModel (FLUX.1-dev, FLUX.1-schnell).

    `path_or_hub_id` is a transformer folder (config.json and diffusion_pytorch_model.safetensors, or the
    shards with their diffusion_pytorch_model.safetensors.index.json), a FLUX pipeline folder (its
    transformer/ is read) or a hub id of either (only the transformer's config and safetensors are
    downloaded). Float weights and the compute dtype become `dtype`. Raises FileNotFoundError for a path that
    does not exist, TransformerFolderError (a FileNotFoundError and a ValueError) for a folder without the
    config or the weights, UnsupportedConfigError for a config of another model, CheckpointMismatchError for
    weights that do not fit the config.
    """
    root, name = local_or_hub(path_or_hub_id, f"{CLASS_NAME} folder")
    if root is None:
        files = (CONFIG_FILE, WEIGHTS_FILE, SHARDED_WEIGHTS_FILE, "diffusion_pytorch_model-*.safetensors")
        root = download(name, revision, [f"{prefix}{file}" for prefix in ("", "transformer/") for file in files], {})
    folder = _transformer_folder(root)
    module = build_transformer(read_json(folder / CONFIG_FILE), dtype=dtype, attention=attention)
    weights = next((folder / f for f in (WEIGHTS_FILE, SHARDED_WEIGHTS_FILE) if (folder / f).is_file()), None)
    if weights is None:
        raise TransformerFolderError(f"no transformer weights in {folder}: expected {WEIGHTS_FILE} or "
                                     f"{SHARDED_WEIGHTS_FILE} with its shards")
    variables = from_torch(io.read_state_dict(weights), abstract_module(module), FLUX_LAYOUT,
                           f"transformer weights {weights}")
    return module, cast(variables, dtype)


def save_transformer(module: FluxTransformer2DModel, params: dict, folder) -> Path:
    """Write `params` ({"params": ...}) of `module` as a diffusers FluxTransformer2DModel folder (config.json,
    diffusion_pytorch_model.safetensors in PyTorch's layout), which diffusers' `from_pretrained` and
    `load_transformer` read."""
    folder = Path(folder)
    write_config(module.config, CLASS_NAME, folder / CONFIG_FILE)
    io.write_state_dict(to_torch(params, FLUX_LAYOUT), folder / WEIGHTS_FILE)
    return folder

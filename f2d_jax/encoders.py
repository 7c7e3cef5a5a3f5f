"""The encoders that turn face crops and prompts into Stable Diffusion text conditioning.

    112 crop -> MSID -> identity (B, 1536) --+
    224 crop -> Deep3DFaceRecon -> exp (B, 64) --+-> mapping -> "f l" tokens (B, 2, 768)
    prompt ids + tokens at the "f" position -> CLIP text encoder -> conditioning {"context": (B, 77, 768)}

SDXL has two text encoders (CLIP ViT-L, 768 wide, and OpenCLIP bigG, 1280): the mapping network's
tokens are 768 + 1280 wide, split between them, and the conditioning is their penultimate states side
by side, {"context": (B, 77, 2048)}, with bigG's projected pooled state {"text_embeds": (B, 1280)}.
FLUX.1 has CLIP ViT-L (768) and T5-XXL (4096): the tokens are 768 + 4096 wide, written into both encoders'
inputs (T5 at the tokens carrying "f" and "l", `text_t5`), and the conditioning is T5's states and CLIP's
pooled state, {"context": (B, 512, 4096), "pooled": (B, 768)}.

`Encoders` holds the Flax modules (configuration only); every method is a pure function of a
variables dict {"msid", "mapping", "text_encoder"[, "text_encoder_2"], "expression"} and arrays, so
training and sampling compose them under `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from f2d_jax.models import CLIPTextEncoder, ExpressionEncoder, MappingNetwork, MSIDEncoder, expression_code
from f2d_jax.models.t5 import T5Encoder

NAMES = ("msid", "mapping", "text_encoder", "expression")


def face_models(model: Mapping[str, Any]) -> dict[str, nn.Module]:
    """MSID, the mapping network and the expression encoder of a config's `model` section: what needs no
    text encoder (a packaged model holds the first two, whatever base they were trained on)."""
    return {"msid": MSIDEncoder(**model["msid"], attention=model.get("attention", "auto")),
            "mapping": MappingNetwork(**model["mapping"]), "expression": ExpressionEncoder(**model["expression"])}


def init_models(models: Mapping[str, nn.Module], rng: jax.Array) -> dict[str, Any]:
    """{name: random variables} of `models` ({name in NAMES or "text_encoder_2": module}); a model's
    draws depend on `rng` and its name only, not on which others are drawn with it."""
    return _init(tuple(models.items()), rng)


@functools.partial(jax.jit, static_argnums=0)
def _init(models: tuple[tuple[str, nn.Module], ...], rng: jax.Array) -> dict[str, Any]:
    # Per-parameter draws from an "rbg" key: XLA's RngBitGenerator compiles several times faster on
    # CPU than the hundreds of inlined threefry hashes an init otherwise makes. One compiled program;
    # the dummy inputs are the smallest the parameter shapes allow.
    keys = dict(zip(NAMES, jax.random.split(
        jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg"), len(NAMES))))
    keys["text_encoder_2"] = jax.random.fold_in(keys["text_encoder"], 2)
    inputs = {"msid": lambda m: jnp.zeros((1, m.image_size, m.image_size, 3)),
              "mapping": lambda m: jnp.zeros((1, m.identity_dim)),
              "text_encoder": lambda m: jnp.zeros((1, 1), jnp.int32),
              "text_encoder_2": lambda m: jnp.zeros((1, 1), jnp.int32),
              "expression": lambda m: jnp.zeros((1, 32, 32, 3))}
    return {name: model.init(keys[name], inputs[name](model)) for name, model in models}


@dataclasses.dataclass(frozen=True)
class Encoders:
    msid: MSIDEncoder
    mapping: MappingNetwork
    text_encoder: CLIPTextEncoder
    expression: ExpressionEncoder
    text_encoder_2: CLIPTextEncoder | T5Encoder | None = None   # SDXL's bigG, FLUX's T5

    @property
    def flux(self) -> bool:
        """FLUX.1's encoders: CLIP ViT-L for the pooled vector, T5 for the sequence."""
        return isinstance(self.text_encoder_2, T5Encoder)

    def __post_init__(self):
        if self.mapping.identity_dim != self.msid.features:
            raise ValueError(f"mapping.identity_dim ({self.mapping.identity_dim}) must equal the MSID feature size "
                             f"({self.msid.features} = {len(self.msid.tap_layers)} taps x {self.msid.width})")
        widths = [encoder.width for encoder in self.text_encoders.values()]
        if self.mapping.token_dim != sum(widths):
            raise ValueError(f"mapping.token_dim ({self.mapping.token_dim}) must equal the text encoder width"
                             + (f"s together ({' + '.join(map(str, widths))} = {sum(widths)})" if len(widths) > 1
                                else f" ({widths[0]})"))

    @property
    def text_encoders(self) -> dict[str, CLIPTextEncoder]:
        second = {"text_encoder_2": self.text_encoder_2} if self.text_encoder_2 is not None else {}
        return {"text_encoder": self.text_encoder, **second}

    @classmethod
    def from_config(cls, model: Mapping[str, Any], text_encoders: Mapping[str, CLIPTextEncoder] | None = None
                    ) -> Encoders:
        """From a config's `model` section; `text_encoders` (those of a loaded SD checkpoint, by
        variables key: `StableDiffusion.text_encoders`) are used when given, else the section's."""
        if text_encoders is None:
            text_encoders = {"text_encoder": CLIPTextEncoder(**dict(model.get("text_encoder") or {}),
                                                             attention=model.get("attention", "auto"))}
        return cls(**face_models(model), text_encoder=text_encoders["text_encoder"],
                   text_encoder_2=text_encoders.get("text_encoder_2"))

    def init(self, rng: jax.Array, names: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Random variables for the models in `names` (default: all, SDXL's second text encoder too)."""
        names = names or (*NAMES, *(("text_encoder_2",) if self.text_encoder_2 is not None else ()))
        return init_models({name: getattr(self, name) for name in names}, rng)

    def identity_features(self, variables, faces):
        """(B, 112, 112, 3) aligned faces in [-1, 1] -> (B, F) MSID features."""
        return self.msid.apply(variables["msid"], faces)

    def expression_codes(self, variables, images):
        """(B, 224, 224, 3) Deep3DFaceRecon crops in [0, 1] -> (B, 64) expression codes."""
        return expression_code(self.expression.apply(variables["expression"], images))

    def identity_tokens(self, variables, identity, expression=None, expression_mask=None, *, train=False, rng=None):
        """(B, F) identity [+ (B, 64) expression, (B,) mask] -> (B, 2, D) embeddings of "f" and "l" (D: the
        text encoders' widths together)."""
        rngs = {"dropout": rng} if train else None
        first, last = self.mapping.apply(variables["mapping"], identity, expression, expression_mask,
                                         train=train, rngs=rngs)
        return jnp.stack([first, last], axis=1)

    def class_tokens(self, variables, input_ids, positions, class_ids) -> jax.Array:
        """(B, K, D): the text encoders' input at the K positions from (B,) `positions` when the K words
        `class_ids` (K,) stand there, token + position embeddings as the encoders embed any word, each
        encoder's in its slice of the width. FLUX: the three are dicts by encoder as `prompt_embeddings` takes
        them, T5's positions (B, K) (its class words need not follow each other)."""
        parts = []
        for name, encoder in self.text_encoders.items():
            ids, where, words = (_of(x, name) for x in (input_ids, positions, class_ids))
            where = jnp.asarray(where)
            index = where if where.ndim == 2 else where[:, None] + jnp.arange(jnp.shape(words)[-1])  # (B, K)
            ids = jnp.asarray(ids).at[jnp.arange(index.shape[0])[:, None], index].set(words)
            embedded = encoder.apply(variables[name], ids, method=encoder.embed)
            parts.append(jnp.take_along_axis(embedded, index[..., None], axis=1))
        return jnp.concatenate(parts, axis=-1)

    def scaled_identity_tokens(self, variables, tokens, input_ids, positions, class_ids, scale) -> jax.Array:
        """Identity strength: (B, K, D) tokens to write at (B,) `positions` of (B, T) `input_ids` ->
        (1 - scale) * class + scale * tokens, class: `class_tokens` of the words `class_ids`. Scale 0 makes
        the conditioning that of the prompt with the class words in place of "f l", 1 leaves the tokens as
        they are (both exactly); a traced scale: one program serves every value."""
        scale = jnp.asarray(scale, jnp.float32)
        return (1 - scale) * self.class_tokens(variables, input_ids, positions, class_ids) + scale * tokens

    def prompt_embeddings(self, variables, input_ids, positions=None, tokens=None) -> dict[str, jax.Array]:
        """(B, 77) ids [+ (B, K, D) tokens written at (B,) positions] -> the conditioning {"context": (B, 77, D)},
        and with SDXL's second encoder {"text_embeds": (B, P)}, its projected pooled state. Each encoder
        takes its slice of the tokens' width, in order.

        FLUX (T5 as the second encoder): `input_ids` and `positions` are dicts by encoder, {"text_encoder": CLIP's
        (B, 77) ids and (B,) positions of "f", "text_encoder_2": T5's (B, L) ids and (B, 2) positions of "f" and
        "l"}, and the conditioning is {"context": T5's states (B, L, 4096), "pooled": CLIP's pooled state (B, 768)}."""
        outputs, offset = {}, 0
        for name, encoder in self.text_encoders.items():
            part = None if tokens is None else tokens[..., offset:offset + encoder.width]
            offset += encoder.width
            outputs[name] = encoder.apply(variables[name], _of(input_ids, name), part, _of(positions, name))
        if self.flux:
            return {"context": outputs["text_encoder_2"], "pooled": outputs["text_encoder"][1]}
        states = [hidden for hidden, _ in outputs.values()]
        conditioning = {"context": jnp.concatenate(states, axis=-1) if len(states) > 1 else states[0]}
        if self.text_encoder_2 is not None:
            conditioning["text_embeds"] = outputs["text_encoder_2"][1]
        return conditioning


def _of(x, name: str):
    """An encoder's part of a per-encoder dict (FLUX's ids, positions, class ids); what every encoder shares else."""
    return x[name] if isinstance(x, Mapping) else x

"""Flax modules of Face2Diffusion: MSID, mapping network, CLIP text encoder, expression encoder."""
from f2d_jax.models.clip_text import CLIPTextEncoder, inject_tokens
from f2d_jax.models.expression import ExpressionEncoder, expression_code
from f2d_jax.models.mapping import MappingNetwork
from f2d_jax.models.msid import MSIDEncoder

__all__ = ["CLIPTextEncoder", "ExpressionEncoder", "MSIDEncoder", "MappingNetwork", "expression_code",
           "inject_tokens"]

"""Official checkpoints <-> Flax variables: MSID (msid.pt), mapping (mapping.pt),
Deep3DFaceRecon (epoch_20.pth, its `net_recon`) and Hugging Face CLIP text encoders
(model.safetensors / pytorch_model.bin, model name "text_encoder").

`load_file` reads .pt/.pth (torch), .safetensors or our .msgpack and returns the Flax variables the
module takes; `save*` write exactly the official key layout and shapes (.pt or .safetensors by
suffix), so that a strict `load_state_dict` into the official PyTorch module succeeds. Loading from
a weights directory as well is `f2d_jax.convert.load` (weights_dir.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.convert import io
from f2d_jax.convert.layout import TorchLayout, cast_like, check_tree, from_torch, to_torch
from f2d_jax.models.clip_text import CLIP_LAYOUT, CLIPTextEncoder
from f2d_jax.models.expression import ExpressionEncoder
from f2d_jax.models.mapping import MappingNetwork
from f2d_jax.models.msid import MSIDEncoder


def msid_layout(model: MSIDEncoder) -> TorchLayout:
    taps = [(f"norms.layer_{i}.{j}", f"tap_{i}.{name}")
            for i in model.tap_layers for j, name in enumerate(("batch_norm", "layer_norm"))]
    return TorchLayout(renames=(("patch_embed.proj", "patch_embed"), *taps), stacked=("blocks",))


def mapping_layout(model: MappingNetwork) -> TorchLayout:
    # The official MLP nests each Linear in a Sequential: `i2t_first.layers.{i}.0`.
    return TorchLayout(renames=tuple((f"{branch}.layers.{i}.0", f"{branch}.layers_{i}")
                                     for branch in ("i2t_first", "i2t_last") for i in range(model.num_layers)))


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build, shape and name one model's checkpoint."""

    model: Callable[[], nn.Module]
    example: Callable[[nn.Module], tuple]    # inputs for `init`, only their shapes matter
    layout: Callable[[nn.Module], TorchLayout]
    key: str | None = None                   # nested state-dict entry in the official file


SPECS = {
    "msid": Spec(MSIDEncoder, lambda m: (jnp.zeros((1, m.image_size, m.image_size, 3)),), msid_layout),
    "mapping": Spec(MappingNetwork, lambda m: (jnp.zeros((1, m.identity_dim)),), mapping_layout),
    "expression": Spec(ExpressionEncoder, lambda m: (jnp.zeros((1, 224, 224, 3)),), lambda m: TorchLayout(),
                       key="net_recon"),
    "text_encoder": Spec(CLIPTextEncoder, lambda m: (jnp.zeros((1, m.max_length), jnp.int32),), lambda m: CLIP_LAYOUT),
}


def abstract_variables(model: nn.Module, name: str) -> Any:
    """The model's variable tree as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), *SPECS[name].example(model))


def load_file(name: str, path, model: nn.Module | None = None) -> dict[str, Any]:
    """Flax variables for model `name` from .pt/.pth/.safetensors (official layout) or .msgpack."""
    model = model if model is not None else SPECS[name].model()
    target = abstract_variables(model, name)
    what = f"{name} weights {path}"
    if Path(path).suffix.lower() in io.FLAX_SUFFIXES:
        variables = io.read_flax(path)
        check_tree(variables, target, what)
    else:
        variables = from_torch(io.read_state_dict(path, SPECS[name].key), target, SPECS[name].layout(model), what)
    return cast_like(variables, target)


def torch_state_dict(name: str, variables: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, np.ndarray]:
    """The official PyTorch state dict for Flax `variables` of model `name`."""
    model = model if model is not None else _model_for(name, variables)
    return to_torch(jax.device_get(variables), SPECS[name].layout(model))


def save(name: str, variables: Mapping[str, Any], path, model: nn.Module | None = None) -> Path:
    """Write `variables` as the official checkpoint (.pt/.pth/.safetensors) or as Flax .msgpack."""
    if Path(path).suffix.lower() in io.FLAX_SUFFIXES:
        return io.write_flax(jax.device_get(variables), path)
    return io.write_state_dict(torch_state_dict(name, variables, model), path)


def _model_for(name: str, variables: Mapping[str, Any]) -> nn.Module:
    """A model whose layout fits `variables` (the layouts depend only on MSID's taps and the MLP depth)."""
    params = variables["params"]
    if name == "msid":
        return MSIDEncoder(tap_layers=tuple(sorted(int(k.split("_")[1]) for k in params if k.startswith("tap_"))))
    if name == "mapping":
        return MappingNetwork(num_layers=sum(k.startswith("layers_") for k in params["i2t_first"]))
    return SPECS[name].model()


def save_msid(variables: Mapping[str, Any], path) -> Path:
    """Write MSID variables as the official msid.pt layout (.pt/.safetensors) or .msgpack."""
    return save("msid", variables, path)


def save_mapping(variables: Mapping[str, Any], path) -> Path:
    """Write mapping variables as the official mapping.pt layout (.pt/.safetensors) or .msgpack."""
    return save("mapping", variables, path)


def save_expression(variables: Mapping[str, Any], path) -> Path:
    """Write expression-encoder variables as a Deep3DFaceRecon `net_recon` state dict."""
    return save("expression", variables, path)

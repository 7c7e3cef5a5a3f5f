"""Every model of a config, with its variables: the Face2Diffusion encoders and the frozen SD.

Weights come from the config's `weights` paths (local paths or hub ids); an empty path means
random init, which is what the tiny config uses (and, for `weights.mapping`, training from
scratch). An empty `weights.sd` means the tiny random Stable Diffusion.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from f2d_jax import convert, targets
from f2d_jax.encoders import Encoders, face_models, init_models
from f2d_jax.models import flux_bundle
from f2d_jax.models.flux_bundle import Flux, build_flux, is_flux, load_flux, tiny_flux
from f2d_jax.models.stable_diffusion import (TINY_BASES, StableDiffusion, abstract_params, build, bundle_configs,
                                             load_stable_diffusion, read_size_multiple, tiny_stable_diffusion)


@dataclasses.dataclass(frozen=True)
class Models:
    encoders: Encoders
    sd: StableDiffusion | Flux   # the frozen base: Stable Diffusion 1.x, 2.x, SDXL or FLUX.1


def flux_base(config: Mapping[str, Any]) -> bool:
    """Whether a config trains on FLUX.1: its weights.sd is a FLUX folder or hub id, or empty with tiny_base "flux"."""
    path = config["weights"]["sd"]
    return is_flux(path) if path else config["model"].get("tiny_base", "sd1") == "flux"


def _max_sequence_length(config: Mapping[str, Any]) -> int:
    """FLUX's T5 prompt length: config.flux.max_sequence_length (the tiny FLUX's 32 for an empty weights.sd)."""
    default = flux_bundle.TINY_MAX_SEQUENCE_LENGTH if not config["weights"]["sd"] else 512
    return (config.get("flux") or {}).get("max_sequence_length", default)


def size_multiple(config: Mapping[str, Any]) -> int:
    """The multiple of image sides for the base a config names (read from its configs alone)."""
    if flux_base(config):
        path = config["weights"]["sd"]
        configs = flux_bundle.flux_bundle_configs(path) if path else flux_bundle.TINY_FLUX_CONFIGS
        return flux_bundle.size_multiple(configs)
    return read_size_multiple(config["weights"]["sd"], config["model"].get("tiny_base", "sd1"))


def compute_dtype(name: str, platform: str | None = None):
    """"auto": bfloat16 on accelerators, float32 on CPU: on `platform`, that of the devices the programs are
    for (default: `targets.platform()`)."""
    if name == "auto":
        return jnp.float32 if (platform or targets.platform()) == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def load_models(config: Mapping[str, Any], dtype=jnp.float32, names=("msid", "mapping", "expression"),
                log=lambda msg: print(msg, file=sys.stderr)) -> tuple[Models, dict[str, Any]]:
    """(Models, variables) with variables for "unet", "vae", "text_encoder"[, "text_encoder_2"] (in `dtype`) and `names`
    (float32). `log` receives a line for every model that starts from random init. The Face2Diffusion
    models load first: a weights path that is wrong stops it before Stable Diffusion loads."""
    face = face_models(config["model"])
    face_variables = encoder_variables(config, {name: face[name] for name in names}, log)
    weights = config["weights"]
    attention = config["model"].get("attention", "auto")
    if flux_base(config):
        if weights["sd"]:
            sd, variables = load_flux(weights["sd"], dtype=dtype, attention=attention,
                                      max_sequence_length=_max_sequence_length(config))
        else:
            log("sd: tiny random-init FLUX.1 (weights.sd is empty)")
            sd, variables = tiny_flux(jax.random.key(config["seed"]), dtype=dtype, attention=attention)
    elif weights["sd"]:
        sd, variables = load_stable_diffusion(weights["sd"], dtype=dtype, attention=attention)
    else:
        base = config["model"].get("tiny_base", "sd1")
        log(f"sd: tiny random-init Stable Diffusion of the {base} structure (weights.sd is empty)")
        sd, variables = tiny_stable_diffusion(jax.random.key(config["seed"]), dtype=dtype, attention=attention,
                                              base=base)
    encoders = Encoders.from_config(config["model"], sd.text_encoders)
    return Models(encoders, sd), {**variables, **face_variables}


def tiny_base(config: Mapping[str, Any], dtype=jnp.float32) -> StableDiffusion | Flux:
    """The modules of a config's tiny random base (an empty weights.sd): Stable Diffusion of its tiny_base
    structure, or FLUX.1."""
    base, attention = config["model"].get("tiny_base", "sd1"), config["model"].get("attention", "auto")
    if base == "flux":
        return build_flux(flux_bundle.TINY_FLUX_CONFIGS, dtype=dtype, attention=attention,
                          max_sequence_length=_max_sequence_length(config))
    return build(TINY_BASES[base], dtype=dtype, attention=attention)


def abstract_models(config: Mapping[str, Any], dtype, names=("mapping",)) -> tuple[Models, dict[str, Any]]:
    """`load_models`' (Models, variables) with the variables as ShapeDtypeStructs: nothing is allocated and no
    weights are read (the Stable Diffusion's configs alone, no download for the named configs' bases), for
    compiling the programs for an accelerator on any host (f2d_jax/targets.py)."""
    model = config["model"]
    sd_path = config["weights"]["sd"]
    attention = model.get("attention", "auto")
    if not sd_path:
        sd = tiny_base(config, dtype)
    elif flux_base(config):
        sd = build_flux(flux_bundle.flux_bundle_configs(sd_path), dtype=dtype, attention=attention,
                        max_sequence_length=_max_sequence_length(config))
    else:
        configs, options = bundle_configs(sd_path)
        sd = build(configs, dtype=dtype, attention=attention, **options)
    params = (flux_bundle.abstract_params if sd.base == "flux" else abstract_params)(sd, dtype)
    encoders = Encoders.from_config(model, sd.text_encoders)
    face = {name: getattr(encoders, name) for name in names}
    return Models(encoders, sd), {**params,
                                  **jax.eval_shape(lambda key: init_models(face, key), jax.random.key(0))}


def encoder_variables(config: Mapping[str, Any], models: Mapping[str, nn.Module],
                      log=lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any]:
    """{name: float32 variables} of the Face2Diffusion `models` ({name: module}): read from the config's
    weights paths, random init (from the config's seed) where a path is empty."""
    weights = config["weights"]
    random = {name: model for name, model in models.items() if not weights[name]}
    for name in random:
        log(f"{name}: random init (weights.{name} is empty)")
    variables = init_models(random, jax.random.key(config["seed"] + 1)) if random else {}
    for name, model in models.items():
        if weights[name]:
            variables[name] = convert.load(name, weights[name], model)
    return variables

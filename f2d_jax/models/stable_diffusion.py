"""Stable Diffusion's diffusers folders and hub ids: reading and writing them.

`load_stable_diffusion` reads a diffusers-format directory (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) or a hub id and returns the bundle (`sd_bundle.StableDiffusion`: our Flax UNet, VAE and
CLIP text encoders, the scheduler config) with its parameters. `load_unet` reads a UNet folder alone
(SD 1.x, 2.x or SDXL), or the unet/ of such a directory. Weights may be Flax msgpack or PyTorch
safetensors (no torch needed) or PyTorch .bin (needs torch); PyTorch weights go through the project's
converter, so any mismatch is reported key by key. A config option our models cannot represent raises
rather than being dropped (`sd_config`). `save_stable_diffusion` writes a directory that loads back.

The bundle's building blocks are importable from here too (`build`, `tiny_stable_diffusion`, the tiny
configs, ...), as the one module a user of Stable Diffusion needs.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from f2d_jax.convert import io
from f2d_jax.convert.layout import TorchLayout, check_tree, from_torch
from f2d_jax.models.bases import PUBLISHED
from f2d_jax.models.clip_text import CLIP_LAYOUT
from f2d_jax.models.sd_bundle import (StableDiffusion, abstract_module, abstract_params, build, build_unet, cast,
                                      random_params, tiny_stable_diffusion, unet_output)
from f2d_jax.models.sd_config import (SECOND_ENCODER, TINY_BASES, TINY_CONFIGS, TINY_SD2_CONFIGS,
                                      TINY_SDXL_CONFIGS, UnsupportedConfigError, alphas_cumprod, clip_text_config,
                                      clip_text_fields, size_multiple)
from f2d_jax.models.unet import UNet2DConditionModel

__all__ = ["StableDiffusion", "UnsupportedConfigError", "TINY_BASES", "TINY_CONFIGS", "TINY_SD2_CONFIGS",
           "TINY_SDXL_CONFIGS", "abstract_params", "alphas_cumprod", "build", "build_unet", "clip_text_fields",
           "load_component", "load_stable_diffusion", "load_unet", "random_params", "read_size_multiple",
           "resolve", "bundle_configs", "save_stable_diffusion", "size_multiple", "tiny_stable_diffusion",
           "unet_output"]

COMPONENTS = ("unet", "vae", "text_encoder")
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json", SECOND_ENCODER: "config.json"}
# Per component, in order of preference: Flax msgpack, safetensors, PyTorch pickle.
WEIGHT_FILES = {
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"),
}
WEIGHT_FILES[SECOND_ENCODER] = WEIGHT_FILES["text_encoder"]


# --------------------------------------------------------------------------- weights

# PyTorch VAE attention: current diffusers names to_q/to_k/to_v/to_out.0, older checkpoints
# query/key/value/proj_attn (the Flax names), the oldest store them as 1x1 convolutions.
_VAE_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.")
_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def normalize_vae_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A PyTorch AutoencoderKL state dict with the attention projections named and shaped as the Flax VAE's."""
    out = {}
    for key, value in state.items():
        match = _VAE_ATTENTION.match(key)
        if match:
            name = _VAE_ATTENTION_NAMES.get(match[2], match[2])
            key = f"{match[1]}{name}.{key[match.end():]}"
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


# The generic rules cover the UNet; only its time embeddings' `linear_1`/`linear_2` are literal PyTorch
# names, not `linear.1`: identity renames keep the reverse mapping (missing-key reports) right.
_UNET_LAYOUT = TorchLayout(renames=tuple((f"{m}.linear_{i}", f"{m}.linear_{i}")
                                         for m in ("time_embedding", "add_embedding") for i in (1, 2)))
_TORCH_LAYOUTS = {"unet": _UNET_LAYOUT, "vae": TorchLayout(), "text_encoder": CLIP_LAYOUT, SECOND_ENCODER: CLIP_LAYOUT}


def _clip_from_hf_flax(tree: dict) -> dict:
    """transformers' FlaxCLIPTextModel[WithProjection] params (text_model/encoder/layers/<i>/..., text_projection)
    -> our tree (layers stacked)."""
    projection = {"text_projection": tree["text_projection"]} if "text_projection" in tree else {}
    tree = tree.get("text_model", tree)
    if "encoder" not in tree:
        return {**tree, **projection}  # already our layout (or not CLIP at all: check_tree will say)
    embeddings, layers = tree.get("embeddings", {}), tree["encoder"].get("layers", {})
    flat = [traverse_util.flatten_dict(layers[i]) for i in sorted(layers, key=int)]
    stacked = {path: np.stack([np.asarray(f[path]) for f in flat]) for path in (flat[0] if flat else {})
               if all(path in f and np.shape(f[path]) == np.shape(flat[0][path]) for f in flat)}
    ours = {k: embeddings[k] for k in ("token_embedding", "position_embedding") if k in embeddings}
    ours["layers"] = traverse_util.unflatten_dict(stacked)
    if "final_layer_norm" in tree:
        ours["final_layer_norm"] = tree["final_layer_norm"]
    return {**ours, **projection}


def _weight_file(name: str, folder: Path) -> Path | None:
    return next((folder / f for f in WEIGHT_FILES[name] if (folder / f).is_file()), None)


def load_component(name: str, folder, target: dict, dtype=jnp.float32) -> dict:
    """{"params": ...} for component `name` from the best weight file in `folder`, shaped like `target`."""
    folder = Path(folder)
    path = _weight_file(name, folder)
    if path is None:
        raise FileNotFoundError(f"no {name} weights in {folder}: expected one of {', '.join(WEIGHT_FILES[name])}")
    what = f"{name} weights {path}"
    if path.suffix == ".msgpack":
        tree = io.read_flax(path)
        tree = tree["params"] if set(tree) == {"params"} else tree
        variables = {"params": _clip_from_hf_flax(tree) if name.startswith("text_encoder") else tree}
        check_tree(variables, target, what)
    else:
        state = io.read_state_dict(path)
        if name == "vae":
            state = normalize_vae_state(state)
        variables = from_torch(state, target, _TORCH_LAYOUTS[name], what)
    return cast(variables, dtype)


def write_config(config: dict, class_name: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"_class_name": class_name, **config}, indent=2))


def save_stable_diffusion(sd: StableDiffusion, params: dict, directory) -> Path:
    """Write the bundle as a diffusers-format directory with Flax weights, which
    `load_stable_diffusion` reads back (e.g. a tiny SD whose UNet was trained here)."""
    directory = Path(directory)
    for name, module, class_name in (("unet", sd.unet, "UNet2DConditionModel"), ("vae", sd.vae, "AutoencoderKL")):
        write_config(module.config, class_name, directory / name / CONFIG_FILES[name])
        io.write_flax(params[name]["params"], directory / name / WEIGHT_FILES[name][0])
    tokenizer = copy.deepcopy(sd.tokenizer())   # the loaded one is shared
    for (name, encoder), folder in zip(sd.text_encoders.items(), ("tokenizer", "tokenizer_2")):
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / CONFIG_FILES[name]).write_text(json.dumps(clip_text_config(encoder), indent=2))
        io.write_flax(params[name]["params"], directory / name / WEIGHT_FILES[name][0])
        if encoder.pad_token_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(encoder.pad_token_id)
        tokenizer.save_pretrained(directory / folder)
    index = {"force_zeros_for_empty_prompt": sd.force_zeros_for_empty_prompt} if sd.text_encoder_2 else {}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    (directory / "scheduler").mkdir(exist_ok=True)
    (directory / "scheduler" / CONFIG_FILES["scheduler"]).write_text(json.dumps(sd.scheduler_config, indent=2))
    return directory


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _vocabulary(folder: Path) -> tuple[tuple[dict, list[str]], tuple[str, str]]:
    """((token -> id, the merges as "a b" lines), the files they come from) of a Hugging Face BPE tokenizer
    folder: vocab.json and merges.txt, else the model in tokenizer.json (which transformers 5 saves alone)."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line.strip() and not line.startswith("#version")]
        return (read_json(folder / "vocab.json"), merges), ("vocab.json", "merges.txt")
    if (folder / "tokenizer.json").is_file():
        model = read_json(folder / "tokenizer.json").get("model") or {}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return (model.get("vocab", {}), merges), ("tokenizer.json", "tokenizer.json")
    raise FileNotFoundError(f"{folder} has no vocabulary: vocab.json and merges.txt, or tokenizer.json")


def _tokenizer_settings(folder: Path, vocabulary: Path | None = None) -> dict:
    """{"pad_token": ...} of a Hugging Face tokenizer folder (its special tokens map or config), checking
    that its vocabulary and merges are those of `vocabulary` (the first tokenizer's folder)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder.parent} has no {folder.name}/ subfolder")
    if vocabulary is not None:
        (mine, files), (theirs, their_files) = _vocabulary(folder), _vocabulary(vocabulary)
        for part in range(2):
            if mine[part] != theirs[part]:
                raise UnsupportedConfigError(f"{folder.name}/{files[part]} differs from {vocabulary.name}/"
                                             f"{their_files[part]}: the text encoders are fed the same token ids, "
                                             "so both need one vocabulary")
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = read_json(folder / file).get("pad_token") if (folder / file).is_file() else None
        if pad is not None:
            return {"pad_token": pad["content"] if isinstance(pad, dict) else pad}
    return {}


def _read_config(root: Path, name: str) -> dict:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no {name}/ subfolder; a diffusers Stable Diffusion directory "
                                "has unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    path = folder / CONFIG_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"no {name} config at {path}")
    return read_json(path)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _components(root: Path) -> tuple[str, ...]:
    """The models of the directory: SDXL's have a second text encoder."""
    return (*COMPONENTS, SECOND_ENCODER) if (root / SECOND_ENCODER).is_dir() else COMPONENTS


def local_or_hub(path_or_hub_id, what: str) -> tuple[Path | None, str | None]:
    """(the local directory, None) or (None, the hub id); raises for a path that is neither."""
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; expected a diffusers {what}")
        return path, None
    name = os.fspath(path_or_hub_id)
    if not _HUB_ID.match(name) or name.startswith("."):
        raise FileNotFoundError(f"no {what} at {path}")
    return None, name


def download(name: str, revision: str | None, patterns: list[str], folders: dict[str, str]) -> Path:
    """Snapshot of hub repo `name` with `patterns` and, for each folder ("unet/": "unet", folder prefix ->
    component) whose config it has, one weight format: safetensors, else Flax msgpack, else PyTorch .bin."""
    import huggingface_hub

    root, missing = None, list(folders)
    for weights in (1, 0, 2):
        allow = [*patterns, *(f"{f}{CONFIG_FILES[folders[f]]}" for f in folders),
                 *(f"{f}{WEIGHT_FILES[folders[f]][weights]}" for f in missing)]
        try:
            root = Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=allow))
        except Exception as e:
            raise FileNotFoundError(f"{name!r} is neither a local directory nor a downloadable hub id: {e}") from e
        missing = [f for f, c in folders.items()
                   if (root / f / CONFIG_FILES[c]).is_file() and _weight_file(c, root / f) is None]
        if not missing:
            break
    return root  # with weights missing, the loader names what it expected


def read_size_multiple(path_or_hub_id, tiny_base: str = "sd1", revision: str | None = None) -> int:
    """`size_multiple` of a Stable Diffusion directory or hub id read from its configs alone (a hub id's are
    downloaded, not its weights); of the tiny random Stable Diffusion of `tiny_base` for an empty one."""
    if not path_or_hub_id:
        return size_multiple(TINY_BASES[tiny_base])
    root, name = local_or_hub(path_or_hub_id, "Stable Diffusion directory")
    if root is None:
        root = download(name, revision, [f"{c}/{CONFIG_FILES[c]}" for c in ("unet", "vae")], {})
    return size_multiple({c: _read_config(root, c) for c in ("unet", "vae")})


def resolve(path_or_hub_id, revision: str | None = None) -> Path:
    """A local diffusers directory, or a hub id downloaded with only configs, tokenizer and one weight format."""
    path, name = local_or_hub(path_or_hub_id, "Stable Diffusion directory")
    if path is not None:
        return path
    return download(name, revision, ["model_index.json", "tokenizer/*", "tokenizer_2/*",
                                      f"scheduler/{CONFIG_FILES['scheduler']}"],
                     {f"{c}/": c for c in (*COMPONENTS, SECOND_ENCODER)})


def bundle_configs(path_or_hub_id, revision: str | None = None) -> tuple[dict, dict]:
    """(the component configs `build` takes, its other keyword arguments) of a Stable Diffusion directory or
    hub id, from its config files alone: no weights are read, and a hub id of a base the named configs use
    needs no download either (models/bases.py)."""
    if os.fspath(path_or_hub_id) in PUBLISHED and not Path(os.fspath(path_or_hub_id)).exists():
        return copy.deepcopy(PUBLISHED[os.fspath(path_or_hub_id)]), {}
    root, name = local_or_hub(path_or_hub_id, "Stable Diffusion directory")
    if root is None:
        root = download(name, revision, ["model_index.json", "tokenizer/*", "tokenizer_2/*",
                                          *(f"{c}/{CONFIG_FILES[c]}" for c in (*COMPONENTS, SECOND_ENCODER, "scheduler"))],
                         {})
    return _configs(root)


def _configs(root: Path) -> tuple[dict, dict]:
    components = _components(root)
    configs = {name: _read_config(root, name) for name in (*components, "scheduler")}
    tokenizer = root / "tokenizer"
    configs["tokenizer"] = _tokenizer_settings(tokenizer)
    if SECOND_ENCODER in components:
        configs["tokenizer_2"] = _tokenizer_settings(root / "tokenizer_2", vocabulary=tokenizer)
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    return configs, dict(tokenizer_path=str(tokenizer),
                         force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"))


def load_stable_diffusion(path_or_hub_id, *, dtype=jnp.float32, revision: str | None = None,
                          attention: str = "auto") -> tuple[StableDiffusion, dict]:
    """(bundle, {"unet", "vae", "text_encoder"[, "text_encoder_2"]: {"params": ...}}) from a diffusers
    directory or hub id of SD 1.x, 2.x or SDXL (the base is read from the directory: SDXL's has
    text_encoder_2/ and tokenizer_2/).

    Float weights (and the modules' compute dtype) become `dtype`. Raises FileNotFoundError for a
    missing directory, subfolder, config or weight file, UnsupportedConfigError for a config the Flax
    models would compute differently, CheckpointMismatchError for weights that do not fit.
    """
    root = resolve(path_or_hub_id, revision)
    configs, options = _configs(root)
    sd = build(configs, dtype=dtype, attention=attention, **options)
    targets = abstract_params(sd)
    params = {name: load_component(name, root / name, targets[name], dtype) for name in _components(root)}
    return sd, params


def _unet_folder(root: Path, subfolder: str | None) -> Path:
    """The folder under `root` holding the UNet's config: `subfolder`, else root itself, else root/unet."""
    config = CONFIG_FILES["unet"]
    candidates = [root / subfolder] if subfolder is not None else [root, root / "unet"]
    folder = next((c for c in candidates if (c / config).is_file()), None)
    if folder is None:
        where = " or ".join(str(c / config) for c in candidates)
        raise FileNotFoundError(f"no UNet config at {where}: expected a diffusers UNet folder (config.json and "
                                f"{' / '.join(WEIGHT_FILES['unet'])}) or a Stable Diffusion directory with unet/")
    return folder


def load_unet(path_or_hub_id, *, dtype=jnp.float32, attention: str = "auto", subfolder: str | None = None,
              revision: str | None = None) -> tuple[UNet2DConditionModel, dict]:
    """(module, {"params": ...}) of a diffusers UNet2DConditionModel (SD 1.x, 2.x, SDXL) alone.

    `path_or_hub_id` is a UNet folder (config.json and diffusion_pytorch_model.safetensors, .bin or
    diffusion_flax_model.msgpack), a whole Stable Diffusion directory (its unet/ is read) or a hub id
    of either; `subfolder` names the folder inside it explicitly. The module is the one
    `load_stable_diffusion` builds: `module.apply(params, latents, timesteps, context,
    added_cond_kwargs=...)` (SDXL: {"text_embeds": (B, P), "time_ids": (B, 6)}) returns the prediction.
    Float weights and the compute dtype become `dtype`. Raises FileNotFoundError for a missing
    folder, config or weight file, UnsupportedConfigError, CheckpointMismatchError as that does.
    """
    root, name = local_or_hub(path_or_hub_id, "UNet folder")
    if root is None:
        prefixes = [f"{subfolder.strip('/')}/"] if subfolder is not None else ["", "unet/"]
        root = download(name, revision, [], {p: "unet" for p in prefixes})
    folder = _unet_folder(root, subfolder)
    unet = build_unet(read_json(folder / CONFIG_FILES["unet"]), dtype=dtype, attention=attention)
    return unet, load_component("unet", folder, abstract_module(unet), dtype)

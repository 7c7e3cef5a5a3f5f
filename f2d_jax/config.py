"""Configs: python files with a `get_config()` returning a ConfigDict, by name or by path.

The named configs ship in the package (f2d_jax/configs/: `tiny`, `f2d_sd14`, `msid_arcface`,
`msid_tiny`) and load from anywhere; any other file loads by its path, a .json one (a config as a
checkpoint or a packaged model stores it) too. Command lines take
``--config NAME_OR_FILE`` plus any number of ``--config.dotted.key=value`` overrides
(`add_config_arguments` / `config_from_args`).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import ml_collections

OFFICIAL_CONFIG = "f2d_sd14"  # the named config of the paper's set-up


def config_names() -> list[str]:
    """The named configs shipped in f2d_jax/configs/."""
    files = resources.files("f2d_jax.configs").iterdir()
    return sorted(f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_"))


def config_from_dict(config) -> ml_collections.ConfigDict:
    """A ConfigDict of a config as JSON gives it (lists become tuples: module fields must hash)."""
    def tuples(tree):
        if isinstance(tree, dict):
            return {k: tuples(v) for k, v in tree.items()}
        return tuple(tuples(v) for v in tree) if isinstance(tree, list) else tree
    return ml_collections.ConfigDict(tuples(config))


def _config_module(name_or_path: str | os.PathLike):
    path = Path(name_or_path)
    if path.is_file():
        spec = importlib.util.spec_from_file_location(f"_f2d_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        with _config_code(path):
            spec.loader.exec_module(module)
        return module
    if str(name_or_path) in config_names():
        return importlib.import_module(f"f2d_jax.configs.{name_or_path}")
    raise FileNotFoundError(f"no config file at {path}, and no named config {str(name_or_path)!r} "
                            f"(named configs: {', '.join(config_names())})")


def _parse(text: str, current):
    """An override's value: a Python literal where it parses, else the text; for float fields also
    `nan`, `inf` and `-inf`; for string fields always the text."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, str):
        try:
            value = float(text)
        except ValueError:
            pass
    return value


def load_config(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of a named config or of the file at a path, then `dotted.key=value` overrides.

    A key that is not a field, or a value of another type than the field's, is a ValueError."""
    if Path(name_or_path).suffix.lower() == ".json" and Path(name_or_path).is_file():
        try:
            config = config_from_dict(json.loads(Path(name_or_path).read_text()))
        except ValueError as e:
            raise ValueError(f"{name_or_path} is not a config as JSON: {e}") from None
    else:
        module = _config_module(name_or_path)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{name_or_path} has no get_config()")
        with _config_code(getattr(module, "__file__", name_or_path)):
            config = module.get_config()
        if not isinstance(config, ml_collections.ConfigDict):
            raise ValueError(f"get_config() of {name_or_path} returned {type(config).__name__}, not a ConfigDict")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not of the form key=value")
        *parents, leaf = key.split(".")
        parent, node = None, config
        for depth, name in enumerate([*parents, leaf]):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                where = ".".join(key.split(".")[:depth]) or "the config"
                fields = f"its fields: {', '.join(sorted(node.keys()))}" \
                    if isinstance(node, ml_collections.ConfigDict) else "it is a value, not a section"
                raise ValueError(f"--config.{key}: {where} has no field {name!r} ({fields})")
            parent, node = node, node[name]
        try:
            parent[leaf] = _parse(text, node)
        except TypeError:
            raise ValueError(f"{key}={text} does not fit the field: {key} holds {_kind(node)}, "
                             f"like its default {node!r}") from None
    check_config(config)
    return config


def f2d_config(config, name) -> ml_collections.ConfigDict:
    """`config` (a ConfigDict, or a name or path to load) if it is a Face2Diffusion one; an MSID pretraining
    config is a ValueError saying so, for the commands that run Face2Diffusion models."""
    if not isinstance(config, ml_collections.ConfigDict):
        config = load_config(config)
    if config.get("task", "f2d") != "f2d":
        raise ValueError(f"{name} is an MSID pretraining config (task {config.task}), for f2d-train only; give a "
                         "Face2Diffusion config such as tiny or f2d_sd14")
    return config


@contextlib.contextmanager
def _config_code(path):
    """A config file's code that fails (a syntax error, a name that is not defined) is a ValueError naming
    the file and line, not a traceback."""
    try:
        yield
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 (any error of the user's code)
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == Path(path)]
        where = f", line {lines[-1]}" if lines else ""
        raise ValueError(f"config file {path}{where}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- checks


MAX_SEED = 2 ** 32 - 1


def _at_least(low):
    return lambda v: v >= low, f"at least {low}"


def _between(low, high, *, below_high: bool = False, above_low: bool = False):
    ok = lambda v: (v > low if above_low else v >= low) and (v < high if below_high else v <= high)  # noqa: E731
    return ok, (f"{'above' if above_low else 'at least'} {low} and {'below' if below_high else 'at most'} {high}")


POSITIVE = (lambda v: v > 0, "more than 0")
# Every numeric setting with a meaningful range (those a config has; the others are skipped).
RANGES = {
    "seed": _between(0, MAX_SEED),
    **{f"model.msid.{k}": _at_least(1) for k in ("image_size", "patch_size", "width", "depth", "num_heads")},
    "model.msid.mlp_ratio": POSITIVE,
    **{f"model.mapping.{k}": _at_least(1) for k in ("identity_dim", "expression_dim", "hidden_dim", "token_dim",
                                                     "num_layers")},
    "model.mapping.dropout": _between(0, 1, below_high=True),
    "model.expression.width": _at_least(1),
    "data.holdout": _at_least(0), "data.workers": _at_least(0),
    **{f"data.synthetic_{k}": _at_least(1) for k in ("identities", "examples", "pairs")},
    "train.steps": _at_least(1), "train.batch_size": _at_least(1),
    "train.cgdr_lambda": _at_least(0), "train.p_uncond": _between(0, 1),
    "optim.lr": POSITIVE, "optim.warmup_steps": _at_least(0), "optim.weight_decay": _at_least(0),
    "optim.b1": _between(0, 1, below_high=True), "optim.b2": _between(0, 1, below_high=True),
    "optim.grad_clip": _at_least(0), "optim.power": POSITIVE,
    "flux.max_sequence_length": _at_least(8), "flux.train_guidance": _at_least(0),
    "arcface.num_identities": _at_least(0), "arcface.scale": POSITIVE, "arcface.init_std": POSITIVE,
    "arcface.sample_rate": _between(0, 1, above_low=True),
    "checkpoint.every": _at_least(1), "checkpoint.keep": _at_least(1),
    "log.every": _at_least(1), "log.sample_every": _at_least(0), "log.sample_steps": _between(1, 1000),
    "log.sample_guidance": (lambda v: True, "a finite number"), "log.sample_faces": _at_least(1),
    "log.verify_every": _at_least(0), "log.verify_batch_size": _at_least(1),
}
CHOICES = {
    "train.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "optim.schedule": ("constant", "cosine", "polynomial"),
    "data.mask_source": ("landmarks", "files"),
    "mesh.frozen": ("replicate", "fsdp"), "mesh.params": ("replicate", "fsdp"),
    "model.tiny_base": ("sd1", "sd2", "sdxl", "flux"),
}
_ABSENT = object()


def _get(config, dotted: str):
    for name in dotted.split("."):
        if not isinstance(config, (ml_collections.ConfigDict, dict)) or name not in config:
            return _ABSENT
        config = config[name]
    return config


def check_config(config) -> None:
    """A ValueError naming the first setting of `config` that no run can use: a number outside its range
    (`RANGES`), a name not among its choices (`CHOICES`), a trainable-parameter pattern that is not a
    regular expression, a mesh axis that is neither -1 nor a device count, an image size that is not a
    positive multiple of 8."""
    for key, (ok, wording) in RANGES.items():
        value = _get(config, key)
        if value is _ABSENT:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not ok(value):
            raise ValueError(f"{key}={value!r}: it must be {wording}")
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value is not _ABSENT and value not in choices:
            raise ValueError(f"{key}={value!r}: it must be one of {', '.join(choices)}")
    pattern = _get(config, "train.trainable")
    if pattern is not _ABSENT:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"train.trainable={pattern!r} is not a regular expression: {e}") from None
    for axis in ("data", "fsdp"):
        value = _get(config, f"mesh.{axis}")
        if value is not _ABSENT and (isinstance(value, bool) or not isinstance(value, int) or
                                     not (value == -1 or value >= 1)):
            raise ValueError(f"mesh.{axis}={value!r}: it must be -1 (the devices left) or at least 1")
    resolution = _get(config, "data.resolution")
    if resolution is not _ABSENT and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                      or resolution < 8 or resolution % 8):
        raise ValueError(f"data.resolution={resolution!r}: it must be a positive multiple of 8, and of the model's "
                         "own multiple (its VAE's and UNet's downsampling)")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "True or False"
    return {int: "an integer", float: "a number", tuple: "a tuple, e.g. ('a', 'b')"}.get(type(value),
                                                                                    f"a {type(value).__name__}")


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, required=default is None, metavar="NAME_OR_FILE",
                        help=f"a named config ({', '.join(config_names())}) or a config file with get_config()"
                        + (" (default: %(default)s)" if default else "")
                        + "; override fields with --config.dotted.key=value")


def config_from_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """Parse `argv`; ``--config.x.y=value`` arguments become overrides of the loaded config."""
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for arg in rest:
        if arg.startswith("--config.") and "=" not in arg:
            parser.error(f"{arg} has no value: write {arg}=VALUE")
        (overrides if arg.startswith("--config.") else unknown).append(arg)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --config.key=value)")
    return args, load_config(args.config, [o[len("--config."):] for o in overrides])

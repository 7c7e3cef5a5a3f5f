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
import importlib
import importlib.util
import json
import os
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
        config = config_from_dict(json.loads(Path(name_or_path).read_text()))
    else:
        module = _config_module(name_or_path)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{name_or_path} has no get_config()")
        config = module.get_config()
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not of the form key=value")
        *parents, leaf = key.split(".")
        node = config
        for name in [*parents, leaf]:
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                fields = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
                raise ValueError(f"{key} is not a config field (fields at {name!r}: {fields})")
            parent, node = node, node[name]
        try:
            parent[leaf] = _parse(text, node)
        except TypeError:
            raise ValueError(f"{key}={text} does not fit the field: {key} holds {_kind(node)}, "
                             f"like its default {node!r}") from None
    return config


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
        (overrides if arg.startswith("--config.") and "=" in arg else unknown).append(arg)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --config.key=value)")
    return args, load_config(args.config, [o[len("--config."):] for o in overrides])

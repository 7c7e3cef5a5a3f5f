"""Config files: python files under configs/ with a `get_config()` returning a ConfigDict.

Command lines take ``--config FILE`` plus any number of ``--config.dotted.key=value`` overrides
(`add_config_arguments` / `config_from_args`).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of the file at `path`, then `dotted.key=value` overrides (values parsed as
    Python literals where they parse, else kept as strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    root = str(path.resolve().parent.parent)  # so that `from configs import f2d_sd14` resolves
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_f2d_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    config = module.get_config()
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not of the form key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for name in [*parents, leaf]:
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                fields = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
                raise ValueError(f"{key} is not a config field (fields at {name!r}: {fields})")
            parent, node = node, node[name]
        parent[leaf] = value
    return config


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, required=default is None, metavar="FILE",
                        help="config file with get_config()" + (" (default: %(default)s)" if default else "")
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

"""The command lines, and what they share: the options naming the weights of the commands that load a
pipeline, and how every command answers its user (f2d_jax/usage.py, re-exported here): a user's mistake
is one `error:` line (details may follow on the next lines) and exit status 2, never a traceback; Ctrl-C
is one line and status 130.

Each command module keeps its imports of JAX and the models inside `main`, after the arguments are
checked, so that `--help` and a mistyped argument answer at once.
"""
from __future__ import annotations

import argparse

from f2d_jax.usage import add_compile_cache, add_target, check_output, command, error, run

__all__ = ["WEIGHT_SOURCES", "add_compile_cache", "add_target", "add_weights", "check_output", "check_weights",
           "command", "error", "load_pipeline", "named_config", "run", "trained_resolution"]

WEIGHT_SOURCES = ("checkpoint", "config", "model")  # the options that name the models' config (one at most)


def add_weights(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that load an F2DPipeline (sample, app): the weights, --dtype and
    --compile-cache. `check_weights` checks them once parsed and `load_pipeline` loads what they name."""
    weights = parser.add_argument_group("weights")
    weights.add_argument("--checkpoint", metavar="WORKDIR", help="a train.py workdir (latest checkpoint)")
    weights.add_argument("--config", metavar="NAME_OR_FILE",
                         help="a named config (e.g. tiny) or config file giving the models and weights")
    weights.add_argument("--model", metavar="DIR", help="a packaged model folder (f2d-convert package, "
                         "save_pretrained): its config, MSID and mapping weights, on the base it names")
    weights.add_argument("--sd", help="Stable Diffusion: local diffusers directory or hub id "
                         "(default: the model's, checkpoint's or config's, else CompVis/stable-diffusion-v1-4)")
    weights.add_argument("--msid", help="MSID weights (msid.pt, .safetensors, .msgpack)")
    weights.add_argument("--mapping", help="mapping-network weights (mapping.pt, .safetensors, .msgpack)")
    weights.add_argument("--expression", help="Deep3DFaceRecon weights (epoch_20.pth), for an expression photo")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="SD compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    add_compile_cache(parser)


def check_weights(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """At most one of --checkpoint, --config and --model (else argparse's error, status 2)."""
    given = [f"--{name}" for name in WEIGHT_SOURCES if getattr(args, name)]
    if len(given) > 1:
        parser.error(f"give one of --checkpoint, --config and --model, not {' and '.join(given)}")


def load_pipeline(args: argparse.Namespace):
    """The F2DPipeline that the `add_weights` options name."""
    from f2d_jax.sampling import F2DPipeline

    return F2DPipeline.load(args.checkpoint, args.config, args.dtype, args.model, sd=args.sd, msid=args.msid,
                            mapping=args.mapping, expression=args.expression)


def named_config(args: argparse.Namespace) -> dict:
    """The config (a dict) that the `add_weights` options name, with the weights given in place of its own;
    with none named, the paper's config with the weights given. Reads no weights."""
    from f2d_jax.config import OFFICIAL_CONFIG, f2d_config, load_config

    if args.model:
        from f2d_jax.convert.package import package_config, package_weights

        config = {**package_config(args.model), "weights": package_weights(args.model)}
    elif args.checkpoint:
        from f2d_jax.workdir import check_f2d_run, trained_config

        config = trained_config(args.checkpoint)[0]
        check_f2d_run(args.checkpoint, config)
    else:
        config = (f2d_config(args.config, args.config) if args.config else load_config(OFFICIAL_CONFIG)).to_dict()
        if not args.config:
            config["weights"].update(msid="", mapping="", expression="")
    given = {name: getattr(args, name) for name in ("sd", "msid", "mapping", "expression") if getattr(args, name)}
    return {**config, "weights": {**config["weights"], **given}}


def trained_resolution(args: argparse.Namespace, pipe) -> int | None:
    """The image size the models were trained at where a config, checkpoint or model folder names them
    (None: the base's own size)."""
    return pipe.config.data.resolution if any(getattr(args, name) for name in WEIGHT_SOURCES) else None

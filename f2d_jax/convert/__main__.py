"""f2d-convert (python -m f2d_jax.convert): import official checkpoints into a weights directory, export back,
package a training run as one folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from f2d_jax import usage

IMPORTABLE = {
    "msid": "MSID encoder: official msid.pt (or .safetensors / .msgpack)",
    "mapping": "mapping network: official mapping.pt (or .safetensors / .msgpack)",
    "expression": "expression encoder: Deep3DFaceRecon checkpoint, e.g. epoch_20.pth (its net_recon)",
}
EXPORT_NAMES = {"msid": "msid", "mapping": "mapping", "expression": "net_recon", "text_encoder": "text_encoder"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="f2d-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="official PyTorch checkpoints -> an f2d-jax weights directory",
                         description="Convert official checkpoints (strictly: every key and shape must match) "
                                     "into a directory of Flax .msgpack files with a manifest.")
    for name, help_text in IMPORTABLE.items():
        imp.add_argument(f"--{name}", metavar="PATH", help=help_text)
    imp.add_argument("--config", metavar="FILE", help="model sizes from this config's `model` section "
                                                      "(default: the official sizes)")
    imp.add_argument("--out", required=True, metavar="DIR", help="weights directory to write (or add to: "
                                                                 "the models already there are kept)")
    imp.add_argument("--overwrite", action="store_true", help="replace models the directory already holds")

    exp = sub.add_parser("export", help="an f2d-jax weights directory -> official PyTorch layouts",
                         description="Write each model of a weights directory in its official key layout "
                                     "(msid.pt, mapping.pt, net_recon.pt), loadable with a strict load_state_dict.")
    exp.add_argument("weights", metavar="DIR", help="weights directory (from `import`) or a training workdir "
                                                    "(its latest checkpoint)")
    exp.add_argument("--out", required=True, metavar="DIR", help="directory for the exported files")
    exp.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    exp.add_argument("--only", nargs="+", choices=sorted(EXPORT_NAMES), help="export only these models")

    pkg = sub.add_parser("package", help="a training run -> one self-contained model folder",
                         description="Write a Face2Diffusion run's checkpoint as one folder: f2d_model.json (the base "
                                     "Stable Diffusion it needs), config.json, msid.safetensors and "
                                     "mapping.safetensors (official layouts) and a model card, README.md. "
                                     "Load it with f2d-sample --model DIR or F2DPipeline.from_pretrained(model=DIR).")
    pkg.add_argument("workdir", metavar="WORKDIR", help="a train.py workdir of a Face2Diffusion run")
    pkg.add_argument("--out", required=True, metavar="DIR", help="the folder to write (absent or empty)")
    pkg.add_argument("--step", type=int, help="the checkpoint to package (default: the latest)")
    pkg.add_argument("--msid", metavar="PATH", help="MSID weights in place of those the run's config names "
                                                    "(e.g. a path only the machine that trained it has)")
    pkg.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files of "
                                                          "the same names")
    pkg.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the folder to this Hugging Face Hub "
                                                              "model repository (created if needed; needs a login)")

    ins = sub.add_parser("inspect", help="list the tensors of a weight file, weights directory, training run or "
                         "packaged model")
    ins.add_argument("path", help=".pt/.pth/.bin/.safetensors/.msgpack file, weights directory (`import`), train.py "
                     "workdir (what its latest checkpoint trained) or packaged model folder (`package`)")
    ins.add_argument("--key", help="nested state-dict entry to show (e.g. net_recon)")
    return parser


def _import(args) -> None:
    import jax

    from f2d_jax.config import load_config
    from f2d_jax.convert import load
    from f2d_jax.convert.weights_dir import module_from_config, save_weights_dir, stored_models

    chosen = {name: getattr(args, name) for name in IMPORTABLE if getattr(args, name)}
    if not chosen:
        raise ValueError("nothing to import: give at least one of " + ", ".join(f"--{n}" for n in IMPORTABLE))
    usage.check_output(args.out, "--out", folder=True)
    replaced = sorted(chosen.keys() & stored_models(args.out).keys())
    if replaced and not args.overwrite:
        raise ValueError(f"{args.out} already holds {', '.join(replaced)}; pass --overwrite to replace "
                         f"{'it' if len(replaced) == 1 else 'them'}")
    sizes = load_config(args.config).model if args.config else {}
    models = {}
    for name, path in chosen.items():
        module = module_from_config(name, dict(sizes.get(name, {})))
        models[name] = (module, load(name, path, module))
        print(f"{name}: {path} -> {sum(np.size(x) for x in jax.tree.leaves(models[name][1])):,} values")
    save_weights_dir(args.out, models, sources={n: str(Path(p).resolve()) for n, p in chosen.items()})
    print(f"wrote {args.out}")


def _export(args) -> None:
    from f2d_jax.convert import save
    from f2d_jax.convert.weights_dir import load_weights_dir
    from f2d_jax.workdir import is_workdir, load_trained_models

    usage.check_output(args.out, "--out", folder=True)
    if is_workdir(args.weights):
        models = {k: v for k, v in load_trained_models(args.weights).items() if not args.only or k in args.only}
    else:
        models = load_weights_dir(args.weights, names=args.only)
    for name, (module, variables) in models.items():
        path = save(name, variables, Path(args.out) / f"{EXPORT_NAMES[name]}.{args.format}", module)
        print(f"{name} -> {path}")


def _package(args) -> None:
    from f2d_jax.convert.package import package_workdir

    if args.push_to_hub:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(args.push_to_hub)  # before any work: a mistyped id is a ValueError
    usage.check_output(args.out, "--out", folder=True)
    out = package_workdir(args.workdir, args.out, args.step, args.force, args.msid)
    print(f"wrote {out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=out, repo_id=args.push_to_hub, repo_type="model")
        print(f"uploaded to {commit.repo_url}")


def _inspect(args) -> None:
    from flax import traverse_util

    from f2d_jax.convert import io
    from f2d_jax.convert.package import FILES, is_package
    from f2d_jax.convert.weights_dir import load_weights_dir
    from f2d_jax.workdir import is_workdir, load_trained

    path = Path(args.path)
    if is_workdir(path):  # what the latest checkpoint trained
        tensors = traverse_util.flatten_dict(load_trained(path)[1], sep="/")
    elif is_package(path):  # its weight files, in the official layouts
        tensors = {f"{name}/{key}": value for name in ("msid", "mapping")
                   for key, value in io.read_state_dict(path / FILES[name]).items()}
    elif path.is_dir():
        tree = {name: variables for name, (_, variables) in load_weights_dir(path).items()}
        tensors = traverse_util.flatten_dict(tree, sep="/")
    elif path.suffix.lower() in io.FLAX_SUFFIXES:
        tensors = traverse_util.flatten_dict(io.read_flax(path), sep="/")
    else:
        tensors = io.read_state_dict(path, args.key)
    for key, value in tensors.items():
        print(f"{key:<70s} {str(tuple(np.shape(value))):<22s} {np.asarray(value).dtype}")
    print(f"{len(tensors)} tensors, {sum(int(np.size(v)) for v in tensors.values()):,} values")


@usage.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = {"import": _import, "export": _export, "package": _package, "inspect": _inspect}[args.command]
    return usage.run(lambda: command(args), errors=(*usage.USER_ERRORS, ImportError))  # a missing torch included


if __name__ == "__main__":
    sys.exit(main())

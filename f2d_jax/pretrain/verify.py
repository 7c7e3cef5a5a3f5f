"""Face verification accuracy of an MSID encoder on insightface .bin pair sets (LFW, CFP-FP, AgeDB-30, ...).

    f2d-verify --msid WORKDIR lfw.bin cfp_fp.bin agedb_30.bin
    f2d-verify --msid weights/msid.pt --json accuracy.json lfw.bin

insightface's protocol, as MSID pretraining reports it during training: the embedding of a face is
MSID's feature of it plus that of its mirror image (running BatchNorm statistics), pairs are
compared by the squared distance of the L2-normalized embeddings, and the accuracy is the mean
(and std) over 10 folds of the threshold chosen on the other 9.

--msid: a train.py workdir of an MSID pretraining run (its latest checkpoint), or MSID weights
(official msid.pt, .safetensors, .msgpack, or a `convert import` directory); a weights file has the
official sizes unless --config gives a config whose model.msid says otherwise. Images are embedded
in batches split over the local devices.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from f2d_jax import usage
from f2d_jax.compile_cache import enable

PROG = "f2d-verify"


class VerifyError(Exception):
    """A user error: printed as one `error:` line, exit status 2."""


def load_msid(msid: str, config: str | None = None):
    """(MSIDEncoder, variables) from a training workdir or a weights file/directory."""
    from f2d_jax.convert import CheckpointMismatchError, load
    from f2d_jax.models.msid import MSIDEncoder
    from f2d_jax.workdir import CheckpointError, is_workdir, load_trained_models

    path = Path(msid)
    if not path.exists():
        raise VerifyError(f"--msid {path} does not exist")
    try:
        if is_workdir(path):
            models = load_trained_models(path)
            if "msid" not in models:
                raise VerifyError(f"--msid {path}: its checkpoints hold no MSID (trained: {', '.join(models) or 'none'})")
            return models["msid"]
        if config:
            from f2d_jax.config import load_config
            model = MSIDEncoder(**load_config(config).model.msid)
        else:
            model = MSIDEncoder()
        return model, load("msid", path, model)
    except CheckpointMismatchError as e:
        sizes = f"in {config}" if config else "of the official msid_base_patch8_112"
        raise VerifyError(f"--msid {path} does not fit MSID of the sizes {sizes} (other sizes: pass their config "
                          f"with --config): {e}") from None
    except (CheckpointError, ValueError) as e:
        raise VerifyError(f"--msid {path}: {e}") from None


def evaluate(model, variables, bins: list[str], batch_size: int = 256, folds: int = 10) -> dict[str, dict]:
    """{set name: {"pairs", "accuracy", "std", "threshold"}} of each .bin (named by its stem)."""
    import functools

    import jax
    from tqdm import tqdm

    from f2d_jax.data.verification import VerificationFileError, load_bin, verification_accuracy
    from f2d_jax.pretrain.loop import embeddings
    from f2d_jax.pretrain.step import embed
    from f2d_jax.sharding import batch_sharding, make_mesh, replicated

    mesh = make_mesh({"data": -1, "fsdp": 1})
    batch_size = mesh.size * -(-batch_size // mesh.size)   # a multiple of the devices
    batch_sh, rep = batch_sharding(mesh), replicated(mesh)
    embed_fn = jax.jit(functools.partial(embed, model=model), in_shardings=(rep, batch_sh), out_shardings=rep)
    variables = jax.device_put(variables, rep)
    size = model.image_size
    results = {}
    for path in tqdm(bins, desc="sets", unit="set", disable=len(bins) < 2):
        try:
            images, issame = load_bin(path, (size, size))
        except (VerificationFileError, OSError) as e:
            raise VerifyError(str(e)) from None
        e = embeddings(embed_fn, variables, images, batch_size, batch_sh)
        if len(issame) < folds:
            raise VerifyError(f"{path} has {len(issame)} pairs, fewer than --folds {folds}")
        r = verification_accuracy(e[0::2], e[1::2], issame, folds)
        results[Path(path).stem] = dict(pairs=len(issame), accuracy=r["accuracy_mean"], std=r["accuracy_std"],
                                        threshold=r["threshold_mean"])
    return results


@usage.command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bins", nargs="+", metavar="BIN", help="insightface verification files (lfw.bin, ...)")
    parser.add_argument("--msid", required=True, metavar="WORKDIR_OR_WEIGHTS",
                        help="an MSID pretraining workdir or MSID weights (msid.pt, .safetensors, .msgpack, dir)")
    parser.add_argument("--config", metavar="FILE", help="model sizes for a weights file (its model.msid; "
                        "default: the official msid_base_patch8_112)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per call (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=10, help="cross-validation folds (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    usage.add_compile_cache(parser)
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.folds < 1:
            raise VerifyError("--batch-size and --folds must be at least 1")
        missing = [b for b in args.bins if not Path(b).is_file()]
        if missing:
            raise VerifyError(f"no verification file at {', '.join(missing)}")
        enable(args.compile_cache)
        model, variables = load_msid(args.msid, args.config)
        results = evaluate(model, variables, args.bins, args.batch_size, args.folds)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(name) for name in results)
    print(f"{'set':<{width}}  pairs  accuracy          threshold")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['pairs']:5d}  {100 * r['accuracy']:6.2f}% +- {100 * r['std']:5.2f}  {r['threshold']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"msid": args.msid, "folds": args.folds, "sets": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

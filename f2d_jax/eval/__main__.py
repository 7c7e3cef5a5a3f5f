"""Evaluation of identity fidelity vs text fidelity (the paper's protocol), for our outputs and anyone else's.

    python -m f2d_jax.eval generate --config CONFIG_OR_WORKDIR --faces DIR --seeds 4 --out gen/
    python -m f2d_jax.eval generate ... --identity-scale 0.6,0.8,1.0 --out sweep/   # identity strength sweep
    python -m f2d_jax.eval score --generated gen/ --out gen.json
    python -m f2d_jax.eval report --inputs gen.json other.json --out report/

generate: every face photo in --faces x every prompt (default: the 40 shipped in
f2d_jax/assets/eval_prompts.txt) x seeds 0..N-1 x identity scales with the JAX pipeline, resumable;
writes images and a manifest. score: any folder with such a manifest (f2d_jax/eval/manifest.py; other systems' images
too): identity similarity with dlib's face descriptor (independent of the generator), our MSID and
optionally an ArcFace IResNet; the CLIP score of the prompt with "f l" -> "a person"; their harmonic
and geometric means; the landmark spread over seeds; per identity scale too. report: a JSON, a markdown
table (a row per system and identity scale), the trade-off plot (a curve through a sweep's scales) and
contact sheets. `--config tiny` and `score --clip tiny` run offline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from f2d_jax import usage
from f2d_jax.compile_cache import enable

if TYPE_CHECKING:
    import ml_collections

COMMANDS = ("generate", "score", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="f2d-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="generate faces x prompts x seeds (resumable)",
                            description="Generate every reference face x prompt x seed with the JAX pipeline; "
                            "a rerun skips the images already made.")
    g.add_argument("--config", required=True, metavar="CONFIG_OR_WORKDIR",
                   help="a named config (e.g. tiny, f2d_sd14), a config file or a train.py workdir")
    g.add_argument("--faces", metavar="DIR", help="reference face photos, one person per file (required)")
    g.add_argument("--prompts", metavar="FILE", help="prompts with 'f l', one per line (default: the 40 shipped)")
    g.add_argument("--seeds", type=int, default=4, metavar="N", help="seeds 0..N-1 per face and prompt "
                   "(default: %(default)s)")
    g.add_argument("--out", metavar="DIR", help="images, manifest.jsonl and settings.json (required)")
    g.add_argument("--name", help="system name in reports (default: the config's or workdir's name)")
    g.add_argument("--steps", type=int, default=30, help="1 to 1000 (default: %(default)s)")
    g.add_argument("--guidance", type=float, help="(default: the base's, as f2d-sample's: 7 on SD 1.x, 7.5 on "
                   "SD 2.x, 5 on SDXL)")
    g.add_argument("--scheduler", help="euler_a, euler, ddim, dpm++2m (default: the base's, as f2d-sample's)")
    g.add_argument("--negative-prompt", help="(default: none, as f2d-sample's)")
    g.add_argument("--identity-scale", default="1.0", metavar="S[,S...]", help="identity strength(s), comma-"
                   "separated: images are made at each (0: the class \"a person\", 1: the person as trained; see "
                   "f2d-sample --identity-scale). A rerun with other scales adds the missing ones to --out "
                   "(default: %(default)s)")
    g.add_argument("--height", type=int, help="(default: the config's data.resolution)")
    g.add_argument("--width", type=int, help="(default: as --height)")
    g.add_argument("--batch-size", type=int, default=8, help="images generated at a time, as f2d-sample's "
                   "(default: %(default)s)")
    g.add_argument("--sd", help="Stable Diffusion directory or hub id (replaces the config's)")
    g.add_argument("--msid", help="MSID weights (replace the config's)")
    g.add_argument("--mapping", help="mapping-network weights (replace the config's)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    usage.add_compile_cache(g)
    usage.add_target(g)

    s = commands.add_parser("score", help="score a folder of generated images",
                            description="Identity similarity, CLIP score, their means and the face diversity of "
                            "the images a manifest lists (f2d_jax/eval/manifest.py describes its format).")
    s.add_argument("--generated", required=True, metavar="DIR", help="folder with manifest.jsonl")
    s.add_argument("--out", required=True, metavar="JSON", help="the score report to write")
    s.add_argument("--name", help="system name (default: settings.json's, else the folder name)")
    s.add_argument("--clip", default=None, help="CLIP model directory or hub id (default: "
                   "openai/clip-vit-large-patch14; 'tiny': random init, offline smoke runs only)")
    s.add_argument("--recognizers", default="dlib,msid", help="comma-separated: dlib, msid, arcface "
                   "(default: %(default)s; arcface is added when --arcface is given)")
    s.add_argument("--primary", help="the recognizer the means use (default: arcface if given, else dlib)")
    s.add_argument("--msid", help="MSID weights (default: those of the generator's config)")
    s.add_argument("--arcface", metavar="BACKBONE_PTH", help="insightface ArcFace IResNet backbone.pth")
    s.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    usage.add_compile_cache(s)

    r = commands.add_parser("report", help="tables, plot and contact sheets from score reports",
                            description="Combine score reports: report.json, report.md (a row per system and "
                            "identity scale), tradeoff.png (identity vs CLIP score, a point per system and "
                            "identity scale, a sweep's points joined) and sheets/<system>/<prompt>.png.")
    r.add_argument("--inputs", required=True, nargs="+", metavar="JSON", help="score reports")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--no-sheets", action="store_true", help="skip the contact sheets")
    return parser


def _generate(args) -> int | None:
    from f2d_jax.eval.generate import GenerateError, align_references, check_resume, generate, parse_identity_scales
    from f2d_jax.eval.prompts import load_prompts
    from f2d_jax.bundle import size_multiple
    from f2d_jax.sampling import F2DPipeline, check_sampling, check_size, seed_range

    if args.target:
        return _compile_for_target(args)
    missing = [f"--{name}" for name in ("faces", "out") if not getattr(args, name)]
    if missing:
        raise ValueError(f"generate needs {' and '.join(missing)} (or --target, to compile for an accelerator)")

    if args.seeds < 1:  # the cheap checks before any weights load
        raise GenerateError(f"--seeds must be at least 1, got {args.seeds}")
    seed_range(0, args.seeds)
    check_sampling(args.steps, args.guidance, args.scheduler, args.batch_size)
    scales = parse_identity_scales(args.identity_scale)
    usage.check_output(args.out, "--out", folder=True)
    prompts = load_prompts(args.prompts)
    generator, config = _generator(args)
    height = config.data.resolution if args.height is None else args.height
    width = height if args.width is None else args.width
    check_size(height, width, size_multiple(config))
    settings = dict(system=args.name or Path(args.config).resolve().name.removesuffix(".py"), **generator,
                    weights=dict(config.weights), steps=args.steps, guidance_scale=args.guidance,
                    scheduler=args.scheduler, negative_prompt=args.negative_prompt, height=height,
                    width=width, identity_scales=scales)
    check_resume(args.out, settings)  # what is given; the base's defaults once the model has loaded
    faces = align_references(args.faces)
    enable(args.compile_cache)
    if generator["checkpoint"]:
        pipe = F2DPipeline.from_checkpoint(args.config, generator["step"], args.dtype, sd=args.sd, msid=args.msid,
                                           mapping=args.mapping)
    else:
        pipe = F2DPipeline.from_config(config, args.dtype)
    settings["guidance_scale"], settings["scheduler"], *_ = pipe.settings(args.guidance, args.scheduler)
    made = generate(pipe, faces, prompts, list(range(args.seeds)), args.out, settings, args.batch_size)
    total = len(faces) * len(prompts) * args.seeds * len(scales)
    print(f"{args.out}: {made} images generated, {total - made} already there", file=sys.stderr)


def _compile_for_target(args) -> int:
    """generate --target: the pipeline's denoising step and decode at --batch-size images, compiled for the
    target's chips (one host of them), as the generator's config builds them."""
    from f2d_jax.sampling.pipeline import compile_sampling_for_target

    return compile_sampling_for_target(args, _generator(args)[1])


def _generator(args) -> tuple[dict, ml_collections.ConfigDict]:
    """What names the generator in the settings (config: a named config's name, else the resolved path;
    checkpoint: whether it is a workdir; step: the workdir's latest checkpoint) and its config with the
    weights flags applied; read without loading any weights."""
    from f2d_jax.config import config_names, f2d_config
    from f2d_jax.sampling import with_weights
    from f2d_jax.workdir import check_f2d_run, trained_config

    path, weights = Path(args.config), dict(sd=args.sd, msid=args.msid, mapping=args.mapping)
    if path.is_dir():
        config, step = trained_config(path)
        check_f2d_run(path, config)
        return dict(config=str(path.resolve()), checkpoint=True, step=step), with_weights(config, **weights)
    named = not path.is_file() and args.config in config_names()
    generator = dict(config=args.config if named else str(path.resolve()), checkpoint=False, step=None)
    return generator, with_weights(f2d_config(args.config, args.config), **weights)


def _generator_config(settings) -> dict | None:
    """The config the images were generated with (None for other systems' folders)."""
    if not settings.get("config"):
        return None
    if settings.get("checkpoint"):
        from f2d_jax.workdir import trained_config

        return trained_config(settings["config"])[0]
    from f2d_jax.config import load_config

    return load_config(settings["config"]).to_dict()


def _recognizers(args, settings) -> dict:
    from f2d_jax.eval import recognizers as rec

    names = [n.strip() for n in args.recognizers.split(",") if n.strip()]
    if args.arcface and "arcface" not in names:
        names.append("arcface")
    unknown = sorted(set(names) - {"dlib", "msid", "arcface"})
    if unknown:
        raise ValueError(f"unknown recognizer(s) {', '.join(unknown)}: choose from dlib, msid, arcface")
    if "arcface" in names and not args.arcface:
        raise ValueError("the arcface recognizer needs --arcface BACKBONE_PTH")
    out = {}
    for name in names:
        if name == "dlib":
            out[name] = rec.DlibRecognizer()
        elif name == "arcface":
            out[name] = rec.arcface_recognizer(args.arcface)
        else:
            config = _generator_config(settings)
            if config is None:
                from f2d_jax.config import OFFICIAL_CONFIG, load_config

                if not args.msid:
                    raise ValueError("the msid recognizer needs --msid (the official msid.pt) for images that "
                                     "f2d_jax.eval generate did not make; or leave it out: --recognizers dlib")
                config = load_config(OFFICIAL_CONFIG).to_dict()
            weights = args.msid or settings.get("weights", {}).get("msid") or config["weights"]["msid"]
            out[name] = rec.msid_recognizer(config["model"]["msid"], weights, config["seed"] + 1,
                                            log=lambda msg: print(msg, file=sys.stderr))
    return out


def _score(args) -> None:
    from f2d_jax.eval.clip_score import DEFAULT_CLIP, ClipScorer
    from f2d_jax.eval.manifest import read_manifest
    from f2d_jax.eval.score import score_images

    settings, entries = read_manifest(args.generated)
    if Path(args.out).suffix.lower() != ".json":
        raise ValueError(f"--out must be a .json file, got {args.out}")
    usage.check_output(args.out, "--out")
    enable(args.compile_cache)
    recognizers = _recognizers(args, settings)
    primary = args.primary or ("arcface" if "arcface" in recognizers else "dlib" if "dlib" in recognizers
                               else next(iter(recognizers), None))
    clip = ClipScorer.load(args.clip or DEFAULT_CLIP, args.batch_size)
    report = score_images(entries, clip, recognizers, primary, batch_size=args.batch_size)
    report = {"system": args.name or settings.get("system") or Path(args.generated).resolve().name,
              "generated": str(Path(args.generated).resolve()), "settings": settings, **report}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    o = report["overall"]
    print(f"{report['system']}: {o['images']} images, no face {o['no_face_rate']:.1%}, CLIP score "
          f"{o['clip_score']:.3f}, identity ({primary}) "
          f"{o['identity'][primary]['mean'] if primary else float('nan'):.3f}, hmean {o['hmean']:.3f} -> {args.out}",
          file=sys.stderr)


def _report(args) -> None:
    from f2d_jax.eval.report import load_reports, write_report

    usage.check_output(args.out, "--out", folder=True)
    paths = write_report(load_reports(args.inputs), args.out, sheets=not args.no_sheets)
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)


@usage.command
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    command = {"generate": _generate, "score": _score, "report": _report}[args.command]
    interrupted = ("interrupted: the images finished so far are kept; rerun the same command to resume"
                   if args.command == "generate" else "interrupted")
    return usage.run(lambda: command(args), interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())

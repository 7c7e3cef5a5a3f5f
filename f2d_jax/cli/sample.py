"""Generate images of the person in a face photo from a prompt containing "f l".

    f2d-sample --image face.jpg --prompt "f l eating bread in front of the Eiffel Tower" \\
        --msid msid.pt --mapping mapping.pt --out out.png -n 8 --seed 0
    f2d-sample --image face.jpg --prompt "a photo of f l" --checkpoint runs/demo --out out.png
    f2d-sample --image face.jpg --prompt "a photo of f l" --model my-model --out out.png
    f2d-sample --config tiny --image face.jpg --prompt "a photo of f l" --out out.png

Weights: --model (a packaged model folder: `f2d-convert package`), --checkpoint (a train.py workdir:
its config and trained mapping network) or --msid/--mapping (the official .pt, .safetensors, our
.msgpack or a `convert import` directory) with --sd (a local diffusers directory or hub id; default
CompVis/stable-diffusion-v1-4); given with --model or --checkpoint, these replace what it names.
--config tiny runs the embedded tiny random-init models (offline; the picture means
nothing). Writes a grid PNG with the settings in its metadata, and each image with --out-dir.
Every setting, the faces in the photos and the outputs' folders are checked before any weights load.
"""
import argparse
import math
import sys
from pathlib import Path

from f2d_jax import cli
from f2d_jax.compile_cache import enable


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="f2d-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", nargs="+", metavar="PHOTO",
                        help="photo(s) of the person; several photos of one person are averaged (required)")
    parser.add_argument("--prompt", action="append",
                        help='prompt containing the identifier "f l" (repeat for several prompts; required)')
    parser.add_argument("--out", help="output grid PNG (rows: prompts; required)")
    parser.add_argument("--out-dir", help="also write every image here")
    parser.add_argument("-n", "--num-images", type=int, default=8, help="images per prompt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="image j of a prompt uses seed + j; seeds are "
                        "0 to 2^32 - 1 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images generated at a time; it changes neither "
                        "seeds nor pictures, only the memory used (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps, 1 to 1000 (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; on FLUX.1 "
                        "the transformer's guidance embedding (default: the base's: 7 on SD 1.x (official), 7.5 on "
                        "SD 2.x, 5 on SDXL, 3.5 on FLUX.1-dev)")
    parser.add_argument("--true-cfg", type=float, default=1.0, help="FLUX.1: classifier-free guidance against "
                        "--negative-prompt (the empty prompt if none) above 1, at twice the work, as FluxPipeline's "
                        "true_cfg_scale (default: %(default)s: none)")
    parser.add_argument("--scheduler", default=None, help="euler_a, euler, ddim or dpm++2m (default: the base's: "
                        "euler_a on SD 1.x (official), the scheduler its directory names on SD 2.x and SDXL; "
                        "FLUX.1 samples with euler, the flow-matching Euler sampler, only)")
    parser.add_argument("--negative-prompt", help="(default: none: the empty prompt's conditioning, zeros on SDXL, as "
                        "diffusers' pipelines; --negative-prompt '' encodes the empty prompt on SDXL too; FLUX.1 "
                        "reads it only with --true-cfg above 1)")
    parser.add_argument("--identity-scale", type=float, default=1.0, help="how much of the person the \"f l\" "
                        "tokens carry: 0 draws the class (the prompt with \"a person\" for \"f l\"), 1 the person "
                        "as trained, values in between interpolate the tokens; above 1 extrapolates (with a "
                        "warning); at least 0 (default: %(default)s)")
    parser.add_argument("--expression-image", help="photo whose facial expression to use (needs --expression)")
    parser.add_argument("--height", type=int, default=None, help="image height, a multiple of 8, of 16 on FLUX.1 "
                        "(default: the base's training size, 512 for SD 1.x, 768 for SD 2.1, 1024 for SDXL and "
                        "FLUX.1, or the --config's or --checkpoint's training resolution; SDXL's size conditioning "
                        "follows it)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: as --height)")
    cli.add_weights(parser)
    cli.add_target(parser)
    args = parser.parse_args(argv)
    cli.check_weights(parser, args)
    missing = [f"--{name.replace('_', '-')}" for name in ("image", "prompt", "out") if not getattr(args, name)]
    if missing and not args.target:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def save(images, args, pipe, out: Path) -> None:
    """The grid at `out` and, with --out-dir, each image; each PNG with its prompt(s), seed(s) and settings."""
    import numpy as np
    from PIL import Image

    from f2d_jax.sampling.metadata import grid, png_info, png_text, weights_source

    settings = dict(images=[str(Path(p).resolve()) for p in args.image], num_images=args.num_images,
                    expression_image=str(Path(args.expression_image).resolve()) if args.expression_image else None,
                    steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                    identity_scale=args.identity_scale, negative_prompt=args.negative_prompt,
                    true_cfg_scale=args.true_cfg, height=images.shape[1], width=images.shape[2])
    source = weights_source(args, pipe)
    seeds = range(args.seed, args.seed + args.num_images)
    rows = len(args.prompt) if len(args.prompt) > 1 else max(1, int(math.sqrt(len(images))))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(np.asarray(images), rows=rows)).save(
        out, pnginfo=png_info(png_text(args.prompt, seeds, settings, source)))
    if args.out_dir:
        directory = Path(args.out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            prompt, index = divmod(i, args.num_images)
            text = png_text(args.prompt[prompt], seeds[index], settings, source)
            Image.fromarray(image).save(directory / f"p{prompt:02d}_{index:03d}.png", pnginfo=png_info(text))


@cli.command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.target:
        return cli.run(lambda: compile_for_target(args))
    return cli.run(lambda: _sample(args), interrupted="interrupted: nothing was written")


def compile_for_target(args) -> int:
    """--target: the denoising step and the decode at --batch-size images, compiled for the target's chips
    (one host of them: the pipeline runs per host), from the weights options' config."""
    from f2d_jax.config import config_from_dict
    from f2d_jax.sampling.pipeline import compile_sampling_for_target

    if not any(getattr(args, name) for name in cli.WEIGHT_SOURCES) and not args.sd:
        raise ValueError("--target needs the model: give --config NAME (e.g. f2d_sd14, f2d_sdxl), --checkpoint "
                         "WORKDIR, --model DIR or --sd")
    return compile_sampling_for_target(args, config_from_dict(cli.named_config(args)))


def check(args) -> None:
    """The cheap checks, before any weights load: a ValueError names the first mistake."""
    from f2d_jax.bundle import flux_base, size_multiple
    from f2d_jax.sampling import check_identity_scale, check_sampling, check_size, check_true_cfg, seed_range
    from f2d_jax.text import identifier_prompts

    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    cli.check_output(args.out, "--out")
    if args.out_dir:
        cli.check_output(args.out_dir, "--out-dir", folder=True)
    identifier_prompts(args.prompt)
    check_sampling(args.steps, args.guidance, args.scheduler, args.batch_size)
    seed_range(args.seed, args.num_images)
    check_identity_scale(args.identity_scale)
    missing = [f"--{name}" for name in ("msid", "mapping") if not getattr(args, name)]
    if missing and not any(getattr(args, name) for name in cli.WEIGHT_SOURCES):
        raise ValueError(f"no weights: give --model DIR (a packaged model), --checkpoint WORKDIR (a training run), "
                         f"--config NAME (e.g. tiny: random models, offline) or {' and '.join(missing)} (the "
                         "official msid.pt and mapping.pt, with --sd)")
    config = cli.named_config(args)
    multiple = size_multiple(config)
    if flux_base(config):
        check_true_cfg(args.true_cfg, args.negative_prompt)
    elif args.true_cfg != 1:
        raise ValueError("--true-cfg is FLUX.1's; a Stable Diffusion base's classifier-free guidance is --guidance")
    check_size(multiple if args.height is None else args.height, multiple if args.width is None else args.width,
               multiple)
    if args.expression_image and not config["weights"]["expression"]:
        raise ValueError("--expression-image needs the expression encoder's weights: give --expression "
                         "(Deep3DFaceRecon's epoch_20.pth)")


def _sample(args) -> int:
    from f2d_jax.faces import align_face

    enable(args.compile_cache)  # before the checks, which compile too (the scheduler's arrays)
    check(args)
    faces = [align_face(image) for image in args.image]
    expression = align_face(args.expression_image) if args.expression_image else None
    from f2d_jax.sampling import check_sampling

    pipe = cli.load_pipeline(args)
    height = args.height if args.height is not None else cli.trained_resolution(args, pipe)
    args.guidance, args.scheduler, height, width = pipe.settings(args.guidance, args.scheduler, height, args.width)
    check_sampling(args.steps, args.guidance, args.scheduler, args.batch_size)
    images = pipe.generate(faces, args.prompt, num_images=args.num_images, seed=args.seed, steps=args.steps,
                           guidance_scale=args.guidance, scheduler=args.scheduler,
                           negative_prompt=args.negative_prompt, expression_image=expression,
                           height=height, width=width, batch_size=args.batch_size,
                           identity_scale=args.identity_scale, true_cfg_scale=args.true_cfg)
    out = Path(args.out)
    save(images, args, pipe, out)
    print(f"wrote {out}" + (f" and {len(images)} images in {args.out_dir}" if args.out_dir else ""), file=sys.stderr)
    return 0

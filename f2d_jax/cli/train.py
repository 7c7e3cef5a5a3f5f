"""Train Face2Diffusion's mapping network (CGDR + expression guidance) on a device mesh.

    f2d-train --config tiny --workdir /tmp/f2d            # tiny random models, on CPU
    f2d-train --config f2d_sd14 --workdir runs/f2d \\
        --config.data.dir=/data/ffhq_prepared --config.weights.msid=msid.pt --config.train.batch_size=64

Resumes from the workdir's latest checkpoint. Several processes (one per host) run the same
command; they join through jax.distributed when JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES,
JAX_PROCESS_ID) or a cluster scheduler (SLURM, Open MPI, Cloud TPU pods) says so.
"""
import argparse

from f2d_jax import cli


@cli.command
def main(argv=None) -> int:
    from f2d_jax.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="f2d-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--workdir", help="checkpoints, metrics, TensorBoard and sample images (not with --target)")
    cli.add_compile_cache(parser)
    cli.add_target(parser)
    try:
        args, config = config_from_args(parser, argv)
    except (FileNotFoundError, ValueError) as e:
        return cli.error(str(e))
    if args.target:
        from f2d_jax.train.launch import compile_for_target
        return cli.run(lambda: compile_for_target(config, args))
    if not args.workdir:
        parser.error("the following arguments are required: --workdir (or --target, to compile for an accelerator)")
    from f2d_jax.train.launch import run
    return run(config, args.workdir, args.compile_cache)


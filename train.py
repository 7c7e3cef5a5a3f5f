"""Train Face2Diffusion (or pretrain MSID) as a config says: `f2d-train` from a checkout.
Run `python train.py --help` for the options (f2d_jax/cli/train.py)."""
import sys

from f2d_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

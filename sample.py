"""Generate images of the person in a face photo: `f2d-sample` from a checkout.
Run `python sample.py --help` for the options (f2d_jax/cli/sample.py)."""
import sys

from f2d_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())

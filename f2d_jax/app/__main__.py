"""`python -m f2d_jax.app`: the web app (f2d_jax/cli/app.py)."""
import sys

from f2d_jax.cli.app import main

if __name__ == "__main__":
    sys.exit(main())

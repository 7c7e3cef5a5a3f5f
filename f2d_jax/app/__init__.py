"""The web app: `python -m f2d_jax.app` or `f2d-app` (the command line: f2d_jax/cli/app.py; the page:
f2d_jax/app/page.py, which needs the `app` extra)."""

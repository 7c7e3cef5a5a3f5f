"""The web app: face photo(s) and a prompt with "f l" -> images, in the browser.

    f2d-app                                   # the tiny random config, offline (the pictures are noise)
    f2d-app --config tiny --port 7860
    f2d-app --checkpoint runs/f2d --sd CompVis/stable-diffusion-v1-4 --host 0.0.0.0
    f2d-app --model my-model

Weights as f2d-sample takes them (--model, --checkpoint, --config, --sd/--msid/--mapping/--expression);
with none, the tiny random config. The models load and compile once, before the server starts (a
warm-up generation with the page's default settings); one generation runs at a time. The server
listens on 127.0.0.1 unless --host or --share says otherwise, takes uploads up to 20 MB and photos
up to 25 megapixels, and serves files only from its own temporary folder, removed when it stops.
"""
import argparse
import importlib.util
import os
import signal
import socket
import sys
import tempfile
import time
import warnings

from f2d_jax import cli
from f2d_jax.compile_cache import enable

OFFLINE_CONFIG = "tiny"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="f2d-app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                        "machine only; 0.0.0.0: every network interface)")
    parser.add_argument("--port", type=int, default=7860, help="port, 1 to 65535 (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (needs the "
                        "internet)")
    cli.add_weights(parser)
    args = parser.parse_args(argv)
    cli.check_weights(parser, args)
    if not (args.checkpoint or args.config or args.model or args.sd or args.msid or args.mapping):
        args.config = OFFLINE_CONFIG
    return args


@cli.command
def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _serve(args), interrupted="interrupted: the server stopped")


def check(args) -> None:
    """The checks before anything loads: a ValueError or OSError names the first mistake."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise OSError(f"cannot listen on {args.host} port {args.port}: {e.strerror or e}") from None
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the web app needs gradio: pip install 'f2d-jax[app]'")
    if args.config:
        from f2d_jax.config import f2d_config

        f2d_config(args.config, args.config)
    if args.model:
        from f2d_jax.convert.package import read_package

        read_package(args.model)


def _stop(signum, frame):
    raise KeyboardInterrupt


def _serve(args) -> None:
    check(args)
    warnings.filterwarnings("ignore", message="'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")  # gradio's, per request
    enable(args.compile_cache)
    signal.signal(signal.SIGTERM, _stop)  # a stopped server removes its folder too
    with tempfile.TemporaryDirectory(prefix="f2d-app-") as folder:
        os.environ["GRADIO_TEMP_DIR"] = folder  # uploads and outputs; set before gradio is imported
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        from f2d_jax.app import page

        began = time.perf_counter()
        pipe = cli.load_pipeline(args)
        limits = page.limits_for(pipe, cli.trained_resolution(args, pipe))
        page.warm_up(pipe, args, limits)
        print(f"loaded and compiled in {time.perf_counter() - began:.0f} s; files in {folder}", file=sys.stderr)
        blocks = page.build(pipe, args, limits)
        blocks.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=page.MAX_FILE_SIZE,
            allowed_paths=[], ssr_mode=False, css=page.CSS, prevent_thread_lock=True, quiet=True)
        reach = f" and {blocks.share_url}" if blocks.share_url else "" if args.host != "127.0.0.1" else \
            " (this machine only: --host 0.0.0.0 or --share to reach it from others)"
        print(f"running on {blocks.local_url}{reach}; Ctrl-C stops the server", file=sys.stderr)
        try:
            signal.pause()  # until Ctrl-C or SIGTERM
        finally:
            blocks.close(verbose=False)

"""How every command answers its user, and the options several commands share: a user's mistake is one
`error:` line (details may follow on the next lines) and exit status 2, never a traceback; Ctrl-C is one
line and status 130.

Every command imports these from here, those of the lower packages too (f2d_jax.convert, f2d_jax.eval,
f2d_jax.data.prepare, the training launcher, ...; f2d_jax.cli re-exports them for its own), so this module
imports nothing of the package but f2d_jax.compiled and f2d_jax.targets, when a command compiles for a target.
"""
from __future__ import annotations

import _thread
import argparse
import errno
import functools
import gc
import importlib.machinery
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

USER_ERROR = 2
INTERRUPTED = 130
USER_ERRORS = (ValueError, OSError)  # the package's user errors derive from these


def error(message: str) -> int:
    """Print `error: message` on stderr; returns the exit status of a user error."""
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


def describe(e: BaseException) -> str:
    """The message of an exception, whole (a key list after its first line stays), or its type's name."""
    return str(e).strip() or type(e).__name__


def add_compile_cache(parser: argparse.ArgumentParser) -> None:
    """The --compile-cache flag of the commands that compile models (f2d_jax/compile_cache.py)."""
    parser.add_argument("--compile-cache", metavar="DIR|off",
                        help="JAX's persistent compilation cache, so that later runs skip compiling what this "
                        "one compiles, or 'off' (default: $F2D_JAX_COMPILE_CACHE, else JAX's own "
                        "JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/f2d_jax/jax or ~/.cache/f2d_jax/jax)")


def add_target(parser: argparse.ArgumentParser) -> None:
    """--target, --fit and --json: compile the command's programs for an accelerator instead of running them
    (f2d_jax/compiled.py)."""
    group = parser.add_argument_group("compile for an accelerator (on any host, nothing runs)")
    group.add_argument("--target", metavar="NAME", help="compile the programs for these chips and print what each "
                       "device holds and computes: a TPU slice (v5e-8, v6e-64, v4-8, v5p-128, 2xv5e-256 for two "
                       "slices) or NVIDIA GPUs (h100, h100x8, 2xh100x8, h200x8, a100x8); no weights are read")
    group.add_argument("--fit", action="store_true", help="with --target: find the largest batch per device "
                       "that fits")
    group.add_argument("--json", metavar="PATH", help="with --target: also write the figures as JSON")


def compile_for_target(args: argparse.Namespace, build, batch_per_device: int) -> int:
    """What --target, --fit and --json ask: `build(devices, batch_per_device)`'s programs compiled for the
    target, their table printed; 0 when every program fits, 1 if one does not."""
    from f2d_jax import compiled, targets

    target = targets.parse(args.target)
    if args.json:
        check_output(args.json, "--json")
    rows = compiled.compile_all(target, build, batch_per_device, fit=args.fit)
    return compiled.report(rows, args.json)


def check_output(path, flag: str, folder: bool = False) -> None:
    """A ValueError naming `flag` unless `path` can be written: a file (or with `folder`, a folder to
    write files in) whose folder exists and takes a new file, or can be made. A file is made there and
    removed to find out: permissions, read-only filesystems and full quotas all answer that way."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    for parent in (path, *path.parents) if folder else path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path} cannot be written: {parent} is a file, not a directory")
            try:
                tempfile.TemporaryFile(dir=parent).close()
            except OSError as e:
                why = f" ({e.strerror})" if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else ""
                raise ValueError(f"{flag} {path} cannot be written: {parent} is not writable{why}") from None
            return


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates a console script's `main(argv=None) -> status`: a Ctrl-C at any moment, while modules import
    and arguments parse too, is one line and status 130 (`run` words the line for the work it stops)."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        _resurface_interrupts()
        _INTERRUPTED.clear()
        try:
            return main(argv)
        except KeyboardInterrupt:
            pass
        except Exception:  # the interrupt broke an import in C code (jaxlib's "error while initializing the
            if not _INTERRUPTED.is_set():  # extension"): what follows a Ctrl-C is the interrupt
                raise
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    return wrapped


_INTERRUPTED = threading.Event()  # set by the SIGINT handler of `command`


def _resurface_interrupts() -> None:
    """Ctrl-C's KeyboardInterrupt is raised in whatever Python code runs when it comes; in a garbage-collection
    callback (JAX has one) or a finalizer, Python reports it as "Exception ignored" and drops it, and the
    program would go on. While a C extension initializes, an interrupt breaks its import, and the extension
    may print it as a traceback (NumPy's C API does, importing numpy for it). From here on such an interrupt
    is raised a moment later instead, in the code that runs then; one that is dropped all the same is not
    reported but raised again."""
    report = sys.unraisablehook
    if getattr(report, "resurfaces_interrupts", False):
        return

    def later():
        threading.Timer(0.05, _thread.interrupt_main).start()

    def handler(signum, frame):
        _INTERRUPTED.set()
        callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
        while frame is not None:
            if frame.f_code in callbacks or frame.f_code.co_name == "__del__" or _initializes_extension(frame):
                return later()
            frame = frame.f_back
        raise KeyboardInterrupt

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            later()
        else:
            report(unraisable)

    hook.resurfaces_interrupts = True
    sys.unraisablehook = hook
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def _initializes_extension(frame) -> bool:
    """Whether `frame` is importlib creating or executing a C extension module."""
    return frame.f_code.co_name in ("create_module", "exec_module") and \
        isinstance(frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader)


def run(body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = USER_ERRORS,
        interrupted: str = "interrupted") -> int:
    """`body()`'s exit status (None: 0); `errors` become one `error:` line and status 2, Ctrl-C the
    line `interrupted` and status 130."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return INTERRUPTED
    except errors as e:
        return error(describe(e))

"""The command lines, and what they share: a user's mistake is one `error:` line (details may follow
on the next lines) and exit status 2, never a traceback; Ctrl-C is one line and status 130.

Each command module keeps its imports of JAX and the models inside `main`, after the arguments are
checked, so that `--help` and a mistyped argument answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
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


def check_output(path, flag: str, folder: bool = False) -> None:
    """A ValueError naming `flag` unless `path` can be written: a file (or with `folder`, a folder to
    write files in) whose folder exists and is writable, or can be made."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    for parent in (path, *path.parents) if folder else path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path} cannot be written: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path} cannot be written: {parent} is not writable")
            return


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

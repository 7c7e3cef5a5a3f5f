"""JAX's persistent compilation cache, which the command lines turn on: what one run compiles (the
train step, the encoders, the models' set-up, the sampling step) later runs read from disk instead of
compiling again. JAX runs what it reads there: keep the folder writable by you alone.

Where: `--compile-cache DIR`, else $F2D_JAX_COMPILE_CACHE, else JAX's own setting where one is made
(JAX_COMPILATION_CACHE_DIR, `jax.config.update("jax_compilation_cache_dir", ...)`), else
$XDG_CACHE_HOME/f2d_jax/jax (~/.cache/f2d_jax/jax). `off` for either of the first two turns it off.

The library (F2DPipeline and the rest) leaves JAX's configuration alone: a Python program that wants
the cache calls `enable()` before it compiles anything.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "F2D_JAX_COMPILE_CACHE"
OFF = "off"
# JAX writes only programs that took this long to compile (its default: 1 s). The tiny configs' and
# small programs' entries are cheap to keep, and reading one is faster than compiling it.
MIN_COMPILE_SECONDS = 0.0


def default_dir() -> Path:
    """$XDG_CACHE_HOME/f2d_jax/jax, else ~/.cache/f2d_jax/jax."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "f2d_jax" / "jax"


def enable(setting: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on (call it before anything compiles) and return its
    folder, or turn it off and return None. `setting`: a folder or "off"; None: as the module says.
    A folder that cannot be written is one warning on stderr, and the run goes on without the cache."""
    import jax

    setting = setting or os.environ.get(ENV) or None
    if setting and setting.lower() == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    own = jax.config.jax_compilation_cache_dir
    folder = os.path.expanduser(setting) if setting else own or str(default_dir())
    if "://" not in folder:  # a local folder (JAX also takes a cloud bucket's address)
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as e:
            print(f"warning: the compilation cache {folder} cannot be written ({e.strerror or e}); this run "
                  "compiles without it", file=sys.stderr)
            jax.config.update("jax_enable_compilation_cache", False)
            return None
    if folder != own:  # JAX's own setting stays as its user made it
        jax.config.update("jax_compilation_cache_dir", folder)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if setting:
        jax.config.update("jax_enable_compilation_cache", True)
    return folder if jax.config.jax_enable_compilation_cache else None

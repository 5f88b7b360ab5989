"""JAX's persistent compilation cache for mergejax runs: compile once per machine, not per run.

XLA compiles every jitted function on first use in a process (the statistics kernel per feature
width, `zip_match` per width, the train-mode forward of a BatchNorm reset...): seconds that a
PyTorch pipeline never pays. With the cache on, compiled executables are stored on disk and a
later process with the same shapes loads them instead of compiling.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MERGEJAX_COMPILE_CACHE"
OFF = ("", "0", "off", "false", "no")


def default_dir() -> Path:
    """`$MERGEJAX_COMPILE_CACHE`, else `$XDG_CACHE_HOME/mergejax/xla` (~/.cache/mergejax/xla)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get(ENV) or base / "mergejax" / "xla")


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns the persistent cache on (call before the first compile of the process).

    Args:
      directory: where executables are kept; default `default_dir()`. `MERGEJAX_COMPILE_CACHE`
        set to "off" (or "0", "false", "no", empty) disables the cache and returns None.

    Returns the cache directory in use, or None when disabled.
    """
    if directory is None and os.environ.get(ENV, "unset").strip().lower() in OFF:
        return None
    import jax

    path = Path(directory) if directory is not None else default_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # CPU compiles of small kernels take 0.1-2 s each: keep all of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

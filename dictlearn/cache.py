"""dictlearn's cache folder (built kernels, trained default transcoders, compiled programs).

``root()`` is ``$DICTLEARN_CACHE``, else ``$XDG_CACHE_HOME/dictlearn`` (``~/.cache/dictlearn``),
else, when that cannot be written, a per-user temporary folder.
"""

from __future__ import annotations

import os
import pathlib
import tempfile


def root() -> pathlib.Path:
  """The cache folder (created)."""
  base = pathlib.Path(os.environ.get("DICTLEARN_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dictlearn"))
  try:
    base.mkdir(parents=True, exist_ok=True)
    if os.access(base, os.W_OK):
      return base
  except OSError:
    pass
  user = os.getuid() if hasattr(os, "getuid") else "user"
  fallback = pathlib.Path(tempfile.gettempdir()) / f"dictlearn-{user}"
  fallback.mkdir(parents=True, exist_ok=True)
  return fallback


def enable_compilation_cache(folder: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache in ``folder`` (default ``root() / "jax"``).

  A later process that compiles the same program (same shapes, same jax and device) loads
  it instead: a second ``dictlearn circuit`` on a prompt of similar length, a re-run tour.
  Every program is stored, the small ones too: loading one is several times quicker than
  compiling it, and entries are small (past 1 GiB the least recently used are deleted).
  ``$DICTLEARN_COMPILATION_CACHE=0`` leaves JAX's settings alone; so does a cache folder
  set already (by the user or JAX's own ``JAX_COMPILATION_CACHE_DIR``). Returns the folder
  in use, or None.
  """
  import jax

  if os.environ.get("DICTLEARN_COMPILATION_CACHE", "1") == "0":
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:
    return pathlib.Path(current)
  folder = pathlib.Path(folder) if folder is not None else root() / "jax"
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_compilation_cache_max_size", 1 << 30)
  return folder

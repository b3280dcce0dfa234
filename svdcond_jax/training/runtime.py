"""Process-wide runtime defaults: LAPACK threads and jax's persistent compilation cache.

Every entry point (``experiments.*``, ``benchmarks.*``) calls :func:`configure` first thing
in ``main``, before anything is compiled. What it sets, and why (measured on the 2-core
development CPU; docs/performance.md):

* ``OPENBLAS_NUM_THREADS=1``. On CPU ``jnp.linalg.eigh`` (the meta-layer's forward) runs
  LAPACK from the OpenBLAS that SciPy ships, whose worker threads compete with XLA's own
  intra-op thread pool for the same cores. A batch of 64 eigendecompositions of 256x256
  (the GCP meta-layer, forward + backward) took 2.7-6.4 s with OpenBLAS's default threads
  and 0.73-0.76 s with one (minimum wall time, loaded machine). The variable is read when
  SciPy's OpenBLAS is loaded (on jax's first eigh); if it is already loaded, ``threadpoolctl``
  (when installed) limits it instead. An explicit ``OPENBLAS_NUM_THREADS`` is kept.
* ``jax_compilation_cache_dir``: jax's persistent compilation cache, so a second run of
  the same step (another seed, a resumed run, the next process) loads the executable
  instead of compiling it again (the CIFAR ResNet-50 train step: ~25 s of XLA compile on
  2 cores). Default directory: ``$SVDCOND_JAX_CACHE_DIR``, else
  ``~/.cache/svdcond_jax/jax``; a cache directory already configured for jax (e.g. by
  ``JAX_COMPILATION_CACHE_DIR``) is kept. Not capped: jax 0.10's size cap (least recently
  used eviction) fails every later write ("Error writing persistent compilation cache
  entry ... -atime") once the directory holds one entry written without the cap (by any
  other jax process), so we leave jax's unbounded default; delete the directory to reclaim
  the space, or set ``jax_compilation_cache_max_size`` in every process that shares it.
  Entries are compiled code that the process loads and runs: keep the directory private.

Example:
    >>> from svdcond_jax.training import runtime
    >>> settings = runtime.configure(cache_dir=None)  # threads only, no cache
    >>> settings["cache_dir"] is None
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

DEFAULT_CACHE_DIR = Path("~/.cache/svdcond_jax/jax")
CACHE_ENV = "SVDCOND_JAX_CACHE_DIR"
BLAS_ENV = "OPENBLAS_NUM_THREADS"
_DEFAULT = object()


def default_cache_dir() -> Path:
    """``$SVDCOND_JAX_CACHE_DIR`` if set, else ``~/.cache/svdcond_jax/jax`` (expanded)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def limit_blas_threads(threads: int = 1) -> int:
    """Caps OpenBLAS's threads (the LAPACK behind jax's CPU ``eigh``) at ``threads``.

    Sets ``OPENBLAS_NUM_THREADS`` unless the user already set it, and, if an OpenBLAS is
    already loaded in this process, limits it at once with ``threadpoolctl`` when that
    package is installed.

    Args:
      threads: positive thread count.

    Returns:
      The value of ``OPENBLAS_NUM_THREADS`` now in force (the user's, if they set one).

    Raises:
      ValueError: if ``threads < 1``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1; got {threads=}")
    if BLAS_ENV in os.environ:
        return int(os.environ[BLAS_ENV])
    os.environ[BLAS_ENV] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return threads
    threadpool_limits(limits=threads, user_api="blas")  # only the BLAS libraries loaded now
    return threads


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Turns on jax's persistent compilation cache (unless one is configured already).

    Must run before the first compilation of the process (jax initialises the cache once).

    Args:
      cache_dir: directory (created if missing); None: the directory jax is already
        configured with, else :func:`default_cache_dir`.

    Returns:
      The cache directory in force.
    """
    current = jax.config.jax_compilation_cache_dir
    if cache_dir is None and current:
        path = Path(current)
    else:
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_enable_compilation_cache", True)
    return path


def configure(*, cache_dir: Any = _DEFAULT, blas_threads: int | None = 1) -> dict[str, Any]:
    """Applies the runtime defaults; call first thing in ``main``.

    Args:
      cache_dir: persistent compilation cache directory; default
        :func:`default_cache_dir`; None turns jax's persistent cache off, also one
        configured elsewhere (for cold-compile benchmarks).
      blas_threads: OpenBLAS threads (None: leave OpenBLAS alone).

    Returns:
      What is in force: ``{"blas_threads": int | None, "cache_dir": str | None}``.
    """
    threads = None if blas_threads is None else limit_blas_threads(blas_threads)
    if cache_dir is None:
        path = None
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        path = enable_compilation_cache(None if cache_dir is _DEFAULT else cache_dir)
    return {"blas_threads": threads, "cache_dir": None if path is None else str(path)}

"""Test configuration: two fake CPU devices (set before jax is imported) and float64 on demand."""

import os
import tempfile

# Append (not setdefault) so that a caller's XLA_FLAGS, e.g. --xla_cpu_max_isa=AVX2 to find
# ISA-dependent tests, keeps the two fake devices the suite relies on.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=2".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Entry points turn on jax's persistent compilation cache (svdcond_jax.training.runtime); in
# tests each process gets its own fresh directory: nothing written to the user's cache, and two
# xdist workers never evict each other's entries.
os.environ.setdefault("SVDCOND_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="svdcond_jax_cache_"))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Enable float64 inside one test and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)

"""Small batch-polymorphic linear-algebra helpers shared by the solvers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Full float32 precision for matrix products on accelerators (TPU/GPU default to
# bf16/TF32 passes, far too coarse for covariance conditioning); no effect on CPU.
HIGHEST = jax.lax.Precision.HIGHEST


def mT(a: Array) -> Array:
    """Transpose the last two axes."""
    return jnp.swapaxes(a, -1, -2)


def sym(a: Array) -> Array:
    """Symmetric part (A + A^T) / 2 over the last two axes."""
    return (a + mT(a)) / 2


def mm(a: Array, b: Array) -> Array:
    """Batched matrix product at full precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def eye_like(a: Array) -> Array:
    """Identity with the trailing (d, d) shape and dtype of ``a`` (broadcasts over batch)."""
    return jnp.eye(a.shape[-1], dtype=a.dtype)


def scale_cols(u: Array, v: Array) -> Array:
    """U diag(v): multiply column j of each matrix by v[..., j]."""
    return u * v[..., None, :]


def reconstruct(u: Array, v: Array) -> Array:
    """U diag(v) U^T for eigenvectors u (..., d, d) and values v (..., d)."""
    return mm(scale_cols(u, v), mT(u))


def _several_cpu_devices() -> bool:
    """True when the default backend is the CPU with more than one (e.g. fake) device."""
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def eigh(p: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of symmetric p (..., d, d).

    ``jnp.linalg.eigh`` everywhere, except one workaround: on a CPU backend with several
    devices (``--xla_force_host_platform_device_count``, as in the tests), batched matrices
    are decomposed one at a time with ``lax.map``. jaxlib's CPU LAPACK kernel
    (``lapack_ssyevd_ffi``) splits a batch over XLA's intra-op thread pool and waits for it
    (``ParallelBatchMap``); when every device's program does so at once, all pool threads
    wait and the step deadlocks (observed with jax 0.10.2, 2 fake CPU devices, a GCP model
    at batch 32; gdb showed both pool threads in ``BlockingCounter::Wait``). One device, or
    any accelerator, keeps the batched call.
    """
    if p.ndim <= 2 or not _several_cpu_devices():
        return jnp.linalg.eigh(p, symmetrize_input=False)
    flat = p.reshape((-1,) + p.shape[-2:])
    lam, u = jax.lax.map(lambda m: jnp.linalg.eigh(m, symmetrize_input=False), flat)
    return lam.reshape(p.shape[:-1]), u.reshape(p.shape)

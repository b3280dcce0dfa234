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

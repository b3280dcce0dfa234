"""Small batch-polymorphic linear-algebra helpers shared by the solvers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    """Symmetric part (A + A^T) / 2 over the last two axes (A/2 + A^T/2: no overflow)."""
    half = a / 2
    return half + mT(half)


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


def frobenius(a: Array) -> Array:
    """Frobenius norm over the last two axes, shape (...), without overflow.

    Scaled by the largest entry first, so float32 entries up to ~3e38 do not overflow in the
    squares.
    """
    big = jax.lax.stop_gradient(jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True))
    big = jnp.where(big > 0, big, 1)
    return big[..., 0, 0] * jnp.sqrt(jnp.sum(jnp.square(a / big), axis=(-2, -1)))


def psd_tolerance(dtype: Any) -> float:
    """Relative tolerance of the symmetric-PSD test: sqrt(eps) of the compute dtype.

    A symmetric PSD matrix stored or computed in floating point has eigenvalues perturbed by
    about c * eps * ||P|| with a modest c (a float32 covariance of 256 channels and 49
    samples: lambda_min ~ -1e-7 ||P||_F, docs/meta_layer.md). An eigenvalue below
    ``-sqrt(eps) ||P||_F`` (-3.5e-4 in float32, -1.5e-8 in float64) is thousands of
    roundings away from zero: the input is not PSD.
    """
    return float(jnp.finfo(dtype).eps) ** 0.5


def nan_where(bad: Array, a: Array) -> Array:
    """NaN for the matrices of ``a`` (..., m, n) where ``bad`` (...) is True, in value and
    in derivative (a product with a constant NaN/1 mask, so the tangent is NaN too)."""
    mask = jax.lax.stop_gradient(jnp.where(bad, jnp.nan, 1.0).astype(a.dtype))
    return a * mask[..., None, None]


@jax.custom_jvp
def nan_tangent_where(bad: Array, a: Array) -> Array:
    """``a`` unchanged in value; its tangent (and so its gradient) is NaN where ``bad``.

    For points where the function is defined but not differentiable (the square root of the
    zero matrix: its derivative is unbounded).
    """
    del bad
    return a


@nan_tangent_where.defjvp
def _nan_tangent_where_jvp(primals, tangents):
    bad, a = primals
    mask = jnp.where(bad, jnp.nan, 1.0).astype(a.dtype)
    return a, tangents[1] * mask[..., None, None]


@jax.custom_jvp
def _zero_where(bad: Array, a: Array) -> Array:
    return jnp.where(bad[..., None, None], jnp.zeros_like(a), a)


@_zero_where.defjvp
def _zero_where_jvp(primals, tangents):
    bad, a = primals
    mask = jnp.where(bad, jnp.nan, 1.0).astype(a.dtype)[..., None, None]
    return _zero_where(bad, a), tangents[1] * mask


def finite_or_zero(a: Array) -> tuple[Array, Array]:
    """(a with every matrix holding a NaN/Inf entry replaced by 0, (...) mask of those).

    LAPACK must never see them: ``jnp.linalg.svd`` of a float32 matrix with one Inf entry
    does not return (jax 0.10.2, CPU), and NumPy's ``eigvalsh`` returns finite garbage for a
    NaN. The derivative of the replaced matrices is NaN (not the 0 of a plain ``where``), so
    callers that also NaN the outputs (``nan_where``) give NaN values and NaN gradients.
    """
    bad = ~jnp.all(jnp.isfinite(a), axis=(-2, -1))
    return _zero_where(bad, a), bad


def _several_cpu_devices() -> bool:
    """True when the default backend is the CPU with more than one (e.g. fake) device."""
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def _inside_manual_sharding() -> bool:
    """True inside ``shard_map``/``pmap`` (local per-device data, no batch sharding)."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def map_matrices(fn: Callable[..., Any], *arrays: Array) -> Any:
    """``fn`` applied to a batch of matrices ``arrays`` (each (..., m, n), same batch shape).

    ``fn`` is a batch-polymorphic LAPACK-backed function (eigh, cholesky, solve) returning a
    pytree of arrays whose leading axes are the batch. It is called on the whole batch
    everywhere except on a CPU backend with several devices
    (``--xla_force_host_platform_device_count``, as in the tests). There jaxlib's LAPACK
    kernels (e.g. ``lapack_ssyevd_ffi``) split a batch over XLA's intra-op thread pool and
    wait for it (``ParallelBatchMap``); when every device's program does so at once, all
    pool threads wait and the step deadlocks (observed with jax 0.10.2, 2 fake CPU devices,
    a GCP model at batch 32; gdb showed both pool threads in ``BlockingCounter::Wait``).

    The protection: each kernel call sees one matrix per device. The flat batch B is viewed
    as (n, B/n), n the device count, and ``lax.map`` runs over the B/n axis, calling ``fn``
    on n matrices at a time. A batch sharded over the n devices in contiguous blocks (a
    Mesh over the batch axis) stays sharded: the sliced axis is never the sharded one, so
    no all-gather happens and every device decomposes its own matrices, one per call. Where
    B is not a multiple of n, inside ``shard_map``/``pmap`` (per-device data), or for a
    single matrix, the matrices are processed one at a time. A batch *replicated* on every
    device is decomposed n matrices per call; jaxlib runs such a call inline unless
    n * cost(d) > 2e5 flops (d >= 30 for eigh with n = 2).
    """
    shape = arrays[0].shape
    batch = shape[:-2]
    if not batch or not _several_cpu_devices():
        return fn(*arrays)
    flat = [a.reshape((-1,) + a.shape[-2:]) for a in arrays]
    count, n = flat[0].shape[0], jax.local_device_count()
    unflatten = lambda x: x.reshape(batch + x.shape[1:])
    if count == 0:
        return jax.tree_util.tree_map(unflatten, fn(*flat))
    if count % n or _inside_manual_sharding():
        return jax.tree_util.tree_map(unflatten, jax.lax.map(lambda xs: fn(*xs), flat))
    # (B,) -> (n, B/n): block k of the batch is row k, the rows live on device k when the
    # batch is sharded; lax.map runs over the unsharded B/n axis.
    split = [jnp.swapaxes(a.reshape((n, count // n) + a.shape[1:]), 0, 1) for a in flat]
    out = jax.lax.map(lambda xs: fn(*xs), split)
    merge = lambda x: unflatten(jnp.swapaxes(x, 0, 1).reshape((count,) + x.shape[2:]))
    return jax.tree_util.tree_map(merge, out)


def eigh(p: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of symmetric p (..., d, d).

    ``jnp.linalg.eigh`` through :func:`map_matrices` (one matrix per device per LAPACK call
    on a multi-device CPU backend; batched everywhere else).
    """
    return map_matrices(lambda a: tuple(jnp.linalg.eigh(a, symmetrize_input=False)), p)


def not_psd(p: Array, norm: Array) -> Array:
    """(...,) True where symmetric p has lambda_min < -sqrt(eps) ||P||_F (``norm``).

    One Cholesky factorisation of P + sqrt(eps) ||P||_F I: jax returns NaN factors exactly
    when that shifted matrix is not numerically positive definite. The zero matrix is PSD.
    """
    shift = psd_tolerance(p.dtype) * norm[..., None, None] * eye_like(p)
    factor = map_matrices(
        lambda a: jax.lax.linalg.cholesky(a, symmetrize_input=False), p + shift)
    return jnp.any(jnp.isnan(factor), axis=(-2, -1)) & (norm > 0)

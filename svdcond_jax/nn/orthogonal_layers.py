"""Pre-SVD weight treatments as Flax linen layers (paper Sec. 4.2, docs/weight_treatments.md).

* :class:`SpectralNormConv`: ``W / sigma_max(W)`` (Eq. 11), power iteration as in Miyato et al.
* :class:`OrthogonalDense`: ``W = exp(A - A^T)`` (Eq. 13).
* :class:`SkewOrthogonalConv`: Skew Orthogonal Convolution (Singla & Feizi 2021), the
  convolutional form of Eq. 13 used by the reference for conv Pre-SVD layers.

All are called as ``layer(x, train)`` on NHWC input (dense: ``(..., in)``). The trainable
weight is the param ``"kernel"``: the raw, unconstrained parameter for OW/SOC, which is what
NOG/OLR act on (docs/nog_olr.md). Power-iteration vectors live in the
``"batch_stats"`` collection and are only updated when ``train=True`` (pass
``mutable=["batch_stats"]``).

References:
  Miyato et al, Spectral Normalization for Generative Adversarial Networks
  <https://arxiv.org/abs/1802.05957>, 2018.
  Singla & Feizi, Skew Orthogonal Convolutions <https://arxiv.org/abs/2105.11417>, 2021.
  Singla & Feizi, Fantastic Four: Differentiable Bounds on Singular Values of Convolution
  Layers <https://arxiv.org/abs/1911.10258>, 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax.orthogonal import as_matrix, skew_symmetric_expm

__all__ = [
    "OrthogonalDense",
    "SkewOrthogonalConv",
    "SpectralNormConv",
    "conv_transpose_kernel",
    "fantastic_four_matrices",
    "power_iteration",
]

_DN = ("NHWC", "HWIO", "NHWC")


def _normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v), eps)


def _power_step(_: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    m, u = carry
    return m, _normalize(m.T @ _normalize(m @ u))


def power_iteration(
    matrix: jax.Array, u: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array]:
    """Power iteration for the largest singular value of ``matrix`` (Miyato et al.).

    ``num_iters`` times: ``v = normalize(M u)``, ``u = normalize(M^T v)``. The returned
    ``sigma = ||M sg(u)||`` is differentiable in ``M`` with ``d sigma / dM = v u^T`` (the
    vector is held constant, as in Miyato et al.) and approaches ``sigma_max(M)`` from below.

    Args:
      matrix: ``(rows, cols)``.
      u: ``(cols,)`` right singular vector estimate.
      num_iters: iterations (0 evaluates sigma with the given ``u``).

    Returns:
      ``(u, sigma)``: the updated unit vector (gradient stopped) and the estimate.

    Example:
      >>> import jax.numpy as jnp
      >>> _, s = power_iteration(jnp.diag(jnp.array([3.0, 1.0])), jnp.ones(2), 20)
      >>> round(float(s), 4)
      3.0
    """
    u = jax.lax.stop_gradient(u)
    m = jax.lax.stop_gradient(matrix)
    if num_iters > 0:
        # Module-level body: eager calls hit jax's trace cache instead of recompiling.
        _, u = jax.lax.fori_loop(0, num_iters, _power_step, (m, u))
    return u, jnp.linalg.norm(matrix @ u)


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


def _start_vector(n: int, dtype: jnp.dtype) -> jax.Array:
    """Fixed, generic unit vector to start power iteration (no RNG: random-number kernels
    dominate compile time on CPU). Its entries are the fractional parts of i * golden ratio
    shifted to [-0.5, 0.5): no structure that could make it orthogonal to a top singular
    vector except on a measure-zero set of kernels."""
    i = jnp.arange(1, n + 1, dtype=jnp.float32)
    v = jnp.mod(i * 0.6180339887, 1.0) - 0.5
    return _normalize(v.astype(dtype))


def _power_vector(
    module: nn.Module, name: str, matrix: jax.Array, init_iters: int, iters: int, update: bool
) -> jax.Array:
    """Reads/updates one power-iteration vector in "batch_stats"; returns sigma estimate."""

    def init() -> jax.Array:
        return power_iteration(matrix, _start_vector(matrix.shape[1], matrix.dtype), init_iters)[0]

    var = module.variable("batch_stats", name, init)
    u, sigma = power_iteration(matrix, var.value, iters if update else 0)
    if update:
        var.value = u
    return sigma


class SpectralNormConv(nn.Module):
    """Convolution with a spectrally normalised kernel ``W / sigma_max(W)`` (Eq. 11).

    ``sigma_max`` is the largest singular value of the kernel reshaped to
    ``(kh*kw*in, out)`` (the reference's ``(out, in*kh*kw)`` transposed, as in Miyato et al.),
    estimated by power iteration: ``init_power_iterations`` at initialisation, then
    ``n_power_iterations`` per call with ``train=True`` (the vector is frozen otherwise).

    Variables (for a module named ``name``): ``params/<name>/kernel`` (kh, kw, in, out) HWIO,
    the raw weight; ``params/<name>/bias`` (out,) if ``use_bias``;
    ``batch_stats/<name>/u`` (out,), the power-iteration vector.

    Attributes:
      features: output channels.
      kernel_size: int or (kh, kw).
      strides: int or (sh, sw).
      use_bias: add a bias after the normalised convolution.
      n_power_iterations: power iterations per training call.
      init_power_iterations: power iterations at initialisation (15, like
        ``torch.nn.utils.parametrizations.spectral_norm``).
      padding: Flax padding ("SAME", "VALID" or explicit pairs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = SpectralNormConv(4, 3)
      >>> v = layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)), train=False)
      >>> y, _ = layer.apply(v, jnp.ones((1, 5, 5, 2)), train=True, mutable=["batch_stats"])
      >>> y.shape
      (1, 5, 5, 4)
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    use_bias: bool = False
    n_power_iterations: int = 1
    init_power_iterations: int = 15
    padding: str | Sequence[tuple[int, int]] = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"SpectralNormConv: x must be NHWC, got {x.shape=}")
        kh, kw = _pair(self.kernel_size)
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
        )
        matrix, _ = as_matrix(kernel)
        update = train and not self.is_initializing()
        sigma = _power_vector(
            self, "u", matrix, self.init_power_iterations, self.n_power_iterations, update
        )
        w = kernel / jnp.maximum(sigma, 1e-12)
        y = jax.lax.conv_general_dilated(
            x, w.astype(x.dtype), _pair(self.strides), self.padding, dimension_numbers=_DN
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class OrthogonalDense(nn.Module):
    """Dense layer with an orthogonal weight ``W = exp(A - A^T)`` (Eq. 13).

    The param ``kernel`` is the raw square ``A`` of size ``n = max(in, out)``
    (N(0, 1/n) init); the weight applied as ``y = x W`` is the top-left ``(in, out)`` block of
    ``exp(A - A^T)``. Hence ``W W^T = I_in`` when ``in <= out`` and ``W^T W = I_out`` when
    ``in >= out`` (the paper's ``(out, in)`` weight is ``W^T``).

    Variables: ``params/<name>/kernel`` (n, n); ``params/<name>/bias`` (out,) if ``use_bias``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = OrthogonalDense(3)
      >>> v = layer.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
      >>> y = layer.apply(v, jnp.eye(3), train=False)
      >>> bool(jnp.allclose(y @ y.T, jnp.eye(3), atol=1e-5))
      True
    """

    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        n_in = x.shape[-1]
        n = max(n_in, self.features)
        a = self.param("kernel", nn.initializers.normal(stddev=1.0 / math.sqrt(n)), (n, n))
        w = skew_symmetric_expm(a)[:n_in, : self.features]
        y = x @ w.astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


def conv_transpose_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO kernel of the adjoint of a stride-1 "SAME" convolution (odd kernel sizes).

    Swaps the in/out channel axes and flips both spatial axes.

    Example:
      >>> import jax.numpy as jnp
      >>> conv_transpose_kernel(jnp.zeros((3, 3, 2, 5))).shape
      (3, 3, 5, 2)
    """
    return jnp.swapaxes(jnp.flip(kernel, axis=(0, 1)), 2, 3)


def fantastic_four_matrices(kernel: jax.Array) -> tuple[jax.Array, ...]:
    """The four reshapes R1..R4 of an HWIO kernel whose spectral norms bound the conv's.

    ``||conv||_2 <= sqrt(kh*kw) * min_i ||R_i||_2`` (Singla & Feizi, Fantastic Four), with
    ``R1 = (out*kh, in*kw)``, ``R2 = (out*kw, in*kh)``, ``R3 = (out, in*kh*kw)``,
    ``R4 = (out*kh*kw, in)``.

    Example:
      >>> import jax.numpy as jnp
      >>> [r.shape for r in fantastic_four_matrices(jnp.zeros((3, 3, 2, 5)))]
      [(15, 6), (15, 6), (5, 18), (45, 2)]
    """
    kh, kw, ci, co = kernel.shape
    return (
        jnp.transpose(kernel, (3, 0, 2, 1)).reshape(co * kh, ci * kw),
        jnp.transpose(kernel, (3, 1, 2, 0)).reshape(co * kw, ci * kh),
        jnp.transpose(kernel, (3, 2, 0, 1)).reshape(co, ci * kh * kw),
        jnp.transpose(kernel, (3, 0, 1, 2)).reshape(co * kh * kw, ci),
    )


class SkewOrthogonalConv(nn.Module):
    """Skew Orthogonal Convolution (SOC): ``y = exp(L) x`` for a skew-symmetric conv ``L``.

    Follows docs/weight_treatments.md (the reference's OW for conv layers, Eq. 13's
    convolutional analogue): param ``P`` of shape ``(kh, kw, c, c)`` HWIO with
    ``c = max(in, out)``, N(0, 1/c) init; ``L = (P - P^T)/2`` where ``P^T`` is
    :func:`conv_transpose_kernel` (so the stride-1 "SAME" conv with ``L`` is exactly a
    skew-symmetric operator); ``L`` is scaled by ``correction / bound`` where
    ``bound = sqrt(kh*kw) * min_i sigma(R_i)`` is the Fantastic-Four spectral bound, each
    ``sigma(R_i)`` estimated by power iteration (``init_power_iterations`` at
    initialisation, ``power_iterations`` per training call; the reference also re-runs 50
    iterations every 200 steps, which we leave out). The power estimate approaches each
    ``||R_i||`` from below; ``correction`` (0.7 for k > 1, 1.0 for 1x1) absorbs that and the
    looseness of the bound. The input is zero-padded to ``c`` channels,
    ``y = sum_{i=0..T} L^i x / i!`` with ``T = train_terms`` if ``train`` else
    ``eval_terms``, and the first ``out`` channels are returned. The map is orthogonal up to
    the Taylor truncation error (about ``||L||^(T+1)/(T+1)!``): norm-preserving when
    ``out >= in``.

    Variables: ``params/<name>/kernel`` (kh, kw, c, c) the raw ``P``;
    ``batch_stats/<name>/u1`` .. ``u4`` the power-iteration vectors of R1..R4
    (sizes c*kw, c*kh, c*kh*kw, c).

    Attributes:
      features: output channels.
      kernel_size: odd (kh, kw).
      train_terms: Taylor terms T in training.
      eval_terms: Taylor terms T in evaluation.
      correction: scale of the normalised ``L`` (None: 0.7, or 1.0 for a 1x1 kernel).
      strides: must be 1.
      power_iterations: power iterations per training call.
      init_power_iterations: power iterations at initialisation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = SkewOrthogonalConv(4)
      >>> x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))
      >>> v = layer.init(jax.random.key(0), x, train=False)
      >>> y = layer.apply(v, x, train=False)
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-4))
      True
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    train_terms: int = 5
    eval_terms: int = 10
    correction: float | None = None
    strides: int | Sequence[int] = 1
    power_iterations: int = 1
    init_power_iterations: int = 50

    def _scaled_skew_kernel(self, c: int, update: bool) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        p = self.param("kernel", nn.initializers.normal(stddev=1.0 / math.sqrt(c)), (kh, kw, c, c))
        skew = 0.5 * (p - conv_transpose_kernel(p))
        sigmas = [
            _power_vector(
                self, f"u{i + 1}", r, self.init_power_iterations, self.power_iterations, update
            )
            for i, r in enumerate(fantastic_four_matrices(skew))
        ]
        bound = math.sqrt(kh * kw) * jnp.min(jnp.stack(sigmas))
        correction = self.correction
        if correction is None:
            correction = 1.0 if kh * kw == 1 else 0.7
        return correction * skew / jnp.maximum(bound, 1e-12)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        if x.ndim != 4:
            raise ValueError(f"SkewOrthogonalConv: x must be NHWC, got {x.shape=}")
        if _pair(self.strides) != (1, 1):
            raise ValueError(
                f"SkewOrthogonalConv: only stride 1 is supported, got {self.strides=}"
            )
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"SkewOrthogonalConv: kernel_size must be odd, got {self.kernel_size=}"
            )
        n_in = x.shape[-1]
        c = max(n_in, self.features)
        kernel = self._scaled_skew_kernel(c, train and not self.is_initializing())
        kernel = kernel.astype(x.dtype)
        if c > n_in:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, c - n_in)))
        terms = self.train_terms if train else self.eval_terms
        y, z = x, x
        for i in range(1, terms + 1):
            z = jax.lax.conv_general_dilated(z, kernel, (1, 1), "SAME", dimension_numbers=_DN) / i
            y = y + z
        return y[..., : self.features]

"""Pre-SVD weight treatments (paper Sec. 4.2, docs/weight_treatments.md): math and Linen layers.

Pure functions (shared with the NNX layers of ``svdcond_jax.nnx``):

* :func:`power_iteration` / :func:`spectral_normalize`: ``W / sigma_max(W)`` (Eq. 11), power
  iteration as in Miyato et al.; safe at ``W = 0``.
* :func:`orthogonal_dense_weight`: ``exp(A - A^T)`` (Eq. 13), sliced to ``(in, out)``.
* :func:`skew_symmetric_kernel`, :func:`soc_kernel`, :func:`soc_series`: the Skew
  Orthogonal Convolution (Singla & Feizi 2021), the convolutional form of Eq. 13 that the
  paper's code uses for conv Pre-SVD layers.

Flax Linen layers: :class:`SpectralNormConv`, :class:`OrthogonalDense`,
:class:`SkewOrthogonalConv`. They follow ``flax.linen.SpectralNorm``: power-iteration vectors
live in ``"batch_stats"`` and are updated when called with ``update_stats=True`` (pass
``mutable=["batch_stats"]``). The trainable weight is always the param ``"kernel"``: the raw,
unconstrained parameter, which is what NOG/OLR act on (docs/nog_olr.md).

References:
  Miyato et al., Spectral Normalization for Generative Adversarial Networks
  <https://arxiv.org/abs/1802.05957>, 2018.
  Singla & Feizi, Skew Orthogonal Convolutions <https://arxiv.org/abs/2105.11417>, 2021.
  Singla & Feizi, Fantastic Four: Differentiable Bounds on Singular Values of Convolution
  Layers <https://arxiv.org/abs/1911.10258>, 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax.nn import _checks
from svdcond_jax.orthogonal import as_matrix, skew_symmetric_expm

__all__ = [
    "SOC_NORMALIZATIONS",
    "OrthogonalDense",
    "SkewOrthogonalConv",
    "SpectralNormConv",
    "conv_transpose_kernel",
    "default_soc_correction",
    "fantastic_four_matrices",
    "orthogonal_dense_weight",
    "power_iteration",
    "skew_symmetric_kernel",
    "soc_kernel",
    "soc_series",
    "spectral_normalize",
]

Array = jax.Array
Initializer = Callable[..., Array]

SOC_NORMALIZATIONS = ("reference", "fantastic_four")

_DN = ("NHWC", "HWIO", "NHWC")
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------ power iteration


def _norm(v: Array) -> Array:
    """||v||_2, overflow-safe, with gradient 0 (not NaN) at v = 0; NaN/inf give NaN."""
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(v)))  # exact: ||v|| is 1-homogeneous
    zero = scale == 0
    safe = jnp.where(zero, jnp.ones_like(scale), scale)
    squares = jnp.sum(jnp.square(v / safe))  # >= 1 unless v = 0 (or NaN)
    root = jnp.sqrt(jnp.where(zero, jnp.ones_like(squares), squares))  # no 0 * inf gradient
    return jnp.where(zero, jnp.zeros_like(scale), safe * root)


def _normalize_or(v: Array, fallback: Array) -> Array:
    """v / ||v||, or ``fallback`` where v = 0 (a zero vector would never recover)."""
    n = _norm(v)
    return jnp.where(n == 0, fallback, v / jnp.where(n == 0, jnp.ones_like(n), n))


def _start_vector(n: int, dtype: Any) -> Array:
    """Fixed, generic unit vector (no RNG: random kernels dominate compile time on CPU).

    Entries are the fractional parts of i * golden ratio shifted to [-0.5, 0.5): no structure
    that could make it orthogonal to a top singular vector except on a measure-zero set.
    """
    i = jnp.arange(1, n + 1, dtype=jnp.float32)
    v = (jnp.mod(i * 0.6180339887, 1.0) - 0.5).astype(dtype)
    return v / jnp.linalg.norm(v)


def _power_step(_: int, carry: tuple[Array, Array, Array, Array]) -> tuple[Array, ...]:
    m, u, start_u, start_v = carry
    v = _normalize_or(jnp.matmul(m, u, precision=_HIGHEST), start_v)
    return m, _normalize_or(jnp.matmul(m.T, v, precision=_HIGHEST), start_u), start_u, start_v


def power_iteration(
    matrix: Array, u: Array | None, num_iters: int
) -> tuple[Array, Array]:
    """Power iteration for the largest singular value of ``matrix`` (Miyato et al.).

    ``num_iters`` times: ``v = normalize(M u)``, ``u = normalize(M^T v)``. The returned
    ``sigma = ||M sg(u)||`` is differentiable in ``M`` with ``d sigma / dM = v u^T`` (the
    vector is held constant, as in Miyato et al.) and approaches ``sigma_max(M)`` from below.

    Safe at ``M = 0``: sigma is 0 with a zero (not NaN) gradient, and a vector that ``M``
    maps to 0 restarts from a fixed generic vector instead of staying 0 forever. A NaN or
    inf in ``M`` gives a NaN sigma (and NaN vectors).

    Args:
      matrix: ``(rows, cols)``.
      u: ``(cols,)`` right singular vector estimate; None starts from a fixed generic unit
        vector.
      num_iters: iterations (0 evaluates sigma with the given ``u``).

    Returns:
      ``(u, sigma)``: the updated unit vector (gradient stopped) and the estimate.

    Raises:
      ValueError: if ``matrix`` is not 2-D, ``u`` has the wrong shape or ``num_iters < 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> _, s = power_iteration(jnp.diag(jnp.array([3.0, 1.0])), None, 20)
      >>> round(float(s), 4)
      3.0
      >>> power_iteration(jnp.zeros((2, 2)), None, 3)[1].tolist()
      0.0
    """
    where = "power_iteration"
    if jnp.ndim(matrix) != 2:
        raise ValueError(f"{where}: matrix must be 2-D; got matrix.shape={jnp.shape(matrix)}")
    num_iters = _checks.check_int(where, "num_iters", num_iters, 0)
    rows, cols = matrix.shape
    start_u = _start_vector(cols, matrix.dtype)
    if u is None:
        u = start_u
    elif jnp.shape(u) != (cols,):
        raise ValueError(f"{where}: u must have shape ({cols},); got u.shape={jnp.shape(u)}")
    u = jax.lax.stop_gradient(jnp.asarray(u, matrix.dtype))
    if num_iters > 0:
        m = jax.lax.stop_gradient(matrix)
        # Module-level body: eager calls hit jax's trace cache instead of recompiling.
        carry = (m, u, start_u, _start_vector(rows, matrix.dtype))
        u = jax.lax.fori_loop(0, num_iters, _power_step, carry)[1]
    return u, _norm(jnp.matmul(matrix, u, precision=_HIGHEST))


def _safe_divide(a: Array, sigma: Array) -> Array:
    """a / sigma, and a itself where sigma = 0 (then a = 0 too: identity gradient)."""
    return a / jnp.where(sigma == 0, jnp.ones_like(sigma), sigma)


def spectral_normalize(
    kernel: Array, u: Array | None, num_iters: int
) -> tuple[Array, Array, Array]:
    """Spectral normalisation ``W / sigma_max(W)`` (Eq. 11) of a dense or conv kernel.

    ``sigma_max`` is that of the kernel reshaped to ``(prod(shape[:-1]), out)`` (HWIO conv:
    ``(kh*kw*in, out)``, the reference's ``(out, in*kh*kw)`` transposed, as in Miyato et al.),
    estimated by :func:`power_iteration`. A zero kernel stays zero with an identity
    gradient (finite, so SGD can leave 0); NaN/inf in the kernel give NaN.

    Args:
      kernel: array with ``ndim >= 2``.
      u: ``(out,)`` power-iteration vector, or None for the fixed start vector.
      num_iters: power iterations to run first.

    Returns:
      ``(normalised kernel, updated u, sigma)``.

    Raises:
      ValueError: if ``kernel.ndim < 2`` or ``num_iters < 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> w, u, sigma = spectral_normalize(jnp.diag(jnp.array([4.0, 2.0])), None, 30)
      >>> w.round(4).tolist(), round(float(sigma), 4)
      ([[1.0, 0.0], [0.0, 0.5]], 4.0)
    """
    matrix, _ = as_matrix(kernel)
    u, sigma = power_iteration(matrix, u, num_iters)
    return _safe_divide(kernel, sigma), u, sigma


# ------------------------------------------------------------------------ orthogonal dense


def orthogonal_dense_weight(a: Array, in_features: int, out_features: int) -> Array:
    """The ``(in, out)`` top-left block of the orthogonal ``exp(A - A^T)`` (Eq. 13).

    ``W W^T = I_in`` when ``in <= out`` and ``W^T W = I_out`` when ``in >= out``.

    Args:
      a: ``(n, n)`` raw parameter with ``n >= max(in_features, out_features)``.
      in_features: rows of the block.
      out_features: columns of the block.

    Returns:
      ``(in_features, out_features)`` weight applied as ``y = x W``.

    Raises:
      ValueError: if ``a`` is not square or smaller than the block.

    Example:
      >>> import jax.numpy as jnp
      >>> w = orthogonal_dense_weight(jnp.triu(jnp.ones((3, 3))), 2, 3)
      >>> bool(jnp.allclose(w @ w.T, jnp.eye(2), atol=1e-5))
      True
    """
    shape = jnp.shape(a)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < max(in_features, out_features):
        raise ValueError(f"orthogonal_dense_weight: a must be square (n, n) with n >= "
                         f"max({in_features=}, {out_features=}); got a.shape={shape}")
    return skew_symmetric_expm(a)[:in_features, :out_features]


# ------------------------------------------------------------------------ SOC


def conv_transpose_kernel(kernel: Array) -> Array:
    """HWIO kernel of the adjoint of a stride-1 "SAME" convolution (odd kernel sizes).

    Swaps the in/out channel axes and flips both spatial axes.

    Args:
      kernel: ``(kh, kw, in, out)``.

    Returns:
      ``(kh, kw, out, in)``.

    Example:
      >>> import jax.numpy as jnp
      >>> conv_transpose_kernel(jnp.zeros((3, 3, 2, 5))).shape
      (3, 3, 5, 2)
    """
    return jnp.swapaxes(jnp.flip(kernel, axis=(0, 1)), 2, 3)


def skew_symmetric_kernel(p: Array) -> Array:
    """``L = (P - P^T) / 2`` with ``P^T`` = :func:`conv_transpose_kernel` (a skew operator).

    The stride-1 "SAME" convolution with ``L`` is a skew-symmetric linear map for any square
    HWIO ``P`` with odd spatial size, so ``exp(L)`` is orthogonal.

    Args:
      p: ``(kh, kw, c, c)``.

    Returns:
      ``(kh, kw, c, c)``.

    Example:
      >>> import jax.numpy as jnp
      >>> skew_symmetric_kernel(jnp.ones((1, 1, 2, 2))).tolist()
      [[[[0.0, 0.0], [0.0, 0.0]]]]
    """
    return 0.5 * (p - conv_transpose_kernel(p))


def fantastic_four_matrices(kernel: Array) -> tuple[Array, ...]:
    """The four reshapes R1..R4 of an HWIO kernel whose spectral norms bound the conv's.

    ``||conv||_2 <= sqrt(kh*kw) * min_i ||R_i||_2`` (Singla & Feizi, Fantastic Four), with
    ``R1 = (out*kh, in*kw)``, ``R2 = (out*kw, in*kh)``, ``R3 = (out, in*kh*kw)``,
    ``R4 = (out*kh*kw, in)`` (the reference's layouts for its ``(out, in, kh, kw)`` filter).

    Args:
      kernel: ``(kh, kw, in, out)``.

    Returns:
      ``(R1, R2, R3, R4)``.

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


def default_soc_correction(kernel_size: tuple[int, int]) -> float:
    """The reference's correction of the normalised SOC filter: 0.7, or 1.0 for 1x1.

    Args:
      kernel_size: (kh, kw).

    Returns:
      The default ``correction`` of :func:`soc_kernel`.

    Example:
      >>> default_soc_correction((3, 3)), default_soc_correction((1, 1))
      (0.7, 1.0)
    """
    return 1.0 if kernel_size[0] * kernel_size[1] == 1 else 0.7


def soc_kernel(
    p: Array,
    us: Sequence[Array | None] | None,
    num_iters: int,
    *,
    normalization: str = "reference",
    correction: float | None = None,
) -> tuple[Array, tuple[Array, ...]]:
    """The scaled skew-symmetric SOC filter ``correction * L / bound``.

    ``L`` = :func:`skew_symmetric_kernel` of ``P``; ``s = min_i sigma(R_i)`` over the
    :func:`fantastic_four_matrices` of ``L``, each estimated by :func:`power_iteration`
    (``num_iters`` iterations on the given vectors). ``bound`` is

    * ``"reference"`` (default): ``s``, as the paper's code (and Singla & Feizi's). For
      kernels larger than 1x1 it is *not* an upper bound of the operator norm ``||L||``;
    * ``"fantastic_four"``: ``sqrt(kh*kw) * s``, the strict Fantastic-Four upper bound (up to
      the power estimate approaching each ``sigma(R_i)`` from below).

    ``correction`` defaults to :func:`default_soc_correction` (0.7; 1.0 for 1x1). A filter
    whose skew part is 0 gives the zero filter (so ``exp(L) = I``) with a finite gradient.

    Args:
      p: ``(kh, kw, c, c)`` raw parameter.
      us: the four power-iteration vectors (sizes ``c*kw, c*kh, c*kh*kw, c``); None (or None
        entries) for the fixed start vector.
      num_iters: power iterations to run first.
      normalization: "reference" or "fantastic_four".
      correction: scale of the normalised filter; None for the default.

    Returns:
      ``(kernel, us)``: the ``(kh, kw, c, c)`` filter and the four updated vectors.

    Raises:
      ValueError: on a non-square or even-sized ``p``, a bad ``normalization`` or
        ``correction``, or ``num_iters < 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = jnp.zeros((1, 1, 2, 2)).at[0, 0, 0, 1].set(2.0)  # L = [[0, 1], [-1, 0]]
      >>> kernel, _ = soc_kernel(p, None, 10)
      >>> kernel[0, 0].round(4).tolist()
      [[0.0, 1.0], [-1.0, 0.0]]
    """
    where = "soc_kernel"
    shape = jnp.shape(p)
    if len(shape) != 4 or shape[2] != shape[3] or shape[0] % 2 == 0 or shape[1] % 2 == 0:
        raise ValueError(f"{where}: p must be (kh, kw, c, c) with odd kh, kw; "
                         f"got p.shape={shape}")
    _checks.check_choice(where, "normalization", normalization, SOC_NORMALIZATIONS)
    kh, kw = shape[:2]
    if correction is None:
        correction = default_soc_correction((kh, kw))
    correction = _checks.check_real(where, "correction", correction, low=0.0, low_open=True)
    skew = skew_symmetric_kernel(p)
    if us is None:
        us = (None,) * 4
    results = [power_iteration(r, u, num_iters)
               for r, u in zip(fantastic_four_matrices(skew), us, strict=True)]
    sigma = jnp.min(jnp.stack([s for _, s in results]))
    bound = sigma if normalization == "reference" else math.sqrt(kh * kw) * sigma
    return correction * _safe_divide(skew, bound), tuple(u for u, _ in results)


def soc_series(x: Array, kernel: Array, terms: int, features: int) -> Array:
    """Truncated exponential ``sum_{i=0..T} L^i x / i!`` of the stride-1 "SAME" conv ``L``.

    ``x`` is zero-padded to the filter's ``c`` channels and the first ``features`` output
    channels are returned. For a skew ``L`` the map is orthogonal up to the truncation error
    (about ``||L||^(T+1) / (T+1)!``): norm-preserving when ``features >= in``.

    Args:
      x: ``(N, H, W, in)`` with ``in <= c``.
      kernel: ``(kh, kw, c, c)`` filter (e.g. from :func:`soc_kernel`).
      terms: T >= 0.
      features: output channels, ``<= c``.

    Returns:
      ``(N, H, W, features)`` in the dtype of ``x`` and ``kernel`` promoted.

    Raises:
      ValueError: if ``x`` has more channels than the filter, ``features > c`` or
        ``terms < 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> soc_series(jnp.ones((1, 2, 2, 1)), jnp.zeros((3, 3, 2, 2)), 5, 2)[0, 0, 0].tolist()
      [1.0, 0.0]
    """
    where = "soc_series"
    c = jnp.shape(kernel)[-1]
    n_in = jnp.shape(x)[-1]
    terms = _checks.check_int(where, "terms", terms, 0)
    if n_in > c or features > c:
        raise ValueError(f"{where}: the filter has c={c} channels; got x.shape="
                         f"{jnp.shape(x)} and features={features}")
    if c > n_in:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, c - n_in)))
    y = z = x
    for i in range(1, terms + 1):
        z = jax.lax.conv_general_dilated(z, kernel, (1, 1), "SAME", dimension_numbers=_DN,
                                         precision=_HIGHEST) / i
        y = y + z
    return y[..., :features]


# ------------------------------------------------------------------------ attribute checks


def _check_spectral_norm_conv(where: str, *, features: Any, kernel_size: Any, strides: Any,
                             padding: Any, n_power_iterations: Any, init_power_iterations: Any,
                             dtype: Any, param_dtype: Any) -> None:
    """Static arguments of the spectral-norm conv (Linen and NNX)."""
    _checks.check_int(where, "features", features, 1)
    _checks.check_pair(where, "kernel_size", kernel_size)
    _checks.check_pair(where, "strides", strides)
    _checks.check_padding(where, padding)
    _checks.check_int(where, "n_power_iterations", n_power_iterations, 0)
    _checks.check_int(where, "init_power_iterations", init_power_iterations, 0)
    _checks.check_dtype(where, "dtype", dtype)
    _checks.check_dtype(where, "param_dtype", param_dtype, optional=False)


def _check_skew_orthogonal_conv(where: str, *, features: Any, kernel_size: Any, train_terms: Any,
                               eval_terms: Any, correction: Any, power_iterations: Any,
                               init_power_iterations: Any, normalization: Any, dtype: Any,
                               param_dtype: Any) -> None:
    """Static arguments of the skew orthogonal conv (Linen and NNX)."""
    _checks.check_int(where, "features", features, 1)
    _checks.check_pair(where, "kernel_size", kernel_size, odd=True)
    _checks.check_int(where, "train_terms", train_terms, 1)
    _checks.check_int(where, "eval_terms", eval_terms, 1)
    if correction is not None:
        _checks.check_real(where, "correction", correction, low=0.0, low_open=True)
    _checks.check_int(where, "power_iterations", power_iterations, 0)
    _checks.check_int(where, "init_power_iterations", init_power_iterations, 0)
    _checks.check_choice(where, "normalization", normalization, SOC_NORMALIZATIONS)
    _checks.check_dtype(where, "dtype", dtype)
    _checks.check_dtype(where, "param_dtype", param_dtype, optional=False)


def _check_orthogonal_dense(where: str, *, features: Any, dtype: Any, param_dtype: Any) -> None:
    """Static arguments of the orthogonal dense layer (Linen and NNX)."""
    _checks.check_int(where, "features", features, 1)
    _checks.check_dtype(where, "dtype", dtype)
    _checks.check_dtype(where, "param_dtype", param_dtype, optional=False)


def _stats_dtype(param_dtype: Any) -> Any:
    """dtype of stored power-iteration vectors: float32, or float64 for float64 params."""
    return _checks.compute_dtype(param_dtype)


# ------------------------------------------------------------------------ Linen layers


class SpectralNormConv(nn.Module):
    """Convolution with a spectrally normalised kernel ``W / sigma_max(W)`` (Eq. 11).

    ``sigma_max`` is the largest singular value of the kernel reshaped to
    ``(kh*kw*in, out)`` (:func:`spectral_normalize`), estimated by power iteration:
    ``init_power_iterations`` at initialisation, then ``n_power_iterations`` per call with
    ``update_stats=True`` (the vector is frozen otherwise), like ``flax.linen.SpectralNorm``.
    A zero kernel gives a zero output with finite gradients (SGD can leave 0).

    Variables (for a module named ``name``): ``params/<name>/kernel`` (kh, kw, in, out) HWIO,
    the raw weight; ``params/<name>/bias`` (out,) if ``use_bias``;
    ``batch_stats/<name>/u`` (out,), the power-iteration vector (float32).

    bfloat16/float16 inputs are computed in float32 and returned in their dtype (or
    ``dtype``). A NaN/inf in the kernel gives NaN everywhere; NaN inputs propagate.

    Attributes:
      features: output channels (>= 1).
      kernel_size: int or (kh, kw), each >= 1.
      strides: int or (sh, sw), each >= 1.
      use_bias: add a bias after the normalised convolution.
      n_power_iterations: power iterations per ``update_stats=True`` call (>= 0).
      init_power_iterations: power iterations at initialisation (15, like
        ``torch.nn.utils.parametrizations.spectral_norm``).
      padding: "SAME", "VALID", "SAME_LOWER" or two (low, high) pairs.
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of kernel and bias.
      kernel_init: initializer of the raw kernel.
      bias_init: initializer of the bias.

    Raises:
      TypeError / ValueError: at construction for a bad attribute (naming it); at call
        time for a non-floating or non-NHWC ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = SpectralNormConv(4, 3)
      >>> x = jnp.ones((1, 5, 5, 2))
      >>> v = layer.init(jax.random.key(0), x, update_stats=False)
      >>> y, _ = layer.apply(v, x, update_stats=True, mutable=["batch_stats"])
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
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    def __post_init__(self) -> None:
        _check_spectral_norm_conv(
            type(self).__name__, features=self.features, kernel_size=self.kernel_size,
            strides=self.strides, padding=self.padding,
            n_power_iterations=self.n_power_iterations,
            init_power_iterations=self.init_power_iterations, dtype=self.dtype,
            param_dtype=self.param_dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, update_stats: bool) -> Array:
        """Convolve NHWC ``x`` with the normalised kernel.

        Args:
          x: (N, H, W, in), real floating.
          update_stats: run ``n_power_iterations`` and store the vector (needs
            ``mutable=["batch_stats"]``); False uses the stored vector as is.

        Returns:
          (N, H', W', features) in ``dtype`` (None: ``x.dtype``).
        """
        x = _checks.check_input(type(self).__name__, x, ndim=4, layout="(N, H, W, C)")
        kh, kw = _checks.pair(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        cdtype = _checks.compute_dtype(x.dtype, self.param_dtype)
        kernel = kernel.astype(cdtype)
        u_var = self.variable(
            "batch_stats", "u",
            lambda: power_iteration(as_matrix(kernel)[0], None, self.init_power_iterations)[0]
            .astype(_stats_dtype(self.param_dtype)))
        update = update_stats and not self.is_initializing()
        w, u, _ = spectral_normalize(kernel, u_var.value.astype(cdtype),
                                     self.n_power_iterations if update else 0)
        if update:
            u_var.value = u.astype(u_var.value.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(cdtype), w, _checks.pair(self.strides), self.padding,
            dimension_numbers=_DN)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,),
                               self.param_dtype).astype(cdtype)
        return y.astype(self.dtype or x.dtype)


class OrthogonalDense(nn.Module):
    """Dense layer with an orthogonal weight ``W = exp(A - A^T)`` (Eq. 13).

    The param ``kernel`` is the raw square ``A`` of size ``n = max(in, out)``
    (N(0, 1/n) init); the weight applied as ``y = x W`` is the top-left ``(in, out)`` block of
    ``exp(A - A^T)`` (:func:`orthogonal_dense_weight`). Hence ``W W^T = I_in`` when
    ``in <= out`` and ``W^T W = I_out`` when ``in >= out`` (the paper's ``(out, in)`` weight
    is ``W^T``). Called like ``flax.linen.Dense``: ``layer(x)``.

    Variables: ``params/<name>/kernel`` (n, n); ``params/<name>/bias`` (out,) if ``use_bias``.
    bfloat16/float16 inputs are computed in float32 and returned in their dtype (or
    ``dtype``); NaN propagates.

    Attributes:
      features: output features (>= 1).
      use_bias: add a bias.
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of kernel and bias.

    Raises:
      TypeError / ValueError: at construction for a bad attribute (naming it); at call
        time for a non-floating ``x`` or one without a feature axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = OrthogonalDense(3)
      >>> v = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> y = layer.apply(v, jnp.eye(3))
      >>> bool(jnp.allclose(y @ y.T, jnp.eye(3), atol=1e-5))
      True
    """

    features: int
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_orthogonal_dense(type(self).__name__, features=self.features, dtype=self.dtype,
                               param_dtype=self.param_dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``x W (+ bias)`` for ``x`` of shape (..., in); returns (..., features)."""
        x = _checks.check_input(type(self).__name__, x, min_ndim=1)
        n_in = x.shape[-1]
        n = max(n_in, self.features)
        a = self.param("kernel", nn.initializers.normal(stddev=1.0 / math.sqrt(n)), (n, n),
                       self.param_dtype)
        cdtype = _checks.compute_dtype(x.dtype, self.param_dtype)
        w = orthogonal_dense_weight(a.astype(cdtype), n_in, self.features)
        y = jnp.matmul(x.astype(cdtype), w, precision=_HIGHEST)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                               self.param_dtype).astype(cdtype)
        return y.astype(self.dtype or x.dtype)


class SkewOrthogonalConv(nn.Module):
    """Skew Orthogonal Convolution (SOC): ``y = exp(L) x`` for a skew-symmetric conv ``L``.

    The paper's OW for conv layers (Eq. 13's convolutional analogue,
    docs/weight_treatments.md). Param ``P`` of shape ``(kh, kw, c, c)`` HWIO with
    ``c = max(in, out)``, N(0, 1/c) init; ``L = (P - P^T)/2`` (:func:`skew_symmetric_kernel`)
    rescaled to ``correction * L / bound`` (:func:`soc_kernel`), where ``bound`` comes from
    the spectral norms of the four Fantastic-Four reshapes ``R_i`` of ``L``, each estimated
    by power iteration (``init_power_iterations`` at initialisation, ``power_iterations``
    per ``update_stats=True`` call; the reference also re-runs 50 iterations every 200
    steps, which we leave out). The input is zero-padded to ``c`` channels, the series
    ``sum_{i=0..T} L^i x / i!`` is applied (:func:`soc_series`) and the first ``out``
    channels are returned.

    Normalisation (``normalization``):

    * ``"reference"`` (default): ``bound = min_i sigma(R_i)``, times ``correction`` = 0.7
      (1.0 for 1x1), as the paper's code and Singla & Feizi's; the paper's OW rows were run
      with it. It is *not* an upper bound of ``||L||`` for kernels larger than 1x1
      (Fantastic Four only gives ``||L|| <= sqrt(kh*kw) min_i ||R_i||``), so ``||L/bound||``
      can exceed 1 and the 5-term series is visibly non-orthogonal.
    * ``"fantastic_four"``: ``bound = sqrt(kh*kw) min_i sigma(R_i)``, a strict upper bound (up
      to the power estimates approaching ``||R_i||`` from below); for 3x3 the filter is 3x
      smaller than the reference's and the series far more accurate. For 1x1 both agree.

    Measured ``||y|| / ||x|| - 1`` (``in = out = c``, N(0, 1/c) init,
    ``init_power_iterations=50``; 3 filters x 8 random N(0, 1) inputs of shape
    (4, 16, 16, c): median [min, max] of the 24; ``||L_n||`` is the exact operator norm of
    the normalised filter's convolution on the 16x16 map; train = the ``update_stats=True``
    call (one power iteration, 5 terms), eval = ``update_stats=False`` (10 terms); float32
    on CPU; ``python -m tests.test_orthogonal_layers`` re-measures it):

    ======  ===  ==============  =========  ==========================  ===============
    kernel  c    normalization   ||L_n||    train (5 terms)             eval (10 terms)
    ======  ===  ==============  =========  ==========================  ===============
    3x3     16   reference       1.28-1.35  +2.2e-4 [+1.9e-4, +2.4e-4]  |.| <= 1.2e-7
    3x3     16   fantastic_four  0.43-0.45  +4.7e-7 [+3.5e-7, +5.9e-7]  |.| <= 1.2e-7
    3x3     64   reference       1.25-1.28  +2.1e-4 [+2.0e-4, +2.3e-4]  |.| <= 1.2e-7
    3x3     64   fantastic_four  0.42-0.43  +4.5e-7 [+3.6e-7, +4.8e-7]  |.| <= 1.2e-7
    1x1     16   either          1.00       +1.6e-4 [+1.3e-4, +2.0e-4]  |.| <= 6e-8
    1x1     64   either          1.00       +1.2e-4 [+1.0e-4, +1.3e-4]  |.| <= 6e-8
    ======  ===  ==============  =========  ==========================  ===============

    Why: a skew ``L_n`` has eigenvalues ``i theta`` with ``|theta| <= ||L_n||``, and the
    T-term series maps them to ``T(i theta)`` with ``|T_5(i theta)|^2 - 1 = theta^6/360 -
    theta^8/960 + theta^10/14400`` and ``|T_10(i theta)|^2 - 1 = theta^12/21772800 - ...``.
    At ``theta = ||L_n||`` that is ``|T_5| - 1`` = 3.4e-3 (reference 3x3, theta 1.35),
    9.0e-4 (1x1, theta 1), 8.2e-6 (fantastic_four 3x3, theta 0.43), and ``|T_10| - 1`` =
    6.4e-7, 2.0e-8, 9e-13: the worst-case gain of a training call, which random inputs
    (spread over the spectrum) see only in part. So with the reference's normalisation a
    training call slightly expands (about 2e-4 on random inputs, up to 3.4e-3 for the worst
    input), while evaluation is orthogonal to round-off for either normalisation.

    Call convention (``flax.linen.SpectralNorm``'s, plus the reference's train/eval series
    lengths): ``update_stats=True`` is a training call (power-iteration update,
    ``train_terms``), ``update_stats=False`` an evaluation call (frozen vectors,
    ``eval_terms``), as the reference ties both to ``module.training``.

    Variables: ``params/<name>/kernel`` (kh, kw, c, c) the raw ``P``;
    ``batch_stats/<name>/u1`` .. ``u4`` the power-iteration vectors of R1..R4
    (sizes c*kw, c*kh, c*kh*kw, c; float32). A ``P`` with zero skew part gives the identity
    map (zero-padded / sliced) with finite gradients. bfloat16/float16 inputs are computed
    in float32 and returned in their dtype (or ``dtype``); NaN/inf in ``P`` give NaN.

    Attributes:
      features: output channels (>= 1).
      kernel_size: odd (kh, kw) (or an odd int).
      train_terms: Taylor terms T of a training call (>= 1).
      eval_terms: Taylor terms T of an evaluation call (>= 1).
      correction: scale of the normalised ``L`` (None: 0.7, or 1.0 for a 1x1 kernel).
      strides: must be 1.
      power_iterations: power iterations per ``update_stats=True`` call.
      init_power_iterations: power iterations at initialisation.
      normalization: "reference" (default) or "fantastic_four".
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of ``P``.

    Raises:
      TypeError / ValueError: at construction for a bad attribute (naming it), including
        an even kernel size and a stride other than 1; at call time for a non-floating or
        non-NHWC ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = SkewOrthogonalConv(4)
      >>> x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))
      >>> v = layer.init(jax.random.key(0), x, update_stats=False)
      >>> y = layer.apply(v, x, update_stats=False)
      >>> bool(jnp.allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-4))
      True
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    train_terms: int = 5
    eval_terms: int = 10
    correction: float | None = None
    strides: int | Sequence[int] = 1
    power_iterations: int = 1
    init_power_iterations: int = 50
    normalization: str = "reference"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        where = type(self).__name__
        _check_skew_orthogonal_conv(
            where, features=self.features, kernel_size=self.kernel_size,
            train_terms=self.train_terms, eval_terms=self.eval_terms,
            correction=self.correction, power_iterations=self.power_iterations,
            init_power_iterations=self.init_power_iterations,
            normalization=self.normalization, dtype=self.dtype, param_dtype=self.param_dtype)
        if _checks.check_pair(where, "strides", self.strides) != (1, 1):
            raise ValueError(f"{where}: only stride 1 is supported; got strides={self.strides!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, *, update_stats: bool) -> Array:
        """Apply ``exp(L)`` (truncated) to NHWC ``x``.

        Args:
          x: (N, H, W, in), real floating.
          update_stats: True for a training call (update the power-iteration vectors, which
            needs ``mutable=["batch_stats"]``, and use ``train_terms``); False for an
            evaluation call (stored vectors, ``eval_terms``).

        Returns:
          (N, H, W, features) in ``dtype`` (None: ``x.dtype``).
        """
        x = _checks.check_input(type(self).__name__, x, ndim=4, layout="(N, H, W, C)")
        kh, kw = _checks.pair(self.kernel_size)
        c = max(x.shape[-1], self.features)
        p = self.param("kernel", nn.initializers.normal(stddev=1.0 / math.sqrt(c)),
                       (kh, kw, c, c), self.param_dtype)
        cdtype = _checks.compute_dtype(x.dtype, self.param_dtype)
        p = p.astype(cdtype)
        matrices = fantastic_four_matrices(skew_symmetric_kernel(p))
        u_vars = [
            self.variable("batch_stats", f"u{i + 1}",
                          lambda r=r: power_iteration(r, None, self.init_power_iterations)[0]
                          .astype(_stats_dtype(self.param_dtype)))
            for i, r in enumerate(matrices)
        ]
        update = update_stats and not self.is_initializing()
        kernel, us = soc_kernel(p, [v.value.astype(cdtype) for v in u_vars],
                                self.power_iterations if update else 0,
                                normalization=self.normalization, correction=self.correction)
        if update:
            for var, u in zip(u_vars, us, strict=True):
                var.value = u.astype(var.value.dtype)
        terms = self.train_terms if update_stats else self.eval_terms
        y = soc_series(x.astype(cdtype), kernel, terms, self.features)
        return y.astype(self.dtype or x.dtype)

"""The one place where the Flax layers compute a covariance (Eq. 2).

Every covariance of ``svdcond_jax.nn`` and ``svdcond_jax.nnx`` goes through
:func:`covariance`, so a change of ``meta_layer.covariance``'s signature is a one-line
change here.
"""

from __future__ import annotations

import jax

from svdcond_jax import meta_layer


def covariance(x: jax.Array, *, eps: float = 0.0) -> jax.Array:
    """Centred covariance ``X J X^T + eps I`` (Eq. 2) of features laid out (..., d, N).

    Args:
      x: (..., d, N): d features, N samples.
      eps: added to the diagonal.

    Returns:
      (..., d, d) covariance in ``x``'s dtype, float32 for bfloat16/float16 ``x``
      (``meta_layer.covariance``).
    """
    return meta_layer.covariance(x, layout="features_first", eps=eps)

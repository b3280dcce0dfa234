"""svdcond_jax: covariance conditioning of the SVD meta-layer by orthogonality.

JAX/Flax/optax implementation of Song et al., "Improving Covariance Conditioning of the
SVD Meta-layer by Orthogonality", ECCV 2022. This module only re-exports the public API.
"""

__version__ = "0.1.0"

# --- meta-layer (issue: foundation) -------------------------------------------------
# (meta-layer exports)

# --- NOG / OLR / weight treatments --------------------------------------------------
# (orthogonality exports)

# --- Flax modules and models --------------------------------------------------------
# (model exports)

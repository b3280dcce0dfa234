"""Matrix square-root solvers behind :mod:`svdcond_jax.meta_layer` (docs/meta_layer.md).

Each solver module exposes ``matrix_functions(p, *, want_sqrt, want_inv, **options)`` that
returns ``(sqrt_or_None, inv_sqrt_or_None)`` for a symmetrised float32/float64 batch ``p``.
Validation, dtype handling and the public API live in :mod:`svdcond_jax.meta_layer`.
"""

"""Tests for the Pre-SVD weight treatments: SN (Eq. 11), OW dense (Eq. 13), SOC.

``python -m tests.test_orthogonal_layers`` re-measures the agreement with the reference SOC
and the ||y||/||x|| - 1 table of the ``SkewOrthogonalConv`` docstring
(docs/weight_treatments.md).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax.nn.orthogonal_layers import (
    OrthogonalDense,
    SkewOrthogonalConv,
    SpectralNormConv,
    conv_transpose_kernel,
    fantastic_four_matrices,
    power_iteration,
    soc_kernel,
    spectral_normalize,
)

KEY = jax.random.key(0)
_DN = ("NHWC", "HWIO", "NHWC")


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _init(layer, x):
    # Eager on purpose: per-primitive compiles are cached across tests with equal shapes,
    # while a jitted init recompiles the (slow to compile) random kernels every time.
    return layer.init(KEY, x, update_stats=False)


# ------------------------------------------------------- float64 NumPy reference SOC
# A re-implementation of the authors' skew_conv (https://github.com/KingJamesSong/
# OrthoImproveCond, "Decorrelated BN/models/skew_symmetric_conv.py" and utils_conv.py) in
# float64 NumPy, torch layouts: NCHW input, (out, in, kh, kw) filter, cross-correlation.


def _ref_l2_normalize(t):
    return t / max(float(np.sqrt(np.sum(t * t))), 1e-12)


def _ref_transpose_filter(f):
    return np.flip(np.swapaxes(f, 0, 1), (2, 3))


def _ref_fantastic_four(f, num_iters, rng):
    """The reference's power iteration on the four reshapes; returns vectors and sigmas."""
    o, i, h, w = f.shape
    n = lambda *shape: _ref_l2_normalize(rng.standard_normal(shape))
    u1, v1, u2, v2 = n(1, i, 1, w), n(o, 1, h, 1), n(1, i, h, 1), n(o, 1, 1, w)
    u3, v3, u4, v4 = n(1, i, h, w), n(o, 1, 1, 1), n(o, 1, h, w), n(1, i, 1, 1)
    for _ in range(num_iters):
        v1 = _ref_l2_normalize((f * u1).sum((1, 3), keepdims=True))
        u1 = _ref_l2_normalize((f * v1).sum((0, 2), keepdims=True))
        v2 = _ref_l2_normalize((f * u2).sum((1, 2), keepdims=True))
        u2 = _ref_l2_normalize((f * v2).sum((0, 3), keepdims=True))
        v3 = _ref_l2_normalize((f * u3).sum((1, 2, 3), keepdims=True))
        u3 = _ref_l2_normalize((f * v3).sum(0, keepdims=True))
        v4 = _ref_l2_normalize((f * u4).sum((0, 2, 3), keepdims=True))
        u4 = _ref_l2_normalize((f * v4).sum(1, keepdims=True))
    sigmas = [np.sum(f * a * b) for a, b in ((u1, v1), (u2, v2), (u3, v3), (u4, v4))]
    # Our layout: the vector on the columns of R1..R4 (the reference's v4 for R4).
    ours = [u1.reshape(-1), u2.reshape(-1), u3.reshape(-1), v4.reshape(-1)]
    return ours, sigmas


def _ref_conv2d(x, f):
    b, _, height, width = x.shape
    kh, kw = f.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    out = np.zeros((b, f.shape[0], height, width))
    for p in range(kh):
        for q in range(kw):
            out += np.einsum("bchw,oc->bohw", xp[:, :, p:p + height, q:q + width], f[:, :, p, q])
    return out


def _ref_soc(x, weight, sigma, terms, out_channels):
    """The reference forward: correction * skew / min_i sigma_i, series, pad / slice."""
    correction = 1.0 if weight.shape[2] * weight.shape[3] == 1 else 0.7
    skew = 0.5 * (weight - _ref_transpose_filter(weight))
    filt = correction * skew / sigma
    z = x
    if out_channels > x.shape[1]:
        z = np.pad(x, ((0, 0), (0, weight.shape[0] - x.shape[1]), (0, 0), (0, 0)))
    y = z
    for i in range(1, terms + 1):
        z = _ref_conv2d(z, filt) / float(i)
        y = y + z
    return y[:, :out_channels]


def _reference_case(k, cin, cout, seed, dtype):
    """A random filter, the reference's converged vectors and sigma, and an input."""
    rng = np.random.default_rng(seed)
    c = max(cin, cout)
    weight = rng.standard_normal((c, c, k, k)) / np.sqrt(c)  # the reference's init
    weight = np.asarray(weight.astype(dtype), np.float64)  # what the float32 layer sees
    us, sigmas = _ref_fantastic_four(0.5 * (weight - _ref_transpose_filter(weight)), 2000, rng)
    x = np.asarray(rng.standard_normal((2, cin, 6, 6)).astype(dtype), np.float64)
    return weight, us, min(sigmas), x


def _our_soc(weight, us, x, cout, dtype, update_stats, **kwargs):
    layer = SkewOrthogonalConv(cout, kernel_size=weight.shape[2:], param_dtype=dtype, **kwargs)
    variables = {"params": {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0), dtype)},
                 "batch_stats": {f"u{i + 1}": jnp.asarray(u, dtype) for i, u in enumerate(us)}}
    xj = jnp.asarray(x.transpose(0, 2, 3, 1), dtype)
    y = layer.apply(variables, xj, update_stats=update_stats, mutable=["batch_stats"])[0]
    return np.asarray(y, np.float64).transpose(0, 3, 1, 2)


REFERENCE_CASES = [(3, 16, 16), (3, 3, 16), (3, 16, 8), (1, 16, 16), (5, 4, 4)]


@pytest.mark.parametrize("k,cin,cout", REFERENCE_CASES)
def test_soc_matches_the_reference_in_float64(x64, k, cin, cout):
    weight, us, sigma, x = _reference_case(k, cin, cout, seed=k * 100 + cin, dtype=np.float64)
    svd = min(np.linalg.norm(np.asarray(r), 2) for r in fantastic_four_matrices(
        jnp.asarray(0.5 * (weight - _ref_transpose_filter(weight)).transpose(2, 3, 1, 0))))
    np.testing.assert_allclose(sigma, svd, rtol=1e-13)  # the reference's vectors converged
    for update_stats, terms in ((False, 10), (True, 5)):
        expected = _ref_soc(x, weight, sigma, terms, cout)
        got = _our_soc(weight, us, x, cout, jnp.float64, update_stats)
        assert np.linalg.norm(got - expected) <= 1e-12 * np.linalg.norm(expected)


@pytest.mark.parametrize("k,cin,cout", REFERENCE_CASES[:2] + REFERENCE_CASES[3:4])
def test_soc_matches_the_reference_in_float32(k, cin, cout):
    """float32 vs the float64 reference on the same (float32-representable) filter and input.

    Each of the T convolutions sums kh*kw*c products; its relative rounding error is about
    sqrt(kh*kw*c) * 2^-24 (~7e-7 for 3x3x16), the series adds up ~e^||L|| of those, and
    sigma carries a few more ulps: 2e-5 leaves a margin of ~8x over that estimate
    (measured: 1.0e-7 to 1.6e-7).
    """
    weight, us, sigma, x = _reference_case(k, cin, cout, seed=k * 100 + cin, dtype=np.float32)
    for update_stats, terms in ((False, 10), (True, 5)):
        expected = _ref_soc(x, weight, sigma, terms, cout)
        got = _our_soc(weight, us, x, cout, jnp.float32, update_stats)
        assert np.linalg.norm(got - expected) <= 2e-5 * np.linalg.norm(expected)


def test_fantastic_four_normalisation_is_the_reference_over_sqrt_k2():
    """The strict bound divides by sqrt(kh*kw) more: correction 2.1 = the reference's 0.7."""
    weight, us, _, x = _reference_case(3, 8, 8, seed=7, dtype=np.float32)
    ref = _our_soc(weight, us, x, 8, jnp.float32, False)
    strict = _our_soc(weight, us, x, 8, jnp.float32, False, normalization="fantastic_four")
    scaled = _our_soc(weight, us, x, 8, jnp.float32, False, normalization="fantastic_four",
                      correction=2.1)
    np.testing.assert_allclose(scaled, ref, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(strict - ref) > 0.1 * np.linalg.norm(ref)  # not a round-off effect


# ------------------------------------------------------- SOC norm preservation (the table)


def _operator_norm(kernel, size=16, num_iters=300):
    """Exact ||conv_L|| of a stride-1 SAME conv on a size x size map (power iteration)."""
    conv = lambda z, k: jax.lax.conv_general_dilated(z, k, (1, 1), "SAME", dimension_numbers=_DN,
                                                     precision="highest")
    adjoint = conv_transpose_kernel(kernel)

    def body(_, z):
        z = conv(conv(z, kernel), adjoint)
        return z / jnp.linalg.norm(z)

    z = jax.random.normal(jax.random.key(5), (1, size, size, kernel.shape[-1]))
    z = jax.lax.fori_loop(0, num_iters, body, z / jnp.linalg.norm(z))
    return float(jnp.linalg.norm(conv(z, kernel)))


def measure_norm_ratios(k, c, normalization, filters=3, inputs=8):
    """||y||/||x|| - 1 of random N(0, 1) inputs (4, 16, 16, c), and ||L_n|| per filter.

    Train: the call with ``update_stats=True`` (one power iteration, 5 terms) right after
    initialisation (50 iterations); eval: ``update_stats=False`` (10 terms) after it.
    """
    layer = SkewOrthogonalConv(c, kernel_size=(k, k), normalization=normalization)
    x0 = jnp.zeros((4, 16, 16, c))
    init = jax.jit(lambda key: layer.init(key, x0, update_stats=False))
    train = jax.jit(lambda v, x: layer.apply(v, x, update_stats=True, mutable=["batch_stats"]))
    evaluate = jax.jit(lambda v, x: layer.apply(v, x, update_stats=False))
    ratios, norms = {"train": [], "eval": []}, []
    for f in range(filters):
        variables = init(jax.random.key(100 + f))
        trained = {**variables, **train(variables, x0)[1]}
        stats = trained["batch_stats"]
        kernel, _ = soc_kernel(trained["params"]["kernel"], [stats[f"u{i}"] for i in range(1, 5)],
                               0, normalization=normalization)
        norms.append(_operator_norm(kernel))
        for i in range(inputs):
            x = jax.random.normal(jax.random.key(1000 * f + i), (4, 16, 16, c))
            nx = float(jnp.linalg.norm(x))
            ratios["train"].append(float(jnp.linalg.norm(train(variables, x)[0])) / nx - 1)
            ratios["eval"].append(float(jnp.linalg.norm(evaluate(trained, x))) / nx - 1)
    return ratios, norms


def taylor_norm_error(theta, terms):
    """|T(i theta)| - 1 for the degree-``terms`` Taylor polynomial T of exp (float64)."""
    t = sum((1j * theta) ** i / math.factorial(i) for i in range(terms + 1))
    return abs(t) - 1.0


def test_soc_norm_preservation_follows_the_taylor_error():
    """One cell each of the docstring table (3x3, c = 16), with bounds from the math."""
    (ref, ref_norms), (strict, strict_norms) = (
        measure_norm_ratios(3, 16, norm, filters=1, inputs=2)
        for norm in ("reference", "fantastic_four"))
    # The reference's divisor min_i ||R_i|| is not an upper bound of ||L||: ||L_n|| > 0.7.
    assert ref_norms[0] > 1.0
    assert strict_norms[0] <= 0.7 * 1.01  # strict, up to the power estimate from below
    # Every eigenvalue i*theta of L_n has |theta| <= ||L_n||, so each ratio lies within the
    # worst Taylor error over [0, ||L_n||] (plus float32 round-off of the norms, ~1e-6).
    for ratios, norm in ((ref, ref_norms[0]), (strict, strict_norms[0])):
        for mode, terms in (("train", 5), ("eval", 10)):
            bound = max(abs(taylor_norm_error(t, terms)) for t in np.linspace(0, norm, 200))
            assert max(abs(r) for r in ratios[mode]) <= bound + 1e-6
    # The 5-term series is visibly non-orthogonal with the reference normalisation only.
    assert min(ref["train"]) > 3e-5
    assert max(abs(r) for r in strict["train"]) < 5e-6


# ------------------------------------------------------------------------------ SOC


def test_soc_variables_and_param_paths():
    layer = SkewOrthogonalConv(4)
    v = _init(layer, _x((1, 4, 4, 2)))
    assert jax.tree_util.tree_map(jnp.shape, v["params"]) == {"kernel": (3, 3, 4, 4)}
    assert jax.tree_util.tree_map(jnp.shape, v["batch_stats"]) == {
        "u1": (12,), "u2": (12,), "u3": (36,), "u4": (4,)}
    np.testing.assert_allclose(np.std(np.asarray(v["params"]["kernel"])), 1 / np.sqrt(4), rtol=0.3)


@pytest.mark.parametrize("normalization", ["reference", "fantastic_four"])
@pytest.mark.parametrize("cin,cout,k", [(2, 4, 3), (4, 4, 1)])
def test_soc_is_norm_preserving(cin, cout, k, normalization):
    layer = SkewOrthogonalConv(cout, kernel_size=(k, k), normalization=normalization)
    x = _x((2, 4, 4, cin))
    v = _init(layer, x)
    y = layer.apply(v, x, update_stats=False)  # T = 10
    chex.assert_shape(y, (2, 4, 4, cout))
    np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5)
    y_train, _ = layer.apply(v, x, update_stats=True, mutable="batch_stats")  # T = 5
    np.testing.assert_allclose(jnp.linalg.norm(y_train), jnp.linalg.norm(x), rtol=4e-3)


@pytest.mark.parametrize("cin,cout", [(4, 4), (2, 4), (4, 2)])
def test_soc_jacobian_is_orthogonal(cin, cout):
    layer = SkewOrthogonalConv(cout)
    x = _x((1, 4, 4, cin))
    v = _init(layer, x)
    jac = jax.jacobian(lambda z: layer.apply(v, z, update_stats=False))(x)
    jac = np.asarray(jac, np.float64).reshape(16 * cout, 16 * cin)
    if cout >= cin:  # zero-padded input: orthonormal columns
        np.testing.assert_allclose(jac.T @ jac, np.eye(16 * cin), atol=2e-5)
    else:  # sliced output: orthonormal rows
        np.testing.assert_allclose(jac @ jac.T, np.eye(16 * cout), atol=2e-5)
    assert np.abs(jac).max() > 0.05  # not trivially the identity


def _conv(z, k):
    return jax.lax.conv_general_dilated(z, k, (1, 1), "SAME", dimension_numbers=_DN)


_conv_jacobian = jax.jit(jax.jacobian(_conv))  # one compile for all kernels of one shape


def test_soc_operator_is_exactly_skew_symmetric():
    """conv with L = (P - P^T)/2, P^T = conv_transpose_kernel(P), is a skew operator."""
    p = _x((3, 3, 4, 4), seed=4)
    skew = 0.5 * (p - conv_transpose_kernel(p))
    jac = np.asarray(_conv_jacobian(jnp.zeros((1, 4, 4, 4)), skew), np.float64).reshape(64, 64)
    np.testing.assert_allclose(jac, -jac.T, atol=1e-6)
    assert np.abs(jac).max() > 0.1


def test_fantastic_four_bound_holds():
    rng = np.random.default_rng(0)
    for _ in range(4):
        k = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) * rng.normal(size=4) ** 2, jnp.float32)
        jac = np.asarray(_conv_jacobian(jnp.zeros((1, 4, 4, 4)), k), np.float64)
        exact = np.linalg.norm(jac.reshape(64, 64), 2)
        bounds = [3.0 * np.linalg.norm(np.asarray(r, np.float64), 2)
                  for r in fantastic_four_matrices(k)]
        assert exact <= min(bounds) * (1 + 1e-5)


def test_soc_power_vectors_update_only_in_training_calls():
    layer = SkewOrthogonalConv(4)
    x = _x((1, 4, 4, 4))
    v = _init(layer, x)
    _, new = layer.apply(v, x, update_stats=True, mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     v["batch_stats"], new["batch_stats"])
    assert any(jax.tree_util.tree_leaves(changed))
    _, same = layer.apply(v, x, update_stats=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(same["batch_stats"], v["batch_stats"])


def test_soc_rejects_stride_and_even_kernel():
    with pytest.raises(ValueError, match="stride"):
        SkewOrthogonalConv(2, strides=2)
    with pytest.raises(ValueError, match="odd"):
        SkewOrthogonalConv(2, kernel_size=(2, 2))


def test_soc_gradient_flows_to_raw_kernel():
    layer = SkewOrthogonalConv(4)
    x = _x((1, 4, 4, 4))
    v = _init(layer, x)
    loss = lambda p: jnp.sum(layer.apply({**v, "params": p}, x, update_stats=False)[..., 0])
    g = jax.grad(loss)(v["params"])
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g["kernel"]).max()) > 0


# ------------------------------------------------------------------------------ OW dense


@pytest.mark.parametrize("cin,cout", [(4, 4), (3, 6), (6, 3)])
def test_orthogonal_dense_weight_is_orthogonal(cin, cout):
    layer = OrthogonalDense(cout)
    x = _x((5, cin))
    v = layer.init(KEY, x)
    assert jax.tree_util.tree_map(jnp.shape, v["params"]) == {"kernel": (max(cin, cout),) * 2}
    w = np.asarray(layer.apply(v, jnp.eye(cin)), np.float64)  # rows of W
    chex.assert_shape(w, (cin, cout))
    if cin <= cout:
        np.testing.assert_allclose(w @ w.T, np.eye(cin), atol=1e-5)
    else:
        np.testing.assert_allclose(w.T @ w, np.eye(cout), atol=1e-5)
    y = layer.apply(v, x)
    np.testing.assert_allclose(y, np.asarray(x) @ w, atol=1e-5)


# ------------------------------------------------------------------------------ SN


def test_power_iteration_matches_svd():
    m = _x((12, 5), seed=3)
    _, sigma = power_iteration(m, jnp.ones(5) / np.sqrt(5), 100)
    np.testing.assert_allclose(sigma, np.linalg.norm(np.asarray(m, np.float64), 2), rtol=1e-5)


def test_power_iteration_is_safe_at_zero_and_recovers():
    zero = jnp.zeros((4, 3))
    u, sigma = power_iteration(zero, None, 5)
    assert float(sigma) == 0.0 and np.isclose(float(jnp.linalg.norm(u)), 1.0)
    grad = jax.grad(lambda m: power_iteration(m, u, 0)[1])(zero)
    assert np.all(np.isfinite(np.asarray(grad)))
    # A vector in the null space does not get stuck at 0: it restarts and converges.
    m = jnp.diag(jnp.array([2.0, 0.0, 0.0]))
    _, sigma = power_iteration(m, jnp.array([0.0, 1.0, 0.0]), 30)
    np.testing.assert_allclose(float(sigma), 2.0, rtol=1e-6)


def test_power_iteration_turns_nan_into_nan():
    m = jnp.ones((3, 3)).at[1, 2].set(jnp.nan)
    assert np.isnan(float(power_iteration(m, None, 3)[1]))
    w, _, _ = spectral_normalize(m, None, 3)
    assert np.all(np.isnan(np.asarray(w)))


def test_spectral_norm_conv_variables_and_sigma():
    layer = SpectralNormConv(8, (3, 3), use_bias=True)
    x = _x((2, 6, 6, 3))
    v = _init(layer, x)
    assert jax.tree_util.tree_map(jnp.shape, v) == {
        "params": {"kernel": (3, 3, 3, 8), "bias": (8,)}, "batch_stats": {"u": (8,)}}
    for _ in range(30):  # power iteration converges over training calls
        _, new = layer.apply(v, x, update_stats=True, mutable="batch_stats")
        v = {**v, **new}
    kernel = np.asarray(v["params"]["kernel"], np.float64).reshape(27, 8)
    _, sigma = power_iteration(jnp.asarray(kernel, jnp.float32), v["batch_stats"]["u"], 0)
    effective = kernel / float(sigma)
    np.testing.assert_allclose(np.linalg.norm(effective, 2), 1.0, rtol=1e-4)
    # the layer computes conv(x, effective kernel) + bias
    y = layer.apply(v, x, update_stats=False)
    ref = jax.lax.conv_general_dilated(x, jnp.asarray(effective.reshape(3, 3, 3, 8), jnp.float32),
                                       (1, 1), "SAME", dimension_numbers=_DN)
    np.testing.assert_allclose(y, ref + v["params"]["bias"], atol=1e-5)


def test_spectral_norm_conv_strides():
    layer = SpectralNormConv(4, 3, strides=2)
    x = _x((1, 8, 8, 2))
    v = _init(layer, x)
    chex.assert_shape(layer.apply(v, x, update_stats=False), (1, 4, 4, 4))


# ------------------------------------------------------------------------------ zero kernel


@pytest.mark.parametrize("layer", [SpectralNormConv(4, 3), SkewOrthogonalConv(4),
                                   SkewOrthogonalConv(4, normalization="fantastic_four")],
                         ids=["sn", "ow", "ow_strict"])
def test_zero_kernel_is_finite_and_sgd_leaves_it(layer):
    """A zero Pre-SVD kernel: finite output and gradients, and SGD steps stay finite."""
    x = _x((2, 5, 5, 3), seed=8)
    target = _x((2, 5, 5, 4), seed=9)
    v = _init(layer, x)
    v = {**v, "params": jax.tree.map(jnp.zeros_like, v["params"])}

    @jax.jit
    def step(v):
        def loss(params):
            y, new = layer.apply({**v, "params": params}, x, update_stats=True,
                                 mutable=["batch_stats"])
            return jnp.mean((y - target) ** 2), (y, new)

        (value, (y, new)), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        params = jax.tree.map(lambda p, d: p - 0.1 * d, v["params"], g)
        return {"params": params, **new}, value, y, g

    y0 = None
    for i in range(4):
        v, value, y, g = step(v)
        for leaf in [value, y, *jax.tree.leaves(g), *jax.tree.leaves(v)]:
            assert np.all(np.isfinite(np.asarray(leaf))), i
        y0 = y if y0 is None else y0
    if isinstance(layer, SpectralNormConv):
        assert float(jnp.abs(y0).max()) == 0.0  # W = 0 -> conv output 0
    else:  # exp(0) = I on the zero-padded input
        np.testing.assert_allclose(y0[..., :3], x, atol=1e-6)
    assert float(jnp.abs(v["params"]["kernel"]).max()) > 0  # SGD moved off the zero kernel


# ------------------------------------------------------------------------------ the table


def _print_table():
    """Re-measures the SkewOrthogonalConv docstring table (float32, this machine's CPU)."""
    def fmt(a):
        return f"{np.median(a):+.1e} [{min(a):+.1e}, {max(a):+.1e}]"

    for k in (3, 1):
        for c in (16, 64):
            for norm in ("reference", "fantastic_four"):
                ratios, norms = measure_norm_ratios(k, c, norm)
                print(f"{k}x{k}  c={c:<3d} {norm:15s} ||L_n|| {min(norms):.2f}-{max(norms):.2f}"
                      f"  train {fmt(ratios['train'])}  eval {fmt(ratios['eval'])}", flush=True)
    for theta in (0.43, 1.0, 1.35):
        print(f"worst |T(i theta)| - 1 at theta={theta}: 5 terms "
              f"{taylor_norm_error(theta, 5):+.1e}, 10 terms {taylor_norm_error(theta, 10):+.1e}")


def _print_reference_agreement():
    """||ours - reference|| / ||reference|| on the REFERENCE_CASES, float32 then float64."""
    for dtype, jdtype in ((np.float32, jnp.float32), (np.float64, jnp.float64)):
        jax.config.update("jax_enable_x64", dtype is np.float64)
        for k, cin, cout in REFERENCE_CASES:
            weight, us, sigma, x = _reference_case(k, cin, cout, k * 100 + cin, dtype)
            errors = []
            for update_stats, terms in ((False, 10), (True, 5)):
                expected = _ref_soc(x, weight, sigma, terms, cout)
                got = _our_soc(weight, us, x, cout, jdtype, update_stats)
                errors.append(np.linalg.norm(got - expected) / np.linalg.norm(expected))
            strict = _our_soc(weight, us, x, cout, jdtype, False, normalization="fantastic_four")
            expected = _ref_soc(x, weight, sigma, 10, cout)
            print(f"{dtype.__name__} {k}x{k} in={cin} out={cout}: eval {errors[0]:.1e}, "
                  f"train {errors[1]:.1e}; fantastic_four vs reference "
                  f"{np.linalg.norm(strict - expected) / np.linalg.norm(expected):.3f}")


if __name__ == "__main__":
    _print_reference_agreement()
    _print_table()

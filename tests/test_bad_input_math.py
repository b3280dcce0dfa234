"""Bad input to the pure-math public API: every case raises, gives NaN, or is a documented value.

The rule (docs/meta_layer.md, "Bad input"): what shapes, dtypes or static arguments decide
raises ValueError/TypeError at trace time, naming the argument and its value or shape; what
only the values decide gives NaN (never a plausible finite number); bfloat16/float16 are
computed in float32 and returned in their own dtype (except ``covariance``, a second moment,
returned in float32). Each case lists its expected outcome;
array-valued cases run eagerly and under ``jax.jit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax import (
    METHODS,
    as_matrix,
    condition_number,
    condition_number_f64,
    covariance,
    eigvalsh_f64,
    inv_sqrtm,
    orthogonality_loss,
    polar_factor,
    skew_symmetric_expm,
    sqrtm,
    sqrtm_and_inv_sqrtm,
)

RAISE = ("ValueError", "TypeError")


_PARTIALS: dict[tuple, Callable] = {}


def bind(fn: Callable, **options: Any) -> Callable:
    """``functools.partial(fn, **options)``, one object per (fn, options), so that cases
    with the same function share ``jax.jit`` compilations (jit caches per function). The
    key holds each option's type and repr: True, 1 and 1.0 are different cases."""
    key = (fn, tuple(sorted((k, type(v).__name__, repr(v)) for k, v in options.items())))
    return _PARTIALS.setdefault(key, functools.partial(fn, **options))


@functools.cache
def _jit(fn: Callable) -> Callable:
    return jax.jit(fn)


@dataclass(frozen=True)
class Case:
    """fn(*args) is expected to raise ``outcome`` (matching ``match``), give NaN where
    ``nan`` selects (outcome "nan"), or pass ``check`` (outcome "value")."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    outcome: str
    match: str = ""
    check: Callable[[Any], None] | None = None
    jittable: bool = True
    nan: Callable[[Any], Any] = field(default=lambda out: out)


def _all_nan(a) -> bool:
    return bool(np.isnan(np.asarray(a, np.float64)).all())


def _close(expected, atol=1e-5) -> Callable[[Any], None]:
    def check(out):
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=atol)
    return check


def _shape_is(shape) -> Callable[[Any], None]:
    def check(out):
        assert out.shape == shape, out.shape
    return check


def _not_all_finite(out) -> None:
    assert not np.isfinite(np.asarray(out)).all(), out


def _dtype_is(dtype, expected=None, atol=2e-2) -> Callable[[Any], None]:
    def check(out):
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            assert o.dtype == dtype, o.dtype
        if expected is not None:
            np.testing.assert_allclose(np.asarray(outs[0], np.float64), expected, atol=atol)
    return check


# ------------------------------------------------------------------------- inputs

EYE2 = np.eye(2, dtype=np.float32)
SPD = np.array([[4.0, 0.0], [0.0, 9.0]], np.float32)
NAN_ENTRY = np.array([[4.0, np.nan], [np.nan, 9.0]], np.float32)
INF_ENTRY = np.array([[np.inf, 0.0], [0.0, 9.0]], np.float32)
NEG_INF_ENTRY = np.array([[4.0, -np.inf], [-np.inf, 9.0]], np.float32)
MINUS_EYE = -EYE2
INDEFINITE = np.diag(np.array([4.0, -1.0], np.float32))
TINY_NEGATIVE = np.diag(np.array([1.0, -1e-6], np.float32))  # rounding level: accepted
ZERO = np.zeros((2, 2), np.float32)
NON_SYMMETRIC = np.array([[4.0, 2.0], [0.0, 9.0]], np.float32)  # sym part [[4, 1], [1, 9]]
SYM_PART = np.array([[4.0, 1.0], [1.0, 9.0]])


def _np_sqrt(p):
    w, v = np.linalg.eigh(np.asarray(p, np.float64))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _np_inv_sqrt(p):
    w, v = np.linalg.eigh(np.asarray(p, np.float64))
    return (v / np.sqrt(w)) @ v.T


# ------------------------------------------------------------- the matrix functions


def _matrix_function_cases() -> list[Case]:
    """Types, dtypes and shapes for each of the three functions and four methods; the
    value cases on sqrtm_and_inv_sqrtm (both outputs), the zero matrix on each."""
    cases = []
    fns = {"sqrtm": sqrtm, "inv_sqrtm": inv_sqrtm, "both": sqrtm_and_inv_sqrtm}
    for method in METHODS:
        for fname, fn in fns.items():
            f = bind(fn, method=method)
            tag = f"{fname}[{method}]"
            for bad, what in ((np.eye(2, dtype=np.int32), "int32"), (np.eye(2, dtype=bool), "bool"),
                              (np.eye(2, dtype=np.complex64), "complex64")):
                cases.append(Case(f"{tag} dtype {what}", f, (bad,), "TypeError", "p.dtype"))
            for bad, what in (("abc", "str"), (None, "None"), ({"a": 1}, "dict"),
                              ([[1, 0], [0, 1]], "int list")):
                cases.append(Case(f"{tag} {what}", f, (bad,), "TypeError", "p", jittable=False))
            for shape in ((), (3,), (2, 3), (4, 2, 3), (0, 0), (2, 0, 0)):
                cases.append(Case(f"{tag} shape {shape}", f, (np.ones(shape, np.float32),),
                                  "ValueError", r"p\.shape="))
        # The zero matrix: sqrt exactly 0, inverse root NaN.
        cases.append(Case(f"sqrtm[{method}] zero", bind(sqrtm, method=method),
                          (ZERO,), "value", check=_close(ZERO, 0)))
        cases.append(Case(f"inv_sqrtm[{method}] zero",
                          bind(inv_sqrtm, method=method), (ZERO,), "nan"))
        both = bind(sqrtm_and_inv_sqrtm, method=method)
        tag = f"sqrtm_and_inv_sqrtm[{method}]"
        cases.append(Case(f"{tag} zero", both, (ZERO,), "value",
                          check=lambda out: (_close(ZERO, 0)(out[0]),
                                             _all_nan(out[1]) or pytest.fail("inverse"))))
        for bad, what in ((NAN_ENTRY, "NaN entry"), (INF_ENTRY, "+Inf entry"),
                          (NEG_INF_ENTRY, "-Inf entry"), (MINUS_EYE, "-I"),
                          (INDEFINITE, "diag(4, -1)")):
            cases.append(Case(f"{tag} {what}", both, (bad,), "nan", nan=jnp.stack))

        def batch_check(out):
            for o in out:
                o = np.asarray(o, np.float64)
                assert np.isnan(o[1:3]).all() and np.isfinite(o[[0, 3]]).all()
        cases.append(Case(f"{tag} batch with bad matrices", both,
                          (np.stack([SPD, NAN_ENTRY, INDEFINITE, SPD]),), "value",
                          check=batch_check))
        atol = 1e-4 if method in ("eigh", "eigh_autodiff") else 5e-2

        def close_both(p, atol=atol):
            return lambda out: (_close(_np_sqrt(p), atol)(out[0]),
                                _close(_np_inv_sqrt(p), 10 * atol)(out[1]))
        cases += [
            Case(f"{tag} non-symmetric: its symmetric part", both, (NON_SYMMETRIC,), "value",
                 check=close_both(SYM_PART)),
            Case(f"{tag} rounding-level negative eigenvalue", both, (TINY_NEGATIVE,),
                 "value", check=lambda out: np.testing.assert_array_equal(
                     np.isfinite(np.stack(out)), True)),
            Case(f"{tag} 1x1", both, (np.array([[4.0]], np.float32),), "value",
                 check=close_both(np.array([[4.0]]))),
            Case(f"{tag} empty batch", both, (np.ones((0, 3, 3), np.float32),), "value",
                 check=lambda out: _shape_is((0, 3, 3))(out[1])),
            Case(f"{tag} float list", both, ([[4.0, 0.0], [0.0, 9.0]],), "value",
                 check=close_both(SPD), jittable=False),
        ]
        for dtype in (jnp.bfloat16, jnp.float16):
            cases.append(Case(f"{tag} {jnp.dtype(dtype).name}", both,
                              (jnp.asarray(SPD, dtype),), "value",
                              check=_dtype_is(dtype, _np_sqrt(SPD), atol=0.1)))
    return cases


def _option_cases() -> list[Case]:
    cases = []
    bad_options = [
        ({"method": None}, "TypeError", "method"),
        ({"method": 3}, "TypeError", "method"),
        ({"method": "svd"}, "ValueError", "method='svd'"),
        ({"method": "EIGH"}, "ValueError", "method='EIGH'"),
        ({"method": "eigh", "num_iters": 3}, "TypeError", "num_iters"),
        ({"method": "newton_schulz", "lyapunov_iters": 3}, "TypeError", "lyapunov_iters"),
        ({"method": "pade", "eig_floor": 0.1}, "TypeError", "eig_floor"),
        ({"method": "eigh", "foo": 1}, "TypeError", "foo"),
        ({"method": "newton_schulz", "num_iters": 0}, "ValueError", "num_iters=0"),
        ({"method": "newton_schulz", "num_iters": -1}, "ValueError", "num_iters=-1"),
        ({"method": "newton_schulz", "num_iters": 2.5}, "TypeError", "num_iters=2.5"),
        ({"method": "newton_schulz", "num_iters": True}, "TypeError", "num_iters=True"),
        ({"method": "newton_schulz", "num_iters": "5"}, "TypeError", "num_iters='5'"),
        ({"method": "newton_schulz", "num_iters": None}, "TypeError", "num_iters=None"),
        ({"method": "pade", "lyapunov_iters": 0}, "ValueError", "lyapunov_iters=0"),
        ({"method": "pade", "lyapunov_iters": 1.0}, "TypeError", "lyapunov_iters=1.0"),
        ({"method": "eigh", "taylor_degree": -1}, "ValueError", "taylor_degree=-1"),
        ({"method": "eigh", "taylor_degree": 1.5}, "TypeError", "taylor_degree=1.5"),
        ({"method": "eigh", "backward": "pade"}, "ValueError", "backward='pade'"),
        ({"method": "eigh", "backward": 1}, "TypeError", "backward=1"),
        ({"method": "eigh", "backward": None}, "TypeError", "backward=None"),
        ({"method": "eigh", "eig_floor": -1.0}, "ValueError", "eig_floor=-1.0"),
        ({"method": "eigh", "eig_floor": 1.0}, "ValueError", "eig_floor=1.0"),
        ({"method": "eigh", "eig_floor": float("nan")}, "ValueError", "eig_floor=nan"),
        ({"method": "eigh", "eig_floor": float("inf")}, "ValueError", "eig_floor=inf"),
        ({"method": "eigh_autodiff", "eig_floor": True}, "TypeError", "eig_floor=True"),
        ({"method": "eigh", "eig_floor": "0.1"}, "TypeError", "eig_floor='0.1'"),
        ({"method": "eigh", "eig_floor": jnp.float32(0.1)}, "TypeError", "eig_floor"),
    ]
    for fname, fn in (("sqrtm", sqrtm), ("inv_sqrtm", inv_sqrtm),
                      ("both", sqrtm_and_inv_sqrtm)):
        for options, outcome, match in bad_options:
            cases.append(Case(f"{fname} {options}", bind(fn, **options), (SPD,),
                              outcome, match))
    good = [({"method": "newton_schulz", "num_iters": np.int64(40)}, _np_sqrt(SPD), 1e-4),
            ({"method": "eigh", "eig_floor": np.float32(0.5)}, _np_sqrt(np.diag([4.5, 9.0])),
             1e-4),
            ({"method": "eigh", "eig_floor": 0.0}, _np_sqrt(SPD), 1e-5),
            ({"method": "eigh", "taylor_degree": 0, "backward": "taylor"}, _np_sqrt(SPD), 1e-5)]
    for options, expected, atol in good:
        cases.append(Case(f"sqrtm {options}", bind(sqrtm, **options), (SPD,),
                          "value", check=_close(expected, atol)))
    # A traced option (jit over it) is not static: TypeError at trace time.
    cases.append(Case("sqrtm traced num_iters", jax.jit(
        lambda p, n: sqrtm(p, method="newton_schulz", num_iters=n)), (SPD, 3), "TypeError",
        "num_iters", jittable=False))
    # eig_floor = 0 on a singular matrix: the inverse root is infinite, not a finite guess.
    cases.append(Case("inv_sqrtm eig_floor=0 singular", bind(
        inv_sqrtm, eig_floor=0.0), (np.diag(np.array([1.0, 0.0], np.float32)),), "value",
        check=_not_all_finite))
    return cases


# ----------------------------------------------------------------------- covariance


def _covariance_cases() -> list[Case]:
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)  # d = 3, N = 5
    cov = np.cov(x, bias=True)
    first = bind(covariance, layout="features_first")
    cases = [
        Case("covariance no layout", covariance, (x,), "TypeError",
             "features_first.*features_last"),
        Case("covariance layout=None", bind(covariance, layout=None), (x,),
             "TypeError", "features_first"),
        Case("covariance layout=1", bind(covariance, layout=1), (x,), "TypeError",
             "layout=1"),
        Case("covariance layout=NCHW", bind(covariance, layout="NCHW"), (x,),
             "ValueError", "layout='NCHW'"),
        Case("covariance int x", first, (x.astype(np.int32),), "TypeError", "x.dtype"),
        Case("covariance bool x", first, (x > 0,), "TypeError", "x.dtype"),
        Case("covariance complex x", first, (x.astype(np.complex64),), "TypeError", "x.dtype"),
        Case("covariance str x", first, ("abc",), "TypeError", "x", jittable=False),
        Case("covariance 1-D x", first, (x[0],), "ValueError", r"x\.shape"),
        Case("covariance 0-D x", first, (np.float32(1),), "ValueError", r"x\.shape"),
        Case("covariance N=0", first, (np.ones((3, 0), np.float32),), "ValueError", "N=0"),
        Case("covariance d=0", first, (np.ones((0, 4), np.float32),), "ValueError", "d=0"),
        Case("covariance eps=-1", bind(first, eps=-1.0), (x,), "ValueError",
             "eps=-1.0"),
        Case("covariance eps=nan", bind(first, eps=float("nan")), (x,),
             "ValueError", "eps=nan"),
        Case("covariance eps=inf", bind(first, eps=float("inf")), (x,),
             "ValueError", "eps=inf"),
        Case("covariance eps=True", bind(first, eps=True), (x,), "TypeError",
             "eps=True"),
        Case("covariance eps='1'", bind(first, eps="1"), (x,), "TypeError",
             "eps='1'"),
        Case("covariance traced eps", jax.jit(lambda a, e: covariance(
            a, layout="features_first", eps=e)), (x, 0.1), "TypeError", "eps", jittable=False),
        Case("covariance NaN feature", first, (_with_nan(x),), "nan", nan=lambda p: p[0]),
        Case("covariance Inf feature", first, (_with_inf(x),), "nan", nan=lambda p: p[0, 0]),
        Case("covariance N=1 is zero", first, (x[:, :1],), "value",
             check=_close(np.zeros((3, 3)), 0)),
        Case("covariance d=1", first, (x[:1],), "value", check=_close(cov[:1, :1])),
        Case("covariance features_last", bind(covariance, layout="features_last"),
             (x.T,), "value", check=_close(cov)),
        Case("covariance float list", first, (x.tolist(),), "value", check=_close(cov),
             jittable=False),
        Case("covariance empty batch", first, (np.ones((0, 3, 5), np.float32),), "value",
             check=_shape_is((0, 3, 3))),
        Case("covariance eps=np.float32", bind(first, eps=np.float32(0.5)), (x,),
             "value", check=_close(cov + 0.5 * np.eye(3))),
    ]
    for dtype in (jnp.bfloat16, jnp.float16):  # a second moment: returned in float32
        cases.append(Case(f"covariance {jnp.dtype(dtype).name}", first,
                          (jnp.asarray(x, dtype),), "value",
                          check=_dtype_is(jnp.float32, cov, atol=5e-2)))
    return cases


def _with_nan(x):
    y = x.copy()
    y[0, 0] = np.nan
    return y


def _with_inf(x):
    y = x.copy()
    y[0, 0] = np.inf
    return y


# ------------------------------------------------------------- condition numbers


def _condition_cases() -> list[Case]:
    f64 = condition_number_f64
    cases = [
        Case("condition_number int", condition_number, (np.eye(2, dtype=np.int32),),
             "TypeError", "p.dtype"),
        Case("condition_number complex", condition_number, (np.eye(2, dtype=np.complex64),),
             "TypeError", "p.dtype"),
        Case("condition_number (2, 3)", condition_number, (np.ones((2, 3), np.float32),),
             "ValueError", r"p\.shape="),
        Case("condition_number (3,)", condition_number, (np.ones(3, np.float32),),
             "ValueError", r"p\.shape="),
        Case("condition_number NaN entry", condition_number, (NAN_ENTRY,), "nan"),
        Case("condition_number Inf entry", condition_number, (INF_ENTRY,), "nan"),
        Case("condition_number -I", condition_number, (MINUS_EYE,), "nan"),
        Case("condition_number diag(4, -1)", condition_number, (INDEFINITE,), "nan"),
        Case("condition_number zero: singular", condition_number, (ZERO,), "value",
             check=_close(np.inf)),
        Case("condition_number singular", condition_number, (np.diag([1.0, 0.0]),), "value",
             check=_close(np.inf)),
        Case("condition_number non-symmetric", condition_number, (NON_SYMMETRIC,), "value",
             check=_close(np.linalg.cond(SYM_PART), 1e-3)),
        Case("condition_number bf16", condition_number, (jnp.asarray(SPD, jnp.bfloat16),),
             "value", check=_dtype_is(jnp.float32, 9 / 4, atol=1e-5)),
        Case("condition_number 1x1", condition_number, (np.array([[2.0]], np.float32),),
             "value", check=_close(1.0)),
        # host float64 monitors (not jittable: they need concrete values)
        Case("condition_number_f64 complex", f64, (np.eye(2, dtype=complex),), "TypeError",
             "p.dtype", jittable=False),
        Case("condition_number_f64 bool", f64, (np.eye(2, dtype=bool),), "TypeError",
             "p.dtype", jittable=False),
        Case("condition_number_f64 str", f64, ("abc",), "TypeError", "p", jittable=False),
        Case("condition_number_f64 traced", jax.jit(f64), (SPD,), "TypeError", "traced",
             jittable=False),
        Case("condition_number_f64 (2, 3)", f64, (np.ones((2, 3)),), "ValueError",
             r"p\.shape=", jittable=False),
        Case("condition_number_f64 (0, 0)", f64, (np.ones((0, 0)),), "ValueError",
             r"p\.shape=", jittable=False),
        Case("condition_number_f64 eps=-1", bind(f64, eps=-1.0), (SPD,),
             "ValueError", "eps=-1.0", jittable=False),
        Case("condition_number_f64 eps=nan", bind(f64, eps=float("nan")), (SPD,),
             "ValueError", "eps=nan", jittable=False),
        Case("condition_number_f64 eps='x'", bind(f64, eps="x"), (SPD,),
             "TypeError", "eps='x'", jittable=False),
        Case("condition_number_f64 NaN entry", f64, (NAN_ENTRY,), "nan", jittable=False),
        Case("condition_number_f64 -Inf entry", f64, (NEG_INF_ENTRY,), "nan",
             jittable=False),
        Case("condition_number_f64 -I", f64, (MINUS_EYE,), "nan", jittable=False),
        Case("condition_number_f64 zero", f64, (ZERO,), "value", check=_close(np.inf),
             jittable=False),
        Case("condition_number_f64 int", f64, (np.array([[4, 0], [0, 1]]),), "value",
             check=_close(4.0), jittable=False),
        Case("condition_number_f64 list", f64, ([[4.0, 0.0], [0.0, 1.0]],), "value",
             check=_close(4.0), jittable=False),
        Case("condition_number_f64 bf16", f64, (jnp.asarray(SPD, jnp.bfloat16),), "value",
             check=_close(9 / 4), jittable=False),
        Case("condition_number_f64 -I + eps: PD", bind(f64, eps=2.0),
             (MINUS_EYE,), "value", check=_close(1.0), jittable=False),
        Case("eigvalsh_f64 complex", eigvalsh_f64, (np.eye(2, dtype=complex),), "TypeError",
             "p.dtype", jittable=False),
        Case("eigvalsh_f64 bool", eigvalsh_f64, (np.eye(2, dtype=bool),), "TypeError",
             "p.dtype", jittable=False),
        Case("eigvalsh_f64 object", eigvalsh_f64, (np.array([["a", "b"], ["c", "d"]]),),
             "TypeError", "p.dtype", jittable=False),
        Case("eigvalsh_f64 traced", jax.jit(eigvalsh_f64), (SPD,), "TypeError", "traced",
             jittable=False),
        Case("eigvalsh_f64 (3,)", eigvalsh_f64, (np.ones(3),), "ValueError", r"p\.shape=",
             jittable=False),
        Case("eigvalsh_f64 NaN entry", eigvalsh_f64, (NAN_ENTRY,), "nan", jittable=False),
        Case("eigvalsh_f64 Inf entry", eigvalsh_f64, (INF_ENTRY,), "nan", jittable=False),
        Case("eigvalsh_f64 batch with NaN", eigvalsh_f64, (np.stack([SPD, NAN_ENTRY]),),
             "value", check=lambda lam: (np.testing.assert_allclose(lam[0], [4, 9]),
                                         np.testing.assert_array_equal(np.isnan(lam[1]), True)),
             jittable=False),
        Case("eigvalsh_f64 zero", eigvalsh_f64, (ZERO,), "value", check=_close([0.0, 0.0], 0),
             jittable=False),
        Case("eigvalsh_f64 non-symmetric: its symmetric part", eigvalsh_f64, (NON_SYMMETRIC,),
             "value", check=_close(np.linalg.eigvalsh(SYM_PART), 1e-12), jittable=False),
        Case("eigvalsh_f64 indefinite", eigvalsh_f64, (INDEFINITE,), "value",
             check=_close([-1.0, 4.0]), jittable=False),
        Case("eigvalsh_f64 int", eigvalsh_f64, (np.array([[2, 1], [1, 2]]),), "value",
             check=_close([1.0, 3.0]), jittable=False),
        Case("eigvalsh_f64 empty batch", eigvalsh_f64, (np.ones((0, 2, 2)),), "value",
             check=_shape_is((0, 2)), jittable=False),
    ]
    return cases


# ------------------------------------------------------------------- orthogonal.py


def _orthogonal_cases() -> list[Case]:
    m = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    u, _, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    polar = u @ vt
    cases = []
    # polar_express is within 7.6e-3 of the polar factor on these well-conditioned inputs
    for method, tol in (("svd", 1e-4), ("newton_schulz", 1e-4), ("polar_express", 1e-2)):
        f = bind(polar_factor, method=method)
        tag = f"polar_factor[{method}]"
        cases += [
            Case(f"{tag} int", f, (m.astype(np.int32),), "TypeError", "m.dtype"),
            Case(f"{tag} bool", f, (m > 0,), "TypeError", "m.dtype"),
            Case(f"{tag} complex", f, (m.astype(np.complex64),), "TypeError", "m.dtype"),
            Case(f"{tag} str", f, ("abc",), "TypeError", "m", jittable=False),
            Case(f"{tag} shape ()", f, (np.float32(1),), "ValueError", r"m\.shape="),
            Case(f"{tag} shape (3,)", f, (m[0],), "ValueError", r"m\.shape="),
            Case(f"{tag} shape (0, 3)", f, (np.ones((0, 3), np.float32),), "ValueError",
                 r"m\.shape="),
            Case(f"{tag} shape (3, 0)", f, (np.ones((3, 0), np.float32),), "ValueError",
                 r"m\.shape="),
            Case(f"{tag} NaN entry", f, (_with_nan(m),), "nan"),
            Case(f"{tag} Inf matrix", f, (np.full((3, 2), np.inf, np.float32),), "nan"),
            Case(f"{tag} -Inf entry", f, (-_with_inf(m),), "nan"),
            Case(f"{tag} batch with NaN", f, (np.stack([m, _with_nan(m)]),), "value",
                 check=lambda r, tol=tol: (np.testing.assert_allclose(r[0], polar, atol=tol),
                                           np.testing.assert_array_equal(np.isnan(r[1]),
                                                                         True))),
            Case(f"{tag} zero", f, (np.zeros((3, 2), np.float32),), "value",
                 check=_close(np.zeros((3, 2)), 0)),
            Case(f"{tag} 1x1", f, (np.array([[-3.0]], np.float32),), "value",
                 check=_close([[-1.0]], max(tol, 1e-5))),
            Case(f"{tag} row vector", f, (np.array([[3.0, 4.0]], np.float32),), "value",
                 check=_close([[0.6, 0.8]], max(tol, 1e-5))),
            Case(f"{tag} empty batch", f, (np.ones((0, 3, 2), np.float32),), "value",
                 check=_shape_is((0, 3, 2))),
            Case(f"{tag} float list", f, (m.tolist(),), "value", check=_close(polar, tol),
                 jittable=False),
            Case(f"{tag} rtol=-0.1", bind(f, rtol=-0.1), (m,), "ValueError",
                 "rtol=-0.1"),
            Case(f"{tag} rtol=1.0", bind(f, rtol=1.0), (m,), "ValueError",
                 "rtol=1.0"),
            Case(f"{tag} rtol=nan", bind(f, rtol=float("nan")), (m,),
                 "ValueError", "rtol=nan"),
            Case(f"{tag} rtol=True", bind(f, rtol=True), (m,), "TypeError",
                 "rtol=True"),
            Case(f"{tag} rtol='1e-3'", bind(f, rtol="1e-3"), (m,), "TypeError",
                 "rtol='1e-3'"),
        ]
        for dtype in (jnp.bfloat16, jnp.float16):
            cases.append(Case(f"{tag} {jnp.dtype(dtype).name}", f, (jnp.asarray(m, dtype),),
                              "value", check=_dtype_is(dtype, polar, atol=2e-2)))
    ns = bind(polar_factor, method="newton_schulz")
    cases += [
        Case("polar_factor method=None", bind(polar_factor, method=None), (m,),
             "TypeError", "method=None"),
        Case("polar_factor method='qr'", bind(polar_factor, method="qr"), (m,),
             "ValueError", "method='qr'"),
        Case("polar_factor svd with num_iters", bind(polar_factor, num_iters=5),
             (m,), "ValueError", "num_iters=5"),
        Case("polar_factor num_iters=0", bind(ns, num_iters=0), (m,),
             "ValueError", "num_iters=0"),
        Case("polar_factor num_iters=-3", bind(ns, num_iters=-3), (m,),
             "ValueError", "num_iters=-3"),
        Case("polar_factor num_iters=2.5", bind(ns, num_iters=2.5), (m,),
             "TypeError", "num_iters=2.5"),
        Case("polar_factor num_iters=True", bind(ns, num_iters=True), (m,),
             "TypeError", "num_iters=True"),
        Case("polar_factor num_iters='3'", bind(ns, num_iters="3"), (m,),
             "TypeError", "num_iters='3'"),
        Case("polar_factor rtol=0 num_iters=60", bind(ns, rtol=0.0, num_iters=60),
             (m,), "value", check=_close(polar, 1e-4)),
        Case("polar_factor polar_express with num_iters",
             bind(polar_factor, method="polar_express", num_iters=5), (m,), "ValueError",
             "num_iters=5"),
        Case("polar_factor polar_express rtol=0",
             bind(polar_factor, method="polar_express", rtol=0.0), (m,), "ValueError",
             r"rtol=0\.0.*newton_schulz"),
        Case("polar_factor polar_express rtol=1e-2",
             bind(polar_factor, method="polar_express", rtol=1e-2), (m,), "ValueError",
             "rtol=0.01"),
        Case("polar_factor muon with rtol", bind(polar_factor, method="muon", rtol=1e-3),
             (m,), "ValueError", "no cutoff"),
        Case("polar_factor svd with matmul_dtype",
             bind(polar_factor, matmul_dtype=jnp.bfloat16), (m,), "ValueError",
             "matmul_dtype"),
        Case("polar_factor matmul_dtype=int32",
             bind(polar_factor, method="polar_express", matmul_dtype=jnp.int32), (m,),
             "TypeError", "matmul_dtype"),
        Case("polar_factor num_iters=np.int64", bind(ns, num_iters=np.int64(50)),
             (m,), "value", check=_close(polar, 1e-4)),
        # orthogonality_loss
        Case("orthogonality_loss int", orthogonality_loss, (np.eye(3, dtype=np.int32),),
             "TypeError", "w.dtype"),
        Case("orthogonality_loss complex", orthogonality_loss,
             (np.eye(3, dtype=np.complex64),), "TypeError", "w.dtype"),
        Case("orthogonality_loss 1-D", orthogonality_loss, (np.ones(3, np.float32),),
             "ValueError", r"w\.shape="),
        Case("orthogonality_loss zero-size", orthogonality_loss,
             (np.ones((0, 3, 4), np.float32),), "ValueError", r"w\.shape="),
        Case("orthogonality_loss NaN", orthogonality_loss, (_with_nan(m),), "nan"),
        Case("orthogonality_loss Inf", orthogonality_loss, (_with_inf(m),), "nan"),
        Case("orthogonality_loss -Inf", orthogonality_loss, (-_with_inf(m),), "nan"),
        Case("orthogonality_loss zero: ||I||_F", orthogonality_loss,
             (np.zeros((9, 4), np.float32),), "value", check=_close(2.0)),
        Case("orthogonality_loss bf16", orthogonality_loss,
             (jnp.asarray(np.eye(3)[:, :2], jnp.bfloat16),), "value",
             check=_dtype_is(jnp.bfloat16, 0.0, atol=1e-6)),
        # skew_symmetric_expm
        Case("skew_symmetric_expm int", skew_symmetric_expm, (np.eye(2, dtype=np.int32),),
             "TypeError", "a.dtype"),
        Case("skew_symmetric_expm complex", skew_symmetric_expm,
             (np.eye(2, dtype=np.complex64),), "TypeError", "a.dtype"),
        Case("skew_symmetric_expm (2, 3)", skew_symmetric_expm, (np.ones((2, 3), np.float32),),
             "ValueError", r"a\.shape="),
        Case("skew_symmetric_expm (3,)", skew_symmetric_expm, (np.ones(3, np.float32),),
             "ValueError", r"a\.shape="),
        Case("skew_symmetric_expm (0, 0)", skew_symmetric_expm, (np.ones((0, 0), np.float32),),
             "ValueError", r"a\.shape="),
        Case("skew_symmetric_expm NaN", skew_symmetric_expm, (NAN_ENTRY,), "nan"),
        Case("skew_symmetric_expm Inf", skew_symmetric_expm, (INF_ENTRY,), "nan"),
        Case("skew_symmetric_expm zero: I", skew_symmetric_expm, (ZERO,), "value",
             check=_close(np.eye(2), 0)),
        Case("skew_symmetric_expm symmetric input: I", skew_symmetric_expm, (SPD,), "value",
             check=_close(np.eye(2), 0)),
        Case("skew_symmetric_expm 1x1", skew_symmetric_expm, (np.array([[5.0]], np.float32),),
             "value", check=_close([[1.0]])),
        Case("skew_symmetric_expm f16", skew_symmetric_expm, (jnp.asarray(SPD, jnp.float16),),
             "value", check=_dtype_is(jnp.float16, np.eye(2), atol=1e-3)),
        # as_matrix: a pure reshape
        Case("as_matrix 1-D", lambda x: as_matrix(x)[0], (np.ones(3, np.float32),),
             "ValueError", r"x\.shape="),
        Case("as_matrix 0-D", lambda x: as_matrix(x)[0], (np.float32(1),), "ValueError",
             r"x\.shape="),
        Case("as_matrix str", lambda x: as_matrix(x)[0], ("abc",), "TypeError", "x",
             jittable=False),
        Case("as_matrix int kernel", lambda x: as_matrix(x)[0], (np.ones((2, 2, 3), int),),
             "value", check=_shape_is((4, 3))),
        Case("as_matrix list", lambda x: as_matrix(x)[0], ([[1.0, 2.0]],), "value",
             check=_close([[1.0, 2.0]]), jittable=False),
    ]
    return cases


CASES = (_matrix_function_cases() + _option_cases() + _covariance_cases()
         + _condition_cases() + _orthogonal_cases())
PARAMS = [pytest.param(case, mode, id=f"{case.name} ({mode})")
          for case in CASES for mode in (("eager", "jit") if case.jittable else ("eager",))]


def outcome_counts() -> dict[str, int]:
    """Bad inputs tried, by expected outcome, each (case, eager/jit) counted once."""
    counts: dict[str, int] = {}
    for param in PARAMS:
        case = param.values[0]
        counts[case.outcome] = counts.get(case.outcome, 0) + 1
    return counts


@pytest.mark.parametrize("case,mode", PARAMS)
def test_bad_input(case: Case, mode: str):
    fn = _jit(case.fn) if mode == "jit" else case.fn
    if case.outcome in RAISE:
        error = {"ValueError": ValueError, "TypeError": TypeError}[case.outcome]
        with pytest.raises(error, match=case.match):
            fn(*case.args)
        return
    out = fn(*case.args)
    if case.outcome == "nan":
        assert _all_nan(case.nan(out)), out
    else:
        case.check(out)


# ---------------------------------------------------------- vmap and gradients of NaN


@pytest.mark.parametrize("method", METHODS)
def test_vmap_gives_nan_only_for_the_bad_matrices(method):
    batch = jnp.stack([SPD, NAN_ENTRY, INDEFINITE, MINUS_EYE, SPD])
    q, s = jax.vmap(lambda a: sqrtm_and_inv_sqrtm(a, method=method))(batch)
    for out in (np.asarray(q), np.asarray(s), np.asarray(jax.vmap(condition_number)(batch))):
        assert np.isnan(out[1:4]).all()
        assert np.isfinite(out[[0, 4]]).all()


def test_vmap_polar_factor_nan_per_matrix():
    m = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    batch = jnp.stack([m, _with_nan(m), m])
    for method in ("svd", "newton_schulz", "polar_express"):
        r = np.asarray(jax.vmap(lambda a, method=method: polar_factor(a, method=method))(batch))
        assert np.isnan(r[1]).all() and np.isfinite(r[[0, 2]]).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", ["nan", "-I", "diag(4,-1)", "zero"])
def test_gradient_of_a_bad_matrix_is_nan_and_the_others_are_finite(method, bad):
    """NaN value, NaN gradient (never a silent zero); the zero matrix's sqrt is 0 but its
    derivative is unbounded: NaN too. The good matrix of the batch keeps a finite gradient,
    in reverse mode and (custom JVP methods) forward mode."""
    bad_matrix = {"nan": NAN_ENTRY, "-I": MINUS_EYE, "diag(4,-1)": INDEFINITE,
                  "zero": ZERO}[bad]
    batch = jnp.stack([SPD, bad_matrix])

    def loss(a, index):
        q, s = sqrtm_and_inv_sqrtm(a, method=method)
        return jnp.sum(q[index]) + jnp.sum(s[index])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    assert np.isnan(np.asarray(grad(batch, 1)[1])).all()
    assert np.isfinite(np.asarray(grad(batch, 0)[0])).all()
    if method in ("eigh", "pade"):  # custom JVP: forward mode too
        jvp = jax.jit(lambda a, t: jax.jvp(
            lambda b: sqrtm_and_inv_sqrtm(b, method=method), (a,), (t,))[1])
        tangents = jvp(batch, jnp.ones_like(batch))
        for t in tangents:
            assert np.isnan(np.asarray(t[1])).all() and np.isfinite(np.asarray(t[0])).all()


def test_outcome_counts_cover_every_category():
    counts = outcome_counts()
    assert set(counts) == {"ValueError", "TypeError", "nan", "value"}, counts

"""Argument checks shared by the Linen and NNX layers (docs/README.md, "bad input").

What the shapes, dtypes or static arguments decide raises here, at construction or trace
time, with a message that names the argument and its value or shape: ``TypeError`` for a
wrong type (a float where an int is needed, an integer or complex array where a real
floating one is needed), ``ValueError`` for a wrong value or shape.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax import meta_layer

PADDING_STRINGS = ("SAME", "VALID", "SAME_LOWER")


def check_int(where: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an int; TypeError unless an integer (not a bool), ValueError if < minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {name} must be an int; got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}; got {name}={value!r}")
    return int(value)


def check_bool(where: str, name: str, value: Any) -> bool:
    """``value``; TypeError unless a bool (0/1 and strings are refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be True or False; got {name}={value!r}")
    return bool(value)


def check_real(where: str, name: str, value: Any, *, low: float, high: float = math.inf,
               low_open: bool = False) -> float:
    """``value`` as a float in [low, high] ((low, high] with ``low_open``); NaN is rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number; got {name}={value!r}")
    value = float(value)
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok or not math.isfinite(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{where}: {name} must be finite and in {interval}; "
                         f"got {name}={value!r}")
    return value


def check_choice(where: str, name: str, value: Any, valid: Sequence[Any]) -> Any:
    """ValueError unless ``value`` is one of ``valid``."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{where}: {name}={value!r}; valid: {tuple(valid)}")
    return value


def check_pair(where: str, name: str, value: Any, *, minimum: int = 1,
               odd: bool = False) -> tuple[int, int]:
    """An int or a length-2 sequence of ints >= ``minimum`` (odd if ``odd``) as a pair."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    if isinstance(value, bool) or not isinstance(pair, (Sequence, np.ndarray)) or (
            isinstance(pair, str) or len(pair) != 2):
        raise TypeError(f"{where}: {name} must be an int or a pair of ints; "
                        f"got {name}={value!r}")
    out = tuple(check_int(where, name, v, minimum) for v in pair)
    if odd and (out[0] % 2 == 0 or out[1] % 2 == 0):
        raise ValueError(f"{where}: {name} must be odd; got {name}={value!r}")
    return out  # type: ignore[return-value]


def check_padding(where: str, value: Any) -> Any:
    """Flax 2-D padding: "SAME" / "VALID" / "SAME_LOWER" or two (low, high) int pairs."""
    if isinstance(value, str):
        return check_choice(where, "padding", value, PADDING_STRINGS)
    try:
        pairs = [tuple(p) for p in value]
        ok = len(pairs) == 2 and all(
            len(p) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                for v in p) for p in pairs)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: padding must be one of {PADDING_STRINGS} or two "
                         f"(low, high) int pairs; got padding={value!r}")
    return value


def check_dtype(where: str, name: str, dtype: Any, *, optional: bool = True) -> Any:
    """None (if ``optional``) or a real floating dtype."""
    if dtype is None and optional:
        return None
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{where}: {name} must be a real floating dtype"
                        f"{' or None' if optional else ''}; got {name}={dtype!r}")
    return dtype


def check_input(where: str, x: Any, *, ndim: int | None = None, min_ndim: int = 1,
                layout: str = "") -> jax.Array:
    """``x`` as a jax array; TypeError unless real floating, ValueError on a wrong rank or 0
    features (last axis)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{where}: x must be a real floating array (bfloat16, float16, "
                        f"float32 or float64); got x.dtype={dtype}")
    shape = tuple(np.shape(x))
    if (ndim is not None and len(shape) != ndim) or len(shape) < min_ndim:
        want = f"{ndim} dims {layout}".rstrip() if ndim is not None else f">= {min_ndim} dims"
        raise ValueError(f"{where}: x must have {want}; got x.shape={shape}")
    if shape[-1] < 1:
        raise ValueError(f"{where}: x must have at least one feature (last axis); "
                         f"got x.shape={shape}")
    return jnp.asarray(x)


def check_method(where: str, method: Any, method_kwargs: Any) -> None:
    """Meta-layer method and its options: the option names and values are checked here, by
    the meta-layer's own rules, so that a bad option raises at construction, not at the
    first call (TypeError for an option the method does not take or of the wrong type,
    ValueError for a value out of range)."""
    check_choice(where, "method", method, meta_layer.METHODS)
    if method_kwargs is not None and not isinstance(method_kwargs, Mapping):
        raise TypeError(f"{where}: method_kwargs must be a mapping or None; "
                        f"got method_kwargs={method_kwargs!r}")
    try:
        meta_layer._check_options(method, dict(method_kwargs or {}))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: method_kwargs={dict(method_kwargs)!r}: {err}") from None


def compute_dtype(*dtypes: Any) -> Any:
    """At least float32: float32 for bfloat16/float16/float32, float64 for float64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """An int or a (checked) pair as a tuple of two ints."""
    return (int(value), int(value)) if isinstance(value, (int, np.integer)) else (
        int(value[0]), int(value[1]))


def mode(where: str, name: str, call_value: bool | None, default: bool | None) -> bool:
    """A mode flag given at call time, else the module's; ValueError if neither is set."""
    value = default if call_value is None else call_value
    if value is None:
        raise ValueError(f"{where}: pass {name} to the constructor or the call")
    return bool(value)

"""Parameter paths as '/'-joined strings, the form Pre-SVD selections are written in.

A Flax NNX state holds each parameter in an ``nnx.Variable``, a pytree node whose array sits
one key further down (``.../kernel/value``), while ``nnx.Optimizer`` hands ``tx.update`` the
bare arrays (``.../kernel``). The helpers here stop at Variables, so a parameter has one path,
the Linen spelling ('stem_conv/kernel'), whether it arrives wrapped or bare.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def is_variable(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX Variable (treated as one leaf by the helpers here)."""
    return isinstance(x, nnx.Variable)


def unwrap(x: Any) -> Any:
    """The array inside an NNX Variable, or ``x`` itself."""
    return x.get_value() if is_variable(x) else x


def key_of(key: Any) -> Any:
    """One pytree key (DictKey, GetAttrKey, SequenceKey, ...) as the raw str or int."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def key_str(key: Any) -> str:
    """One pytree key as a string."""
    return str(key_of(key))


def path_str(path: tuple[Any, ...]) -> str:
    """A ``tree_flatten_with_path`` key path as 'a/b/c', e.g. 'stem_conv/kernel'."""
    return "/".join(key_str(k) for k in path)


def leaves_with_paths(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """``(key path, leaf)`` pairs of ``tree``, an NNX Variable counting as one leaf."""
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_variable)


def array_leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path string, array)`` pairs of ``tree``, Variables unwrapped."""
    return [(path_str(p), unwrap(x)) for p, x in leaves_with_paths(tree)]

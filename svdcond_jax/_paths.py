"""Parameter paths as '/'-joined strings, the form Pre-SVD selections are written in."""

from __future__ import annotations

from typing import Any


def key_str(key: Any) -> str:
    """One pytree key (DictKey, GetAttrKey, SequenceKey, ...) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple[Any, ...]) -> str:
    """A ``tree_flatten_with_path`` key path as 'a/b/c', e.g. 'stem_conv/kernel'."""
    return "/".join(key_str(k) for k in path)

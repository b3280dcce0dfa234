"""Clear errors for a missing optional dependency (an extra of the ``svdcond-jax`` package).

The core (meta-layer, transforms, layers, models) needs jax, flax, optax, chex and numpy
only. Extras (``pyproject.toml``): ``train`` (the training library and the experiment
scripts on in-memory data: absl-py, ml_collections, orbax-checkpoint, tensorboard,
scikit-learn, matplotlib, tqdm; no TensorFlow) and ``tfds`` (TensorFlow Datasets and
TensorFlow, for ImageNet and CIFAR from TFDS files).

Example:
    >>> require(("numpy",), extra="train", what="this")
    >>> require(("no_such_module_xyz",), extra="train", what="the training library")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ImportError: the training library needs no_such_module_xyz, which is not installed: ...
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence


def missing(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (each is imported: the
    callers import them next anyway, and a half-installed package counts as missing)."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def require(modules: Sequence[str], *, extra: str, what: str) -> None:
    """Raises ImportError naming the ``pip install`` line if a module of ``modules`` is
    missing.

    Args:
        modules: importable top-level module names (``"ml_collections"``, ``"tensorflow"``).
        extra: the extra of ``svdcond-jax`` that installs them (``"train"``, ``"tfds"``).
        what: what needs them, for the message.

    Raises:
        ImportError: naming the missing modules and the install command.
    """
    absent = missing(modules)
    if absent:
        raise ImportError(
            f"{what} needs {', '.join(absent)}, which "
            f"{'is' if len(absent) == 1 else 'are'} not installed: pip install "
            f"'svdcond-jax[{extra}]' (from a checkout: pip install -e \".[{extra}]\")")

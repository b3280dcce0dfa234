"""The paper's method rows (Tables 1-6) as model options plus optimizer flags.

Each name is a row of the paper: ``svd`` is the SVD meta-layer with the custom backward
(docs/meta_layer.md); ``+sn``/``+ow`` change the Pre-SVD layer
(docs/weight_treatments.md; SN = spectral norm, OW = orthogonal weight via SOC);
``+ol`` adds the orthogonality loss (Eq. 12);
``+nog``/``+olr`` turn on the Pre-SVD gradient treatments of ``pre_svd_sgd`` (Eqs. 14-21).
``bn`` is the plain network (BatchNorm stem, average pooling; no SVD anywhere; the
conditioning monitor still reads its stem conv output with eps = ``config.dbn_eps``, the
paper's "BN" curves ~1e3),
``newton_schulz`` replaces the eigendecomposition by 5 (``config.ns_iters``) Newton-Schulz
iterations and ``svd_autodiff`` differentiates ``jnp.linalg.eigh`` with plain autodiff (the
failing baseline; docs/meta_layer.md).

Example:
    >>> from svdcond_jax.training.methods import parse_method
    >>> spec = parse_method("svd+nog+ow+olr")
    >>> spec.pre_svd, spec.nog, spec.olr, spec.ol
    ('ow', True, True, False)
"""

from __future__ import annotations

from typing import Any, NamedTuple

METHODS: tuple[str, ...] = (
    "bn",
    "svd",
    "svd+sn",
    "svd+ol",
    "svd+ow",
    "svd+nog",
    "svd+olr",
    "svd+nog+sn",
    "svd+nog+ol",
    "svd+nog+ow",
    "svd+nog+olr",
    "svd+ow+olr",
    "svd+nog+ow+olr",
    "newton_schulz",
    "svd_autodiff",
)

TASKS: tuple[str, ...] = ("dbn", "gcp")


class MethodSpec(NamedTuple):
    """What one method row switches on."""

    name: str
    uses_svd: bool  # False only for "bn"
    meta_method: str  # svdcond_jax.meta_layer method: "eigh" | "eigh_autodiff" | "newton_schulz"
    pre_svd: str  # Pre-SVD weight treatment: "none" | "sn" | "ow"
    nog: bool  # nearest orthogonal gradient (Eqs. 14-17)
    olr: bool  # optimal learning rate (Eqs. 18-21)
    ol: bool  # orthogonality loss ||W W^T - I||_F added to the objective (Eq. 12)


def parse_method(name: str) -> MethodSpec:
    """Parses a paper row name into a :class:`MethodSpec`.

    Args:
        name: one of :data:`METHODS`.

    Returns:
        The method's switches.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid: {', '.join(METHODS)}")
    if name == "bn":
        return MethodSpec(name, False, "eigh", "none", False, False, False)
    if name == "newton_schulz":
        return MethodSpec(name, True, "newton_schulz", "none", False, False, False)
    if name == "svd_autodiff":
        return MethodSpec(name, True, "eigh_autodiff", "none", False, False, False)
    parts = set(name.split("+")[1:])
    pre_svd = "sn" if "sn" in parts else ("ow" if "ow" in parts else "none")
    return MethodSpec(name, True, "eigh", pre_svd, "nog" in parts, "olr" in parts, "ol" in parts)


def resolve_task(task: str, dataset: str) -> str:
    """Returns where the SVD meta-layer sits: "dbn" (stem whitening) or "gcp" (pooling head).

    Args:
        task: "dbn", "gcp" or "auto" (GCP for imagenet2012, decorrelated BN otherwise, as in
            the paper's Appendix B).
        dataset: the config's dataset name.
    """
    if task == "auto":
        return "gcp" if dataset == "imagenet2012" else "dbn"
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; valid: auto, {', '.join(TASKS)}")
    return task


def model_options(spec: MethodSpec, task: str, config: Any) -> dict[str, Any]:
    """Keyword arguments of ``svdcond_jax.models.ResNet`` for a method and task.

    ``bn`` keeps the plain network of the task: a BatchNorm stem and global average pooling
    (the paper's "BN" curves and the vanilla ResNet of Table 6).

    Args:
        spec: the parsed method.
        task: "dbn" or "gcp" (see :func:`resolve_task`).
        config: the run config (reads dbn_eps, dbn_eps_relative, gcp_dim, ns_iters).

    Returns:
        A dict with stem_norm, head, pre_svd, meta_method, meta_kwargs, dbn_eps,
        dbn_eps_relative, gcp_dim.
    """
    ns = spec.meta_method == "newton_schulz"
    meta_kwargs = {"num_iters": int(config.ns_iters)} if ns else None
    options: dict[str, Any] = {
        "stem_norm": "bn",
        "head": "gap",
        "pre_svd": "none",
        "meta_method": spec.meta_method,
        "meta_kwargs": meta_kwargs,
        "dbn_eps": float(config.dbn_eps),
        "dbn_eps_relative": bool(config.get("dbn_eps_relative", False)),
        "gcp_dim": int(config.gcp_dim),
    }
    if not spec.uses_svd:
        return options
    options["pre_svd"] = spec.pre_svd
    if task == "dbn":
        options["stem_norm"] = "dbn"
    else:
        options["head"] = "gcp"
    return options

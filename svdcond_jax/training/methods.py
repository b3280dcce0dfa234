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

Optimizers. A row name may end in ``@<optimizer>``, one of :data:`OPTIMIZERS`, the optimizer
of every parameter the row's ``+nog``/``+olr`` do not treat (without it:
``config.optimizer``, SGD by default): ``sgd`` (the paper's torch-style SGD,
``pre_svd_sgd``), ``adamw`` (``optax.adamw``; the Pre-SVD layer keeps the paper's SGD with
NOG/OLR when the row asks for them, ``pre_svd_optimizer``), ``muon``
(``optax.contrib.muon`` on every conv/dense kernel but the head, AdamW for the rest),
``nog`` and ``nog+olr`` (``nog_optimizer``: NOG, and per-layer OLR, on every conv/dense
kernel but the head, SGD for the rest). ``muon``, ``nog`` and ``nog+olr`` already treat the
Pre-SVD kernel, so they do not combine with ``+nog``/``+olr`` (:func:`resolve_optimizer`).

Example:
    >>> from svdcond_jax.training.methods import parse_method
    >>> spec = parse_method("svd+nog+ow+olr")
    >>> spec.pre_svd, spec.nog, spec.olr, spec.ol
    ('ow', True, True, False)
    >>> parse_method("svd+nog+olr@adamw").optimizer, parse_method("svd").optimizer
    ('adamw', None)
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

OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw", "muon", "nog", "nog+olr")
ALL_LAYER_OPTIMIZERS: tuple[str, ...] = ("muon", "nog", "nog+olr")  # treat every kernel


class MethodSpec(NamedTuple):
    """What one method row switches on."""

    name: str
    uses_svd: bool  # False only for "bn"
    meta_method: str  # svdcond_jax.meta_layer method: "eigh" | "eigh_autodiff" | "newton_schulz"
    pre_svd: str  # Pre-SVD weight treatment: "none" | "sn" | "ow"
    nog: bool  # nearest orthogonal gradient (Eqs. 14-17)
    olr: bool  # optimal learning rate (Eqs. 18-21)
    ol: bool  # orthogonality loss ||W W^T - I||_F added to the objective (Eq. 12)
    optimizer: str | None = None  # the "@<optimizer>" suffix; None: config.optimizer


def parse_method(name: str) -> MethodSpec:
    """Parses a paper row name, optionally ``@<optimizer>``, into a :class:`MethodSpec`.

    Args:
        name: one of :data:`METHODS`, optionally followed by ``@`` and one of
            :data:`OPTIMIZERS` (e.g. ``"svd+nog+olr@adamw"``).

    Returns:
        The method's switches.

    Raises:
        ValueError: for an unknown name or optimizer (the message lists the valid ones).
    """
    if not isinstance(name, str):
        raise ValueError(f"Unknown method {name!r}: a method name is a str")
    row, at, optimizer = name.partition("@")
    if row not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid: {', '.join(METHODS)}, each "
                         f"optionally followed by @<optimizer> ({', '.join(OPTIMIZERS)})")
    if at and optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r} in method {name!r}; valid "
                         f"optimizers: {', '.join(OPTIMIZERS)}")
    opt = optimizer if at else None
    if row == "bn":
        return MethodSpec(name, False, "eigh", "none", False, False, False, opt)
    if row == "newton_schulz":
        return MethodSpec(name, True, "newton_schulz", "none", False, False, False, opt)
    if row == "svd_autodiff":
        return MethodSpec(name, True, "eigh_autodiff", "none", False, False, False, opt)
    parts = set(row.split("+")[1:])
    pre_svd = "sn" if "sn" in parts else ("ow" if "ow" in parts else "none")
    return MethodSpec(name, True, "eigh", pre_svd, "nog" in parts, "olr" in parts,
                      "ol" in parts, opt)


def resolve_optimizer(spec: MethodSpec, default: str) -> str:
    """The optimizer of a run: the method's ``@`` suffix, else ``default``
    (``config.optimizer``).

    Raises:
        ValueError: an unknown optimizer, or an all-layer optimizer (``muon``, ``nog``,
            ``nog+olr``) with a row that also asks for the Pre-SVD ``+nog``/``+olr`` (they
            would treat the same kernel twice).
    """
    optimizer = spec.optimizer or default
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if optimizer in ALL_LAYER_OPTIMIZERS and (spec.nog or spec.olr):
        row = spec.name.partition("@")[0]
        plain = "+".join(p for p in row.split("+") if p not in ("nog", "olr"))
        raise ValueError(
            f"method {spec.name!r} with optimizer {optimizer!r}: {optimizer} already "
            f"orthogonalises every kernel, the Pre-SVD one included; drop +nog/+olr "
            f"({plain}@{optimizer})")
    return optimizer


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

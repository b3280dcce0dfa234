"""Default training configuration (ml_collections), flax-examples style.

Experiments override a few fields of :func:`get_config`; every field is documented inline.
The defaults train ``TinyResNet`` with decorrelated BN (``method="svd"``) on the embedded
offline ``digits`` dataset, so a fresh machine without internet can run them.
:func:`validate_config` checks every field's type and range (``train_and_evaluate`` calls
it before loading data or compiling anything).

Example:
    >>> from svdcond_jax.training.config import get_config, validate_config
    >>> config = get_config()
    >>> config.method, config.dataset
    ('svd', 'digits')
    >>> validate_config(config)
    >>> config.batch_size, config.learning_rate = 0, -0.1
    >>> validate_config(config)
    Traceback (most recent call last):
    ...
    ValueError: invalid config:
      config.batch_size=0: must be an integer >= 1
      config.learning_rate=-0.1: must be a finite number > 0
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")  # names jax.random.key(impl=...) knows
MAX_SEED = 2**32 - 1


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (docs/applications.md recipe, scaled down).

    Returns:
        A ConfigDict with data, model, method, optimiser, logging and parallelism fields.
    """
    config = ml_collections.ConfigDict()
    # --- data ---------------------------------------------------------------------------
    config.dataset = "digits"  # "digits" | "cifar10" | "cifar100" | "imagenet2012"
    # Where CIFAR comes from: "archive" (the original Python archive in data_dir, NumPy
    # only), "tfds" (TFDS files, needs TensorFlow), "auto" (the archive if data_dir holds
    # one, else TFDS). digits is embedded; ImageNet is TFDS only.
    config.data_source = "auto"
    # The CIFAR archive's or TFDS's data_dir (ImageNet: manual_dir is
    # <data_dir>/downloads/manual). A str placeholder (value None) so that
    # `--config.data_dir=DIR` can set it (ml_collections config_flags).
    config.data_dir = ml_collections.config_dict.placeholder(str)
    # digits only: 0 = the fixed 1,497/300 hold-out; k >= 2 = k-fold cross-validation over
    # all 1,797 images, fold cv_fold validating (input_pipeline.digits_arrays)
    config.cv_folds = 0
    config.cv_fold = 0
    config.image_size = -1  # -1: dataset default (digits 16, cifar 32, imagenet 224)
    config.max_train_examples = -1  # -1 = all; >0 takes the first N (demo / tests)
    config.max_eval_examples = -1
    config.input_channels = -1  # -1: all; 1: the model keeps the digits' one grey channel
    config.shuffle_buffer = 50_000  # whole CIFAR train split; ImageNet: ~16_384 (memory)
    # --- model / method -----------------------------------------------------------------
    config.model = "TinyResNet"  # network factory in svdcond_jax.models
    config.num_filters = -1  # -1: the model's default (TinyResNet 8); >27 shows rank <= 27
    config.method = "svd"  # one of svdcond_jax.training.methods.METHODS
    config.task = "auto"  # "dbn" (whitening stem) | "gcp" (covariance head) | "auto"
    config.dbn_eps = 1e-2  # eps*I of decorrelated BN (Appendix B.1)
    # True: the ridge is dbn_eps * trace(P) / d (scale-free; docs/conditioning.md)
    config.dbn_eps_relative = False
    config.dbn_groups = 1
    config.gcp_dim = 256  # channels of the GCP 1x1 Pre-SVD conv (Appendix B.2)
    config.ns_iters = 5  # Newton-Schulz iterations of the "newton_schulz" method
    config.half_precision = False
    # --- optimisation -------------------------------------------------------------------
    config.num_epochs = 30
    config.num_train_steps = -1  # -1: from num_epochs; >0 overrides (tests)
    config.batch_size = 128  # global batch (all processes)
    config.eval_batch_size = 256
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    # lr *= lr_decay at each of these epochs; a tuple so that config_flags can override it
    # (`--config.lr_boundaries_epochs='(5, 8)'`); lists assigned to it become tuples
    config.lr_boundaries_epochs = (10, 20)
    config.lr_decay = 0.1
    config.ol_coeff = 1e-2  # orthogonality-loss weight (the paper gives none; Sec. 4.2)
    # The optimizer of every parameter the method's +nog/+olr do not treat, for method names
    # without "@<optimizer>" (methods.OPTIMIZERS): "sgd" (learning_rate, momentum,
    # weight_decay above: the paper's), "adamw", "muon" (optax.contrib.muon), "nog",
    # "nog+olr" (NOG / NOG + per-layer OLR on every conv and dense kernel but the head, at
    # the SGD fields above). The Pre-SVD layer's NOG/OLR always use the SGD fields, and
    # learning_rate is OLR's cap. Every rate follows the same decay (lr_boundaries_epochs).
    config.optimizer = "sgd"
    config.adamw_learning_rate = 1e-3  # "adamw", and muon's AdamW for the non-matrices
    config.adamw_weight_decay = 1e-4  # decoupled (optax.adamw's default)
    config.muon_learning_rate = 0.02  # "muon": rate of the orthogonalised kernels
    config.muon_weight_decay = 0.0  # "muon": decoupled, on the kernels (optax's default)
    config.polar_method = "polar_express"  # "nog"/"nog+olr": orthogonal.POLAR_METHODS
    # --- telemetry / output -------------------------------------------------------------
    config.monitor_every_steps = 20  # float64 conditioning of the Pre-SVD output
    config.log_every_steps = 20
    config.eval_every_epochs = 1
    config.checkpoint_every_epochs = 1
    config.max_checkpoints_to_keep = 2
    config.progress_bar = True
    # --- reproducibility / parallelism --------------------------------------------------
    config.seed = 0
    # PRNG of parameter init: "rbg" compiles the ResNet init ~6x faster than "threefry2x32"
    # on CPU (measured 3.8 s vs 23 s); rbg bits may differ across backends.
    config.prng_impl = "rbg"
    config.parallel = "jit"  # "jit" (Mesh + NamedSharding) | "pmap"
    config.prefetch = 2  # batches placed on the devices ahead of the step
    return config


def config_with(**overrides: Any) -> ml_collections.ConfigDict:
    """:func:`get_config` with ``overrides`` applied (the experiment configs' base).

    Raises:
        ValueError: for a field the default config does not have.
    """
    config = get_config()
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"the default config has no field {key!r}")
        config[key] = value
    return config


def runlocal(config: ml_collections.ConfigDict, **overrides: Any
             ) -> ml_collections.ConfigDict:
    """Shrinks ``config`` in place to a tiny local run (a few steps on a small subset),
    then applies ``overrides``; returns it."""
    config.update(dict(num_train_steps=4, batch_size=8, eval_batch_size=16,
                       max_train_examples=64, max_eval_examples=32, monitor_every_steps=2,
                       log_every_steps=2, progress_bar=False))
    config.update(overrides)
    return config


def load_config_file(path: str | Path) -> ModuleType:
    """Imports an experiment config file by path, as ml_collections' ``config_flags`` does.

    Config files load each other through it (``load_config_file(Path(__file__).with_name(
    "digits_demo.py"))``), so they work from a checkout and from the installed package
    alike.

    Args:
        path: a Python file defining ``get_config``.

    Returns:
        The module.

    Raises:
        ValueError: if the file does not exist or defines no ``get_config``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r} is not a file")
    spec = importlib.util.spec_from_file_location(f"_experiment_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config={str(path)!r} defines no get_config()")
    return module


Rule = Callable[[Any], str | None]  # value -> what it must be, or None when it is valid


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(low: int, *, or_minus_one: bool = False, high: int | None = None) -> Rule:
    """An integer in [low, high] (or exactly -1, the "default/all" marker)."""
    text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    text = f"-1 or {text}" if or_minus_one else text

    def rule(v: Any) -> str | None:
        ok = _is_int(v) and (v >= low and (high is None or v <= high)
                             or or_minus_one and v == -1)
        return None if ok else text

    return rule


def _number(low: float, *, low_open: bool = False, high: float | None = None,
            high_open: bool = False) -> Rule:
    """A finite real number in the interval given by low/high (open or closed ends)."""
    text = f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        text += f" and {'<' if high_open else '<='} {high:g}"

    def rule(v: Any) -> str | None:
        if not _is_number(v) or (v <= low if low_open else v < low):
            return text
        if high is not None and (v >= high if high_open else v > high):
            return text
        return None

    return rule


def _one_of(choices: Callable[[], Sequence[str]]) -> Rule:
    def rule(v: Any) -> str | None:
        valid = tuple(choices())
        return None if isinstance(v, str) and v in valid else f"one of {', '.join(valid)}"

    return rule


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _optional_path(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) and v else "None or a non-empty path string"


def _epochs(v: Any) -> str | None:
    text = "a list of increasing integer epochs >= 1 (may be empty)"
    if not isinstance(v, list | tuple) or not all(_is_int(e) and e >= 1 for e in v):
        return text
    return None if all(a < b for a, b in zip(v[:-1], v[1:], strict=True)) else text


def _datasets() -> Sequence[str]:
    from svdcond_jax.training.input_pipeline import DATASETS

    return DATASETS


def _data_sources() -> Sequence[str]:
    from svdcond_jax.training.input_pipeline import DATA_SOURCES

    return DATA_SOURCES


def _method(v: Any) -> str | None:
    from svdcond_jax.training.methods import METHODS, OPTIMIZERS, parse_method

    try:
        parse_method(v)
    except ValueError:
        return (f"one of {', '.join(METHODS)}, optionally followed by @<optimizer> "
                f"({', '.join(OPTIMIZERS)})")
    return None


def _optimizers() -> Sequence[str]:
    from svdcond_jax.training.methods import OPTIMIZERS

    return OPTIMIZERS


def _polar_methods() -> Sequence[str]:
    from svdcond_jax.orthogonal import POLAR_METHODS

    return POLAR_METHODS


def _tasks() -> Sequence[str]:
    from svdcond_jax.training.methods import TASKS

    return ("auto", *TASKS)


def _network_names() -> list[str]:
    """Names in svdcond_jax.models that build a whole network: factories ``f(num_classes, ...)``."""
    import inspect

    from svdcond_jax import models

    def builds_network(obj: Any) -> bool:
        if isinstance(obj, type) or not inspect.isfunction(obj):
            return False
        params = list(inspect.signature(obj).parameters)
        return bool(params) and params[0] == "num_classes"

    return sorted(n for n in dir(models) if builds_network(getattr(models, n)))


def _model(v: Any) -> str | None:
    names = _network_names()
    return None if v in names else f"a network of svdcond_jax.models ({', '.join(names)})"


RULES: dict[str, Rule] = {
    "dataset": _one_of(_datasets),
    "data_source": _one_of(_data_sources),
    "data_dir": _optional_path,
    "cv_folds": _int(0),
    "cv_fold": _int(0),
    "image_size": _int(1, or_minus_one=True),
    "max_train_examples": _int(1, or_minus_one=True),
    "max_eval_examples": _int(1, or_minus_one=True),
    "input_channels": _int(1, or_minus_one=True),
    "shuffle_buffer": _int(1),
    "model": _model,
    "num_filters": _int(1, or_minus_one=True),
    "method": _method,
    "task": _one_of(_tasks),
    "dbn_eps": _number(0.0, low_open=True),  # eps*I makes the singular stem covariance PD
    "dbn_eps_relative": _bool,
    "dbn_groups": _int(1),
    "gcp_dim": _int(1),
    "ns_iters": _int(1),
    "half_precision": _bool,
    "num_epochs": _int(1),
    "num_train_steps": _int(1, or_minus_one=True),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
    "learning_rate": _number(0.0, low_open=True),
    "momentum": _number(0.0, high=1.0, high_open=True),
    "weight_decay": _number(0.0),
    "lr_boundaries_epochs": _epochs,
    "lr_decay": _number(0.0, low_open=True, high=1.0),
    "ol_coeff": _number(0.0),
    "optimizer": _one_of(_optimizers),
    "adamw_learning_rate": _number(0.0, low_open=True),
    "adamw_weight_decay": _number(0.0),
    "muon_learning_rate": _number(0.0, low_open=True),
    "muon_weight_decay": _number(0.0),
    "polar_method": _one_of(_polar_methods),
    "monitor_every_steps": _int(1),
    "log_every_steps": _int(1),
    "eval_every_epochs": _int(1),
    "checkpoint_every_epochs": _int(1),
    "max_checkpoints_to_keep": _int(1),
    "progress_bar": _bool,
    "seed": _int(0, high=MAX_SEED),
    "prng_impl": _one_of(lambda: PRNG_IMPLS),
    "parallel": _one_of(lambda: ("jit", "pmap")),
    "prefetch": _int(0),
}
"""What each field of :func:`get_config` must be (the rule returns the requirement text)."""


def validate_config(config: Any) -> None:
    """Checks every field's type and range before a run touches data or compiles anything.

    Rules (:data:`RULES`): sizes, counts and periods are integers >= 1 (``-1`` means
    "default"/"all" where :func:`get_config` says so; ``prefetch`` may be 0); the learning
    rate and ``dbn_eps`` are finite and > 0; ``momentum`` is in [0, 1); ``lr_decay`` in
    (0, 1]; weight decays and ``ol_coeff`` are finite and >= 0; the AdamW and Muon rates
    are finite and > 0; ``lr_boundaries_epochs`` are increasing epochs >= 1; names
    (dataset, data_source, model, method with its optional ``@<optimizer>``, task,
    optimizer, polar_method, prng_impl, parallel) are known; flags are bools; ``seed`` is in
    [0, 2**32 - 1]. Across fields: ``max_train_examples`` (when set) is at least
    ``batch_size`` (else an epoch has no batch); ``cv_folds`` is 0 or >= 2, only for
    digits, and ``cv_fold < cv_folds``; the method and the optimizer combine
    (``methods.resolve_optimizer``: ``muon``/``nog``/``nog+olr`` already treat the Pre-SVD
    kernel, so not with ``+nog``/``+olr``). Fields the defaults do not have are rejected (a
    typo would be ignored).

    Args:
        config: a ConfigDict (or mapping) with the fields of :func:`get_config`.

    Raises:
        ValueError: listing every invalid, missing or unknown field with its value.
    """
    keys = set(config.keys())
    errors = [f"  config.{k}: missing" for k in RULES if k not in keys]
    errors += [f"  config.{k}={config[k]!r}: unknown field (valid: {', '.join(RULES)})"
               for k in sorted(keys - set(RULES))]
    for key, rule in RULES.items():
        if key in keys and (need := rule(config[key])) is not None:
            errors.append(f"  config.{key}={config[key]!r}: must be {need}")
    if not errors and config["cv_folds"] == 1:
        errors.append("  config.cv_folds=1: must be 0 (fixed hold-out) or >= 2 folds")
    if not errors and config["cv_folds"] and not config["cv_fold"] < config["cv_folds"]:
        errors.append(f"  config.cv_fold={config['cv_fold']!r}: must be < config.cv_folds="
                      f"{config['cv_folds']!r}")
    if not errors and config["cv_folds"] and config["dataset"] != "digits":
        errors.append(f"  config.cv_folds={config['cv_folds']!r}: cross-validation folds "
                      f"are for dataset='digits' (got {config['dataset']!r})")
    if not errors and 0 < config["max_train_examples"] < config["batch_size"]:
        errors.append(f"  config.max_train_examples={config['max_train_examples']!r} is "
                      f"smaller than config.batch_size={config['batch_size']!r}: an epoch "
                      "would hold no batch")
    if not errors:
        from svdcond_jax.training.methods import parse_method, resolve_optimizer

        try:
            resolve_optimizer(parse_method(config["method"]), config["optimizer"])
        except ValueError as err:
            errors.append(f"  config.method={config['method']!r}, config.optimizer="
                          f"{config['optimizer']!r}: {err}")
    if errors:
        raise ValueError("invalid config:\n" + "\n".join(errors))

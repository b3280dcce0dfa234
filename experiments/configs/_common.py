"""Helpers shared by the experiment configs (not an experiment itself)."""

from __future__ import annotations

import ml_collections

from svdcond_jax.training import config as default_config


def base(**overrides) -> ml_collections.ConfigDict:
    """The library's default config with `overrides` applied (unknown keys raise)."""
    config = default_config.get_config()
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"the default config has no field {key!r}")
        config[key] = value
    return config


def runlocal(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """Shrinks a config to a tiny local run (a few steps on a small subset)."""
    config.num_train_steps = 4
    config.batch_size = 8
    config.eval_batch_size = 16
    config.max_train_examples = 64
    config.max_eval_examples = 32
    config.monitor_every_steps = 2
    config.log_every_steps = 2
    config.progress_bar = False
    for key, value in overrides.items():
        config[key] = value
    return config

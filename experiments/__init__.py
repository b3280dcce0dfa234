"""Experiment scripts of svdcond_jax: configs, runner, tables, plots, demo and timing.

Everything here calls `svdcond_jax.training.loop.train_and_evaluate` and reads its
outputs only through each run's `metrics.jsonl` (see `experiments/tables.py`).
"""

import os

# Command-line entry points: keep TensorFlow's C++ INFO lines (oneDNN notices) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

"""Training library: config, input pipelines, method rows, jit/pmap steps, conditioning
monitor, checkpoints, metric writers and ``train_and_evaluate(config, workdir)``.

Modules: ``config`` (get_config), ``methods`` (METHODS, parse_method), ``input_pipeline``,
``state`` (model/optimizer/TrainState), ``steps`` (train/eval/feature steps; jit over a Mesh
or pmap), ``monitor`` (float64 kappa), ``writers`` (metrics.jsonl + TensorBoard),
``checkpointing`` (orbax), ``loop`` (train_and_evaluate).
"""

from svdcond_jax.training.config import get_config as get_config
from svdcond_jax.training.loop import train_and_evaluate as train_and_evaluate
from svdcond_jax.training.methods import METHODS as METHODS
from svdcond_jax.training.methods import parse_method as parse_method

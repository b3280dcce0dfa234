"""Training library: config, input pipelines, method rows, jit/pmap steps, conditioning
monitor, checkpoints, metric writers and ``train_and_evaluate(config, workdir)``.

Modules: ``config`` (get_config), ``methods`` (METHODS, parse_method), ``input_pipeline``,
``state`` (model/optimizer/TrainState), ``steps`` (train/eval/feature steps; jit over a Mesh
or pmap), ``monitor`` (float64 kappa), ``writers`` (metrics.jsonl + TensorBoard),
``checkpointing`` (orbax; plain or keyed integrity records), ``distributed`` (several
processes) with ``rendezvous`` (their start handshake), ``loop`` (train_and_evaluate).
"""

from typing import Any

from svdcond_jax._extras import require

require(("ml_collections", "orbax", "tensorboard", "tqdm"), extra="train",
        what="svdcond_jax.training")

from svdcond_jax.training.config import get_config as get_config  # noqa: E402
from svdcond_jax.training.methods import METHODS as METHODS  # noqa: E402
from svdcond_jax.training.methods import parse_method as parse_method  # noqa: E402

__all__ = ["METHODS", "get_config", "parse_method", "train_and_evaluate"]


def __getattr__(name: str) -> Any:
    """Imports ``loop.train_and_evaluate`` on first use (PEP 562).

    The loop imports orbax, the metric writers and the input pipeline, which
    ``state``/``steps`` users (benchmarks, custom loops) do not need.
    """
    if name == "train_and_evaluate":
        from svdcond_jax.training.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

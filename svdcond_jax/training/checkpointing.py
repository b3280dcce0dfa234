"""Orbax checkpoints of the train state under ``workdir/checkpoints`` (one per epoch).

Only array state is saved (params, batch_stats, opt_state, step, svd_failures); the data
order is a function of (seed, step), so restoring the state is enough for an exact resume.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from svdcond_jax.training.checkpointing import Checkpointer
    >>> ckpt = Checkpointer(tempfile.mkdtemp())
    >>> ckpt.save(5, {"w": jnp.ones(2)})
    >>> ckpt.latest_step(), ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
    (5, [1.0, 1.0])
    >>> ckpt.close()
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from svdcond_jax.training.state import TrainState

_FIELDS = ("step", "params", "batch_stats", "opt_state", "svd_failures")


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The saved part of a (host, unreplicated) TrainState."""
    return {k: getattr(state, k) for k in _FIELDS}


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` (StandardSave/Restore)."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2) -> None:
        """Opens (creating) ``workdir/checkpoints``."""
        directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mngr = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._mngr.latest_step()

    def save(self, step: int, tree: Any) -> None:
        """Saves ``tree`` (a pytree of arrays) as checkpoint ``step``; waits for it."""
        if step in self._mngr.all_steps():
            return
        self._mngr.save(step, args=ocp.args.StandardSave(tree))
        self._mngr.wait_until_finished()

    def restore_raw(self, step: int | None = None) -> dict[str, Any]:
        """Restores checkpoint ``step`` (default latest) as nested dicts/lists of arrays."""
        step = self.latest_step() if step is None else step
        return self._mngr.restore(step, args=ocp.args.StandardRestore())

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default latest) into the structure of ``target``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Waits for pending saves and closes the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()


def save_state(ckpt: Checkpointer, state: TrainState) -> None:
    """Saves a host (unreplicated) TrainState at its own step."""
    ckpt.save(int(jax.device_get(state.step)), state_arrays(state))


def load_arrays(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Saved arrays (step, params, batch_stats, opt_state, svd_failures) of a workdir."""
    ckpt = Checkpointer(workdir)
    try:
        return ckpt.restore_raw(step)
    finally:
        ckpt.close()


def restore_state(ckpt: Checkpointer, state: TrainState) -> TrainState:
    """Returns ``state`` with the arrays of the latest checkpoint (unchanged if none)."""
    if ckpt.latest_step() is None:
        return state
    return state.replace(**ckpt.restore(state_arrays(state)))

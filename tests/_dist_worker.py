"""A tiny multi-process training program for tests/test_distributed.py (not a test).

``python -m tests._dist_worker WORKDIR STEPS [WORKDIR STEPS ...] [--sleep_after_step S]
[--fail_process K] [--set KEY=JSON ...] [--mock_tfds N]``:
joins the ``jax.distributed`` program described by the environment (experiments/launch.py
sets it), then trains the tiny digits config of :func:`tiny_config` into each WORKDIR up to
STEPS steps, one after the other (resuming what a WORKDIR holds). It prints one line
``DONE <workdir> <steps> <val_error>`` per run. ``--sleep_after_step`` slows every step
(to kill a process mid-run); ``--fail_process K`` makes process K raise at once while the
others wait for it in a collective (to test the launcher); ``--set`` overrides a config
field (JSON value), e.g. ``--set num_filters=16``; ``--mock_tfds N`` runs under
``tfds.testing.mock_data(num_examples=N)`` (per process: each reads its mocked share).
"""

from __future__ import annotations

import json
import sys
import time

from svdcond_jax.training import distributed


def tiny_config(num_train_steps: int):
    """Digits, TinyResNet with 4 filters, global batch 16, a checkpoint every epoch (2 steps)."""
    from svdcond_jax.training.config import get_config

    config = get_config()
    config.update(dict(method="svd+nog+olr", num_filters=4, image_size=8, batch_size=16,
                       eval_batch_size=16, max_train_examples=32, max_eval_examples=24,
                       num_train_steps=num_train_steps, monitor_every_steps=2,
                       log_every_steps=1, lr_boundaries_epochs=[1], progress_bar=False,
                       max_checkpoints_to_keep=10))
    return config


def main(argv: list[str]) -> int:
    """Runs the (WORKDIR, STEPS) pairs of ``argv``."""
    sleep = 0.0
    if "--sleep_after_step" in argv:
        i = argv.index("--sleep_after_step")
        sleep = float(argv[i + 1])
        del argv[i:i + 2]
    overrides = {}
    while "--set" in argv:  # --set key=json_value (e.g. --set num_filters=16)
        i = argv.index("--set")
        key, _, value = argv[i + 1].partition("=")
        overrides[key] = json.loads(value)
        del argv[i:i + 2]
    mock = 0
    if "--mock_tfds" in argv:  # TFDS datasets from tfds.testing.mock_data(num_examples=N)
        i = argv.index("--mock_tfds")
        mock = int(argv[i + 1])
        del argv[i:i + 2]
    fail = -1
    if "--fail_process" in argv:
        i = argv.index("--fail_process")
        fail = int(argv[i + 1])
        del argv[i:i + 2]
    # jax's default heartbeat timeout (100 s): a short one fires spuriously when a loaded CI
    # machine starves the processes (seen with 10 s). The tests do not need it: a killed
    # peer closes its gloo connections, and the launcher ends the others at once.
    distributed.initialize()
    import jax

    from svdcond_jax.training import runtime

    runtime.enable_compilation_cache()  # $SVDCOND_JAX_CACHE_DIR: shared by the test's runs

    if jax.process_index() == fail:
        raise RuntimeError(f"process {fail} fails on purpose")
    if fail >= 0:  # the others wait for it in a collective (the launcher must end them)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("never completes")

    from svdcond_jax.training import loop

    if sleep:
        original = loop.steps.Parallel.__init__

        def slow_init(self, *args, **kwargs):  # every train step then takes >= sleep seconds
            original(self, *args, **kwargs)
            step = self.train_step

            def slow(state, batch):
                out = step(state, batch)
                jax.block_until_ready(out)
                time.sleep(sleep)
                return out

            self.train_step = slow

        loop.steps.Parallel.__init__ = slow_init
    for workdir, steps in zip(argv[::2], argv[1::2], strict=True):
        config = tiny_config(int(steps))
        config.update(overrides)
        if mock:
            import tensorflow_datasets as tfds

            with tfds.testing.mock_data(num_examples=mock):
                summary = loop.train_and_evaluate(config, workdir)
        else:
            summary = loop.train_and_evaluate(config, workdir)
        print(f"DONE {workdir} {summary['steps']} {summary['val_error']} steps_per_s="
              f"{summary['steps_per_s']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

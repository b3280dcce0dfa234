"""Multi-process specification: flags and environment combine, or fail clearly."""

import pytest

from svdcond_jax.training.distributed import DistributedSpec, resolve

ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
       "JAX_PROCESS_ID": "3"}


def test_nothing_given_is_one_process() -> None:
    assert resolve(env={}) is None
    assert resolve(num_processes=1, env={}) is None


def test_environment_alone_is_read() -> None:
    assert resolve(env=ENV) == DistributedSpec("10.0.0.1:1234", 4, 3)


def test_flags_override_the_environment() -> None:
    assert resolve("h:1", "2", "0", env=ENV) == DistributedSpec("h:1", 2, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"coordinator_address": "h:1"}, "num_processes, process_id missing"),
    ({"num_processes": 2, "process_id": 0}, "coordinator_address missing"),
    ({"coordinator_address": "h:1", "num_processes": 2}, "process_id missing"),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "host:port"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"\[0, num_proc"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, ">= 1"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}, "integer"),
])
def test_partial_or_inconsistent_specifications_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(**kwargs, env={})


def test_partial_environment_raises() -> None:
    with pytest.raises(ValueError, match="process_id missing"):
        resolve(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})

"""Command-line flags shared by the experiment entry points (absl.flags + config_flags).

Every entry point (`experiments.run`, `experiments.demo`, `experiments.decorrelated_bn`,
`experiments.covariance_pooling`, `experiments.plot`) builds its flags with
:func:`new_flag_values` and parses them in its testable ``main(argv)``; ``app.run`` is used
only under ``__main__``. Each call builds a fresh ``FlagValues`` (not the global
``absl.flags.FLAGS``): ml_collections' ``DEFINE_config_file`` registers the
``--config.key=value`` override flags from the command line it is given at definition
time, and tests call ``main`` several times in one process.

Example:
    >>> fv = new_flag_values()
    >>> fv(["prog", "--num_processes=1"])
    ['prog']
    >>> fv.num_processes, fv.coordinator_address
    (1, None)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import flags


def define_distributed_flags(fv: flags.FlagValues) -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` (all optional).

    With none of them (and no ``JAX_*`` environment variable) the program is one process;
    see ``svdcond_jax.training.distributed.initialize``.
    """
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (multi-process runs)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "index of this process", flag_values=fv)


def new_flag_values() -> flags.FlagValues:
    """A fresh ``FlagValues`` holding the distributed flags."""
    fv = flags.FlagValues()
    define_distributed_flags(fv)
    return fv


def initialize_distributed(fv: flags.FlagValues) -> None:
    """Calls ``distributed.initialize`` with the parsed flags (a no-op for one process).

    Raises:
      SystemExit: for an incomplete or inconsistent specification (the message says what
        is missing), or a start that failed (a held port, a process that failed).
    """
    from svdcond_jax.training import distributed

    try:
        distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    except (ValueError, RuntimeError) as err:  # RuntimeError: distributed.StartError
        raise SystemExit(f"error: {err}") from None


def parse(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    """Parses ``argv`` (without the program name) into ``fv``.

    Raises:
      SystemExit: with "error: ..." for an unknown flag, a bad value, an unknown
        ``--config.`` field or a config file that cannot be loaded, or a positional
        argument.
    """
    try:
        rest = fv(["prog", *argv])
    except flags.Error as err:
        raise SystemExit(f"error: {err}") from None
    except (AttributeError, KeyError) as err:  # config_flags: --config.<unknown field>
        raise SystemExit(f"error: the config has no field {err}; "
                         f"arguments: {' '.join(argv)}") from None
    if len(rest) > 1:
        raise SystemExit(f"error: unexpected positional arguments {rest[1:]}")


def int_list(name: str, values: Sequence[str] | None) -> list[int] | None:
    """A comma-separated flag's items as integers (None stays None).

    Raises:
      SystemExit: for an empty list or a non-integer item.
    """
    if values is None:
        return None
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise SystemExit(f"error: --{name}={','.join(values)!r}: not integers") from None
    if not out:
        raise SystemExit(f"error: --{name}='' names no seed")
    return out


def str_list(name: str, values: Sequence[str] | None) -> list[str] | None:
    """A comma-separated flag's non-empty items (None stays None).

    Raises:
      SystemExit: for an empty list.
    """
    if values is None:
        return None
    out = [v.strip() for v in values if v.strip()]
    if not out:
        raise SystemExit(f"error: --{name}='' names no method")
    return out


def run_app(main: Callable[[list[str]], object]) -> None:
    """``absl.app.run`` for an entry point whose ``main(argv)`` parses its own flags.

    ``main`` gets the arguments without the program name; its return value (a table) is
    not an exit status.
    """
    from absl import app, logging

    def _main(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # app.run would show orbax's INFO lines
        main(argv[1:])

    def _parser(argv: list[str]) -> list[str]:
        flags.FLAGS(argv[:1])  # absl's own (global) flags keep their defaults
        return argv

    app.run(_main, flags_parser=_parser)

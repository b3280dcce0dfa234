"""Command-line flags shared by the experiment entry points (absl.flags + config_flags).

Every entry point (`experiments.run`, `experiments.demo`, `experiments.decorrelated_bn`,
`experiments.covariance_pooling`, `experiments.plot`; installed as the console scripts
`svdcond-run`, `svdcond-demo`, `svdcond-dbn`, `svdcond-gcp`, `svdcond-plot`) builds its
flags with :func:`new_flag_values` and parses them in its testable ``main(argv)``;
``app.run`` is used only by :func:`run_app` (``__main__`` and the console scripts). Each
call builds a fresh ``FlagValues`` (not the global ``absl.flags.FLAGS``): ml_collections'
``DEFINE_config_file`` registers the ``--config.key=value`` override flags from the command
line it is given at definition time, and tests call ``main`` several times in one process.
That fresh ``FlagValues`` has no help flags, so :func:`parse` handles ``-h``, ``--help``,
``--helpshort``, ``--helpfull`` and ``-?`` itself: the entry point's docstring, its flags
and the config's fields, then exit 0.

``--config`` takes a path (``path.py`` or ``path.py:arg``) or the name of a config that
ships with the package (``--config=digits_gcp``, :func:`resolve_config`), so the commands
work from any directory.

Example:
    >>> fv = new_flag_values()
    >>> fv(["prog", "--num_processes=1"])
    ['prog']
    >>> fv.num_processes, fv.coordinator_address
    (1, None)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import flags

CONFIGS = Path(__file__).resolve().parent / "configs"  # the configs shipped with the package
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


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


def resolve_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with a ``--config`` that names a shipped config replaced by its path.

    ``--config=NAME`` (or ``--config NAME``, optionally ``NAME:arg``) where ``NAME`` is not
    an existing file but ``NAME`` or ``NAME.py`` is in :data:`CONFIGS` (e.g.
    ``digits_gcp``, ``experiments/configs/digits_gcp.py`` run from another directory)
    becomes that file's path. Everything else is unchanged.

    Example:
        >>> resolve_config(["--config=digits_gcp:runlocal"])[0].endswith(
        ...     "configs/digits_gcp.py:runlocal")
        True
    """

    def resolve(value: str) -> str:
        path, sep, arg = value.partition(":")
        if not path or Path(path).is_file():
            return value
        name = Path(path).name
        for candidate in (CONFIGS / name, CONFIGS / f"{name}.py"):
            if candidate.is_file():
                return f"{candidate}{sep}{arg}"
        return value

    out, items = [], list(argv)
    while items:
        item = items.pop(0)
        if item.startswith("--config="):
            item = "--config=" + resolve(item.partition("=")[2])
        elif item == "--config" and items:
            out.append(item)
            item = resolve(items.pop(0))
        out.append(item)
    return out


def config_fields(config: Any, prefix: str = "") -> list[str]:
    """``field=value`` lines of a ConfigDict (nested fields dotted), for messages and help."""
    lines = []
    for key in sorted(config.keys()):
        value = config[key]
        if hasattr(value, "keys") and hasattr(value, "items"):
            lines += config_fields(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}={value!r}")
    return lines


def requested_config(argv: Sequence[str], default: str | None) -> Any:
    """The config that ``--config`` in ``argv`` (else ``default``) names, or None.

    ``argv`` without the program name, shipped names already resolved
    (:func:`resolve_config`); None when there is no config or its file does not load.
    """
    from svdcond_jax.training.config import load_config_file

    spec = default
    for i, item in enumerate(argv):
        if item.startswith("--config="):
            spec = item.partition("=")[2]
        elif item == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if not spec:
        return None
    path, _, arg = spec.partition(":")
    try:
        return load_config_file(path).get_config(arg or None)
    except Exception:  # the user's file does not load: messages name the field only
        return None


def help_text(fv: flags.FlagValues, doc: str | None, config: Any = None) -> str:
    """The entry point's docstring, its flags and, given a ``config``, its fields."""
    parts = [(doc or "").strip(), "Flags:", fv.get_help(include_special_flags=False).strip(),
             "  -h, --help, --helpshort, --helpfull: this help"]
    if config is None and "config" in fv:
        from svdcond_jax.training.config import get_config

        config = get_config()
        parts.append("No --config given: the library's defaults, which every config file "
                     "starts from, are listed.")
    if config is not None:
        parts += ["Config fields (set any with --config.<field>=value):",
                  "\n".join(f"  --config.{line}" for line in config_fields(config))]
    return "\n\n".join(p for p in parts if p)


def parse(fv: flags.FlagValues, argv: Sequence[str], *, doc: str | None = None,
          config_default: str | None = None) -> None:
    """Parses ``argv`` (without the program name) into ``fv``; answers help flags.

    Args:
      fv: the entry point's flags.
      argv: the command line without the program name.
      doc: the entry point's docstring, printed first by ``--help``.
      config_default: the default of ``--config``, if the entry point has one (its fields
        are listed by ``--help`` and by the error for an unknown field).

    Raises:
      SystemExit: 0 after printing the help for ``-h``, ``--help``, ``--helpshort``,
        ``--helpfull`` or ``-?`` (the other arguments are parsed first where they can be,
        so ``--config=X --help`` lists X's fields); with "error: ..." for an unknown flag, a
        bad value, an unknown ``--config.`` field (the message lists the valid fields) or a
        config file that cannot be loaded, or a positional argument.
    """
    wants_help = any(a in HELP_FLAGS for a in argv)
    argv = [a for a in argv if a not in HELP_FLAGS]

    def config() -> Any:
        return requested_config(argv, config_default) if "config" in fv else None

    try:
        rest = fv(["prog", *argv])
    except flags.Error as err:
        if wants_help:
            print(help_text(fv, doc, config()))
            raise SystemExit(0) from None
        if isinstance(err, flags.UnrecognizedFlagError) and err.flagname.startswith(
                "config."):
            raise SystemExit(unknown_field_message(repr(err.flagname[7:]), config())) from None
        raise SystemExit(f"error: {err}") from None
    except (AttributeError, KeyError) as err:  # config_flags: --config.<unknown field>
        raise SystemExit(unknown_field_message(err, config())) from None
    if wants_help:
        print(help_text(fv, doc, config()))
        raise SystemExit(0)
    if len(rest) > 1:
        raise SystemExit(f"error: unexpected positional arguments {rest[1:]}")


def unknown_field_message(field: BaseException | str, config: Any = None) -> str:
    """"error: the config has no field X", followed by the fields ``config`` has."""
    raw = str(field.args[0] if isinstance(field, BaseException) and field.args else field)
    name = re.search(r"[A-Za-z_][\w.]*", raw)  # ml_collections nests reprs and hints
    text = f"error: the config has no field {name.group(0) if name else raw!r}"
    hint = re.search(r'Did you mean \W*"([^"\\]+)', raw)
    if hint:
        text += f" (did you mean {hint.group(1)!r}?)"
    if config is not None:
        text += ("\nIts fields (--config.<field>=value):\n"
                 + "\n".join(f"  {line}" for line in config_fields(config)))
    return text


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

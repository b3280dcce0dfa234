"""Orbax checkpoints of the train state under ``workdir/checkpoints``, verified on restore.

Only array state is saved (params, batch_stats, opt_state, step, svd_failures); the data
order is a function of (seed, step), so restoring the state is enough for an exact resume.

Integrity. Orbax checks neither the bytes it reads back nor that a checkpoint directory is
whole: a truncated or garbled data file, deleted metadata or an emptied directory raise
tensorstore/orbax errors, and a flipped byte can restore silently as different (e.g. NaN)
weights. So after orbax has finished a checkpoint, :meth:`Checkpointer.save` writes
``<step>/integrity.json`` next to orbax's files (atomically: temporary file + rename): the
SHA-256 of every saved array's dtype, shape and bytes (in tree order), the tree's structure
(path, shape, dtype per array) and the caller's ``extra`` (the loop stores how many
metrics records preceded the checkpoint). :func:`restore_latest` restores the newest
checkpoint, recomputes the digest of the restored arrays and compares; a checkpoint that
does not restore, does not match its digest, holds non-finite values (our train state is
always finite: non-finite steps are skipped) or whose record is unreadable is moved to
``workdir/checkpoints_damaged/`` (kept for inspection, out of orbax's way) with a log line,
and the next older one is tried. A checkpoint without a record (written by an earlier
version, or the run was killed between orbax's commit and the record) is accepted when it
restores and is finite, saying so. A record whose structure differs from the state being
restored (or, without a record, orbax metadata listing arrays of other shapes) means another
config or an incompatible version wrote the workdir: that raises
:class:`CheckpointMismatchError` and moves nothing.

Process layouts (docs/distributed.md). With several processes orbax writes a checkpoint
jointly and process 0 writes the record. Restores read into abstract arrays carrying the
*current* program's sharding (:func:`replicated`), never the saved one, so a checkpoint of N
processes x M devices restores in any other layout (one process included). The digest is of
each array's global value (the replicated state's local copy; a cross-process sharded array
is gathered), so a record written by 2 processes verifies when 1 process restores.

Why a digest of the restored arrays (not of the files): it checks exactly what training
will continue from, whatever orbax's file layout (OCDBT, compression) is, and costs one
host pass over the state per checkpoint.

What the plain digest protects against, and what not. It catches accidental damage: a
disk or network file system that truncates, garbles or loses files, a copy interrupted
half-way, a flipped bit. It cannot catch deliberate tampering: anyone who can write the
workdir can replace the arrays with other finite values and write a matching
``integrity.json`` (the SHA-256 is public arithmetic), and the run resumes from them.

Keyed digest (authentication). With a secret key, :meth:`Checkpointer.save` also records
``hmac_sha256``, an HMAC-SHA256 under that key of the step, the arrays' SHA-256, their
structure and ``extra`` (:func:`keyed_digest`); without the key nobody can write a record
that verifies, so a checkpoint on a shared or untrusted file system cannot be swapped
unnoticed. The key comes from the environment of every process (:func:`checkpoint_key`):
``SVDCOND_CHECKPOINT_KEY`` (the key itself) or ``SVDCOND_CHECKPOINT_KEY_FILE`` (a file
holding it; it must lie outside the workdir, where whoever rewrites checkpoints could read
it). What a keyed run does with each checkpoint, newest first:

* arrays that match the record's SHA-256 and an HMAC that verifies: restored
  (``Restored.authenticated``);
* arrays that do not restore, do not match the SHA-256, or are non-finite: damaged, moved
  to ``checkpoints_damaged/``, the next older one is tried (as without a key);
* no ``integrity.json`` (a kill between orbax's commit and the record, or a deleted
  record): not authenticated, so treated like a damaged one (moved aside, the older one
  is tried) - never restored;
* a record without ``hmac_sha256`` (written without a key) or with one that does not
  verify (the record was rewritten, or another key wrote it):
  :class:`CheckpointAuthenticationError`, nothing is moved and nothing restored; to resume
  such a run, set the key that wrote it, or unset the key to accept unkeyed checkpoints.

A run without a key restores a keyed checkpoint by its SHA-256 alone and logs that it was
not authenticated. The HMAC binds the checkpoint's content to its step, not to its run:
two runs sharing a key can be swapped for each other (use one key per run to rule that
out).

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from svdcond_jax.training.checkpointing import Checkpointer, restore_latest
    >>> ckpt = Checkpointer(tempfile.mkdtemp())
    >>> ckpt.save(5, {"w": jnp.ones(2)})
    >>> ckpt.latest_step(), ckpt.restore({"w": jnp.zeros(2)})["w"].tolist()
    (5, [1.0, 1.0])
    >>> restored = restore_latest(ckpt, {"w": jnp.zeros(2)})
    >>> restored.step, restored.tree["w"].tolist(), restored.verified
    (5, [1.0, 1.0], True)
    >>> ckpt.close()
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from svdcond_jax.training.state import TrainState

_FIELDS = ("step", "params", "batch_stats", "opt_state", "svd_failures")
INTEGRITY_FILE = "integrity.json"
DAMAGED_DIR = "checkpoints_damaged"
ENV_KEY = "SVDCOND_CHECKPOINT_KEY"
ENV_KEY_FILE = "SVDCOND_CHECKPOINT_KEY_FILE"
_FORMAT = 1

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another state structure (another model or method)."""


class CheckpointAuthenticationError(ValueError):
    """A keyed run found a checkpoint whose record it cannot authenticate (no HMAC, or one
    that does not verify under its key)."""


def checkpoint_key(workdir: str, env: Mapping[str, str] | None = None) -> bytes | None:
    """The secret key of keyed checkpoint records, from the environment; None: no key.

    ``SVDCOND_CHECKPOINT_KEY`` holds the key itself (its UTF-8 bytes);
    ``SVDCOND_CHECKPOINT_KEY_FILE`` names a file holding it (its bytes, surrounding
    whitespace such as a final newline removed). Set at most one, on every process.

    Args:
        workdir: the run's workdir (the key file must lie outside it).
        env: the environment to read (default ``os.environ``).

    Returns:
        The key, or None when neither variable is set (or both are empty).

    Raises:
        ValueError: both variables set, a key file that cannot be read, is empty or lies
            inside ``workdir``.

    Example:
        >>> checkpoint_key("/tmp/run", {"SVDCOND_CHECKPOINT_KEY": "s3cret"})
        b's3cret'
        >>> checkpoint_key("/tmp/run", {}) is None
        True
    """
    env = os.environ if env is None else env
    value, path = env.get(ENV_KEY) or None, env.get(ENV_KEY_FILE) or None
    if value is not None and path is not None:
        raise ValueError(f"both {ENV_KEY} and {ENV_KEY_FILE} are set: set one of them")
    if value is not None:
        return value.encode()
    if path is None:
        return None
    real, root = os.path.realpath(path), os.path.realpath(workdir)
    if os.path.commonpath([real, root]) == root:
        raise ValueError(f"{ENV_KEY_FILE}={path!r} lies inside the workdir {workdir!r}: "
                         "whoever can rewrite the checkpoints could read the key there; "
                         "keep the key file outside the workdir")
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"{ENV_KEY_FILE}={path!r} cannot be read: {e}") from None
    if not key:
        raise ValueError(f"{ENV_KEY_FILE}={path!r} is empty")
    return key


def keyed_digest(key: bytes, record: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) under ``key`` of a record's step, SHA-256, structure and extra.

    Example:
        >>> record = {"step": 2, "sha256": "ab", "arrays": [], "extra": {}}
        >>> keyed_digest(b"k", record) == keyed_digest(b"k", {**record, "step": 3})
        False
    """
    message = json.dumps({k: record.get(k) for k in ("step", "sha256", "arrays", "extra")},
                         sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The saved part of a (host, unreplicated) TrainState."""
    return {k: getattr(state, k) for k in _FIELDS}


def _host(x: Any) -> np.ndarray:
    """A host copy of one (replicated) array in jax's canonical dtype (a Python or NumPy
    scalar such as a fresh state's ``step`` compares equal to the int32 it is restored as);
    multi-host arrays give their local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            x = x.addressable_data(0)
        else:  # sharded across processes: gather the global value (collective)
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
    a = np.asarray(x)
    return a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)


def tree_structure(tree: Any) -> list[list[Any]]:
    """``[path, shape, dtype]`` of every array of ``tree``, in tree order (JSON-ready)."""
    def dtype(x: Any) -> str:
        return str(jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype")
                                                 else np.asarray(x).dtype))

    return [[jax.tree_util.keystr(path), list(np.shape(x)), dtype(x)]
            for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def tree_digest(tree: Any) -> str:
    """SHA-256 (hex) of the dtype, shape and bytes of every array of ``tree``, in order.

    The digest is of each array's global value, so it does not depend on the process
    layout that holds it: a replicated array (the train state) is read from this process's
    copy; an array sharded across processes is first gathered (a collective: every process
    must call this).
    """
    h = hashlib.sha256()
    for x in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(_host(x))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.data)
    return h.hexdigest()


def _nonfinite_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if np.issubdtype((a := _host(x)).dtype, np.inexact) and not np.all(np.isfinite(a))]


def verify(tree: Any, record: dict[str, Any] | None) -> str | None:
    """Why restored arrays cannot be trusted, or None: non-finite values, digest mismatch."""
    bad = _nonfinite_paths(tree)
    if bad:
        return f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    if record is not None and tree_digest(tree) != record.get("sha256"):
        return "the restored arrays do not match the SHA-256 recorded when it was saved"
    return None


def replicated() -> jax.sharding.NamedSharding:
    """Replication over every device of every process: how checkpoints are restored.

    The train state is replicated (data parallelism), so restoring into this sharding of
    the *current* program makes a checkpoint independent of the layout that wrote it (N
    processes x M devices -> any other).
    """
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _sync(name: str) -> None:
    """A barrier over all processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """``orbax.checkpoint.CheckpointManager`` (one StandardSave item) + integrity records."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2, key: bytes | None = None
                 ) -> None:
        """Opens (creating) ``workdir/checkpoints``.

        Args:
            workdir: the run's directory.
            max_to_keep: checkpoints kept.
            key: secret key of keyed records; None reads :func:`checkpoint_key` (the
                environment), which may also give None: plain SHA-256 records only.
        """
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.key = key if key is not None else checkpoint_key(self.workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        # One fixed item handler: a manager left to infer its items from what it reads
        # switches to multi-item mode on an empty step directory and then refuses every
        # later save/restore (orbax 0.12).
        self._mngr = ocp.CheckpointManager(self.directory,
                                           item_handlers=ocp.StandardCheckpointHandler(),
                                           options=options)

    def all_steps(self) -> list[int]:
        """Steps of the checkpoint directories orbax sees, ascending (damaged ones too)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint directory, or None (see :func:`restore_latest`)."""
        return self._mngr.latest_step()

    def save(self, step: int, tree: Any, *, extra: dict[str, Any] | None = None) -> None:
        """Saves ``tree`` (a pytree of arrays) as checkpoint ``step``, then its record.

        Waits for orbax, then (process 0) writes ``<step>/integrity.json`` atomically.

        Args:
            step: the checkpoint's step (an existing step is left as it is).
            tree: arrays to save.
            extra: JSON-ready values stored in the record (returned by restore_latest).
        """
        if step in self._mngr.all_steps():
            return
        self._mngr.save(step, args=ocp.args.StandardSave(tree))
        self._mngr.wait_until_finished()
        digest = tree_digest(tree)  # on every process (a sharded array is gathered)
        if jax.process_index() == 0:
            record = {"format": _FORMAT, "step": int(step), "sha256": digest,
                      "arrays": tree_structure(tree), "extra": dict(extra or {})}
            if self.key is not None:
                record["hmac_sha256"] = keyed_digest(self.key, record)
            path = os.path.join(self.directory, str(step), INTEGRITY_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)

    def read_record(self, step: int) -> dict[str, Any] | None:
        """The integrity record of ``step``; None if it has none.

        Raises:
            ValueError: the record exists but cannot be read (damaged).
        """
        path = os.path.join(self.directory, str(step), INTEGRITY_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                record = json.load(f)
            if not isinstance(record, dict) or "sha256" not in record:
                raise ValueError("no sha256")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable {INTEGRITY_FILE} ({e})") from None
        return record

    def saved_shapes(self, step: int) -> list[tuple[tuple[int, ...], str]] | None:
        """Sorted (shape, dtype) of the arrays orbax's metadata lists; None if unreadable."""
        try:
            metadata = self._mngr.item_metadata(step)
            leaves = jax.tree_util.tree_leaves(metadata)
            shapes = sorted((tuple(m.shape), str(jax.dtypes.canonicalize_dtype(m.dtype)))
                            for m in leaves)
        except Exception:  # noqa: BLE001 (any failure to read metadata means: unknown)
            return None
        return shapes or None

    def restore_raw(self, step: int | None = None) -> dict[str, Any]:
        """Restores checkpoint ``step`` (default latest) as nested dicts/lists of arrays.

        Arrays come back replicated over this program's devices (:func:`replicated`),
        whatever process layout wrote them.
        """
        step = self.latest_step() if step is None else step
        sharding = replicated()
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
            self._mngr.item_metadata(step))
        return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores checkpoint ``step`` (default latest) into the structure of ``target``.

        Arrays come back replicated over this program's devices (:func:`replicated`),
        whatever process layout wrote them: orbax reads into the current mesh's sharding.
        """
        step = self.latest_step() if step is None else step
        sharding = replicated()
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(
                x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype), sharding=sharding),
            target)
        return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))

    def quarantine(self, step: int) -> str:
        """Moves checkpoint ``step`` to ``workdir/checkpoints_damaged/`` (process 0).

        Returns:
            Where it went (a suffix ``-1``, ``-2``, ... avoids overwriting an earlier one).
        """
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, DAMAGED_DIR, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            base, k = dst, 0
            while os.path.exists(dst):
                k += 1
                dst = f"{base}-{k}"
            shutil.move(src, dst)
        _sync("quarantine")  # the others must not reload before process 0 moved it
        self._mngr.reload()
        return dst

    def close(self) -> None:
        """Waits for pending saves and closes the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint that restored and verified.

    Attributes:
        step: its step.
        tree: the restored arrays, in the target's structure.
        verified: True when its SHA-256 record matched; False for a checkpoint without a
            record (accepted because it restored and all its arrays are finite).
        extra: the ``extra`` given to :meth:`Checkpointer.save` ({} without a record).
        authenticated: True when its keyed digest (HMAC) verified under the run's key.
    """

    step: int
    tree: Any
    verified: bool
    extra: dict[str, Any]
    authenticated: bool = False


Legacy = tuple[Any, Callable[[Any], Any]]
"""(target in an older layout, function converting what restored into the current one)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _shapes(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    return sorted((tuple(shape), dtype) for _, shape, dtype in tree_structure(tree))


def _mismatch(step: int, saved: list[Any], wanted: list[Any]) -> CheckpointMismatchError:
    saved_t, wanted_t = [tuple(map(str, a)) for a in saved], [tuple(map(str, a)) for a in wanted]
    diff = [a for a in saved_t if a not in wanted_t][:3] + [
        b for b in wanted_t if b not in saved_t][:3]
    return CheckpointMismatchError(
        f"checkpoint {step} was written for another train state ({len(saved)} arrays; this "
        f"config's state has {len(wanted)}; differing: {diff}). The workdir belongs to "
        "another model/method/optimizer config (or a version of svdcond_jax with another "
        "optimizer state): use another workdir (or the config that wrote it).")


def _try_restore(ckpt: Checkpointer, step: int, target: Any, legacy: Legacy | None
                 ) -> tuple[Any, dict[str, Any] | None, str]:
    """(tree, record, note) of one checkpoint; raises with the reason it is unusable."""
    record = ckpt.read_record(step)
    if record is not None and record.get("arrays") != tree_structure(target):
        raise _mismatch(step, record.get("arrays") or [], tree_structure(target))
    if record is None and (saved := ckpt.saved_shapes(step)) is not None:
        # No record, but orbax's metadata is readable: arrays of other shapes mean another
        # config or an incompatible version wrote it, not damage.
        if saved != _shapes(target) and (legacy is None or saved != _shapes(legacy[0])):
            raise _mismatch(step, [list(a) for a in saved], [list(a) for a in _shapes(target)])
    try:
        tree, note = ckpt.restore(target, step), ""
    except Exception as e:  # orbax/tensorstore raise many types on damaged files
        if record is not None or legacy is None:
            raise ValueError(_first_line(e)) from None
        try:  # no record: maybe the layout of an earlier version
            tree, note = legacy[1](ckpt.restore(legacy[0], step)), " (earlier layout, converted)"
        except Exception:
            raise ValueError(_first_line(e)) from None
    problem = verify(tree, record)
    if problem:
        raise ValueError(problem)
    if ckpt.key is not None:
        _authenticate(ckpt.key, step, record)
    elif record is not None and "hmac_sha256" in record:
        log.warning("checkpoint %d was saved with a keyed digest, but no key is set (%s or "
                    "%s): checked against its SHA-256 only (accidental damage), not "
                    "authenticated", step, ENV_KEY, ENV_KEY_FILE)
    return tree, record, note


def _authenticate(key: bytes, step: int, record: dict[str, Any] | None) -> None:
    """Raises unless ``record`` carries a keyed digest that verifies under ``key``.

    Raises:
        ValueError: no record at all (handled as a damaged checkpoint: moved aside).
        CheckpointAuthenticationError: a record without a keyed digest, or a wrong one.
    """
    if record is None:
        raise ValueError(f"no {INTEGRITY_FILE}, so it cannot be authenticated with the key")
    mac = record.get("hmac_sha256")
    if mac is None:
        raise CheckpointAuthenticationError(
            f"checkpoint {step} has no keyed digest (hmac_sha256): it was written without a "
            f"key, or its {INTEGRITY_FILE} was rewritten; a run with a key ({ENV_KEY} or "
            f"{ENV_KEY_FILE}) restores only checkpoints written with that key. To resume it "
            "anyway, unset the key (its SHA-256 is then checked, which detects accidental "
            "damage only); nothing was moved")
    if (not isinstance(mac, str) or not hmac.compare_digest(mac, keyed_digest(key, record))
            or record.get("step") != step):  # the step is authenticated: no swapped steps
        raise CheckpointAuthenticationError(
            f"checkpoint {step}'s keyed digest (hmac_sha256) does not verify under this key: "
            f"its arrays or {INTEGRITY_FILE} were rewritten after it was saved, or another "
            "key wrote it; it is not restored and nothing was moved")


def restore_latest(ckpt: Checkpointer, target: Any, *, legacy: Legacy | None = None
                   ) -> Restored | None:
    """Restores the newest checkpoint that restores and verifies; falls back to older ones.

    Every checkpoint newer than the one returned was damaged: it is moved to
    ``workdir/checkpoints_damaged/`` (so that the run can write that step again) and a
    warning says why. See the module docstring for what is verified.

    Args:
        ckpt: the run's checkpointer.
        target: arrays with the structure, shapes and dtypes to restore into.
        legacy: for checkpoints without a record that do not restore into ``target``: an
            older layout to try, and its conversion to ``target``'s.

    Returns:
        The restored checkpoint, or None when there is none (or none was usable: the run
        then starts from scratch, and the warnings say so).

    Raises:
        CheckpointMismatchError: a checkpoint's record (or, without one, orbax's metadata)
            describes another state structure; nothing is moved.
        CheckpointAuthenticationError: with a key, a checkpoint whose record has no keyed
            digest or a wrong one; nothing is moved.
    """
    steps = ckpt.all_steps()
    for step in reversed(steps):
        try:
            tree, record, note = _try_restore(ckpt, step, target, legacy)
        except (CheckpointMismatchError, CheckpointAuthenticationError):
            raise
        except ValueError as e:
            moved = ckpt.quarantine(step)
            older = [s for s in steps if s < step]
            then = (f"falling back to checkpoint {older[-1]}" if older
                    else "no older checkpoint: starting from step 0")
            log.warning("checkpoint %d in %s is damaged (%s); moved it to %s; %s", step,
                        ckpt.directory, e, moved, then)
            continue
        if record is None:
            log.warning("checkpoint %d has no %s (written by an earlier version, or the run "
                        "was killed right after orbax committed it): accepted because it "
                        "restores and all its arrays are finite%s", step, INTEGRITY_FILE, note)
        return Restored(step, tree, record is not None, dict((record or {}).get("extra", {})),
                        authenticated=ckpt.key is not None)
    return None


def save_state(ckpt: Checkpointer, state: TrainState, *, extra: dict[str, Any] | None = None
               ) -> None:
    """Saves a host (unreplicated) TrainState at its own step (with ``extra`` in the record)."""
    ckpt.save(int(jax.device_get(state.step)), state_arrays(state), extra=extra)


def load_arrays(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Saved arrays (step, params, batch_stats, opt_state, svd_failures) of a workdir."""
    ckpt = Checkpointer(workdir)
    try:
        return ckpt.restore_raw(step)
    finally:
        ckpt.close()


def restore_state(ckpt: Checkpointer, state: TrainState, *, legacy: Legacy | None = None
                  ) -> tuple[TrainState, Restored | None]:
    """``state`` with the arrays of the newest usable checkpoint (unchanged if none).

    Returns:
        The state and the :class:`Restored` checkpoint (None when starting from scratch).
    """
    restored = restore_latest(ckpt, state_arrays(state), legacy=legacy)
    if restored is None:
        return state, None
    return state.replace(**restored.tree), restored

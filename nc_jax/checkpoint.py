"""Checkpoints with Orbax: periodic, keep-N, on SIGINT/SIGTERM, and safe against faults.

A checkpoint holds the whole :class:`nc_jax.train.TrainState` (parameters,
BatchNorm statistics, optimiser state, head state with class means and P, the
run's PRNG key) plus a small JSON record of the position in the data
(``epoch``, ``batch`` within the epoch) and anything else the caller adds.
Because the data order is a pure function of the run key and the epoch, this is
enough for a killed and resumed run to end bitwise equal (on CPU) to an
uninterrupted one.

Static (non-array) parts of the state are not stored: they come from the restore
template, except the implicit head's ``initialised`` flag, which is re-derived from the
restored class-mean step counter (:func:`nc_jax.heads.sync_initialised`), so a resumed
run continues with the steady-state program, not a second first step.

Orbax cannot write zero-size arrays (the standard head keeps empty placeholders
for state it does not use): they are saved as one-element stand-ins and
restored from the template's shape.

Checkpoints are indexed by the global step. Saving is asynchronous inside
Orbax; :meth:`Checkpointer.wait` and :meth:`Checkpointer.close` (or leaving the
``with`` block) wait for it.

**What Orbax leaves on disk** (orbax-checkpoint 0.12.8, local filesystem). Step ``s``
is written into ``<dir>/<s>.orbax-checkpoint-tmp`` (versions before 0.12 append
``-<timestamp>``): ``_CHECKPOINT_METADATA`` (JSON, written first), ``state/``
(TensorStore OCDBT: ``manifest.ocdbt``, data files under ``d/``, ``_METADATA``,
``_sharding``, ``array_metadatas/``) and ``position/metadata`` (the JSON), each
item with a ``commit_success.txt``. The commit is a ``commit_success.txt`` in the
step folder followed by an atomic rename to ``<dir>/<s>``. So a folder named by
an integer is a finished write and a ``*.orbax-checkpoint-tmp*`` folder is a
write that was killed (kill -9, power cut, out of memory): it is not a
checkpoint, and the next save here would otherwise leave it behind for ever.

**Faults, and what this module does about each** (issue #11, "nothing lost,
nothing mixed"):

* A killed write. Every listing here (:meth:`Checkpointer.all_steps`,
  :meth:`~Checkpointer.latest_step`, :func:`has_checkpoint`) counts only
  finished step folders, never an unfinished one or an empty directory, so a
  runner asks :func:`has_checkpoint` instead of listing the folder. Unfinished
  folders are removed before the next save (not at construction: a second
  process that only reads must never delete a write in progress).
* A killed keep-N rotation. Orbax deletes an old step folder in place, and a
  kill in the middle leaves a half-deleted folder with a step's name. Rotation
  is therefore done here: the folder is first renamed to an unfinished-write
  name (atomic), then deleted.
* A damaged checkpoint (a truncated or missing data file, an unreadable
  ``_CHECKPOINT_METADATA``, manifest or ``_METADATA``, a truncated or invalid
  position JSON, a changed byte in a data file). :meth:`Checkpointer.restore`
  checks the small files first, then reads the state and compares it with a
  SHA-256 of its arrays taken at save time (TensorStore's files have no checksum
  of the array bytes: a flipped bit restores, silently, to other values); a
  damaged step is skipped with a
  :class:`CheckpointWarning` naming the step and the problem, and the newest
  intact one is restored (``restored_step`` says which). If none is intact: a
  ``ValueError`` naming the folder and every step's problem — never a silent
  fresh start, never a traceback from TensorStore's depths.
* An edited or inconsistent position. The saved JSON carries a record (key
  ``"checkpoint"``: the global step, the state's SHA-256 and a SHA-256 of the
  JSON itself); restore refuses (as damage) a position whose digest or step does
  not match, a state whose ``step`` is not the checkpoint's, and, when the
  caller passes ``steps_per_epoch``, a position whose ``epoch``/``batch`` is not
  that step. (Checkpoints written before the record existed are accepted
  without the two digests; the other two checks still apply.) Saving costs one
  extra host copy and hash of the state (0.1 s per 200 MB on this CPU, SHA-NI).
* A fall-back leaves newer (damaged, or abandoned) steps behind; left alone they
  would be picked again by the next resume, or collide with the resumed run's
  steps. The first save after a restore moves every step at or after the step
  being saved, and every step known to be damaged, into ``<dir>/set-aside/``
  (with a ``SET_ASIDE.txt`` saying why), out of every listing. Nothing that
  might still be wanted is deleted.

**Several processes.** Constructing a :class:`Checkpointer`, listing and
restoring never modify the directory, so any number of readers
(``read_only=True`` also refuses to save) can open a folder that one writer is
saving into; a reader may at worst see a step vanish to rotation while reading
it, which it reports as damage and falls back from. Two *writers* in one folder
are not supported (each would clean up the other's write in progress): the
runner takes a lock per run folder. In a multi-process JAX program (one run,
several hosts) every process calls the same methods and process 0 alone
changes the folder, with a barrier before the save.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nc_jax import heads

# Orbax's marker of an unfinished step folder (0.12: "<s>.orbax-checkpoint-tmp",
# earlier: "<s>.orbax-checkpoint-tmp-<timestamp>"); a substring of both.
TMP_MARK = ".orbax-checkpoint-tmp"
# Where steps that must leave the listing, but might still be wanted, go. Not a
# step name for Orbax (no digits, no "<prefix>_<digits>").
SET_ASIDE = "set-aside"
# Reserved key of the saved position JSON: {"step": s, "state_sha256": digest of the
# arrays, "sha256": digest of the JSON without this last field}.
RECORD_KEY = "checkpoint"
# After a failed write, how long to wait in all for the threads that write started (their
# arrays' writes fail or finish within moments; a hung file system must not hang the caller).
WRITE_THREADS_TIMEOUT = 60.0
# How TensorStore tags the OS error in its messages: "[os_error_code='27']" or "=27".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# Files read by the cheap integrity check (names as Orbax writes them).
_STEP_METADATA = "_CHECKPOINT_METADATA"
_STATE_METADATA = os.path.join("state", "_METADATA")
_POSITION_FILE = os.path.join("position", "metadata")
_STEP_NAME = re.compile(r"0|[1-9][0-9]*")


class CheckpointWarning(UserWarning):
  """A damaged checkpoint was skipped, or a step folder was set aside."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a file-size limit, a lost mount).

  The unfinished write never counts as a checkpoint (it is removed before the next save), so
  the newest complete checkpoint, which the message names, is intact: free the space and
  resume from it.
  """


def _is_empty(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape)


def _fill_empty(tree: Any) -> Any:
  """Zero-size leaves → one-element stand-ins (Orbax refuses zero-size arrays)."""
  return jax.tree.map(lambda x: jnp.zeros((1,), x.dtype) if _is_empty(x) else x, tree)


def _finished_steps(directory: str) -> list[int]:
  """Steps with a finished (renamed) folder, ascending; unfinished writes, the
  set-aside folder and anything else are not steps."""
  try:
    entries = list(os.scandir(directory))
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(int(e.name) for e in entries
                if _STEP_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False))


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether ``directory`` holds at least one finished checkpoint, intact or damaged.

  What a runner asks to decide "this run is partial" (instead of listing the
  folder: an unfinished write left by a kill, an empty folder or the set-aside
  folder is not a checkpoint). Damaged ones count: resuming then restores the
  newest intact one or fails with a ``ValueError`` naming each problem, rather
  than silently starting the run again. Creates and changes nothing.
  """
  return bool(_finished_steps(os.path.abspath(os.fspath(directory))))


def _digest(saved: dict[str, Any]) -> str:
  """SHA-256 of the saved position JSON (with its record, less the record's own digest)."""
  text = json.dumps(saved, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _state_digest(state: Any) -> str | None:
  """SHA-256 of the state's arrays (dtype, shape and bytes of each leaf, in tree order).

  TensorStore's files carry no checksum of the array bytes: a flipped bit in a data
  file restores, silently, to other values. This digest, saved with the position,
  catches that. None if a leaf is sharded over processes (not the case here: the
  train state is replicated), as no process could then hash it alone.
  """
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(_fill_empty(state)):
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
          return None
        leaf = leaf.addressable_data(0)  # several hosts: this process's full copy
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


class _Damage(Exception):
  """A problem found in a step folder; its message names the file."""


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise _Damage(f"{what} {path} is missing") from None
  except OSError as err:
    raise _Damage(f"{what} {path} cannot be read ({err})") from None
  try:
    return json.loads(raw)
  except (UnicodeDecodeError, ValueError) as err:
    raise _Damage(f"{what} {path} is not valid JSON ({len(raw)} bytes; {err})") from None


def _inspect(directory: str, step: int) -> tuple[dict[str, Any] | None, dict[str, Any],
                                                 str | None]:
  """The cheap checks of a finished step folder (small files only).

  Returns ``(position, record, None)``, the position without its record (``{}`` for
  a checkpoint written before records existed), or ``(None, {}, problem)``.
  """
  folder = os.path.join(directory, str(step))
  try:
    if not isinstance(_read_json(os.path.join(folder, _STEP_METADATA), "checkpoint metadata"),
                      dict):
      raise _Damage(f"checkpoint metadata {os.path.join(folder, _STEP_METADATA)} is not a "
                    f"JSON object")
    if not isinstance(_read_json(os.path.join(folder, _STATE_METADATA), "state metadata"),
                      dict):
      raise _Damage(f"state metadata {os.path.join(folder, _STATE_METADATA)} is not a JSON "
                    f"object")
    path = os.path.join(folder, _POSITION_FILE)
    position = _read_json(path, "position file")
    if not isinstance(position, dict):
      raise _Damage(f"position file {path}: expected a JSON object, got "
                    f"{type(position).__name__}")
    record = position.pop(RECORD_KEY, {})
    if not isinstance(record, dict):
      raise _Damage(f"position file {path}: its record {RECORD_KEY!r} is not a JSON object")
    if record:
      record = dict(record)
      digest = record.pop("sha256", None)
      if digest != _digest({**position, RECORD_KEY: record}):
        raise _Damage(f"position file {path}: the position {position} does not match the "
                      f"checksum recorded when it was saved (edited by hand, or damaged)")
      if record.get("step") != step:
        raise _Damage(f"position file {path}: its record names step {record.get('step')!r}, "
                      f"not the folder's step {step}")
  except _Damage as err:
    return None, {}, str(err)
  return position, record, None


def _state_step(state: Any) -> int | None:
  """``int(state.step)`` for a state with a scalar ``step`` (a TrainState), else None."""
  step = getattr(state, "step", None)
  if step is None or not hasattr(step, "shape") or tuple(step.shape) != ():
    return None
  return int(np.asarray(jax.device_get(step)))


def _expected_step(position: dict[str, Any], steps_per_epoch) -> tuple[int | None, str]:
  """Global step that ``position`` denotes, or ``(None, why not)``."""
  epoch, batch = position.get("epoch"), position.get("batch")
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, batch)):
    return None, f"has no non-negative integer 'epoch' and 'batch' (epoch={epoch!r}, " \
                 f"batch={batch!r})"
  if callable(steps_per_epoch):
    before = sum(int(steps_per_epoch(e)) for e in range(epoch))
    this = int(steps_per_epoch(epoch))
    per = "steps_per_epoch(epoch)"
  else:
    before, this, per = epoch * steps_per_epoch, steps_per_epoch, f"{steps_per_epoch}"
  if batch >= this:
    return None, f"says batch {batch} of epoch {epoch}, which has {this} batches"
  return before + batch, f"says epoch {epoch}, batch {batch}: step {before + batch} at {per} " \
                         f"steps per epoch"


def _describe(err: BaseException) -> str:
  """One line per exception of the chain (at most three), without TensorStore's spec dumps."""
  parts, seen = [], set()
  while err is not None and id(err) not in seen and len(parts) < 3:
    seen.add(id(err))
    text = str(err).split("See full TensorStore details")[0].strip()
    line = text.splitlines()[0] if text else ""
    parts.append(f"{type(err).__name__}: {line[:500]}")
    err = err.__cause__ or err.__context__
  return "; caused by ".join(parts)


def _is_structure_mismatch(err: BaseException) -> bool:
  return isinstance(err, ValueError) and "tree structures do not match" in str(err)


class Checkpointer:
  """Orbax ``CheckpointManager`` for a train state and its data position.

  Args:
    directory: where checkpoints go (created if missing, unless ``read_only``;
      absolute or relative).
    keep: how many recent checkpoints to keep (≥ 1).
    read_only: list and restore only; :meth:`save` raises. Nothing in the
      directory is created, changed or removed.

  A runner's resume::

    partial = has_checkpoint(ckpt_dir)     # module function: creates and changes nothing
    checkpointer = Checkpointer(ckpt_dir, keep=keep)
    if partial:                            # newest intact one, or ValueError naming each problem
      state, position = checkpointer.restore(state, steps_per_epoch=steps_per_epoch)
    ... loop.fit(state, ..., checkpointer=checkpointer, position=position)

  After :meth:`restore`, :attr:`restored_step` is the step restored (the newest
  intact one; equal to ``int(state.step)`` for a train state).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False):
    if int(keep) < 1:
      raise ValueError(f"keep: expected at least 1 checkpoint to keep, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = int(keep)
    self.read_only = bool(read_only)
    self.restored_step: int | None = None
    self._saved = False                     # rotation only once this object has saved
    self._in_flight: int | None = None      # the step being written asynchronously
    self._write_threads: list[threading.Thread] = []  # the threads that write started
    self._found_damaged: dict[int, str] = {}  # steps restore could not read, and why
    # Rotation is done here (rename, then delete), never by Orbax (in place).
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not self.read_only,
                                           read_only=self.read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # ----------------------------------------------------------------- listing

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending: finished, passing the cheap
    checks (small files present and valid), and not found damaged by a restore.
    Waits for this object's save in flight first."""
    self.wait()
    return [s for s in _finished_steps(self.directory)
            if s not in self._found_damaged and _inspect(self.directory, s)[2] is None]

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (see :meth:`all_steps`), or None.
    Whether its arrays are intact is only known by reading them, which
    :meth:`restore` does (falling back to an older one if not)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def damaged_steps(self) -> dict[int, str]:
    """``{step: problem}`` of the finished checkpoints that are not complete."""
    self.wait()
    out = {}
    for s in _finished_steps(self.directory):
      problem = self._found_damaged.get(s) or _inspect(self.directory, s)[2]
      if problem is not None:
        out[s] = problem
    return out

  def has_checkpoint(self) -> bool:
    """:func:`has_checkpoint` of this directory (finished checkpoints, intact or damaged)."""
    self.wait()
    return has_checkpoint(self.directory)

  # ------------------------------------------------------------------ saving

  def save(self, step: int, state: Any, position: dict[str, Any]) -> None:
    """Saves ``state`` and the JSON-serialisable ``position`` under ``step``
    (asynchronously; :meth:`wait` waits).

    ``step`` must be the global step, ``int(state.step)`` for a train state.
    First removes unfinished writes, moves steps ``>= step`` and damaged steps to
    ``set-aside/``, and rotates to the newest ``keep`` checkpoints.
    """
    if self.read_only:
      raise ValueError(f"{self.directory}: this Checkpointer is read-only; save refused")
    step = int(step)
    if step < 0:
      raise ValueError(f"step: expected a non-negative global step, got {step}")
    state_step = _state_step(state)
    if state_step is not None and state_step != step:
      raise ValueError(f"step: expected the state's own step {state_step} (int(state.step)), "
                       f"got {step}; a checkpoint's step and its state must agree")
    if not isinstance(position, Mapping):
      raise ValueError(f"position: expected a dict, got {type(position).__name__}")
    if RECORD_KEY in position:
      raise ValueError(f"position: the key {RECORD_KEY!r} is reserved for the checkpoint's "
                       f"own record; got {position!r}")
    try:  # what a JSON round trip gives back, so that the digest compares equal
      position = json.loads(json.dumps(dict(position)))
    except (TypeError, ValueError) as err:
      raise ValueError(f"position: expected JSON-serialisable values, got {position!r} "
                       f"({err})") from err
    record = {"step": step, "state_sha256": _state_digest(state)}
    position[RECORD_KEY] = {**record, "sha256": _digest({**position, RECORD_KEY: record})}
    self._finish_write()
    self._tidy(step)
    self._in_flight = step
    before = set(threading.enumerate())
    failure = None
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_fill_empty(state)),
          position=ocp.args.JsonSave(position)), force=True)
    except Exception as err:  # noqa: BLE001 -- any write failure: named, nothing lost
      failure = err
    # Orbax writes each array in a thread of its own, started inside save().
    self._write_threads = [t for t in threading.enumerate() if t not in before]
    if failure is not None:
      self._in_flight = None
      raise self._write_error(step, failure) from failure
    self._saved = True

  def _finish_write(self) -> None:
    """Waits for the write in flight; its failure (raised by Orbax here, from its
    background thread) becomes a :class:`CheckpointWriteError`."""
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001
      step, self._in_flight = self._in_flight, None
      raise self._write_error(step, err) from err
    self._in_flight = None
    self._write_threads = []

  def _quiesce(self) -> None:
    """After a failed write: waits (at most ``WRITE_THREADS_TIMEOUT`` seconds in all)
    for the threads that write started. Orbax stops waiting at the first array that
    fails, while the other arrays' threads are still writing; each logs its own failure
    with a traceback when it ends. Without this wait those tracebacks could follow the
    caller's error message (a runner's last line, which says what to do), or come in the
    middle of the next run's output."""
    deadline = time.monotonic() + WRITE_THREADS_TIMEOUT
    for thread in self._write_threads:
      if thread is not threading.current_thread():
        try:  # Orbax's threads re-raise their own failure from join(): the same full disk
          thread.join(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 -- the failure being reported already
          pass
    self._write_threads = []

  def _write_error(self, step: int | None, err: BaseException) -> CheckpointWriteError:
    """The error for a failed write of ``step``, once the write's threads have ended
    (:meth:`_quiesce`): the step, the cause and the newest intact checkpoint."""
    self._quiesce()
    cause = " ".join(str(err).split())
    if len(cause) > 400:
      cause = cause[:150] + " … " + cause[-250:]
    # TensorStore names the OS error in the middle of its text (a JSON spec of the array
    # may follow it, and the shortening above may cut it out) and tags it with its code.
    code = _OS_ERROR_CODE.search(str(err))
    if code is not None and not isinstance(err, OSError):
      cause = f"{os.strerror(int(code.group(1)))} [errno {code.group(1)}]: {cause}"
    newest = [s for s in _finished_steps(self.directory)
              if s != step and _inspect(self.directory, s)[2] is None]
    kept = (f"the newest complete checkpoint, step {newest[-1]}, is intact" if newest else
            "there is no earlier checkpoint")
    return CheckpointWriteError(
        f"{self.directory}: checkpoint step {step} could not be written "
        f"({type(err).__name__}: {cause}); the unfinished write does not count and {kept}. "
        f"Free disk space (or raise the limit) and resume")

  def _tidy(self, step: int) -> None:
    """Before saving ``step``: unfinished writes removed; steps ``>= step`` and
    damaged ones set aside; keep-N rotation. Process 0 changes the folder; then
    every process re-reads it (Orbax's own list of steps)."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for entry in os.scandir(self.directory):
        if TMP_MARK in entry.name:
          _remove(entry.path)
      for s in _finished_steps(self.directory):
        problem = self._found_damaged.get(s) or _inspect(self.directory, s)[2]
        if s >= step:
          self._set_aside(s, f"step {s} is at or after step {step}, which is being saved: it "
                             f"belongs to a line of training this run does not continue"
                             + (f" (it is also damaged: {problem})" if problem else ""))
        elif problem is not None:
          self._set_aside(s, f"step {s} is damaged: {problem}")
      self._rotate()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"nc_jax.checkpoint.tidy:{step}")
    self._manager.reload()

  def _set_aside(self, step: int, reason: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    base = os.path.join(self.directory, SET_ASIDE, f"{step}-{stamp}")
    dest, n = base, 1
    while os.path.exists(dest):
      dest, n = f"{base}-{n}", n + 1
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.rename(os.path.join(self.directory, str(step)), dest)
    with open(os.path.join(dest, "SET_ASIDE.txt"), "w") as f:
      f.write(reason + "\n")
    self._found_damaged.pop(step, None)
    warnings.warn(f"{self.directory}: moved checkpoint step {step} to {dest}: {reason}",
                  CheckpointWarning, stacklevel=4)

  def _rotate(self) -> None:
    """Keeps the newest ``keep`` complete checkpoints; an older one is renamed to an
    unfinished-write name first, so a kill mid-deletion leaves no half step."""
    complete = [s for s in _finished_steps(self.directory)
                if s not in self._found_damaged and _inspect(self.directory, s)[2] is None]
    for s in complete[:-self.keep]:
      doomed = os.path.join(self.directory, f"{s}{TMP_MARK}-deleted")
      if os.path.lexists(doomed):
        _remove(doomed)
      os.rename(os.path.join(self.directory, str(s)), doomed)
      _remove(doomed)

  def wait(self) -> None:
    """Waits for the save in flight; then (process 0, once this object has saved)
    rotates to the newest ``keep`` checkpoints.

    Raises:
      CheckpointWriteError: the save in flight failed (e.g. the disk is full).
    """
    self._finish_write()
    if self._saved and jax.process_index() == 0:
      self._rotate()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --------------------------------------------------------------- restoring

  def restore(self, template: Any, step: int | None = None, *,
              steps_per_epoch: int | Callable[[int], int] | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, position)`` into ``template``'s structure, shapes, dtypes
    and shardings.

    Args:
      template: a fresh state of the run (its arrays are not used).
      step: this step only (a damaged one raises); default: the newest intact
        one, skipping damaged newer ones with a :class:`CheckpointWarning`.
      steps_per_epoch: batches per epoch (or ``epoch -> batches``): the position's
        ``epoch`` and ``batch`` must then denote the checkpoint's step. Without
        it only the position's checksum and the state's ``step`` are checked.

    Returns:
      ``(state, position)``; the position as saved (without the checkpoint's own
      record). :attr:`restored_step` is the step restored.

    Raises:
      ValueError: no finished checkpoint; none intact (naming each step's
        problem); or one of another tree structure (never skipped: the
        template, not the checkpoint, is then wrong).
    """
    if steps_per_epoch is not None and not callable(steps_per_epoch):
      if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) \
          or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected a positive int or a callable "
                         f"epoch -> batches, got {steps_per_epoch!r}")
    self.wait()
    finished = _finished_steps(self.directory)
    if step is not None:
      if int(step) not in finished:
        raise ValueError(f"step: no finished checkpoint at step {step} in {self.directory} "
                         f"(finished: {finished})")
      candidates = [int(step)]
    elif not finished:
      raise ValueError(f"directory: no checkpoint to restore in {self.directory} (an "
                       f"unfinished write, *{TMP_MARK}*, is not a checkpoint)")
    else:
      candidates = finished[::-1]
    problems: dict[int, str] = {}
    for s in candidates:
      position, record, problem = _inspect(self.directory, s)
      if problem is None:
        try:
          state = self._read_state(s, template)
        except Exception as err:  # noqa: BLE001 - TensorStore raises bare Exception
          if _is_structure_mismatch(err):
            raise ValueError(
                f"{self.directory}: the checkpoint at step {s} does not match the train state "
                f"given to restore (another head or model, or written by an nc_jax version "
                f"whose train state differed); nothing was restored. Start the run again "
                f"(--overwrite) or restore with the code that wrote it. Orbax: "
                f"{str(err).splitlines()[0]}") from err
          problem = f"reading the state failed: {_describe(err)}"
      if problem is None:
        problem = self._check(s, position, record, state, steps_per_epoch)
      if problem is None:
        if problems:
          listed = "; ".join(f"step {k}: {v}" for k, v in problems.items())
          warnings.warn(f"{self.directory}: restored step {s}, the newest intact checkpoint; "
                        f"skipped damaged newer ones: {listed}", CheckpointWarning, stacklevel=2)
        self.restored_step = s
        return state, position
      problems[s] = problem
      self._found_damaged[s] = problem
    listed = "\n".join(f"  step {k}: {v}" for k, v in problems.items())
    raise ValueError(f"{self.directory}: no intact checkpoint to restore; nothing was "
                     f"restored. Each step's problem:\n{listed}")

  def _read_state(self, step: int, template: Any) -> Any:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _fill_empty(template))
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    state = jax.tree.map(lambda t, x: t if _is_empty(t) else x, template, out["state"])
    # Static pytree metadata comes from the template; the implicit head's `initialised`
    # flag is derived from the restored arrays instead (heads.sync_initialised).
    return jax.tree.map(lambda x: heads.sync_initialised(x) if isinstance(x, heads.HeadState)
                        else x, state, is_leaf=lambda x: isinstance(x, heads.HeadState))

  def _check(self, step: int, position: dict[str, Any], record: dict[str, Any], state: Any,
             steps_per_epoch) -> str | None:
    """The restored state against the checksum saved with it, the position and its step."""
    path = os.path.join(self.directory, str(step), _POSITION_FILE)
    if record.get("state_sha256") is not None and record["state_sha256"] != _state_digest(state):
      return (f"the restored arrays differ from the ones saved (their SHA-256 recorded in "
              f"{path} does not match): a data file under "
              f"{os.path.join(self.directory, str(step), 'state')} changed, or the template's "
              f"dtypes differ from the saved state's")
    state_step = _state_step(state)
    if state_step is not None and state_step != step:
      return f"the state is at step {state_step}, not the folder's step {step}"
    if steps_per_epoch is not None:
      expected, how = _expected_step(position, steps_per_epoch)
      if expected != step:
        return f"position file {path} {how}, but the checkpoint is step {step}"
    return None


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


class StopRequest:
  """Turns SIGINT/SIGTERM into a flag the training loop polls between steps.

  The first signal sets :attr:`requested`; the loop then saves a checkpoint and
  returns. A second SIGINT raises ``KeyboardInterrupt`` as usual. Handlers are
  restored on exit. Only installs handlers in the main thread (Python's rule).
  """

  def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self.requested = False
    self.signal_name: str | None = None

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

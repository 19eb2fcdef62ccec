"""Checkpoints with Orbax: periodic, keep-N, and on SIGINT/SIGTERM.

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
Orbax; :meth:`Checkpointer.close` (or leaving the ``with`` block) waits for it.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nc_jax import heads


def _is_empty(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape)


def _fill_empty(tree: Any) -> Any:
  """Zero-size leaves → one-element stand-ins (Orbax refuses zero-size arrays)."""
  return jax.tree.map(lambda x: jnp.zeros((1,), x.dtype) if _is_empty(x) else x, tree)


class Checkpointer:
  """Orbax ``CheckpointManager`` for a train state and its data position.

  Args:
    directory: where checkpoints go (created if missing; absolute or relative).
    keep: how many recent checkpoints to keep (≥ 1).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    if int(keep) < 1:
      raise ValueError(f"keep: expected at least 1 checkpoint to keep, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, position: dict[str, Any]) -> None:
    """Saves ``state`` and the JSON-serialisable ``position`` under ``step``."""
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_fill_empty(state)), position=ocp.args.JsonSave(dict(position))),
        force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, position)`` at ``step`` (default: latest) into ``template``'s
    structure, shapes, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"directory: no checkpoint to restore in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _fill_empty(template))
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
    except ValueError as err:
      if "tree structures do not match" not in str(err):
        raise
      raise ValueError(
          f"{self.directory}: the checkpoint at step {step} does not match the train state "
          f"given to restore (another head or model, or written by an nc_jax version whose "
          f"train state differed); nothing was restored. Start the run again (--overwrite) "
          f"or restore with the code that wrote it. Orbax: "
          f"{str(err).splitlines()[0]}") from err
    state = jax.tree.map(lambda t, x: t if _is_empty(t) else x, template, out["state"])
    # Static pytree metadata comes from the template; the implicit head's `initialised`
    # flag is derived from the restored arrays instead (heads.sync_initialised).
    state = jax.tree.map(lambda x: heads.sync_initialised(x) if isinstance(x, heads.HeadState)
                         else x, state, is_leaf=lambda x: isinstance(x, heads.HeadState))
    return state, dict(out["position"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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

"""The epoch loop: train, evaluate, checkpoint, resume.

:func:`fit` trains a :class:`~nc_jax.pipeline.Pipeline` (device-resident or streaming data,
one interface) from a position ``(epoch, batch)`` to the end of the run. The position plus the
train state is the whole run state (the pipelines' batches are pure functions of the run key
or seed, the epoch and the batch): a run stopped at any step (SIGINT/SIGTERM, or
``max_steps``) and resumed from its checkpoint continues exactly where it was, bitwise on CPU,
and its records are bitwise the uninterrupted run's (a mid-epoch stop saves the epoch's running
sums with the position, and the data iterator's state when it has one: a streaming pipeline's
Grain iterator state, restored on resume and checked against the position).

Per step the host only dispatches: metrics are summed on device and the host reads them once
per epoch (:func:`nc_jax.train.summarise`, which also stops a faulty run:
:class:`nc_jax.train.TrainingFault`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from nc_jax import train
from nc_jax.checkpoint import Checkpointer, StopRequest
from nc_jax.pipeline import Pipeline, Steps


@dataclasses.dataclass
class FitResult:
  state: train.TrainState
  history: list[dict]
  stopped: bool          # True if a stop request or max_steps ended the run early
  position: dict         # where the run would continue: {"epoch", "batch"} (mid-epoch: and
                         # "sums", the epoch's running metric sums, and "data", the data
                         # iterator's get_state() if it has one)
  stop_reason: str | None = None  # "max_steps", or the signal's name ("SIGTERM", "SIGINT")


def evaluate(steps: Steps, state: train.TrainState, data: Pipeline) -> dict:
  """Loss, top-1 and top-5 over the pipeline's evaluation split (padded last batch masked
  out), from ``steps.eval`` (:meth:`Pipeline.compile`)."""
  total = None
  for args in data.eval_batches():
    total = train.add_metrics(total, steps.eval(state, *args))
  return train.summarise(total)


def _save_sums(total: dict) -> dict:
  """The epoch's running metric sums as JSON numbers (float32 values: ``repr`` of the float is
  exact, so restoring gives the same bits); ``first_*`` keys are not sums (and are +inf on a
  state that passed its checks)."""
  host = jax.device_get(total)
  return {k: float(v) for k, v in host.items() if not k.startswith("first_")}


def _restore_sums(sums: dict | None, mesh) -> dict | None:
  """Saved running sums as the device accumulator (replicated like the step's metrics)."""
  if not sums:
    return None
  out = {k: np.float32(v) for k, v in sums.items()}
  out["first_fault_step"] = np.float32(np.inf)
  return jax.device_put(out, None if mesh is None else train.replicated(mesh))


def fit(state: train.TrainState, data: Pipeline, *, steps: Steps, epochs: int,
        eval_every: int = 1, checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 1, position: dict | None = None, max_steps: int | None = None,
        on_epoch: Callable[[dict, train.TrainState], None] | None = None,
        on_step: Callable[[int, int], None] | None = None) -> FitResult:
  """Trains from ``position`` (default: the start) to the end of ``epochs``.

  Args:
    state: the train state (fresh, or restored with ``position``), placed on ``data.mesh``.
    data: the run's data (:class:`~nc_jax.pipeline.DevicePipeline` or
      :class:`~nc_jax.pipeline.StreamingPipeline`: batch size, stratification and mesh
      are its own).
    steps: ``data.compile(model=..., tx=..., head_config=...)``.
    epochs: total epochs of the run (not "more epochs").
    eval_every: evaluate the pipeline's evaluation split (if it has one) every this many
      epochs and at the end.
    checkpointer: saves every ``checkpoint_every`` epochs, at the end, and when
      stopped (SIGINT/SIGTERM or ``max_steps``).
    position: ``{"epoch": e, "batch": i}`` to resume at (as :class:`FitResult` or the
      checkpoint gives it; mid-epoch also ``"sums"`` and, from a pipeline whose training
      iterator has ``get_state()``, ``"data"``, passed back to
      ``data.train_batches(..., data_state=...)``, which checks it against ``(e, i)``).
    max_steps: stop (and checkpoint) after this many steps of this call.
    on_epoch: called with each epoch's record and the state at its end, ``(record, state)``
      (logging, progress, evaluating the state: the NC pass of the image runner).
    on_step: called with ``(epoch, batch)`` after each dispatched step.

  Returns:
    :class:`FitResult`; its ``history`` holds one record per finished epoch:
    ``epoch`` (1-based), ``train`` (loss, top1, top5), ``eval`` (if run),
    ``seconds``.

  Raises:
    nc_jax.train.TrainingFault: non-finite loss or parameters, labels outside ``[0, K)``, or
      an unconverged nearest-ETF solve (read from the metrics at the end of an epoch or at a
      stop; the faulty state is never checkpointed).
  """
  mesh = data.mesh
  num_batches = data.steps_per_epoch
  position = dict(position or {"epoch": 0, "batch": 0})
  history: list[dict] = []
  taken = 0
  with StopRequest() as stop:
    for epoch in range(position["epoch"], epochs):
      start = position["batch"] if epoch == position["epoch"] else 0
      # A pipeline whose iterator has a state (streaming: Grain's) saved it with a mid-epoch
      # position; it gets it back to restore, and checks it against (epoch, start).
      data_state = position.get("data") if start else None
      rows = (data.train_batches(state, epoch, start) if data_state is None else
              data.train_batches(state, epoch, start, data_state=data_state))
      # A run stopped mid-epoch saved the epoch's running sums with its position: the
      # epoch's record is then bitwise the uninterrupted one's.
      total = _restore_sums(position.get("sums"), mesh) if start else None
      t0 = time.perf_counter()
      for b, args in enumerate(rows, start):
        state, metrics = steps.train(state, *args)
        total = train.add_metrics(total, metrics)
        taken += 1
        if on_step is not None:
          on_step(epoch, b)
        if stop.requested or (max_steps is not None and taken >= max_steps):
          here = {"epoch": epoch, "batch": b + 1}
          if b + 1 == num_batches:
            here = {"epoch": epoch + 1, "batch": 0}
          elif hasattr(rows, "get_state"):  # mid-epoch: the data iterator's own state too
            here["data"] = rows.get_state()
          if hasattr(rows, "close"):
            rows.close()  # stops a streaming pipeline's threads and worker processes
          # Never checkpoint a faulty state; keep the epoch's running sums with the position.
          train.check_step_metrics(total, f"epoch {epoch + 1}")
          if here["batch"]:
            here["sums"] = _save_sums(total)
          if checkpointer is not None:
            checkpointer.save(int(state.step), state, here)
            checkpointer.wait()
          return FitResult(state, history, True, here,
                           stop.signal_name if stop.requested else "max_steps")
      record = {"epoch": epoch + 1, "train": train.summarise(total, f"epoch {epoch + 1}"),
                "seconds": time.perf_counter() - t0}
      last = epoch + 1 == epochs
      if data.has_eval and ((epoch + 1) % eval_every == 0 or last):
        record["eval"] = evaluate(steps, state, data)
      history.append(record)
      if on_epoch is not None:
        on_epoch(record, state)
      if checkpointer is not None and ((epoch + 1) % checkpoint_every == 0 or last):
        checkpointer.save(int(state.step), state, {"epoch": epoch + 1, "batch": 0})
  if checkpointer is not None:
    checkpointer.wait()
  return FitResult(state, history, False, {"epoch": epochs, "batch": 0})

"""The epoch loop: train, evaluate, checkpoint, resume.

Two kinds of data:

* :class:`DeviceData` — a split resident on device as uint8; batches are
  gathered and augmented inside the compiled step (:func:`compile_data_steps`).
  Randomness is a pure function of the run key in the train state: the epoch
  plan (order, stratified batches) uses ``fold_in(fold_in(rng, 0), epoch)``, the
  augmentation of a step ``fold_in(fold_in(rng, 1), step)``.
* :class:`nc_jax.data.StreamingLoader` — host batches with prefetch (ImageNet),
  fed to :func:`nc_jax.train.compile_train_step`; its order and augmentation are
  seeded by ``(seed, epoch, index)``.

So the position ``(epoch, batch)`` plus the train state is the whole run state: a
run stopped at any step (SIGINT/SIGTERM, or ``max_steps``) and resumed from its
checkpoint continues exactly where it was, bitwise on CPU.

Per step the host only dispatches: batch gathering and augmentation run inside
the compiled step, metrics are summed on device, and the host reads them once
per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import train
from nc_jax.checkpoint import Checkpointer, StopRequest
from nc_jax.data import batching
from nc_jax.data.augment import AugmentSpec
from nc_jax.data.streaming import StreamingLoader


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """A split resident on device: uint8 images ``(N, H, W, C)``, int32 labels ``(N,)``."""
  images: jax.Array
  labels: jax.Array
  spec: AugmentSpec


@dataclasses.dataclass
class FitResult:
  state: train.TrainState
  history: list[dict]
  stopped: bool          # True if a stop request or max_steps ended the run early
  position: dict         # where the run would continue: {"epoch", "batch"} (mid-epoch: and
                         # "sums", the epoch's running metric sums)
  stop_reason: str | None = None  # "max_steps", or the signal's name ("SIGTERM", "SIGINT")


def _data_step(state, images, labels, idx, *, spec, **static):
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
  x, y = batching.make_batch(images, labels, idx, key, spec, True)
  return train.train_step(state, x, y, **static)


def _eval_data_step(state, images, labels, idx, *, spec, **static):
  x, y = batching.make_batch(images, labels, idx, None, spec, False)
  return train.eval_step(state, x, y, **static)


def compile_data_steps(mesh, train_spec: AugmentSpec, eval_spec: AugmentSpec, *, model, tx,
                       head_config, loss="cross_entropy"):
  """Compiled ``(train, eval)`` steps taking ``(state, images, labels, idx)``.

  Images and labels are replicated, the index batch is sharded along ``"data"``
  (so each device gathers and augments its own slice), the state replicated and
  donated.
  """
  tr = functools.partial(_data_step, spec=train_spec, model=model, tx=tx,
                         head_config=head_config, loss=loss)
  ev = functools.partial(_eval_data_step, spec=eval_spec, model=model, head_config=head_config,
                         loss=loss)
  if mesh is None:
    return jax.jit(tr, donate_argnums=0), jax.jit(ev)
  rep, data = train.replicated(mesh), train.batch_sharding(mesh)
  return (jax.jit(tr, in_shardings=(rep, rep, rep, data), out_shardings=(rep, rep),
                  donate_argnums=0),
          jax.jit(ev, in_shardings=(rep, rep, rep, data), out_shardings=rep))


def epoch_plan(state: train.TrainState, labels: jax.Array, epoch: int, batch_size: int,
               stratified: bool, num_classes: int) -> np.ndarray:
  """The ``(num_batches, B)`` index plan of ``epoch`` (host copy)."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), epoch)
  return np.asarray(batching.epoch_indices(key, labels, batch_size, stratified,
                                           num_classes=num_classes))


def _batches(data, state, epoch, start, batch_size, stratified, num_classes, mesh, train_mode):
  """``(index, step arguments)`` of one epoch from batch ``start``, and the batch count."""
  if isinstance(data, StreamingLoader):
    it = data.epoch(epoch, start=start)

    def gen():
      with it:
        for i, batch in enumerate(it, start):
          yield i, _host_batch(batch, mesh)
    return gen(), len(data)
  if train_mode:
    plan = epoch_plan(state, data.labels, epoch, batch_size, stratified, num_classes)
  else:
    plan, _ = batching.eval_indices(int(data.labels.shape[0]), batch_size)
  rows = ((b, (data.images, data.labels, place_indices(plan[b], mesh)))
          for b in range(start, plan.shape[0]))
  return rows, plan.shape[0]


def _host_batch(batch, mesh):
  pair = (batch.images, batch.labels)
  return tuple(jnp.asarray(a) for a in pair) if mesh is None else train.global_batch(pair, mesh)


def evaluate(eval_fn: Callable, state: train.TrainState, data: Any, batch_size: int,
             mesh=None) -> dict:
  """Loss, top-1 and top-5 over a whole split (padded last batch masked out).

  ``data``: :class:`DeviceData` (with ``eval_fn`` from :func:`compile_data_steps`)
  or an evaluation :class:`~nc_jax.data.StreamingLoader` (with
  :func:`nc_jax.train.compile_eval_step`).
  """
  rows, _ = _batches(data, state, 0, 0, batch_size, False, None, mesh, train_mode=False)
  total = None
  for _, args in rows:
    total = train.add_metrics(total, eval_fn(state, *args))
  return train.summarise(total)


def place_indices(idx_row, mesh):
  """A global index row as the step's sharded input; each process passes its own slice."""
  if mesh is None:
    return jnp.asarray(idx_row)
  n = jax.process_count()
  local = np.asarray(idx_row).reshape(n, -1)[jax.process_index()]
  return train.global_batch(local, mesh)


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


def fit(state: train.TrainState, train_data: DeviceData | StreamingLoader, *,
        steps: tuple[Callable, Callable], epochs: int, batch_size: int, num_classes: int,
        stratified: bool = False, eval_data: DeviceData | StreamingLoader | None = None, eval_every: int = 1, mesh=None,
        checkpointer: Checkpointer | None = None, checkpoint_every: int = 1,
        position: dict | None = None, max_steps: int | None = None,
        on_epoch: Callable[[dict, train.TrainState], None] | None = None,
        on_step: Callable[[int, int], None] | None = None) -> FitResult:
  """Trains from ``position`` (default: the start) to the end of ``epochs``.

  Args:
    state: the train state (fresh, or restored with ``position``).
    train_data, eval_data: device-resident splits (replicated over ``mesh``), or
      streaming loaders (their own batch size, order and stratification apply).
    steps: ``compile_data_steps(...)`` for device data; ``(compile_train_step(...),
      compile_eval_step(...))`` for streaming loaders.
    epochs: total epochs of the run (not "more epochs").
    batch_size: global batch size (a multiple of the device count).
    num_classes: K.
    stratified: stratified batches (the implicit method's recipe).
    eval_every: evaluate ``eval_data`` every this many epochs (and at the end).
    checkpointer: saves every ``checkpoint_every`` epochs, at the end, and when
      stopped (SIGINT/SIGTERM or ``max_steps``).
    position: ``{"epoch": e, "batch": i}`` to resume at.
    max_steps: stop (and checkpoint) after this many steps of this call.
    on_epoch: called with each epoch's record and the state at its end, ``(record, state)``
      (logging, progress, evaluating the state: the NC pass of the image runner).
    on_step: called with ``(epoch, batch)`` after each dispatched step.

  Returns:
    :class:`FitResult`; its ``history`` holds one record per finished epoch:
    ``epoch`` (1-based), ``train`` (loss, top1, top5), ``eval`` (if run),
    ``seconds``.
  """
  train_fn, eval_fn = steps
  if mesh is not None:
    train.check_batch_size(batch_size, mesh)
  position = dict(position or {"epoch": 0, "batch": 0})
  history: list[dict] = []
  taken = 0
  with StopRequest() as stop:
    for epoch in range(position["epoch"], epochs):
      start = position["batch"] if epoch == position["epoch"] else 0
      rows, num_batches = _batches(train_data, state, epoch, start, batch_size, stratified,
                                   num_classes, mesh, train_mode=True)
      # A run stopped mid-epoch saved the epoch's running sums with its position: the
      # epoch's record is then bitwise the uninterrupted one's.
      total = _restore_sums(position.get("sums"), mesh) if start else None
      t0 = time.perf_counter()
      for b, args in rows:
        state, metrics = train_fn(state, *args)
        total = train.add_metrics(total, metrics)
        taken += 1
        if on_step is not None:
          on_step(epoch, b)
        if stop.requested or (max_steps is not None and taken >= max_steps):
          if hasattr(rows, "close"):
            rows.close()  # stops a streaming loader's prefetch thread
          here = {"epoch": epoch, "batch": b + 1}
          if b + 1 == num_batches:
            here = {"epoch": epoch + 1, "batch": 0}
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
      if eval_data is not None and ((epoch + 1) % eval_every == 0 or last):
        record["eval"] = evaluate(eval_fn, state, eval_data, batch_size, mesh)
      history.append(record)
      if on_epoch is not None:
        on_epoch(record, state)
      if checkpointer is not None and ((epoch + 1) % checkpoint_every == 0 or last):
        checkpointer.save(int(state.step), state, {"epoch": epoch + 1, "batch": 0})
  if checkpointer is not None:
    checkpointer.wait()
  return FitResult(state, history, False, {"epoch": epochs, "batch": 0})

r"""Train state and pure, jit-compiled train/eval steps, data-parallel over a device mesh.

A step is ``train_step(state, images, labels) -> (state, metrics)``:

1. backbone (Flax Linen, BatchNorm in training mode) → raw features ``(n, d)``;
2. :func:`nc_jax.heads.head_features` (τ-normalisation) → head logits (standard, fixed
   ETF or implicit ETF, :mod:`nc_jax.heads`) → loss;
3. gradients w.r.t. the trainable parameters (backbone, plus the standard
   head's classifier), an Optax update, and the standard head's row
   renormalisation.

Data parallelism is a sharded ``jit`` over a 1-D mesh with axis ``"data"``:
the batch is split along its first axis, the state is replicated. XLA then
computes every batch reduction globally — BatchNorm statistics, the class sums
and batch mean of the implicit head, the loss mean — so every device solves the
same nearest-ETF problem on the global batch and the step equals the
single-device step on that batch (up to summation order). Across hosts the same
program runs under ``jax.distributed.initialize`` with each process feeding its
local slice (:func:`global_batch`).

Metrics are summed on device (``loss_sum``, ``correct``, ``count``), so a
training loop needs no host synchronisation per step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nc_jax import heads

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step (a pytree; checkpointed whole).

  Attributes:
    step: ``()`` int32, optimiser steps taken.
    params: ``{"backbone": ..., "head": ...}`` trainable parameters.
    batch_stats: the backbone's BatchNorm running statistics (``{}`` if none).
    opt_state: the Optax state of ``params``.
    head: :class:`nc_jax.heads.HeadState` (class means, P, last W and b).
    rng: a PRNG key for the run's randomness (data order, augmentation).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  head: heads.HeadState
  rng: jax.Array


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       head_config: heads.HeadConfig, key: jax.Array, sample_input: jax.Array,
                       *, init_params: Callable[[Any, jax.Array], Any] | None = None
                       ) -> TrainState:
  """Initialises model, head and optimiser.

  Args:
    model: a backbone ``model.apply(variables, x, train=...) -> (n, d)`` features.
    tx: the optimiser.
    head_config: the head (its ``feature_dim`` must equal the model's output d).
    key: PRNG key.
    sample_input: one input batch (shape and dtype) for ``model.init``.
    init_params: optional re-initialisation of all trainable params, e.g.
      :func:`nc_jax.optim.agd_init` (``fn(params, key) -> params``).
  """
  k_model, k_head, k_reinit, k_run = jax.random.split(key, 4)
  variables = model.init(k_model, sample_input, train=False)
  features = model.apply(variables, sample_input, train=False)
  if features.shape[-1] != head_config.feature_dim:
    raise ValueError(f"head_config.feature_dim: expected the model's feature dimension "
                     f"{features.shape[-1]}, got {head_config.feature_dim}")
  # The head computes in the features' precision, at least float32 (bf16 backbones).
  head_dtype = jnp.promote_types(features.dtype, jnp.float32)
  head_params, head_state = heads.init(head_config, k_head, head_dtype)
  params = {"backbone": variables["params"], "head": head_params}
  if init_params is not None:
    params = init_params(params, k_reinit)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    head=head_state, rng=k_run)


def _forward(model, head_config, params, batch_stats, images, train):
  variables = {"params": params["backbone"]}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  if train and batch_stats:
    feats, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    new_stats = updates["batch_stats"]
  else:
    feats, new_stats = model.apply(variables, images, train=train), batch_stats
  # bf16 backbones: the head always computes in (at least) float32.
  feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
  return heads.head_features(head_config, feats), new_stats


def _step_metrics(per_sample, logits, labels):
  """Sums over the valid (label ≥ 0; padded evaluation slots have −1) samples."""
  valid = labels >= 0
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  k = logits.shape[-1]
  top5 = jax.lax.top_k(logits, min(5, k))[1]
  correct5 = jnp.any(top5 == labels[:, None], axis=-1) & valid
  f32 = jnp.float32
  return {"loss_sum": jnp.sum(jnp.where(valid, per_sample, 0.0)).astype(f32),
          "correct": jnp.sum(correct).astype(f32), "correct_top5": jnp.sum(correct5).astype(f32),
          "count": jnp.sum(valid).astype(f32)}


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, head_config: heads.HeadConfig,
               loss: str = "cross_entropy") -> tuple[TrainState, dict]:
  """One optimisation step on a (global) batch; pure. See the module docstring."""

  def objective(params):
    h, new_stats = _forward(model, head_config, params, state.batch_stats, images, True)
    logits, head_state = heads.train_logits(head_config, params["head"], state.head, h, labels)
    per_sample = heads.per_sample_loss(loss, logits, labels)
    return jnp.mean(per_sample), (per_sample, logits, new_stats, head_state)

  (_, (per_sample, logits, new_stats, head_state)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = {**params, "head": heads.renormalise(head_config, params["head"])}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state, head=head_state)
  metrics = _step_metrics(jax.lax.stop_gradient(per_sample), logits, labels)
  metrics.update(_fault_metrics(state.step + 1, metrics["loss_sum"], params, labels,
                                head_config, head_state))
  return new_state, metrics


def _fault_metrics(step, loss_sum, params, labels, head_config, head_state) -> dict:
  """Counts of what must stop a run, computed on device and read by the host only where it
  already reads the metrics (:func:`check_step_metrics`): never a synchronisation inside the
  step. Out-of-range training labels are dropped by the class sums and the loss mask alike,
  so without this count a run would train on silently; a non-finite loss or parameter would
  be checkpointed and rotate the good checkpoints out."""
  f32 = jnp.float32
  finite = jnp.isfinite(loss_sum)
  for leaf in jax.tree.leaves(params):
    finite = finite & jnp.all(jnp.isfinite(leaf))
  bad_labels = jnp.sum((labels < 0) | (labels >= head_config.num_classes)).astype(f32)
  unconverged = heads.unconverged_solves(head_state)
  faulty = (~finite) | (bad_labels > 0) | (unconverged > 0)
  return {"nonfinite": (~finite).astype(f32), "bad_labels": bad_labels,
          "etf_unconverged": unconverged,
          # Combined by minimum in add_metrics: the first faulty global step (1-based).
          "first_fault_step": jnp.where(faulty, step.astype(f32), jnp.inf).astype(f32)}


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: nn.Module,
              head_config: heads.HeadConfig, loss: str = "cross_entropy") -> dict:
  """Summed evaluation metrics on a batch (BatchNorm running averages; implicit head:
  last training W and b; fixed head: the batch's mean in the bias). Samples with
  label −1 (padding) are not counted."""
  h, _ = _forward(model, head_config, state.params, state.batch_stats, images, False)
  logits = heads.eval_logits(head_config, state.params["head"], state.head, h, valid=labels >= 0)
  return _step_metrics(heads.per_sample_loss(loss, logits, labels), logits, labels)


def features(state: TrainState, images: jax.Array, *, model: nn.Module,
             head_config: heads.HeadConfig) -> jax.Array:
  """τ-normalised evaluation-mode features ``(n, d)`` (for NC metrics)."""
  return _forward(model, head_config, state.params, state.batch_stats, images, False)[0]


# --------------------------------------------------------------------------- #
# Compilation and data parallelism
# --------------------------------------------------------------------------- #


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch_size: expected a multiple of the number of devices ({n}) for "
                     f"data parallelism, got {batch_size}")


def compile_train_step(mesh: Mesh | None, **static) -> Callable:
  """``jit(train_step)`` with the state donated; sharded over ``mesh`` if given.

  ``static``: ``model``, ``tx``, ``head_config``, ``loss`` (bound, not traced).
  """
  fn = functools.partial(train_step, **static)
  if mesh is None:
    return jax.jit(fn, donate_argnums=0)
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep, data, data), out_shardings=(rep, rep), donate_argnums=0)


def compile_eval_step(mesh: Mesh | None, **static) -> Callable:
  fn = functools.partial(eval_step, **static)
  if mesh is None:
    return jax.jit(fn)
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep, data, data), out_shardings=rep)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host/device pytree replicated on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Assembles per-process batch slices into one global array sharded along ``"data"``.

  Single process: ``local`` is the whole batch. Multi-host: each process passes
  its own contiguous slice (``global batch / process_count`` rows).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def add_metrics(total: dict | None, new: dict) -> dict:
  """Sums metric dicts on device (no host synchronisation); ``first_*`` keys take the minimum."""
  if total is None:
    return new
  return {k: (jnp.minimum if k.startswith("first_") else jnp.add)(total[k], new[k]) for k in new}


class TrainingFault(RuntimeError):
  """A check of the summed step metrics failed (:func:`check_step_metrics`); the run stops
  before anything after the last checkpoint is saved."""


class Diverged(TrainingFault, FloatingPointError):
  """Non-finite loss or parameters."""


class BadLabels(TrainingFault, ValueError):
  """Training labels outside [0, K)."""


class SolveNotConverged(TrainingFault, FloatingPointError):
  """Nearest-ETF solves that did not certify convergence."""


def check_step_metrics(total: dict, where: str = "") -> None:
  """Raises a :class:`TrainingFault` if the summed training metrics ``total`` count a fault.

  One host read of what the step counted on device (:func:`train_step`): out-of-range labels
  (:class:`BadLabels`), a non-finite loss or parameter (:class:`Diverged`), a nearest-ETF
  solve that missed its convergence certificate (:class:`SolveNotConverged`); the message
  names the first faulty global step and ``where`` (e.g. the epoch). Evaluation metrics (no
  such keys) pass.
  """
  total = jax.device_get(total)
  first = float(total.get("first_fault_step", np.inf))
  at = (f" (first at global step {int(first)}" + (f", {where}" if where else "") + ")"
        if np.isfinite(first) else (f" ({where})" if where else ""))
  kept = ("; nothing after the last checkpoint was saved, and it is intact")
  if int(total.get("bad_labels", 0)):
    raise BadLabels(
        f"labels: {int(total['bad_labels'])} training label(s) outside [0, K){at}: expected "
        f"class indices 0..K-1; check the data and num_classes{kept}")
  if int(total.get("nonfinite", 0)):
    raise Diverged(
        f"training diverged: {int(total['nonfinite'])} step(s) with a non-finite loss or "
        f"parameters{at}; lower the learning rate or check the data{kept}")
  check_solves(total.get("etf_unconverged", 0), at + kept)


def check_solves(unconverged: Any, detail: str = "") -> None:
  """Raises :class:`SolveNotConverged` if the count ``unconverged`` (host or device
  scalar, e.g. summed ``etf_unconverged`` metrics) is positive (a host read)."""
  failed = int(jax.device_get(unconverged))
  if failed:
    raise SolveNotConverged(
        f"{failed} training step(s) took a nearest-ETF solve that did not converge in its "
        f"fixed Newton–Schulz schedule (σ_min(B) fell below the bound δ/16 the schedule is "
        f"sized for; nc_jax.solver.newton_schulz_bound); resume with factorisation='svd' "
        f"(--factorisation svd), or report the case: it is outside what the solver was "
        f"measured on{detail}")


def summarise(total: dict, where: str = "") -> dict:
  """Host-side means of summed metrics: loss and accuracies in %.

  Raises:
    TrainingFault: the summed training metrics count a fault (:func:`check_step_metrics`).
  """
  total = jax.device_get(total)
  check_step_metrics(total, where)
  n = float(total["count"])
  return {"loss": float(total["loss_sum"]) / n, "top1": 100.0 * float(total["correct"]) / n,
          "top5": 100.0 * float(total["correct_top5"]) / n, "count": int(n)}

r"""Classifier heads: standard (learned), fixed ETF and implicit ETF (docs/method.md §8).

Every head first normalises the backbone features, :math:`h = \tau\,h_{raw}/\max(\|h_{raw}\|, 10^{-12})`
(τ = 5 in every released script), then produces logits :math:`hW^T + b` with a
K×d classifier ``W``:

* ``standard``: ``W`` (and optionally ``b``) are learned parameters. With
  ``renormalise_rows`` the rows of ``W`` are rescaled to unit norm after every
  optimiser step (:func:`renormalise`), the paper's cosine-classifier baseline.
* ``fixed``: ``W`` is the canonical simplex ETF in the first K coordinates,
  :math:`\sqrt{K/(K-1)}\,[M\;0]`, or a seeded random rotation of it, frozen; the
  bias :math:`b = -W\,\mathrm{sg}(\mu_G)` uses the *current batch* mean, in
  training and evaluation alike (official behaviour).
* ``implicit``: the paper's method. The class-mean moving average
  (:mod:`nc_jax.class_means`) gives :math:`(\bar Y, \mu_G)`; the nearest ETF
  :math:`P = \mathrm{nearest\_etf}(\bar Y, P_{prev})` (the first step uses the
  feasibility solve) gives :math:`W = \sqrt{K/(K-1)}\,MP^T` (unit rows) and
  :math:`b = -W\mu_G`. Gradients flow through P (implicit VJP) and through
  :math:`\mu_G`; ``forward_only`` stops the gradient at P (the paper's ablation
  "without DDN gradient"). Evaluation uses the W and b of the last training
  step, as the official code does.

State lives in explicit pytrees (:class:`HeadState`) so it is checkpointed with
the rest of the train state. All functions are pure and jit-able.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nc_jax import class_means, solver, stiefel
from nc_jax._linalg import mm

HEAD_KINDS = ("standard", "fixed", "implicit")
LOSSES = ("cross_entropy", "mse", "dot_regression")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Static head settings (hashable).

  Attributes:
    kind: ``"standard"``, ``"fixed"`` or ``"implicit"``.
    num_classes: K ≥ 2.
    feature_dim: d (≥ K for the ETF heads).
    tau: feature norm τ (paper: 5).
    normalise: scale the features to norm τ (:func:`head_features`); only the standard head
      may turn it off (the paper's ablation of standard training without feature and weight
      normalisation, with ``renormalise_rows=False``).
    bias: standard head: learn a bias (paper: no, ``--no-bias``).
    renormalise_rows: standard head: unit-norm rows after every update.
    rotation_seed: fixed head: ``None`` for the canonical ETF in the first K
      coordinates, else the seed of a Haar-random rotation.
    forward_only: implicit head: stop the gradient at P (ablation).
    delta, solver, factorisation: passed to :func:`nc_jax.nearest_etf` (``solver`` as its
      ``method``: ``"polar"`` or ``"rgd"``).
    alpha_min: floor of the class-mean moving-average weight.
  """
  kind: str
  num_classes: int
  feature_dim: int
  tau: float = 5.0
  normalise: bool = True
  bias: bool = False
  renormalise_rows: bool = True
  rotation_seed: int | None = None
  forward_only: bool = False
  delta: float = solver.DEFAULT_DELTA
  solver: str = "polar"
  factorisation: str = "auto"
  alpha_min: float = class_means.ALPHA_MIN

  def __post_init__(self):
    if self.kind not in HEAD_KINDS:
      raise ValueError(f"kind: expected one of {HEAD_KINDS}, got {self.kind!r}")
    if int(self.num_classes) != self.num_classes or self.num_classes < 2:
      raise ValueError(f"num_classes: expected an integer >= 2, got {self.num_classes!r}")
    if int(self.feature_dim) != self.feature_dim or self.feature_dim < 1:
      raise ValueError(f"feature_dim: expected a positive integer, got {self.feature_dim!r}")
    if self.kind != "standard" and self.feature_dim < self.num_classes:
      raise ValueError(
          f"feature_dim: the {self.kind} ETF head needs feature dimension d >= number of classes "
          f"K, got d={self.feature_dim}, K={self.num_classes}")
    if not self.tau > 0:
      raise ValueError(f"tau: expected a positive feature norm, got {self.tau!r}")
    if not self.normalise and self.kind != "standard":
      raise ValueError(f"normalise: the {self.kind} ETF head needs features of norm τ "
                       f"(normalise=True); only the standard head can train without it")
    if self.solver not in solver.METHODS:
      raise ValueError(f"solver: expected one of {solver.METHODS}, got {self.solver!r}")
    solver.check_factorisation(self.factorisation)
    if not self.delta > 0:
      raise ValueError(f"delta: expected a positive float, got {self.delta!r}")


@flax.struct.dataclass
class HeadState:
  """Non-trainable head state (a pytree; replicated across devices).

  Attributes:
    weight: ``(K, d)`` classifier for evaluation: the fixed ETF, or the implicit
      head's W of the last training step; zeros for the standard head (its W is
      a parameter).
    bias: ``(K,)`` the implicit head's last training bias; zeros otherwise.
    frame: ``(d, K)`` the implicit head's previous solution :math:`P_{prev}`.
    means: the implicit head's :class:`nc_jax.class_means.ClassMeanState`.
    solve_converged: ``()`` bool, the last nearest-ETF solve certified its result
      (:attr:`nc_jax.SolverInfo.converged`); True for the other heads.
    initialised: static Python bool (pytree metadata, not an array): the implicit head
      has taken a training step, so ``frame`` holds :math:`P_{prev}`; before it, the
      step takes the feasibility solve. Being static, it selects between two compiled
      programs — the first step and the steady state — instead of a ``lax.cond`` inside
      one, whose predicate a GPU would copy to the host at every step. A jitted step
      therefore compiles twice for the implicit head (once for the first step) and never
      again. :func:`sync_initialised` re-derives it from the arrays after a restore.
  """
  weight: jax.Array
  bias: jax.Array
  frame: jax.Array
  means: class_means.ClassMeanState
  solve_converged: jax.Array
  initialised: bool = flax.struct.field(pytree_node=False, default=False)


def normalise_features(h: jax.Array, tau: float) -> jax.Array:
  r""":math:`\tau\,h/\max(\|h\|_2, 10^{-12})` row-wise; ``h``: ``(n, d)``."""
  norm = jnp.linalg.norm(h, axis=-1, keepdims=True)
  return tau * h / jnp.maximum(norm, 1e-12)


def head_features(config: HeadConfig, h: jax.Array) -> jax.Array:
  """The head's input: backbone features ``(n, d)`` scaled to norm τ
  (:func:`normalise_features`), or unchanged when ``config.normalise`` is off."""
  return normalise_features(h, config.tau) if config.normalise else h


def etf_classifier(frame: jax.Array) -> jax.Array:
  r""":math:`W = \sqrt{K/(K-1)}\,MP^T` for a frame P ``(d, K)``: ``(K, d)`` with unit rows."""
  k = frame.shape[-1]
  pt = frame.T
  return jnp.sqrt(k / (k - 1.0)).astype(frame.dtype) * (pt - jnp.mean(pt, axis=0, keepdims=True))


def init(config: HeadConfig, key: jax.Array, dtype=jnp.float32) -> tuple[dict, HeadState]:
  """Initial ``(params, state)``; ``params`` is ``{}`` for the ETF heads.

  The standard head's kernel uses PyTorch's ``nn.Linear`` default,
  :math:`U(-1/\\sqrt d, 1/\\sqrt d)` (AGD re-initialises it orthogonally).
  """
  k, d = config.num_classes, config.feature_dim
  zeros_w = jnp.zeros((k, d), dtype)
  frame = jnp.eye(d, k, dtype=dtype) if d >= k else jnp.zeros((d, k), dtype)
  state = HeadState(weight=zeros_w, bias=jnp.zeros((k,), dtype), frame=frame,
                    means=class_means.init(d, k, dtype) if config.kind == "implicit" else
                    class_means.ClassMeanState(jnp.zeros((0, 0), dtype), jnp.zeros((0,), bool),
                                               jnp.zeros((), jnp.int32)),
                    solve_converged=jnp.ones((), bool))
  params: dict[str, Any] = {}
  if config.kind == "standard":
    bound = 1.0 / np.sqrt(d)
    kw, kb = jax.random.split(key)
    params["kernel"] = jax.random.uniform(kw, (k, d), dtype, -bound, bound)
    if config.bias:
      params["bias"] = jax.random.uniform(kb, (k,), dtype, -bound, bound)
  elif config.kind == "fixed":
    if config.rotation_seed is None:
      frame = jnp.eye(d, k, dtype=dtype)
    else:
      frame = stiefel.random_point(jax.random.PRNGKey(config.rotation_seed), d, k, dtype)
    state = state.replace(weight=etf_classifier(frame), frame=frame)
  return params, state


def train_logits(config: HeadConfig, params: dict, state: HeadState, h: jax.Array,
                 labels: jax.Array, *, axis_name: Any = None):
  """Training-mode logits for τ-normalised features.

  Args:
    config: the head's :class:`HeadConfig`.
    params: head parameters (``{}`` for ETF heads).
    state: :class:`HeadState`.
    h: ``(n, d)`` τ-normalised features (:func:`normalise_features`).
    labels: ``(n,)`` int labels (used by the implicit head's class means).
    axis_name: device axis when called inside ``shard_map``/``pmap`` (class
      sums and the batch mean are then all-reduced). Not needed under a
      sharded ``jit``, which computes global reductions itself.

  Returns:
    ``(logits (n, K), new_state)``.
  """
  if config.kind == "standard":
    return _standard_logits(params, h), state
  if config.kind == "fixed":
    return _fixed_logits(state, h, axis_name), state
  return _implicit_train_logits(config, state, h, labels, axis_name)


def eval_logits(config: HeadConfig, params: dict, state: HeadState, h: jax.Array, *,
                valid: jax.Array | None = None, axis_name: Any = None) -> jax.Array:
  """Evaluation-mode logits ``(n, K)``: standard as in training, fixed with the
  evaluation batch's mean in the bias (over the ``valid`` rows ``(n,)`` bool when
  a batch is padded), implicit with the last training W and b."""
  if config.kind == "standard":
    return _standard_logits(params, h)
  if config.kind == "fixed":
    return _fixed_logits(state, h, axis_name, valid)
  return mm(h, state.weight.T) + state.bias


def classifier(config: HeadConfig, params: dict, state: HeadState,
               global_mean: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The ``(W (K, d), b (K,))`` evaluation uses, e.g. for :func:`nc_jax.nc_metrics`.

  For the fixed head the bias depends on the features' mean: pass it as
  ``global_mean`` (``(d,)``); without it the bias is zero.
  """
  if config.kind == "standard":
    w = params["kernel"]
    return w, params.get("bias", jnp.zeros((w.shape[0],), w.dtype))
  if config.kind == "fixed":
    w = state.weight
    b = -mm(w, global_mean[:, None])[:, 0] if global_mean is not None else jnp.zeros(
        (w.shape[0],), w.dtype)
    return w, b
  return state.weight, state.bias


def renormalise(config: HeadConfig, params: dict) -> dict:
  """Standard head with ``renormalise_rows``: rows of W rescaled to unit norm (after a step)."""
  if config.kind != "standard" or not config.renormalise_rows:
    return params
  w = params["kernel"]
  norms = jnp.linalg.norm(w, axis=1, keepdims=True)
  return {**params, "kernel": w / jnp.maximum(norms, 1e-12)}


def _standard_logits(params, h):
  logits = mm(h, params["kernel"].T)
  if "bias" in params:
    logits = logits + params["bias"]
  return logits


def _batch_mean(h, axis_name, valid=None):
  if valid is None:
    total, n = jnp.sum(h, axis=0), jnp.asarray(h.shape[0], h.dtype)
  else:
    total, n = jnp.sum(jnp.where(valid[:, None], h, 0), axis=0), jnp.sum(valid).astype(h.dtype)
  if axis_name is not None:
    total, n = lax.psum(total, axis_name), lax.psum(n, axis_name)
  return total / n


def _fixed_logits(state, h, axis_name, valid=None):
  w = state.weight
  mu = lax.stop_gradient(_batch_mean(h, axis_name, valid))
  return mm(h - mu, w.T)


def _implicit_train_logits(config, state, h, labels, axis_name):
  y_bar, mu_g, means = class_means.update(state.means, h, labels, axis_name=axis_name,
                                          alpha_min=config.alpha_min)
  if state.initialised:
    prox = state.frame
  else:  # first step: P_prev from the feasibility solve, no gradient (a separate program)
    prox = solver.feasibility_solution(lax.stop_gradient(y_bar)).astype(y_bar.dtype)
  frame, info = solver.nearest_etf(y_bar, prox, delta=config.delta, method=config.solver,
                                   factorisation=config.factorisation, return_info=True)
  if config.forward_only:
    frame = lax.stop_gradient(frame)
  w = etf_classifier(frame)
  b = -mm(w, mu_g[:, None])[:, 0]
  logits = mm(h, w.T) + b
  sg = lax.stop_gradient
  new_state = HeadState(weight=sg(w), bias=sg(b), frame=sg(frame), means=means,
                        solve_converged=info.converged, initialised=True)
  return logits, new_state


def sync_initialised(state: HeadState) -> HeadState:
  """``state`` with the static ``initialised`` flag re-derived from its arrays.

  The implicit head updates its class-mean tracker at every training step, so it is
  initialised exactly when ``means.step > 0`` (one host read). For a state restored
  into a fresh template (:meth:`nc_jax.checkpoint.Checkpointer.restore` calls this).
  """
  steps = state.means.step
  return state.replace(initialised=bool(np.asarray(jax.device_get(steps)) > 0))


def unconverged_solves(state: HeadState) -> jax.Array:
  """``()`` float32: 1 if the head's last nearest-ETF solve did not certify convergence."""
  return jnp.logical_not(state.solve_converged).astype(jnp.float32)


# --------------------------------------------------------------------------- #
# Losses (means over the batch)
# --------------------------------------------------------------------------- #


def per_sample_loss(name: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Per-sample loss ``(n,)`` of ``logits`` ``(n, K)`` against int ``labels`` ``(n,)``.

  * ``cross_entropy``: :math:`-\log\mathrm{softmax}(z_i)_{y_i}` (official).
  * ``mse``: :math:`\|z_i - e_{y_i}\|^2` on one-hot targets.
  * ``dot_regression``: :math:`\tfrac12 (z_{i,y_i} - 1)^2`, the official unused
    ``DotRegression`` (:math:`\langle h, w_y\rangle + b_y = z_{y}`).

  Labels < 0 (padding) give a finite, meaningless value: mask them out.
  """
  if name not in LOSSES:
    raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  k = logits.shape[-1]
  safe = jnp.clip(labels, 0, k - 1)[:, None]
  if name == "cross_entropy":
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe, axis=-1)[:, 0]
  if name == "mse":
    return jnp.sum((logits - jax.nn.one_hot(labels, k, dtype=logits.dtype)) ** 2, -1)
  return 0.5 * (jnp.take_along_axis(logits, safe, axis=-1)[:, 0] - 1.0) ** 2


def loss(name: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Batch-mean of :func:`per_sample_loss` (mean reduction, as the official code)."""
  return jnp.mean(per_sample_loss(name, logits, labels))

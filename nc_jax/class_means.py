r"""Per-class feature means and the official moving average of them (docs/method.md §7).

Notation. A batch holds ``n`` feature rows :math:`h_i \in \mathbb R^d` (already
τ-normalised, docs/method.md §8.1) with labels :math:`y_i \in \{0,\dots,K-1\}`.

* :func:`class_means` returns plain per-class means and counts.
* :func:`update` is a pure-function port of the official
  ``FeaturesMovingAverageLayer.forward(features, targets, method='EMA')``
  (commit 00cdf29). One call per training step:

  1. :math:`\mu_G = \tfrac1n\sum_i h_i` (mean over *samples*, with gradient).
  2. Present classes: :math:`m_k = \bar h_k - \mu_G`, :math:`\bar h_k` the class mean.
  3. Missing classes, only when some class is missing from the batch:
     ``seen ← seen | present``, then

     * if the stored average is all zeros (its sum is exactly 0, i.e. the start of
       training), :math:`m_k = \mu_G` (the *uncentred* global mean, a code quirk)
       and storage is untouched;
     * otherwise, a missing class not yet seen gets :math:`m_k = \mu_G` and its
       stored column is overwritten with :math:`\mu_G` before the average, so
       its new column is :math:`\alpha\mu_G + (1-\alpha)\mu_G = \mu_G`;
     * a missing class already seen gets :math:`m_k` = its stored column, so the
       average leaves it unchanged (:math:`\alpha p + (1-\alpha)p`).

  4. :math:`t` = ``step + 1`` (global, never reset),
     :math:`\alpha_t = \max(2/(t+1), \alpha_{min})` with :math:`\alpha_{min} = 10^{-4}`
     (identical to the official "2/(t+1) while the previous α > 1e-4, else
     1e-4": α₁ = 1, α₂ = 2/3, …, α_t = 1e-4 from t = 19 999), and
     :math:`F_t = \alpha_t m + (1-\alpha_t)\,\mathrm{sg}(F_{t-1})`; the
     un-normalised :math:`\mathrm{sg}(F_t)` is stored.
  5. Output :math:`\bar Y = F_t/\|F_t\|_F` (``(d, K)``, with gradient) and :math:`\mu_G`.

Two details of the official code that are reproduced on purpose (and differ
from a naive reading of the rules):

* **``seen`` is only updated in steps where some class is missing.** A class
  that has only ever appeared in batches containing all K classes still counts
  as never seen; if it then goes missing, its column is reset to μ_G.
* **Gradient of a reset column.** The official code overwrites the stored
  column in place with the *non-detached* μ_G (PyTorch ``CopySlices``), so that
  column of :math:`F_t` is :math:`\mu_G` with derivative 1, not α. Here the
  column likewise carries μ_G's full gradient. Consequently the gradient of
  :func:`update` is exactly the derivative of the one-step map
  ``features ↦ (Ȳ, μ_G)`` for the given (constant) state. The stored state is
  always detached, so no gradient reaches earlier batches.

Data parallelism: with ``axis_name`` (inside ``jax.shard_map`` or ``jax.pmap``
over a device axis) the per-device class sums, class counts, feature sums and
sample counts are ``lax.psum``-ed, so every device computes exactly what one
device computes on the whole global batch (any split of the classes across
devices). The state must be replicated.

All matmuls use full precision (:mod:`nc_jax._linalg`): GPUs default to TF32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nc_jax import _validation as v
from nc_jax._linalg import mtm
from nc_jax.geometry import frobenius_normalise

__all__ = [
    "ALPHA_MIN",
    "ClassMeanState",
    "class_means",
    "ema_alpha",
    "init",
    "update",
]

#: Floor of the moving-average weight α_t in the official code.
ALPHA_MIN = 1e-4


class ClassMeanState(NamedTuple):
  r"""State of the feature-mean moving average (a pytree; replicate it across devices).

  Attributes:
    ema: ``(d, K)`` floating, the *un-normalised* moving average
      :math:`F_t` of the centred class means (column k ↔ class k). All zeros
      before the first update. Stored detached (no gradient history). Its dtype
      is the computation dtype of :func:`update`.
    seen: ``(K,)`` bool, sticky "class k has been sampled" flags, OR-ed with
      the classes present in a batch *only in steps where some class is
      missing* (official behaviour).
    step: ``()`` int32, number of updates done so far (0 before the first);
      update number :math:`t` = ``step + 1`` uses weight :math:`\alpha_t`.
  """
  ema: jax.Array
  seen: jax.Array
  step: jax.Array


def init(dim: int, num_classes: int, dtype: Any = jnp.float32) -> ClassMeanState:
  r"""The state before the first update: ``ema = 0`` (d×K), ``seen = False`` (K), ``step = 0``.

  Args:
    dim: feature dimension ``d >= 1``.
    num_classes: number of classes ``K >= 2``.
    dtype: a floating dtype; :func:`update` computes in it.

  Raises:
    ValueError: bad ``dim``, ``num_classes`` or ``dtype``.
  """
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
    raise ValueError(f"dim: expected an integer feature dimension d >= 1, got {dim!r}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise ValueError(f"num_classes: expected an integer number of classes K >= 2, got {num_classes!r}")
  v.check_num_classes("num_classes", num_classes)
  dt = v.float_dtype("dtype", dtype)
  d, k = int(dim), int(num_classes)
  return ClassMeanState(
      ema=jnp.zeros((d, k), dtype=dt),
      seen=jnp.zeros((k,), dtype=jnp.bool_),
      step=jnp.zeros((), dtype=jnp.int32),
  )


def ema_alpha(t: Any, alpha_min: float = ALPHA_MIN, dtype: Any = jnp.float32) -> jax.Array:
  r"""Moving-average weight of update number ``t`` (1-based): :math:`\max(2/(t+1), \alpha_{min})`.

  Equals the official recursion α₀ = 1, α_t = 2/(t+1) if α_{t-1} > α_min else
  α_min (because 2/(t+1) decreases): α₁ = 1, α₂ = 2/3, α₃ = 1/2, …,
  α_{19998} = 2/19999, α_t = 1e-4 for t ≥ 19 999. Traceable; ``t`` may be an
  array.
  """
  t = jnp.asarray(t).astype(dtype)
  return jnp.maximum(jnp.asarray(2.0, dtype) / (t + 1), jnp.asarray(alpha_min, dtype))


# ---------------------------------------------------------------------------
# Shared per-class sums.


def _class_sums(features: jax.Array, labels: jax.Array, num_classes: int):
  """Per-class feature sums ``(d, K)`` (one-hot matmul) and int32 counts ``(K,)``.

  Labels outside ``[0, K)`` (possible only under tracing, where values are not
  checked) match no class: they are ignored here.
  """
  match = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]
  sums = mtm(features, match.astype(features.dtype))
  counts = jnp.sum(match, axis=0, dtype=jnp.int32)
  return sums, counts


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def _check_axis_name(axis_name):
  if axis_name is None:
    return
  try:
    hash(axis_name)
  except TypeError as err:
    raise ValueError(f"axis_name: expected a hashable mesh/pmap axis name or None, got {axis_name!r}") from err


def _check_features(features: Any) -> jax.Array:
  features = v.as_float_array("features", features)
  v.check_ndim("features", features, 2, "(n, d) of feature rows")
  if features.shape[0] == 0:
    raise ValueError(f"features: expected a non-empty batch (n >= 1 rows), got shape {tuple(features.shape)}")
  v.check_finite("features", features)
  return features


def class_means(features: Any, labels: Any, num_classes: int, *, axis_name: Any = None):
  r"""Plain per-class means of feature rows.

  :math:`\bar h_k = \frac{1}{n_k}\sum_{i: y_i = k} h_i`, computed as a one-hot
  matmul :math:`H^T E\,\mathrm{diag}(n)^{-1}` in full precision.

  Args:
    features: ``(n, d)`` floating (integers are converted), finite.
    labels: ``(n,)`` integer in ``[0, K)``.
    num_classes: ``K >= 2``.
    axis_name: optional device axis name (inside ``shard_map``/``pmap``):
      sums and counts are ``psum``-ed, giving the means of the global batch.

  Returns:
    ``(means, counts)``: ``means`` ``(d, K)`` in the features' dtype, with
    zero columns for classes without samples; ``counts`` ``(K,)`` int32.
    Differentiable in ``features``.

  Raises:
    ValueError: bad shapes, dtypes, label range or non-finite features (value
      checks only for concrete inputs, not under a user's ``jit``).
  """
  v.check_num_classes("num_classes", num_classes)
  _check_axis_name(axis_name)
  features = _check_features(features)
  labels = v.check_labels("labels", labels, int(num_classes), n=features.shape[0])
  return _class_means_jit(features, labels, int(num_classes), axis_name)


def _class_means_impl(features, labels, num_classes, axis_name):
  sums, counts = _class_sums(features, labels, num_classes)
  sums, counts = _psum(sums, axis_name), _psum(counts, axis_name)
  means = sums / jnp.maximum(counts, 1).astype(sums.dtype)
  return means, counts


_class_means_jit = jax.jit(_class_means_impl, static_argnums=(2, 3))


# ---------------------------------------------------------------------------
# The official moving average.


def _check_state(state: Any) -> ClassMeanState:
  if not isinstance(state, ClassMeanState):
    if isinstance(state, tuple) and len(state) == 3:
      state = ClassMeanState(*state)
    else:
      raise ValueError(f"state: expected a ClassMeanState (ema, seen, step), got {type(state).__name__}")
  ema = jnp.asarray(state.ema)
  seen = jnp.asarray(state.seen)
  step = jnp.asarray(state.step)
  if ema.ndim != 2 or not jnp.issubdtype(ema.dtype, jnp.floating):
    raise ValueError(
        f"state.ema: expected a rank-2 (d, K) floating array, got shape {tuple(ema.shape)} dtype {ema.dtype}")
  v.check_num_classes("state.ema.shape[1]", ema.shape[1])
  if seen.shape != (ema.shape[1],) or seen.dtype != jnp.bool_:
    raise ValueError(
        f"state.seen: expected a ({ema.shape[1]},) bool array, got shape {tuple(seen.shape)} dtype {seen.dtype}")
  if step.shape != () or not jnp.issubdtype(step.dtype, jnp.integer):
    raise ValueError(f"state.step: expected a scalar integer, got shape {tuple(step.shape)} dtype {step.dtype}")
  return ClassMeanState(ema, seen, step.astype(jnp.int32))


def update(state: ClassMeanState, features: Any, labels: Any, *, axis_name: Any = None,
           alpha_min: float = ALPHA_MIN):
  r"""One training-step update of the official feature-mean moving average.

  See the module docstring for the exact rules (steps 1–5, missing classes and
  the two reproduced quirks).

  Args:
    state: :class:`ClassMeanState` from :func:`init` or a previous update
      (replicated across devices when ``axis_name`` is given).
    features: ``(n, d)`` batch features (τ-normalised upstream), finite; cast
      to ``state.ema.dtype``. Under ``axis_name``: this device's shard.
    labels: ``(n,)`` integer labels in ``[0, K)``.
    axis_name: optional device axis name (``shard_map``/``pmap``): class sums,
      class counts, feature sums and sample counts are ``psum``-ed, so the
      result equals one device's update on the concatenated global batch.
    alpha_min: floor of the weight, default 1e-4 (official); a Python float in
      ``[0, 1]``.

  Returns:
    ``(Ybar, mu_G, new_state)``: ``Ybar`` ``(d, K)`` = :math:`F_t/\|F_t\|_F`
    and ``mu_G`` ``(d,)`` = batch mean, both differentiable in ``features``;
    ``new_state`` with detached ``ema`` = :math:`F_t`, updated ``seen`` and
    ``step + 1``.

  Raises:
    ValueError: malformed state, features not ``(n, d)`` with the state's
      ``d``, empty batch, labels not a length-n integer vector, bad
      ``alpha_min``; and, only for concrete (non-traced) inputs, non-finite
      features or labels outside ``[0, K)``. Under a user's ``jit``,
      out-of-range labels are ignored in the class sums (still counted in
      μ_G).

  Pure and traceable: works under ``jit``, ``grad``, ``vmap`` (over states
  and batches), ``lax.scan`` (the state dtype is stable) and ``shard_map``.
  """
  state = _check_state(state)
  d, k = state.ema.shape
  _check_axis_name(axis_name)
  if isinstance(alpha_min, bool) or not isinstance(alpha_min, (int, float, np.floating, np.integer)) \
      or not 0.0 <= float(alpha_min) <= 1.0:
    raise ValueError(f"alpha_min: expected a Python float in [0, 1], got {alpha_min!r}")
  features = _check_features(features)
  if features.shape[1] != d:
    raise ValueError(
        f"features: expected feature dimension d={d} (state.ema is {d}x{k}), got shape {tuple(features.shape)}")
  labels = v.check_labels("labels", labels, k, n=features.shape[0])
  features = features.astype(state.ema.dtype)
  return _update_jit(state, features, labels, axis_name, float(alpha_min))


def _update_impl(state, features, labels, axis_name, alpha_min):
  ema_prev, seen_prev, step = state
  dtype = ema_prev.dtype
  num_classes = ema_prev.shape[1]
  sg = lax.stop_gradient
  prev = sg(ema_prev)

  # 1-2. Global mean over samples and centred class means (psum-ed over devices).
  sums, counts = _class_sums(features, labels, num_classes)
  feature_sum = jnp.sum(features, axis=0)
  n = jnp.asarray(features.shape[0], dtype)
  sums, counts = _psum(sums, axis_name), _psum(counts, axis_name)
  feature_sum, n = _psum(feature_sum, axis_name), _psum(n, axis_name)
  mu_g = feature_sum / n
  present = counts > 0
  centred = sums / jnp.maximum(counts, 1).astype(dtype) - mu_g[:, None]

  # 3. Missing classes (official: this whole block runs only if a class is missing).
  missing = ~present
  any_missing = jnp.any(missing)
  seen = jnp.where(any_missing, seen_prev | present, seen_prev)
  history_empty = jnp.sum(prev) == 0
  reset = missing & ~seen & ~history_empty         # never seen: column <- mu_G (with gradient)
  keep = missing & seen & ~history_empty           # seen before: m <- stored column
  mu_col = jnp.broadcast_to(mu_g[:, None], prev.shape)
  m = jnp.where(present[None, :], centred, jnp.where(keep[None, :], prev, mu_col))
  prev_eff = jnp.where(reset[None, :], mu_col, prev)

  # 4. EMA with alpha_t = max(2/(t+1), alpha_min), t = step + 1.
  t = step + 1
  alpha = ema_alpha(t, alpha_min, dtype)
  ema = alpha * m + (1 - alpha) * prev_eff

  # 5. Frobenius-normalised output; stored average detached.
  new_state = ClassMeanState(ema=sg(ema), seen=seen, step=t.astype(jnp.int32))
  return frobenius_normalise(ema), mu_g, new_state


_update_jit = jax.jit(_update_impl, static_argnums=(3, 4))

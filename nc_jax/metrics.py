r"""Neural-collapse metrics (docs/method.md §9), in memory or streamed over batches.

Notation. ``N`` samples with features :math:`h_i \in \mathbb R^d` (rows of the
``(N, d)`` array ``features``) and labels :math:`y_i \in [0, K)`; a linear
classifier ``W`` (``(K, d)``, rows :math:`w_k`) with bias ``b`` (``(K,)``;
``None`` means zero), logits :math:`h W^T + b`.

* :math:`\mu_c` class means, :math:`\mu_G = \tfrac1N\sum_i h_i` the mean over all
  *samples* (not the mean of class means), :math:`H = [\mu_c - \mu_G]_c` (``(d, K)``).
* :math:`M = I_K - \tfrac1K 11^T`, :math:`\tilde M = M/\sqrt{K-1}`.
* :math:`\Sigma_W = \tfrac1N\sum_i (h_i-\mu_{y_i})(h_i-\mu_{y_i})^T`,
  :math:`\Sigma_B = \tfrac1K\sum_c(\mu_c-\mu_G)(\mu_c-\mu_G)^T = HH^T/K`,
  :math:`\Sigma_T = \Sigma_W + \Sigma_B`.

Metrics (keys of the dict returned by :func:`nc_metrics`):

* ``top1``, ``top5``: accuracy of the logits in % (top-5 means top-min(5, K)).
* ``nc1`` :math:`= \operatorname{tr}(\Sigma_W\Sigma_B^+)/K`.
* ``vci`` :math:`= 1 - \operatorname{tr}(\Sigma_T^+\Sigma_B)/\min(d, K-1)`.
* ``nc2_etf`` :math:`= \|WW^T/\|WW^T\|_F - \tilde M\|_F`.
* ``nc2_equinorm_w`` :math:`= \operatorname{std}_k\|w_k\|/\operatorname{mean}_k\|w_k\|`,
  ``nc2_equinorm_h`` the same for :math:`\|\mu_c-\mu_G\|` (unbiased std, ddof 1),
  ``wh_equinorm`` :math:`= |\text{H-eq} - \text{W-eq}|`.
* ``nc3`` :math:`= \|WH/\|WH\|_F - \tilde M\|_F`.
* ``ncc_mismatch`` :math:`= 100 -` % of samples whose nearest class centre
  :math:`\arg\min_c\|h-\mu_c\|` equals the logits' argmax. This is the paper's NC4.
* ``bias_collapse`` :math:`= \|W\mu_G + b\|_2` (the official code's key ``"NC4"``).
* ``cosine_margins`` (``(N,)`` numpy array, sample order) and ``avg_cosine_margin``
  (their mean): with :math:`\tilde w_k = w_k - \tfrac1K\sum_j w_j`,
  :math:`\tilde h = h - \mu_G`, :math:`\cos_k = \langle\tilde h,\tilde w_k\rangle/
  (\|\tilde h\|\|\tilde w_k\|)`, the margin is :math:`\cos_{y} - \max_{k\ne y}\cos_k`.
  :func:`sorted_cosine_margins` gives the paper's "PCM at EoT" curve.
* ``w_etf_dist``, ``h_etf_dist``: squared Frobenius distance of :math:`W^T/\|W\|_F`
  and :math:`H/\|H\|_F` to their nearest unit-Frobenius simplex ETF, in closed form
  (:func:`nc_jax.geometry.nearest_etf_closed_form`); ``wh_etf_dist``
  :math:`= \|E_W - E_H\|_F^2` between the two nearest ETFs. They need ``d >= K``
  and are ``nan`` otherwise. ``w_etf_frame`` and ``h_etf_frame`` are those nearest ETFs,
  :math:`E_W` and :math:`E_H` (``(d, K)`` float64 numpy arrays, ``None`` where undefined).

Two passes (like the official code): pass 1 accumulates per-class sums and
counts (:class:`ClassStats`); after it the class means are fixed
(:class:`ClassMeans`) and pass 2 accumulates the within-class scatter, the
top-1/top-5/NCC agreement counts and the cosine margins w.r.t. those means
(:class:`SecondPassStats`). Both updates are pure ``jax.jit`` functions over
small ``NamedTuple`` states (compiled once per batch shape and dtype), so they
also run inside a user's ``jit``/``scan``. The final small linear algebra (thin
SVD of ``H``, ``eigh`` of :math:`\Sigma_T`, the K×K Gram matrices) runs on the
host in float64 numpy (:func:`finalise_metrics`). :func:`nc_metrics` is the
one-batch case of :func:`nc_metrics_streaming`: both run the same code.

Host functions. :func:`nc_metrics`, :func:`nc_metrics_streaming`,
:func:`finalise_class_stats`, :func:`make_second_pass_context`,
:func:`finalise_metrics` and :func:`sorted_cosine_margins` read concrete values on
the host, so they cannot run under ``jax.jit``, ``vmap`` or ``grad``; given a
tracer they raise a ``ValueError`` that says so (call them outside the
transformation, or accumulate with the jit-able :func:`update_class_stats` /
:func:`update_second_pass` inside it and finalise on the host).

Degenerate inputs. A metric that is undefined for the data is ``nan`` and a
:class:`DegenerateMetricsWarning` names it and says why: class means that
coincide up to rounding (:math:`H = 0`, e.g. identical features for every
sample: NC1, NC3, the H-equinorm, NCC and the H-ETF distances divide by
:math:`H`), samples that all coincide (also VCI and the cosine margins),
``W = 0`` or a class whose centred classifier row is zero (the W metrics,
resp. the cosine margins), ``d < K`` (ETF distances) or overflow of the
accumulation dtype. Finite inputs whose squares would overflow the accumulation
dtype are refused with a ``ValueError`` before any work.

Pseudo-inverses use scipy's default cutoff: singular values
:math:`\le d\cdot\varepsilon_{64}\cdot\sigma_{\max}` are dropped
(:math:`\varepsilon_{64}` the float64 epsilon, as the final algebra runs in
float64). For ``nc1`` no ``d×d`` matrix is inverted: with the thin SVD
:math:`H = U S V^T` and the kept columns :math:`U_r, S_r`,
:math:`\Sigma_B^+ = K\,U_r S_r^{-2} U_r^T`, so
:math:`\mathrm{nc1} = \sum_{j\le r} u_j^T\Sigma_W u_j / s_j^2`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nc_jax import _validation as v
from nc_jax import geometry
from nc_jax._linalg import mm, mtm

_EPS64 = float(np.finfo(np.float64).eps)

#: Class means (or samples) closer than this many ``eps`` of the accumulation dtype,
#: relative to the largest mean entry, are taken as coinciding (rounding of the sums).
_COINCIDE_EPS = 32.0


class DegenerateMetricsWarning(UserWarning):
  """Some metrics are ``nan`` because they are undefined for the data (message: which, why)."""

#: Scalar keys of the dict returned by :func:`nc_metrics` (besides ``cosine_margins``).
METRIC_KEYS = (
    "top1", "top5", "nc1", "vci", "nc2_etf", "nc2_equinorm_w", "nc2_equinorm_h",
    "wh_equinorm", "nc3", "ncc_mismatch", "bias_collapse", "avg_cosine_margin",
    "w_etf_dist", "h_etf_dist", "wh_etf_dist",
)


# ---------------------------------------------------------------------------
# Pass 1: per-class sums and counts.
# ---------------------------------------------------------------------------

class ClassStats(NamedTuple):
  """Pass-1 accumulator (a pytree of device arrays).

  Attributes:
    sums: ``(K, d)``, :math:`\\sum_{i: y_i = c} h_i` per class.
    counts: ``(K,)`` int32, number of samples per class.
  """
  sums: jax.Array
  counts: jax.Array


class ClassMeans(NamedTuple):
  """Finalised pass 1, on the host in float64 numpy.

  Attributes:
    means: ``(K, d)``, class means :math:`\\mu_c` (rows).
    global_mean: ``(d,)``, :math:`\\mu_G`, the mean over all samples, computed
      from the same class sums (so :math:`\\sum_c n_c(\\mu_c - \\mu_G) = 0` holds
      to float64 rounding whatever the accumulation dtype).
    counts: ``(K,)`` int64, samples per class (all ``>= 1``).
    num_samples: ``N``.
  """
  means: np.ndarray
  global_mean: np.ndarray
  counts: np.ndarray
  num_samples: int


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_class_stats(num_classes: int, dim: int, dtype) -> ClassStats:
  return ClassStats(jnp.zeros((num_classes, dim), dtype), jnp.zeros((num_classes,), jnp.int32))


@jax.jit
def _update_class_stats(stats: ClassStats, features: jax.Array, labels: jax.Array) -> ClassStats:
  k = stats.sums.shape[0]
  dtype = stats.sums.dtype
  # One-hot matmul instead of a scatter-add: deterministic on GPU (no atomics).
  onehot = jax.nn.one_hot(labels, k, dtype=dtype)  # (B, K); out-of-range labels give a zero row
  sums = stats.sums + mtm(onehot, features.astype(dtype))
  counts = stats.counts + jnp.sum(onehot, axis=0).astype(jnp.int32)
  return ClassStats(sums, counts)


def init_class_stats(num_classes: int, dim: int, dtype: Any = jnp.float32) -> ClassStats:
  """Zero pass-1 state: ``sums`` ``(K, d)`` of ``dtype``, ``counts`` ``(K,)`` int32.

  ``dtype`` is canonicalised (float64 becomes float32 unless ``jax_enable_x64``).
  """
  v.check_num_classes("num_classes", num_classes)
  if int(dim) != dim or dim < 1:
    raise ValueError(f"dim: expected a positive integer feature dimension, got {dim}")
  dtype = jax.dtypes.canonicalize_dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
  return _init_class_stats(int(num_classes), int(dim), dtype)


def update_class_stats(stats: ClassStats, features: jax.Array, labels: jax.Array) -> ClassStats:
  """Adds one batch to the pass-1 state (pure; jit-compiled once per batch shape).

  Args:
    stats: current :class:`ClassStats` (``K`` classes, dimension ``d``).
    features: ``(B, d)`` batch features (cast to ``stats.sums.dtype``).
    labels: ``(B,)`` integer labels in ``[0, K)``.

  Returns:
    The updated :class:`ClassStats`.

  Raises:
    ValueError: on a bad shape or dtype, non-finite features or labels out of
      range. Under a user's ``jit`` only the static checks run; out-of-range
      labels are then silently ignored.
  """
  k, d = stats.sums.shape
  f, lab = _check_batch("features", "labels", features, labels, k, d)
  return _update_class_stats(stats, f, lab)


def finalise_class_stats(stats: ClassStats) -> ClassMeans:
  """Class means and global mean from the pass-1 state, on the host in float64.

  Raises:
    ValueError: if no samples were seen, some class has no samples (its mean,
      hence :math:`\\Sigma_B` and every metric built on ``H``, is undefined), the
      sums are not finite (overflow), or ``stats`` is a tracer (a host function).
  """
  _require_concrete("finalise_class_stats", "stats", stats)
  sums = np.asarray(stats.sums, dtype=np.float64)
  counts = np.asarray(stats.counts).astype(np.int64)
  n = int(counts.sum())
  if n == 0:
    raise ValueError("features: expected at least one sample, got 0")
  if not np.all(np.isfinite(sums)):
    raise ValueError(
        f"stats: expected finite class sums, got {int(np.sum(~np.isfinite(sums)))} non-finite "
        f"entries: the features overflowed {np.dtype(stats.sums.dtype).name} accumulation; "
        "rescale them (e.g. normalise) or accumulate in float64")
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    shown = ", ".join(str(int(c)) for c in missing[:10]) + (", ..." if missing.size > 10 else "")
    raise ValueError(
        f"labels: expected every class in [0, {counts.size}) to occur at least once "
        f"(class means are undefined otherwise), got no samples of {missing.size} "
        f"class(es): [{shown}]")
  means = sums / counts[:, None]
  global_mean = sums.sum(axis=0) / n
  return ClassMeans(means, global_mean, counts, n)


# ---------------------------------------------------------------------------
# Pass 2: within-class scatter, accuracies, NCC agreement and cosine margins.
# ---------------------------------------------------------------------------

class SecondPassContext(NamedTuple):
  """Constants of pass 2 (a pytree of device arrays of the compute dtype).

  Attributes:
    means: ``(K, d)`` class means :math:`\\mu_c`.
    means_sqnorm: ``(K,)``, :math:`\\|\\mu_c\\|^2` (for the nearest-centre rule).
    global_mean: ``(d,)``, :math:`\\mu_G`.
    weights: ``(K, d)`` classifier ``W``.
    bias: ``(K,)`` classifier bias ``b``.
    centred_unit_weights: ``(K, d)``, :math:`\\tilde w_k/\\|\\tilde w_k\\|` with
      :math:`\\tilde w_k = w_k - \\tfrac1K\\sum_j w_j`.
  """
  means: jax.Array
  means_sqnorm: jax.Array
  global_mean: jax.Array
  weights: jax.Array
  bias: jax.Array
  centred_unit_weights: jax.Array


class SecondPassStats(NamedTuple):
  """Pass-2 accumulator (a pytree of device arrays).

  Attributes:
    within_scatter: ``(d, d)``, :math:`\\sum_i (h_i-\\mu_{y_i})(h_i-\\mu_{y_i})^T`
      (un-normalised; :math:`\\Sigma_W` is this divided by ``count``).
    top1: int32, samples whose logits' argmax equals the label.
    top5: int32, samples whose label is among the top-min(5, K) logits.
    ncc_agree: int32, samples whose nearest class centre equals the logits' argmax.
    margin_sum: sum of the cosine margins.
    count: int32, samples seen.
  """
  within_scatter: jax.Array
  top1: jax.Array
  top5: jax.Array
  ncc_agree: jax.Array
  margin_sum: jax.Array
  count: jax.Array


def make_second_pass_context(class_means: ClassMeans, W: jax.Array, b: jax.Array | None = None,
                             dtype: Any = None) -> SecondPassContext:
  """Builds the pass-2 constants from the finalised class means and the classifier.

  Args:
    class_means: :class:`ClassMeans` from :func:`finalise_class_stats`.
    W: ``(K, d)`` classifier weights.
    b: ``(K,)`` bias, or ``None`` for zero.
    dtype: compute dtype of pass 2; default ``W``'s floating dtype.

  Raises:
    ValueError: if ``W`` or ``b`` has the wrong shape or non-finite values, or an
      argument is a tracer (a host function; build the context outside ``jit``
      and pass it in).
  """
  _require_concrete("make_second_pass_context", "class_means", class_means)
  _require_concrete("make_second_pass_context", "W", W)
  _require_concrete("make_second_pass_context", "b", b)
  k, d = class_means.means.shape
  w, bias = _check_classifier(W, b, k, d)
  dtype = jax.dtypes.canonicalize_dtype(w.dtype if dtype is None else dtype)
  w64 = np.asarray(w, dtype=np.float64)
  wt = w64 - w64.mean(axis=0, keepdims=True)
  wt_norm = np.linalg.norm(wt, axis=1, keepdims=True)
  wt_unit = wt / np.maximum(wt_norm, np.finfo(np.float64).tiny)
  means = class_means.means
  return SecondPassContext(
      means=jnp.asarray(means, dtype),
      means_sqnorm=jnp.asarray(np.sum(means * means, axis=1), dtype),
      global_mean=jnp.asarray(class_means.global_mean, dtype),
      weights=jnp.asarray(w64, dtype),
      bias=jnp.asarray(np.asarray(bias, np.float64), dtype),
      centred_unit_weights=jnp.asarray(wt_unit, dtype),
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_second_pass(dim: int, dtype) -> SecondPassStats:
  i0 = jnp.zeros((), jnp.int32)
  return SecondPassStats(jnp.zeros((dim, dim), dtype), i0, i0, i0, jnp.zeros((), dtype), i0)


@jax.jit
def _update_second_pass(stats: SecondPassStats, ctx: SecondPassContext, features: jax.Array,
                        labels: jax.Array) -> tuple[SecondPassStats, jax.Array]:
  dtype = ctx.means.dtype
  k = ctx.means.shape[0]
  h = features.astype(dtype)
  n = h.shape[0]

  # Within-class scatter w.r.t. the pass-1 means.
  centred = h - ctx.means[labels]
  scatter = stats.within_scatter + mtm(centred, centred).astype(stats.within_scatter.dtype)

  # Accuracies (top_k breaks ties towards the lower index, like argmax).
  logits = mm(h, ctx.weights.T) + ctx.bias
  pred = jnp.argmax(logits, axis=-1)
  top1 = jnp.sum(pred == labels, dtype=jnp.int32)
  _, top_idx = lax.top_k(logits, min(5, k))
  top5 = jnp.sum(jnp.any(top_idx == labels[:, None], axis=-1), dtype=jnp.int32)

  # Nearest class centre: argmin_c ||h - mu_c||^2 = argmin_c ||mu_c||^2 - 2 <h, mu_c>.
  ncc = jnp.argmin(ctx.means_sqnorm[None, :] - 2.0 * mm(h, ctx.means.T), axis=-1)
  ncc_agree = jnp.sum(ncc == pred, dtype=jnp.int32)

  # Cosine margins.
  ht = h - ctx.global_mean
  ht_norm = jnp.linalg.norm(ht, axis=-1)
  cos = mm(ht, ctx.centred_unit_weights.T) / jnp.maximum(ht_norm, jnp.finfo(dtype).tiny)[:, None]
  is_label = labels[:, None] == jnp.arange(k)[None, :]
  cos_label = jnp.sum(jnp.where(is_label, cos, 0.0), axis=-1)
  cos_other = jnp.max(jnp.where(is_label, -jnp.inf, cos), axis=-1)
  margins = cos_label - cos_other

  new = SecondPassStats(
      within_scatter=scatter,
      top1=stats.top1 + top1,
      top5=stats.top5 + top5,
      ncc_agree=stats.ncc_agree + ncc_agree,
      margin_sum=stats.margin_sum + jnp.sum(margins).astype(stats.margin_sum.dtype),
      count=stats.count + jnp.int32(n),
  )
  return new, margins


def init_second_pass(dim: int, dtype: Any = jnp.float32) -> SecondPassStats:
  """Zero pass-2 state: a ``(d, d)`` scatter of ``dtype`` and zero counters."""
  if int(dim) != dim or dim < 1:
    raise ValueError(f"dim: expected a positive integer feature dimension, got {dim}")
  dtype = jax.dtypes.canonicalize_dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
  return _init_second_pass(int(dim), dtype)


def update_second_pass(stats: SecondPassStats, context: SecondPassContext, features: jax.Array,
                       labels: jax.Array) -> tuple[SecondPassStats, jax.Array]:
  """Adds one batch to the pass-2 state (pure; jit-compiled once per batch shape).

  Args:
    stats: current :class:`SecondPassStats`.
    context: :class:`SecondPassContext` from :func:`make_second_pass_context`.
    features: ``(B, d)`` batch features (cast to the context's dtype).
    labels: ``(B,)`` integer labels in ``[0, K)``.

  Returns:
    ``(stats, margins)``: the updated state and the batch's ``(B,)`` cosine
    margins :math:`\\cos_{y_i} - \\max_{k\\ne y_i}\\cos_k` in sample order (the
    host concatenates them for the per-sample margin curve).

  Raises:
    ValueError: as :func:`update_class_stats`.
  """
  k, d = context.means.shape
  f, lab = _check_batch("features", "labels", features, labels, k, d)
  return _update_second_pass(stats, context, f, lab)


# ---------------------------------------------------------------------------
# Finalisation on the host (float64 numpy).
# ---------------------------------------------------------------------------

def _pinv_keep(values: np.ndarray, dim: int) -> np.ndarray:
  """Mask of the (singular or eigen) values scipy's ``pinv`` keeps for a dim×dim matrix."""
  vmax = float(np.max(np.abs(values))) if values.size else 0.0
  return np.abs(values) > dim * _EPS64 * vmax


def _gap_to_unit_etf(gram: np.ndarray) -> float:
  r""":math:`\|G/\|G\|_F - \tilde M\|_F` (``nan`` if ``G = 0``)."""
  k = gram.shape[0]
  norm = np.linalg.norm(gram)
  if not norm > 0:
    return float("nan")
  m_tilde = (np.eye(k) - np.full((k, k), 1.0 / k)) / math.sqrt(k - 1.0)
  return float(np.linalg.norm(gram / norm - m_tilde))


def _equinorm(norms: np.ndarray) -> float:
  mean = float(np.mean(norms))
  return float(np.std(norms, ddof=1) / mean) if mean > 0 else float("nan")


_H_KEYS = ("nc1", "nc2_equinorm_h", "wh_equinorm", "nc3", "ncc_mismatch", "h_etf_dist",
           "wh_etf_dist")
_W_KEYS = ("nc2_etf", "nc2_equinorm_w", "wh_equinorm", "nc3", "w_etf_dist", "wh_etf_dist")
_ETF_KEYS = ("w_etf_dist", "h_etf_dist", "wh_etf_dist")


def _degeneracies(class_means: ClassMeans, h_mat: np.ndarray, sigma_w: np.ndarray,
                  w: np.ndarray, margin_sum: float, acc_dtype: Any) -> dict[str, str]:
  """Metric key → why it is undefined for these inputs (empty for well-posed data).

  Why: the formulas divide by ``H`` (its singular values, norms or the norm of
  ``WH``), by ``W`` or by the centred sample and classifier norms; when those
  are zero, or only rounding noise of the float sums, the result is ``nan`` (or
  worse, a finite number made of rounding noise), so these keys are set to
  ``nan`` and reported. ``h_mat``: ``(d, K)``; ``sigma_w``: ``(d, d)``; ``w``:
  ``(K, d)`` float64; ``acc_dtype``: the dtype of the device sums.
  """
  k, d = class_means.means.shape
  why: dict[str, str] = {}

  def mark(keys, reason):
    for key in keys:
      why.setdefault(key, reason)

  eps = float(np.finfo(np.dtype(acc_dtype)).eps) if np.issubdtype(
      np.dtype(acc_dtype), np.floating) else _EPS64
  scale = max(float(np.max(np.abs(class_means.means))),
              float(np.max(np.abs(class_means.global_mean))))
  tol = _COINCIDE_EPS * eps * scale
  h_max = float(np.max(np.abs(h_mat)))
  scatter_ok = bool(np.all(np.isfinite(sigma_w)))
  spread = math.sqrt(max(float(np.max(np.diag(sigma_w))), 0.0)) if scatter_ok else math.inf
  if not scatter_ok:
    mark(("nc1", "vci"), f"the within-class scatter overflowed {np.dtype(acc_dtype).name} "
         "(features too large for the accumulation dtype)")
  if not h_max > tol:
    if not spread > tol:
      mark(("vci", "avg_cosine_margin", "cosine_margins"),
           f"all samples coincide up to rounding (class means and within-class RMS spread "
           f"<= {tol:.3g}, e.g. identical features for every sample): there is no spread to "
           "measure")
    mark(_H_KEYS, f"the class means coincide up to rounding (max |mu_c - mu_G| = {h_max:.3g} "
         f"<= {tol:.3g}, e.g. identical features for every sample): H = 0, so Sigma_B = 0 and "
         "the H-normalised metrics divide by zero")
  if not np.any(w):
    mark(_W_KEYS, "W = 0: the W-normalised metrics divide by zero")
  wt = w - w.mean(axis=0, keepdims=True)
  w_tol = 16.0 * _EPS64 * math.sqrt(d) * float(np.max(np.abs(w)))
  zero_rows = np.flatnonzero(np.linalg.norm(wt, axis=1) <= w_tol)
  if zero_rows.size:
    shown = ", ".join(str(int(c)) for c in zero_rows[:10])
    shown += ", ..." if zero_rows.size > 10 else ""
    mark(("avg_cosine_margin", "cosine_margins"),
         f"the centred classifier row w_k - mean_j w_j is zero for class(es) [{shown}] "
         "(e.g. W = 0 or equal rows): their cosines are undefined")
    if zero_rows.size == k:
      mark(("wh_etf_dist",), "the centred W is zero: its nearest ETF is not unique")
  if d < k:
    mark(_ETF_KEYS, f"the ETF distances need d >= K, got d={d} < K={k}")
  if not math.isfinite(margin_sum):
    mark(("avg_cosine_margin",), f"the cosine-margin sum overflowed {np.dtype(acc_dtype).name}")
  return why


def _warn_nan(out: dict[str, Any], why: dict[str, str], stacklevel: int) -> None:
  """Sets the keys of ``why`` to ``nan`` in ``out``, adds a reason for any other non-finite
  metric, and warns once, naming the metrics grouped by reason."""
  for key in why:
    if key == "cosine_margins":
      if "cosine_margins" in out:
        out[key] = np.full_like(out[key], np.nan)
    else:
      out[key] = float("nan")
  for key in METRIC_KEYS:
    if key not in why and not math.isfinite(out[key]):
      why[key] = "a non-finite intermediate result (unexpected for finite inputs; please report)"
  if "cosine_margins" not in out:
    why.pop("cosine_margins", None)
  if not why:
    return
  groups: dict[str, list[str]] = {}
  for key, reason in why.items():
    groups.setdefault(reason, []).append(key)
  parts = [f"{', '.join(keys)}: {reason}" for reason, keys in groups.items()]
  warnings.warn("NC metrics undefined for these inputs, set to nan: " + "; ".join(parts),
                DegenerateMetricsWarning, stacklevel=stacklevel + 1)


def finalise_metrics(class_means: ClassMeans, stats: SecondPassStats, W: jax.Array,
                     b: jax.Array | None = None,
                     margins: Iterable[jax.Array] | np.ndarray | None = None) -> dict[str, Any]:
  """All metrics from the two finalised passes (host, float64 numpy).

  Args:
    class_means: :class:`ClassMeans` (pass 1).
    stats: :class:`SecondPassStats` (pass 2); :math:`\\Sigma_W` and the
      percentages are normalised by its ``count``.
    W: ``(K, d)`` classifier weights. b: ``(K,)`` bias or ``None`` (zero).
    margins: optional per-batch margin arrays (or one array) from
      :func:`update_second_pass`; concatenated into ``"cosine_margins"``.

  Returns:
    Dict with the python floats of :data:`METRIC_KEYS` and, if ``margins`` is
    given, ``"cosine_margins"``: an ``(N,)`` float64 numpy array. Metrics
    undefined for the inputs are ``nan``, with a :class:`DegenerateMetricsWarning`
    naming them and the reason (module docstring, "Degenerate inputs").

  Raises:
    ValueError: bad ``W``/``b``, an empty second pass, or an argument that is a
      tracer (a host function: call it outside ``jit``).
  """
  return _finalise(class_means, stats, W, b, margins, stacklevel=3)


def _finalise(class_means: ClassMeans, stats: SecondPassStats, W: Any, b: Any, margins: Any,
              stacklevel: int) -> dict[str, Any]:
  """:func:`finalise_metrics`; ``stacklevel`` makes the warning point at the user's call."""
  for name, value in (("class_means", class_means), ("stats", stats), ("W", W), ("b", b),
                      ("margins", margins)):
    _require_concrete("finalise_metrics", name, value)
  k, d = class_means.means.shape
  w, bias = _check_classifier(W, b, k, d)
  w = np.asarray(w, dtype=np.float64)
  bias = np.asarray(bias, dtype=np.float64)
  n = int(stats.count)
  if n == 0:
    raise ValueError("stats: expected a second pass over at least one sample, got count 0")
  mu_g = class_means.global_mean
  h_mat = (class_means.means - mu_g).T  # (d, K)

  sigma_w = np.asarray(stats.within_scatter, dtype=np.float64) / n
  sigma_w = 0.5 * (sigma_w + sigma_w.T)
  margin_sum = float(stats.margin_sum)
  why = _degeneracies(class_means, h_mat, sigma_w, w, margin_sum, stats.within_scatter.dtype)
  nan = float("nan")

  nc1 = vci = nan
  if "nc1" not in why:
    # NC1 = tr(Sigma_W Sigma_B^+)/K = sum_j u_j^T Sigma_W u_j / s_j^2 over kept s_j
    # (Sigma_B = H H^T/K has eigenvalues s_j^2/K; cutoff d*eps*max, as scipy.linalg.pinv).
    u, s, _ = np.linalg.svd(h_mat, full_matrices=False)
    keep = _pinv_keep(s**2, d)
    u_r, s_r = u[:, keep], s[keep]
    nc1 = float(np.sum(np.einsum("ij,ij->j", sigma_w @ u_r, u_r) / s_r**2))

  if "vci" not in why:
    # VCI = 1 - tr(Sigma_T^+ Sigma_B)/min(d, K-1), symmetric pseudo-inverse via eigh.
    sigma_t = sigma_w + (h_mat @ h_mat.T) / k
    lam, vecs = np.linalg.eigh(sigma_t)
    keep_t = _pinv_keep(lam, d)
    proj = vecs[:, keep_t].T @ h_mat  # (r, K)
    tr_tb = float(np.sum(np.sum(proj**2, axis=1) / lam[keep_t]) / k)
    vci = 1.0 - tr_tb / min(d, k - 1)

  w_norms = np.linalg.norm(w, axis=1)
  h_norms = np.linalg.norm(h_mat, axis=0)
  eq_w, eq_h = _equinorm(w_norms), _equinorm(h_norms)

  w_dist = h_dist = wh_dist = nan
  e_w = e_h = None
  if d >= k:
    if "w_etf_dist" not in why:
      etf_w = geometry.nearest_etf_closed_form(w.T)
      e_w, w_dist = np.asarray(etf_w.etf, dtype=np.float64), float(etf_w.distance)
    if "h_etf_dist" not in why:
      etf_h = geometry.nearest_etf_closed_form(h_mat)
      e_h, h_dist = np.asarray(etf_h.etf, dtype=np.float64), float(etf_h.distance)
    if e_w is not None and e_h is not None:
      wh_dist = float(np.sum((e_w - e_h) ** 2))

  out: dict[str, Any] = {
      "top1": 100.0 * int(stats.top1) / n,
      "top5": 100.0 * int(stats.top5) / n,
      "nc1": nc1,
      "vci": float(vci),
      "nc2_etf": _gap_to_unit_etf(w @ w.T),
      "nc2_equinorm_w": eq_w,
      "nc2_equinorm_h": eq_h,
      "wh_equinorm": abs(eq_h - eq_w),
      "nc3": _gap_to_unit_etf(w @ h_mat),
      "ncc_mismatch": 100.0 - 100.0 * int(stats.ncc_agree) / n,
      "bias_collapse": float(np.linalg.norm(w @ mu_g + bias)),
      "avg_cosine_margin": margin_sum / n,
      "w_etf_dist": w_dist,
      "h_etf_dist": h_dist,
      "wh_etf_dist": wh_dist,
      # The nearest ETFs themselves ((d, K), None where undefined): distances between epochs
      # (nc_jax.class_metrics.etf_reference_distances).
      "w_etf_frame": e_w,
      "h_etf_frame": e_h,
  }
  if "nc3" not in why and math.isnan(out["nc3"]):
    why["nc3"] = "W H = 0 (the classifier rows are orthogonal to the centred class means)"
  if margins is not None:
    if isinstance(margins, (np.ndarray, jax.Array)):
      out["cosine_margins"] = np.asarray(margins, dtype=np.float64).reshape(-1)
    else:
      parts = [np.asarray(m, dtype=np.float64).reshape(-1) for m in margins]
      out["cosine_margins"] = np.concatenate(parts) if parts else np.zeros((0,))
  _warn_nan(out, why, stacklevel)
  return out


def sorted_cosine_margins(margins: Any) -> np.ndarray:
  """Per-sample cosine margins sorted ascending (the paper's "PCM at EoT" curve).

  Args:
    margins: ``(N,)`` margins, e.g. ``nc_metrics(...)["cosine_margins"]``.

  Returns:
    ``(N,)`` float64 numpy array, ascending; plot it against ``arange(N)``.
  """
  _require_concrete("sorted_cosine_margins", "margins", margins)
  arr = np.asarray(margins)
  if arr.ndim != 1:
    raise ValueError(f"margins: expected a rank-1 array of per-sample margins, got shape {arr.shape}")
  return np.sort(arr.astype(np.float64))


# ---------------------------------------------------------------------------
# Drivers.
# ---------------------------------------------------------------------------

def _require_concrete(fn: str, name: str, value: Any) -> None:
  """Refuses a tracer in ``value`` (any pytree) for the host function ``fn``.

  Why: the finalisation reads concrete values into float64 numpy, which a tracer
  under ``jit``/``vmap``/``grad`` cannot give; JAX's own error would be an
  obscure ``TracerArrayConversionError`` deep inside.
  """
  # Containers are searched; anything else (arrays, iterators) is a leaf.
  leaves = jax.tree_util.tree_leaves(
      value, is_leaf=lambda x: not isinstance(x, (list, tuple, dict)))
  if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    raise ValueError(
        f"{name}: expected a concrete array, got a tracer: {fn} is a host function (its final "
        "linear algebra runs in float64 numpy) and cannot run under jax.jit, vmap or grad; call "
        "it outside the transformation on the returned features, or accumulate with "
        "update_class_stats/update_second_pass inside jit and finalise on the host")


def _check_magnitude(name_max: dict[str, float], n: int, d: int, dtype: Any) -> None:
  r"""Refuses finite inputs whose sums of squares would overflow ``dtype``.

  Why: the device accumulations (``(d, d)`` scatter over ``N`` samples, sample
  and mean norms over ``d`` entries, logits) stay below
  :math:`4 N d \max|x|^2`; beyond the dtype's maximum they turn into ``inf``
  and then into silent zeros or ``nan`` (e.g. cosines ``x/inf = 0``).

  Args:
    name_max: argument name → its largest absolute value.
    n, d: samples and feature dimension. dtype: the accumulation dtype.
  """
  big = float(np.finfo(np.dtype(dtype)).max)
  limit = math.sqrt(big / (4.0 * max(n, 1) * d))
  name, amax = max(name_max.items(), key=lambda item: item[1])
  if amax > limit:
    raise ValueError(
        f"{name}: expected |values| <= {limit:.3g} so that {np.dtype(dtype).name} sums of "
        f"squares over N={n} samples and d={d} dimensions do not overflow, got max |{name}| = "
        f"{amax:.3g}; rescale (e.g. normalise the features) or compute in float64 "
        "(jax_enable_x64 and float64 inputs)")


def _check_batch(fname: str, lname: str, features: Any, labels: Any, k: int, d: int):
  f = v.as_float_array(fname, features)
  v.check_ndim(fname, f, 2, "(N, d) of features")
  v.check_nonempty(fname, f)
  if f.shape[1] != d:
    raise ValueError(f"{fname}: expected feature dimension d={d} (from W), got shape {tuple(f.shape)}")
  v.check_finite(fname, f)
  lab = v.check_labels(lname, labels, k, n=f.shape[0])
  return f, lab.astype(jnp.int32)


def _check_classifier(W: Any, b: Any, k: int, d: int | None = None):
  w = v.as_float_array("W", W)
  v.check_ndim("W", w, 2, "(K, d) of classifier weights")
  if w.shape[0] != k or (d is not None and w.shape[1] != d):
    want = f"({k}, {d})" if d is not None else f"({k}, d)"
    raise ValueError(f"W: expected shape (K, d) = {want}, got {tuple(w.shape)}")
  v.check_nonempty("W", w)
  v.check_finite("W", w)
  if b is None:
    bias = jnp.zeros((k,), w.dtype)
  else:
    bias = v.as_float_array("b", b)
    if bias.shape != (k,):
      raise ValueError(f"b: expected shape (K,) = ({k},), got {tuple(bias.shape)}")
    v.check_finite("b", bias)
  return w, bias


def _two_passes(batches: Callable[[], Iterable[Any]], w: jax.Array, bias: jax.Array, k: int,
                validate: bool) -> dict[str, Any]:
  """Shared driver of :func:`nc_metrics` and :func:`nc_metrics_streaming`."""
  d = w.shape[1]

  def iterate(which: str):
    it = batches()
    try:
      it = iter(it)
    except TypeError as err:
      raise ValueError(
          f"batches: expected a callable returning an iterable of (features, labels), "
          f"got {type(it).__name__} on the {which} pass") from err
    for i, item in enumerate(it):
      try:
        feats, labs = item
      except (TypeError, ValueError) as err:
        raise ValueError(
            f"batches: expected each batch to be a (features, labels) pair, "
            f"got {type(item).__name__} (batch {i}, {which} pass)") from err
      _require_concrete("nc_metrics_streaming", f"features (batch {i})", feats)
      _require_concrete("nc_metrics_streaming", f"labels (batch {i})", labs)
      if validate:
        yield _check_batch(f"features (batch {i})", f"labels (batch {i})", feats, labs, k, d)
      else:
        yield jnp.asarray(feats), jnp.asarray(labs).astype(jnp.int32)

  stats1 = None
  dtype = None
  feats_max = jnp.zeros(())  # max |features| over the first pass, read once at its end
  for feats, labs in iterate("first"):
    if stats1 is None:
      dtype = jnp.result_type(feats.dtype, w.dtype)
      stats1 = _init_class_stats(k, d, dtype)
    stats1 = _update_class_stats(stats1, feats, labs)
    feats_max = jnp.maximum(feats_max, jnp.max(jnp.abs(feats)).astype(feats_max.dtype))
  if stats1 is None:
    raise ValueError("batches: expected at least one (features, labels) batch, got none")
  _check_magnitude({"features": float(feats_max), "W": float(jnp.max(jnp.abs(w))),
                    "b": float(jnp.max(jnp.abs(bias)))},
                   int(jnp.sum(stats1.counts)), d, dtype)
  class_means = finalise_class_stats(stats1)

  ctx = make_second_pass_context(class_means, w, bias, dtype)
  stats2 = _init_second_pass(d, dtype)
  margins = []
  for feats, labs in iterate("second"):
    stats2, m = _update_second_pass(stats2, ctx, feats, labs)
    margins.append(m)
  if int(stats2.count) != class_means.num_samples:
    raise ValueError(
        f"batches: expected the second pass to yield the same number of samples as the "
        f"first ({class_means.num_samples}), got {int(stats2.count)}")
  return _finalise(class_means, stats2, w, bias, margins, stacklevel=4)


def nc_metrics(features: Any, labels: Any, W: Any, b: Any, num_classes: int) -> dict[str, Any]:
  """All neural-collapse metrics of docs/method.md §9 for in-memory features.

  Runs the same code as :func:`nc_metrics_streaming` with one batch, so it holds
  ``(N, K)`` logits, centre distances and cosines at once; for large ``N`` (e.g.
  ImageNet) stream the data instead.

  Args:
    features: ``(N, d)`` features (float; the device accumulations run in the
      promoted dtype of ``features`` and ``W``, the final algebra in float64).
    labels: ``(N,)`` integer labels in ``[0, K)``; every class must occur.
    W: ``(K, d)`` classifier weights (rows :math:`w_k`).
    b: ``(K,)`` bias, or ``None`` for zero bias.
    num_classes: ``K >= 2``.

  Returns:
    Dict with python floats ``top1, top5, nc1, vci, nc2_etf, nc2_equinorm_w,
    nc2_equinorm_h, wh_equinorm, nc3, ncc_mismatch, bias_collapse,
    avg_cosine_margin, w_etf_dist, h_etf_dist, wh_etf_dist`` (definitions in the
    module docstring; the ETF distances are ``nan`` if ``d < K``) and
    ``cosine_margins``, an ``(N,)`` float64 numpy array in sample order.
    Metrics undefined for the data (e.g. identical features for every sample,
    ``W = 0``, ``d < K``) are ``nan`` and a :class:`DegenerateMetricsWarning`
    names them and says why.

  Raises:
    ValueError: naming the argument, for a bad rank, shape or dtype, empty or
      non-finite input, values so large that float sums of squares overflow,
      labels out of range or of the wrong length, a class with no samples,
      ``num_classes < 2``, or a tracer (called under ``jit``/``vmap``/``grad``:
      this is a host function).
  """
  for name, value in (("features", features), ("labels", labels), ("W", W), ("b", b)):
    _require_concrete("nc_metrics", name, value)
  v.check_num_classes("num_classes", num_classes)
  k = int(num_classes)
  f = v.as_float_array("features", features)
  v.check_ndim("features", f, 2, "(N, d) of features")
  v.check_nonempty("features", f)
  w, bias = _check_classifier(W, b, k, f.shape[1])
  f, lab = _check_batch("features", "labels", f, labels, k, f.shape[1])
  return _two_passes(lambda: ((f, lab),), w, bias, k, validate=False)


def nc_metrics_streaming(batches: Callable[[], Iterable[tuple[Any, Any]]], W: Any, b: Any,
                         num_classes: int) -> dict[str, Any]:
  """:func:`nc_metrics` over a dataset streamed in batches (two passes).

  Pass 1 accumulates class sums and counts; pass 2 the within-class scatter,
  accuracy and NCC counts and the cosine margins w.r.t. the pass-1 means. The
  result equals :func:`nc_metrics` on the concatenated data (up to rounding).
  Each update is jit-compiled once per batch shape (a smaller last batch costs
  one extra compilation per pass).

  Args:
    batches: zero-argument callable returning a *fresh* iterable of
      ``(features (B, d), labels (B,))`` pairs; it is called twice, and both
      passes must see the same samples (in the official code the train split is
      re-augmented between the passes; that is allowed, but the sample count
      must match). Batches may lack classes; the whole data set may not.
    W: ``(K, d)`` classifier weights. b: ``(K,)`` bias or ``None``.
    num_classes: ``K >= 2``.

  Returns:
    As :func:`nc_metrics`.

  Raises:
    ValueError: as :func:`nc_metrics` (batch arguments are named with their
      index, e.g. ``"features (batch 3)"``), if ``batches`` is not callable or
      yields nothing, or if the two passes see different sample counts.
  """
  _require_concrete("nc_metrics_streaming", "W", W)
  _require_concrete("nc_metrics_streaming", "b", b)
  v.check_num_classes("num_classes", num_classes)
  k = int(num_classes)
  if not callable(batches):
    raise ValueError(
        "batches: expected a zero-argument callable returning an iterable of "
        f"(features, labels) pairs, got {type(batches).__name__}")
  w, bias = _check_classifier(W, b, k)
  return _two_passes(batches, w, bias, k, validate=True)


def ce_lower_bound(num_classes: int, tau: float = 5.0) -> float:
  r"""Minimum mean cross-entropy with features of norm ``tau`` and unit classifier rows.

  .. math:: L_{\min} = \log\bigl(1 + (K-1)\,e^{-\tau K/(K-1)}\bigr),

  attained at a simplex ETF with vanishing bias in the balanced case (Yaras et
  al., arXiv 2209.09211). E.g. 0.0342 (K=10), 0.4912 (K=100), 2.0409 (K=1000) at
  ``tau = 5``.
  """
  v.check_num_classes("num_classes", num_classes)
  try:
    t = float(tau)
  except (TypeError, ValueError) as err:
    raise ValueError(f"tau: expected a positive finite number, got {tau!r}") from err
  if not (math.isfinite(t) and t > 0):
    raise ValueError(f"tau: expected a positive finite number, got {tau!r}")
  k = int(num_classes)
  return math.log1p((k - 1) * math.exp(-t * k / (k - 1)))

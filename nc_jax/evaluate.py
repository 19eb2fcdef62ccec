r"""Neural-collapse evaluation during training: features in, named metrics out.

Two pieces, used by the image runner (:mod:`experiments.image`) and the UFM runner
(:mod:`experiments.ufm`) alike:

* :func:`collect_features` turns an iterable of per-batch ``(features, labels)`` — device
  arrays from a jitted feature function, dispatched without waiting — into host arrays with
  one transfer at the end (a synchronisation per batch cost seconds per pass on a GPU), and
  drops padded slots (label −1, as :func:`nc_jax.data.batching.eval_indices` pads).
* :func:`nc_evaluate` computes every metric of :func:`nc_jax.metrics.nc_metrics` for a head:
  its classifier comes from :func:`nc_jax.heads.classifier` with the features' global mean
  (the fixed head's bias depends on it), the two passes stream in chunks so the ``(N, K)``
  logits are never held at once, and a split in which a class has no example — where class
  means, and so every metric, are undefined (tiny subsets, mock data) — gives NaN metrics
  with a warning instead of failing the run.

The result is a dict: each key of :data:`SCALAR_KEYS` as a float (the metrics of
:data:`nc_jax.metrics.METRIC_KEYS`, the numerical rank unless
``numerical_rank=False``, and the distances of the nearest ETFs
to those of a ``reference`` evaluation, the official ``--ref_ETF``), ``"cosine_margins"`` (the
``(N,)`` per-sample margins, ``None`` when undefined), the nearest-ETF frames
``"w_etf_frame"``/``"h_etf_frame"`` (to pass as a later ``reference``) and, with
``per_class=True``, per-class NC1 and top-1 (``(K,)`` arrays) and with ``minority`` classes
their majority/minority averages and the minority-collapse measure (:data:`IMBALANCE_KEYS`;
definitions in :mod:`nc_jax.class_metrics`).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import class_metrics, heads, metrics

#: Scalars every :func:`nc_evaluate` result holds.
SCALAR_KEYS = metrics.METRIC_KEYS + ("numerical_rank", "w_etf_ref_dist", "h_etf_ref_dist")
#: Scalars of a result with ``minority`` classes (class-imbalanced training sets).
IMBALANCE_KEYS = ("nc1_majority", "nc1_minority", "top1_majority", "top1_minority",
                  "minority_cosine", "minority_collapse")

CHUNK = 8192
"""Rows per chunk of the streamed metric passes."""


def collect_features(batches: Iterable[tuple[jax.Array, jax.Array]]) -> tuple[np.ndarray,
                                                                             np.ndarray]:
  """Host ``(features (N, d), labels (N,))`` of the batches, padding (label < 0) dropped.

  Args:
    batches: ``(features (n, d), labels (n,))`` per batch, device or host arrays; every
      batch is dispatched before the first transfer.
  """
  feats, labs = [], []
  for h, y in batches:
    feats.append(h)
    labs.append(y)
  if not feats:
    raise ValueError("batches: expected at least one batch of features, got none")
  h = np.asarray(jnp.concatenate([jnp.asarray(x) for x in feats]))
  y = np.asarray(jnp.concatenate([jnp.asarray(x) for x in labs]))
  keep = y >= 0
  return h[keep], y[keep]


def nc_evaluate(features: np.ndarray, labels: np.ndarray, head_config: heads.HeadConfig,
                head_params: Any, head_state: heads.HeadState, *, chunk: int = CHUNK,
                reference: dict[str, Any] | None = None, per_class: bool = False,
                minority: Any = None, numerical_rank: bool = True) -> dict[str, Any]:
  """The neural-collapse metrics of ``features`` under the head's evaluation classifier.

  Args:
    features: ``(N, d)`` τ-normalised evaluation-mode features (host).
    labels: ``(N,)`` int labels in ``[0, K)``.
    head_config, head_params, head_state: the head (:mod:`nc_jax.heads`).
    chunk: rows per chunk of the streamed passes.
    reference: an earlier result of this function (its ``*_etf_frame`` entries) for
      ``w_etf_ref_dist`` / ``h_etf_ref_dist``; ``None``: those are NaN.
    per_class: also ``nc1_per_class`` and ``top1_per_class``, ``(K,)`` float64 arrays.
    minority: class ids of the minority classes (implies ``per_class``): also
      :data:`IMBALANCE_KEYS` (means over the majority and minority classes, the minority
      rows' mean cosine and its distance from −1/(K−1)).
    numerical_rank: compute ``"numerical_rank"`` (``False``: the key is absent). It takes K
      SVDs of the ``(n_c, d)`` class features in float64, which made the call 1.45–1.76
      times as long at K = 200 and 1000 (``benchmarks/nc_pass.py``), so a caller that does
      not record it (the UFM runner) skips it.

  Returns:
    ``{key: float for key in SCALAR_KEYS}`` plus ``"cosine_margins"`` (``(N,)`` or ``None``),
    ``"w_etf_frame"``, ``"h_etf_frame"`` (``(d, K)`` or ``None``) and the per-class and
    imbalance entries asked for (without ``"numerical_rank"`` if not asked for); NaN (and
    ``None``) throughout, with a warning naming the missing count, when a class has no
    example.
  """
  features, labels = np.asarray(features), np.asarray(labels)
  k = head_config.num_classes
  per_class = per_class or minority is not None
  missing = k - np.unique(labels).size
  if missing:
    warnings.warn(f"NC metrics undefined: {missing} of {k} classes have no example among the "
                  f"{labels.size} evaluated (a larger evaluation subset fixes it); NaN recorded",
                  stacklevel=2)
    out: dict[str, Any] = {key: float("nan") for key in SCALAR_KEYS
                           if numerical_rank or key != "numerical_rank"}
    out |= {"cosine_margins": None, "w_etf_frame": None, "h_etf_frame": None}
    if per_class:
      out |= {"nc1_per_class": np.full(k, np.nan), "top1_per_class": np.full(k, np.nan)}
    if minority is not None:
      out |= {key: float("nan") for key in IMBALANCE_KEYS}
    return out
  mean = features.mean(axis=0, dtype=np.float64).astype(features.dtype)
  w, b = heads.classifier(head_config, head_params, head_state, mean)
  w, b = np.asarray(w), np.asarray(b)
  result = metrics.nc_metrics_streaming(
      lambda: ((features[i:i + chunk], labels[i:i + chunk])
               for i in range(0, features.shape[0], chunk)),
      w, b, k)
  out = {key: float(result[key]) for key in metrics.METRIC_KEYS}
  if numerical_rank:
    out["numerical_rank"] = class_metrics.numerical_rank(features, labels, k)
  out |= class_metrics.etf_reference_distances(result, reference)
  out |= {key: result[key] for key in ("cosine_margins", "w_etf_frame", "h_etf_frame")}
  if per_class:
    out["nc1_per_class"] = class_metrics.nc1_per_class(features, labels, k)
    out["top1_per_class"] = class_metrics.top1_per_class(features, labels, w, b)
  if minority is not None:
    minor = np.zeros(k, bool)
    minor[np.asarray(list(minority), dtype=np.int64)] = True
    for name in ("nc1", "top1"):
      values = out[f"{name}_per_class"]
      out[f"{name}_majority"] = float(np.mean(values[~minor])) if (~minor).any() else np.nan
      out[f"{name}_minority"] = float(np.mean(values[minor])) if minor.any() else np.nan
    out |= class_metrics.minority_collapse(w, np.flatnonzero(minor))
  return out

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

The result is a dict: each key of :data:`nc_jax.metrics.METRIC_KEYS` as a float, and
``"cosine_margins"``, the ``(N,)`` per-sample margins (``None`` when undefined).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import heads, metrics

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
                head_params: Any, head_state: heads.HeadState, *,
                chunk: int = CHUNK) -> dict[str, Any]:
  """The neural-collapse metrics of ``features`` under the head's evaluation classifier.

  Args:
    features: ``(N, d)`` τ-normalised evaluation-mode features (host).
    labels: ``(N,)`` int labels in ``[0, K)``.
    head_config, head_params, head_state: the head (:mod:`nc_jax.heads`).
    chunk: rows per chunk of the streamed passes.

  Returns:
    ``{key: float for key in METRIC_KEYS} | {"cosine_margins": (N,) or None}``; all NaN (with
    a warning naming the missing count) when a class has no example.
  """
  features, labels = np.asarray(features), np.asarray(labels)
  k = head_config.num_classes
  missing = k - np.unique(labels).size
  if missing:
    warnings.warn(f"NC metrics undefined: {missing} of {k} classes have no example among the "
                  f"{labels.size} evaluated (a larger evaluation subset fixes it); NaN recorded",
                  stacklevel=2)
    return {key: float("nan") for key in metrics.METRIC_KEYS} | {"cosine_margins": None}
  mean = features.mean(axis=0, dtype=np.float64).astype(features.dtype)
  w, b = heads.classifier(head_config, head_params, head_state, mean)
  result = metrics.nc_metrics_streaming(
      lambda: ((features[i:i + chunk], labels[i:i + chunk])
               for i in range(0, features.shape[0], chunk)),
      np.asarray(w), np.asarray(b), k)
  return {key: float(result[key]) for key in metrics.METRIC_KEYS} | {
      "cosine_margins": result["cosine_margins"]}

r"""Metrics resolved by class, and against a reference epoch (docs/method.md §9).

Host functions (float64 numpy) on the features a model produced in evaluation mode; they
complement :func:`nc_jax.nc_metrics` for the settings the official code also covers: the
numerical rank of the class features, and for class-imbalanced training sets the per-class
collapse and accuracy and "minority collapse" (Fang et al., PNAS 2021: the classifier rows of
the minority classes merge as imbalance grows).

Notation as in :mod:`nc_jax.metrics`: features :math:`h_i \in \mathbb R^d`, labels
:math:`y_i \in [0, K)`, class means :math:`\mu_c`, :math:`\mu_G` the mean over all samples,
:math:`H = [\mu_c - \mu_G]_c` (``(d, K)``) with thin SVD :math:`H = U S V^T`.

* ``numerical_rank`` :math:`= \frac1K\sum_c (\|H_c\|_* / \|H_c\|_F)^2` with :math:`H_c` the
  *uncentred* ``(n_c, d)`` features of class ``c`` (as the official ``validate_NC.py``); it
  lies in :math:`[1, \min(n_c, d)]` and falls to 1 as each class collapses onto one direction.
* ``nc1_per_class[c]`` :math:`= \operatorname{tr}(\Sigma_{W,c}\Sigma_B^+)/K` with
  :math:`\Sigma_{W,c} = \frac1{n_c}\sum_{y_i=c}(h_i-\mu_c)(h_i-\mu_c)^T`, so that
  :math:`\mathrm{NC1} = \sum_c \frac{n_c}{N}\,\mathrm{nc1}_c` (the mean over classes when they
  are balanced); computed as :math:`\frac1{n_c}\sum_{y_i=c}\sum_{j\le r}
  ((h_i-\mu_c)^T u_j)^2 / s_j^2`, the kept singular values as :func:`nc_jax.nc_metrics`.
* ``top1_per_class[c]``: % of class ``c``'s samples whose logits' argmax is ``c``.
* ``minority_cosine``: the mean pairwise cosine between the classifier rows :math:`w_k` of the
  minority classes, and ``minority_collapse`` :math:`=` its distance from the simplex value
  :math:`-1/(K-1)` (0 for an ETF; :math:`K/(K-1)` when the rows coincide).
* ``w_etf_ref_dist``, ``h_etf_ref_dist``: :math:`\|E_W - E_W^{ref}\|_F^2`,
  :math:`\|E_H - E_H^{ref}\|_F^2`: how far the nearest ETFs of :math:`W^T/\|W\|_F` and
  :math:`H/\|H\|_F` moved since a reference epoch (the official ``--ref_ETF``, epoch 1). The
  frames are the ``w_etf_frame`` / ``h_etf_frame`` outputs of :func:`nc_jax.nc_metrics`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

_EPS64 = float(np.finfo(np.float64).eps)


def _check(features, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  h = np.asarray(features, dtype=np.float64)
  y = np.asarray(labels)
  if h.ndim != 2:
    raise ValueError(f"features: expected (N, d), got shape {h.shape}")
  if y.shape != (h.shape[0],):
    raise ValueError(f"labels: expected shape ({h.shape[0]},), got {y.shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels: expected values in [0, {num_classes}), got [{y.min()}, "
                     f"{y.max()}]")
  return h, y.astype(np.int64)


def numerical_rank(features, labels, num_classes: int) -> float:
  """Mean over classes of :math:`(\\|H_c\\|_*/\\|H_c\\|_F)^2`, :math:`H_c` the uncentred
  ``(n_c, d)`` features of class ``c`` (classes without samples are skipped; ``nan`` if no
  class has a non-zero feature).

  Example:
    >>> import numpy as np
    >>> h = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    >>> float(numerical_rank(h, np.array([0, 0, 1, 1]), 2))   # each class on one line
    1.0
  """
  h, y = _check(features, labels, num_classes)
  ranks = []
  for c in range(num_classes):
    hc = h[y == c]
    if hc.size == 0:
      continue
    s = np.linalg.svd(hc, compute_uv=False)
    fro2 = float(np.sum(s**2))
    if fro2 > 0:
      ranks.append(float(np.sum(s)) ** 2 / fro2)
  return float(np.mean(ranks)) if ranks else float("nan")


def nc1_per_class(features, labels, num_classes: int) -> np.ndarray:
  """``(K,)``: :math:`\\operatorname{tr}(\\Sigma_{W,c}\\Sigma_B^+)/K` per class (``nan`` for a
  class without samples, or all ``nan`` when the class means coincide)."""
  h, y = _check(features, labels, num_classes)
  k, d = num_classes, h.shape[1]
  counts = np.bincount(y, minlength=k)
  present = counts > 0
  sums = np.zeros((k, d))
  np.add.at(sums, y, h)
  means = np.where(present[:, None], sums / np.maximum(counts, 1)[:, None], 0.0)
  mu_g = h.mean(axis=0)
  h_mat = (means - mu_g).T                      # (d, K); absent classes give −μ_G, dropped
  u, s, _ = np.linalg.svd(h_mat[:, present], full_matrices=False)
  keep = s**2 > d * _EPS64 * (s[0] ** 2 if s.size else 0.0)
  out = np.full(k, np.nan)
  if not keep.any():
    return out
  proj = (h - means[y]) @ (u[:, keep] / s[keep])  # (N, r): whitened within-class residuals
  per_sample = np.sum(proj**2, axis=1)
  per_class = np.bincount(y, weights=per_sample, minlength=k)
  out[present] = per_class[present] / counts[present]  # Σ_B^+ = K·U S⁻² Uᵀ: the K cancels
  return out


def top1_per_class(features, labels, W, b=None) -> np.ndarray:
  """``(K,)``: top-1 accuracy in % of each class under the logits :math:`hW^T + b`
  (``nan`` for a class without samples)."""
  w = np.asarray(W, dtype=np.float64)
  k = w.shape[0]
  h, y = _check(features, labels, k)
  logits = h @ w.T + (0.0 if b is None else np.asarray(b, dtype=np.float64))
  hit = np.argmax(logits, axis=1) == y
  counts = np.bincount(y, minlength=k)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, 100.0 * np.bincount(y, weights=hit, minlength=k) / counts,
                    np.nan)


def minority_collapse(W, minority: Sequence[int]) -> dict[str, float]:
  """Mean pairwise cosine of the minority classes' classifier rows and its distance from the
  simplex value :math:`-1/(K-1)`: ``{"minority_cosine", "minority_collapse"}`` (``nan`` with
  fewer than two minority classes or a zero row)."""
  w = np.asarray(W, dtype=np.float64)
  k = w.shape[0]
  idx = np.asarray(sorted(set(int(i) for i in minority)), dtype=np.int64)
  if idx.size and (idx.min() < 0 or idx.max() >= k):
    raise ValueError(f"minority: expected class ids in [0, {k}), got {idx.tolist()}")
  rows = w[idx]
  norms = np.linalg.norm(rows, axis=1)
  if idx.size < 2 or not np.all(norms > 0):
    return {"minority_cosine": float("nan"), "minority_collapse": float("nan")}
  unit = rows / norms[:, None]
  cos = unit @ unit.T
  m = idx.size
  mean = float((cos.sum() - np.trace(cos)) / (m * (m - 1)))
  return {"minority_cosine": mean, "minority_collapse": abs(mean + 1.0 / (k - 1))}


def etf_reference_distances(result: dict[str, Any], reference: dict[str, Any] | None
                            ) -> dict[str, float]:
  """``{"w_etf_ref_dist", "h_etf_ref_dist"}``: squared Frobenius distances between the nearest
  ETF frames of ``result`` and of ``reference`` (both outputs of :func:`nc_jax.nc_metrics`
  with ``w_etf_frame`` / ``h_etf_frame``); ``nan`` where either frame is missing."""
  out = {}
  for name in ("w", "h"):
    now = result.get(f"{name}_etf_frame")
    ref = None if reference is None else reference.get(f"{name}_etf_frame")
    if now is None or ref is None:
      out[f"{name}_etf_ref_dist"] = float("nan")
      continue
    now, ref = np.asarray(now, np.float64), np.asarray(ref, np.float64)
    if now.shape != ref.shape:
      raise ValueError(f"reference: expected {name}_etf_frame of shape {now.shape}, got "
                       f"{ref.shape}")
    out[f"{name}_etf_ref_dist"] = float(np.sum((now - ref) ** 2))
  return out

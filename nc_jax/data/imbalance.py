r"""Class-imbalanced training sets and symmetric label noise, chosen once from a seed.

The settings the official code offers besides the paper's balanced ones (its
``--imb_factor``; label noise), for studying neural collapse and the implicit ETF under
imbalance (Fang et al., PNAS 2021: "minority collapse" of learned classifiers; Yang et al.,
NeurIPS 2022: a fixed ETF classifier under imbalance).

From a (balanced) training split with :math:`n_{\max}` examples in its smallest class, class
``k`` (``k = 0 … K−1``) keeps :math:`n_k` examples:

* ``"longtail"``: :math:`n_k = \lfloor n_{\max}\,\rho^{-k/(K-1)}\rfloor` — an exponential
  profile from :math:`n_{\max}` down to :math:`n_{\max}/\rho` (the official
  ``--imb_factor`` is :math:`1/\rho`);
* ``"step"``: the last :math:`\operatorname{round}(\mu K)` classes keep
  :math:`\lfloor n_{\max}/\rho\rfloor`, the others :math:`n_{\max}`;

with :math:`\rho \ge 1` the imbalance ratio and :math:`\mu` the minority fraction (every class
keeps at least one example). The **minority classes** are the last
:math:`\operatorname{round}(\mu K)` classes for both profiles (for ``longtail`` the tail).
Which examples a class keeps is a seeded random choice, fixed for a sweep (like the subsets of
:mod:`nc_jax.data.subsets`), so the runs of a sweep see the same data.

**Symmetric label noise**: exactly :math:`\operatorname{round}(\eta N)` training examples,
chosen at random, get a label drawn uniformly from the *other* :math:`K-1` classes (so
:math:`\eta` is the fraction of wrong labels); also seeded and fixed for a sweep. Evaluation
splits are never changed.
"""

from __future__ import annotations

import numpy as np

PROFILES = ("none", "longtail", "step")


def num_minority(num_classes: int, minority_fraction: float) -> int:
  """:math:`\\operatorname{round}(\\mu K)`, at least 1 and at most K − 1."""
  return int(min(max(round(minority_fraction * num_classes), 1), num_classes - 1))


def minority_classes(num_classes: int, minority_fraction: float = 0.5) -> tuple[int, ...]:
  """The minority class ids: the last :func:`num_minority` classes."""
  m = num_minority(num_classes, minority_fraction)
  return tuple(range(num_classes - m, num_classes))


def check(profile: str, ratio: float, minority_fraction: float, label_noise: float) -> None:
  """Raises ``ValueError`` naming the argument for an invalid combination."""
  if profile not in PROFILES:
    raise ValueError(f"imbalance: expected one of {', '.join(PROFILES)}, got {profile!r}")
  if profile == "none" and ratio != 1.0:
    raise ValueError(f"imbalance_ratio: {ratio!r} needs an imbalance profile (longtail or "
                     f"step); with imbalance 'none' it must be 1")
  if profile != "none" and not ratio > 1.0:
    raise ValueError(f"imbalance_ratio: expected a ratio > 1 (largest / smallest class) for "
                     f"imbalance {profile!r}, got {ratio!r}")
  if not 0.0 < minority_fraction < 1.0:
    raise ValueError(f"minority_fraction: expected a fraction in (0, 1), got "
                     f"{minority_fraction!r}")
  if not 0.0 <= label_noise < 1.0:
    raise ValueError(f"label_noise: expected a fraction in [0, 1), got {label_noise!r}")


def class_counts(n_max: int, num_classes: int, profile: str, ratio: float,
                 minority_fraction: float = 0.5) -> np.ndarray:
  """``(K,)`` int64: examples kept per class (see the module docstring).

  Example:
    >>> class_counts(100, 5, "longtail", 100.0).tolist()
    [100, 31, 10, 3, 1]
    >>> class_counts(100, 4, "step", 10.0).tolist()
    [100, 100, 10, 10]
  """
  check(profile, ratio, minority_fraction, 0.0)
  k = int(num_classes)
  if profile == "none":
    return np.full(k, int(n_max), np.int64)
  if profile == "longtail":
    # Rounded a hair up so that exact powers (100 · 100^(-1/2) = 10) are not floored to 9.
    counts = np.floor(n_max * ratio ** (-np.arange(k) / (k - 1)) + 1e-9)
  else:
    counts = np.full(k, float(n_max))
    counts[k - num_minority(k, minority_fraction):] = np.floor(n_max / ratio + 1e-9)
  return np.maximum(counts, 1).astype(np.int64)


def imbalanced_ids(labels, num_classes: int, profile: str, ratio: float,
                   minority_fraction: float = 0.5, seed: int = 0) -> np.ndarray | None:
  """Sorted indices of the examples an imbalanced training set keeps (``None``: all, for
  profile ``"none"``). :math:`n_{\\max}` is the smallest class's size in ``labels``.

  Raises:
    ValueError: a class without examples, or an invalid profile/ratio.
  """
  check(profile, ratio, minority_fraction, 0.0)
  if profile == "none":
    return None
  labels = np.asarray(labels)
  present = np.bincount(labels, minlength=num_classes)
  if present.min() == 0:
    raise ValueError(f"labels: class(es) {np.flatnonzero(present == 0).tolist()} have no "
                     f"example; an imbalanced subset needs every class")
  counts = class_counts(int(present.min()), num_classes, profile, ratio, minority_fraction)
  rng = np.random.default_rng(seed)
  kept = [rng.choice(np.flatnonzero(labels == c), counts[c], replace=False)
          for c in range(num_classes)]
  return np.sort(np.concatenate(kept))


def symmetric_label_noise(labels, num_classes: int, fraction: float, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
  """``(noisy labels (N,) int32, flipped mask (N,) bool)``: exactly
  ``round(fraction · N)`` labels replaced by a uniformly drawn other class.

  Example:
    >>> y, flipped = symmetric_label_noise(np.arange(10) % 5, 5, 0.3)
    >>> int(flipped.sum()), bool(np.all((y != np.arange(10) % 5) == flipped))
    (3, True)
  """
  check("none", 1.0, 0.5, fraction)
  labels = np.asarray(labels).astype(np.int32)
  n = labels.shape[0]
  flipped = np.zeros(n, bool)
  if fraction == 0.0 or n == 0:
    return labels, flipped
  rng = np.random.default_rng(seed)
  which = rng.choice(n, int(round(fraction * n)), replace=False)
  flipped[which] = True
  # An offset in [1, K) added modulo K: uniform over the other classes.
  offset = rng.integers(1, num_classes, size=which.size)
  noisy = labels.copy()
  noisy[which] = (labels[which] + offset) % num_classes
  return noisy, flipped

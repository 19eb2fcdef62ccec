"""Fixed subsets of a split (reduced runs, the NC evaluation subset, imbalanced training
sets) and relabelled sources (label noise).

A subset is chosen once, from a seed, independently of the run's seed, so the runs of a
sweep differ only in what their seeds should change.
"""

from __future__ import annotations

import numpy as np

from nc_jax.data.sources import fetch


def balanced_subset(labels, size: int | None, num_classes: int, seed: int = 0):
  """Indices (sorted) of a class-balanced random subset of ``size`` examples, or ``None``
  for all. Classes get ``size // K`` each (the remainder goes to the first classes), at most
  what a class has."""
  labels = np.asarray(labels)
  if size is None or size >= labels.shape[0]:
    return None
  rng = np.random.default_rng(seed)
  per, extra = divmod(size, num_classes)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    take = min(members.size, per + (c < extra))
    chosen.append(rng.choice(members, take, replace=False))
  return np.sort(np.concatenate(chosen))


class Subset:
  """A random-access source restricted to ``ids``."""

  def __init__(self, source, ids):
    self.source, self.ids = source, [int(i) for i in ids]

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, i):
    return self.source[self.ids[int(i)]]

  def __getitems__(self, ids):
    return fetch(self.source, [self.ids[int(i)] for i in ids])


class Relabelled:
  """A random-access source whose records carry ``labels[i]`` instead of their own label
  (label noise on a streamed training split)."""

  def __init__(self, source, labels):
    self.source, self.labels = source, np.asarray(labels).astype(np.int32)
    if self.labels.shape != (len(source),):
      raise ValueError(f"labels: expected shape ({len(source)},), got {self.labels.shape}")

  def __len__(self):
    return len(self.source)

  def _relabel(self, i, record):
    return {**record, "label": int(self.labels[int(i)])}

  def __getitem__(self, i):
    return self._relabel(i, self.source[int(i)])

  def __getitems__(self, ids):
    ids = [int(i) for i in ids]
    return [self._relabel(i, r) for i, r in zip(ids, fetch(self.source, ids))]


def source_labels(source) -> np.ndarray:
  """The ``(N,)`` int32 labels of a random-access source (one pass over its records)."""
  labels = []
  for start in range(0, len(source), 4096):
    labels += [int(r["label"]) for r in fetch(source, range(start, min(start + 4096,
                                                                        len(source))))]
  return np.asarray(labels, np.int32)

"""The image runner's data: both splits of a sweep, loaded once, subset as the options ask.

Device-resident datasets (MNIST … STL10) are put on the mesh once per sweep; ImageNet streams
from a random-access tfds source. Either way a split is a pair ``(images or source, labels)``
that :meth:`nc_jax.config.TrainConfig.pipeline` turns into the run's
:class:`~nc_jax.pipeline.Pipeline`, so the runner itself never asks which kind it has.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments.cli import RunOptions
from nc_jax import config as config_lib
from nc_jax import train
from nc_jax.data import sources
from nc_jax.data.subsets import Subset, balanced_subset, source_labels

#: NC metrics of a streamed dataset use at most this many examples per split by default.
STREAM_NC_EXAMPLES = 50_000


@dataclasses.dataclass(frozen=True)
class Data:
  """The loaded splits of a sweep (shared by its runs).

  Attributes:
    info: the dataset's :class:`~nc_jax.data.DatasetInfo`.
    train, test: ``(images on the mesh, labels)`` or ``(random-access source, labels or
      None)`` (streamed: labels are read only when a subset or stratification needs them).
    num_train, num_test: examples per split (training: after the configuration's class
      imbalance, :meth:`~nc_jax.config.TrainConfig.training_split`).
    nc_train_ids, nc_test_ids: the examples of the NC metrics (``None``: all).
  """
  info: Any
  train: tuple
  test: tuple
  num_train: int
  num_test: int
  nc_train_ids: Any
  nc_test_ids: Any


def load_data(cfg: config_lib.TrainConfig, options: RunOptions, mesh) -> Data:
  """Both splits, subset as the options ask (subsets are fixed: seed 0 for the splits, 1 for
  the NC subsets, the same for every run of a sweep, so seeds differ only in what they
  should)."""
  info = cfg.info
  k = info.num_classes
  sizes = (("train", options.train_examples), ("test", options.test_examples))
  if info.pipeline == "stream":
    if cfg.source != "tfds":
      raise ValueError(f"source: {info.name} streams from tfds (images vary in size); got "
                       f"{cfg.source!r}")
    splits = []
    for split, size in sizes:
      src = sources.tfds_source(info.name, split, cfg.data_dir)
      labels = None
      # Labels are only read (a pass over the records) when a subset or stratification needs
      # them.
      changed = cfg.imbalance != "none" or cfg.label_noise > 0  # cfg.training_split needs them
      if size is not None or (split == "train" and (cfg.use_stratified or changed)):
        labels = source_labels(src)
        ids = balanced_subset(labels, size, k)
        if ids is not None:
          src, labels = Subset(src, ids), labels[ids]
      splits.append((src, labels))
    n_train, n_test = len(cfg.training_split(splits[0])[0]), len(splits[1][0])
    # The first examples (tfds shuffles the records when it prepares a dataset).
    nc = options.nc_examples or STREAM_NC_EXAMPLES
    return Data(info, splits[0], splits[1], n_train, n_test,
                None if nc >= n_train else range(nc), None if nc >= n_test else range(nc))
  host = []
  for split, size in sizes:
    images, labels, _ = sources.load_split(
        info, split, source=cfg.source, path=cfg.data_path, data_dir=cfg.data_dir,
        num_examples=cfg.num_examples, seed=0)
    ids = balanced_subset(labels, size, k)
    if ids is not None:
      images, labels = images[ids], labels[ids]
    host.append((np.ascontiguousarray(images), np.asarray(labels, np.int32)))
  (_, train_y), (_, test_y) = host
  # The NC subset is drawn from the examples the runs train on (an imbalanced set keeps its
  # imbalance there); TrainConfig.pipeline applies the same choice to the split itself.
  _, train_y = cfg.training_labels(train_y)
  nc = options.nc_examples
  placed = train.replicate(tuple(host), mesh)  # once for the whole sweep
  return Data(info, placed[0], placed[1], len(train_y), len(test_y),
              balanced_subset(train_y, nc, k, seed=1), balanced_subset(test_y, nc, k, seed=1))

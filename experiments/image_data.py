"""The image runner's data: both splits of a sweep, loaded once, subset as the options ask.

Device-resident splits (MNIST … STL10) are host arrays put on the mesh once per sweep;
ImageNet streams from a random-access tfds source (:mod:`nc_jax.data.streaming`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.cli import RunOptions
from nc_jax import config as config_lib
from nc_jax.data.subsets import Subset, balanced_subset, source_labels


@dataclasses.dataclass
class Data:
  """The loaded splits of a sweep (shared by its runs)."""
  info: Any
  stream: bool
  train: Any            # (images, labels) host arrays, or a random-access source
  test: Any
  train_labels: Any     # (N,) host labels; streaming: None unless stratified or subset
  test_labels: Any
  on_device: Any = None  # device pipeline: ((images, labels) train, test) replicated on the mesh

  @property
  def num_train(self) -> int:
    return len(self.train) if self.stream else int(self.train_labels.shape[0])

  @property
  def num_test(self) -> int:
    return len(self.test) if self.stream else int(self.test_labels.shape[0])


def load_data(cfg: config_lib.TrainConfig, options: RunOptions) -> Data:
  """Both splits, subset as the options ask (subsets are fixed: seed 0, the same for every
  run of a sweep, so seeds differ only in what they should)."""
  import numpy as np

  from nc_jax.data import sources
  info = cfg.info
  k = info.num_classes
  if info.pipeline == "stream":
    if cfg.source != "tfds":
      raise ValueError(f"source: {info.name} streams from tfds (images vary in size); got "
                       f"{cfg.source!r}")
    splits = []
    for split, size in (("train", options.train_examples), ("test", options.test_examples)):
      src = sources.tfds_source(info.name, split, cfg.data_dir)
      labels = None
      # Labels are only read (a pass over the records) when a subset or stratification needs
      # them.
      if size is not None or (split == "train" and cfg.use_stratified):
        labels = source_labels(src)
        ids = balanced_subset(labels, size, k)
        if ids is not None:
          src, labels = Subset(src, ids), labels[ids]
      splits.append((src, labels))
    (tr, tr_y), (te, te_y) = splits
    return Data(info, True, tr, te, tr_y, te_y)
  out = []
  for split, size in (("train", options.train_examples), ("test", options.test_examples)):
    images, labels, _ = sources.load_split(
        info, split, source=cfg.source, path=cfg.data_path, data_dir=cfg.data_dir,
        num_examples=cfg.num_examples, seed=0)
    ids = balanced_subset(labels, size, k)
    if ids is not None:
      images, labels = images[ids], labels[ids]
    out.append((np.ascontiguousarray(images), np.asarray(labels, np.int32)))
  return Data(info, False, out[0], out[1], out[0][1], out[1][1])

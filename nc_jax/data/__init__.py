"""Data pipelines for nc_jax (docs/method.md §10.3): dataset registry, readers, augmentation,
device-resident epochs with stratified batches, and host streaming through Grain.

* :mod:`~nc_jax.data.registry` — :func:`get_dataset_info` (K, shapes, normalisation,
  augmentation, tfds names) for mnist, fashion_mnist, cifar10, cifar100, stl10, svhn,
  imagenet2012, synthetic.
* :mod:`~nc_jax.data.sources` — :func:`load_split` (tfds / IDX / npz / synthetic, then the
  load-time resize), :func:`tfds_source` for streaming. Never downloads.
* :mod:`~nc_jax.data.augment` — jit-able device augmentation and numpy host counterparts.
* :mod:`~nc_jax.data.batching` — :func:`epoch_indices` (plain or stratified index plans),
  :func:`make_batch` (gather + augment inside jit).
* :mod:`~nc_jax.data.streaming` — :class:`GrainLoader` (host batches through Grain: our epoch
  plans, per-example seeding, per-process slices, threads or worker processes, iterator
  state).

``tensorflow_datasets`` and ``grain`` are imported lazily, only by the tfds readers and the
streaming loader (the ``data`` extra; without it they raise :class:`MissingExtraError`, naming
``pip install -e ".[data]"``).
"""

from nc_jax.data import augment, batching, registry, sources, streaming
from nc_jax.data.augment import AugmentSpec, augment_batch, host_augment, normalise, resize_bilinear
from nc_jax.data.batching import (epoch_indices, eval_indices, make_batch, num_batches,
                                  put_on_device, shuffle_indices)
from nc_jax.data.registry import (DATASETS, DatasetInfo, dataset_names, get_dataset_info,
                                  synthetic_info)
from nc_jax.data.sources import (ArraySource, DataNotFoundError, MissingExtraError, load_idx,
                                 load_npz, load_split, load_tfds, make_synthetic, preprocess,
                                 read_idx, tfds_source)
from nc_jax.data.streaming import Batch, EpochIterator, GrainLoader

__all__ = [
    "ArraySource", "AugmentSpec", "Batch", "DATASETS", "DataNotFoundError", "DatasetInfo",
    "EpochIterator", "GrainLoader", "MissingExtraError", "augment", "augment_batch",
    "batching", "dataset_names", "epoch_indices", "eval_indices", "get_dataset_info",
    "host_augment", "load_idx", "load_npz", "load_split", "load_tfds", "make_batch",
    "make_synthetic", "normalise", "num_batches", "preprocess", "put_on_device", "read_idx",
    "registry", "resize_bilinear", "shuffle_indices", "sources", "streaming", "synthetic_info",
    "tfds_source",
]

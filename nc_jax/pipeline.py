"""A run's data as the training loop consumes it: one interface, two kinds of data.

A :class:`Pipeline` pairs a training split with an optional evaluation split and knows how to

* **compile its steps** (:meth:`Pipeline.compile` → :class:`Steps`: train, eval and
  eval-mode features, each taking ``(state, *batch)``);
* give the **training batches of an epoch from a batch** ``start`` (to resume mid-epoch);
* give the **evaluation batches** of the evaluation split;
* give the **feature batches** of either split (all examples or a subset ``ids``).

:func:`nc_jax.loop.fit`, :func:`nc_jax.loop.evaluate` and the experiment runner use only this
interface, so none of them depends on where the data lives:

* :class:`DevicePipeline` — both splits resident on the device as uint8 (replicated over the
  mesh); batches are index rows, gathered and augmented inside the compiled step. The epoch
  plan is a pure function of the run key in the train state (``fold_in(fold_in(rng, 0),
  epoch)``), the augmentation of a step of ``fold_in(fold_in(rng, 1), step)``.
* :class:`StreamingPipeline` — random-access sources decoded and augmented on the host
  through Grain (:class:`nc_jax.data.streaming.GrainLoader`: Grain threads or worker
  processes, ImageNet); batches are host arrays, each process's slice of the global batch, put
  on the mesh; order and augmentation are seeded by ``(seed, epoch, index)``. Its training
  iterator also has a ``get_state()`` (the Grain iterator state), saved with a mid-epoch
  position and checked against it on resume.

Either way the position ``(epoch, batch)`` plus the train state is the whole run state, so a
run resumed from its checkpoint continues bitwise. :meth:`nc_jax.config.TrainConfig.pipeline`
builds the right kind for a dataset.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import train
from nc_jax.data import batching
from nc_jax.data.augment import AugmentSpec
from nc_jax.data.streaming import EpochIterator, GrainLoader
from nc_jax.data.subsets import Subset

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Steps:
  """A pipeline's compiled steps; each takes ``(state, *batch)`` with a batch as the
  pipeline's iterators give it.

  Attributes:
    train: ``(state, *batch) -> (state, metrics)``, donating the state.
    eval: ``(state, *batch) -> metrics`` (loss, top-1, top-5 sums; padded slots masked).
    features: ``(state, *batch) -> (h, labels)``: eval-mode features ``(B, d)`` as the
      head sees them and int32 labels ``(B,)``, −1 in padded slots
      (:func:`nc_jax.evaluate.collect_features` drops them).
  """
  train: Callable
  eval: Callable
  features: Callable


class Pipeline(abc.ABC):
  """A training split and an optional evaluation split, batched for one run.

  Attributes:
    batch_size: the global batch size (every process together).
    num_classes: K.
    stratified: stratified training batches (every class in every batch, the implicit
      method's recipe; :func:`nc_jax.data.batching.epoch_indices`).
    mesh: the data-parallel mesh, or ``None`` (one device).
  """
  batch_size: int
  num_classes: int
  stratified: bool
  mesh: Any

  @property
  @abc.abstractmethod
  def steps_per_epoch(self) -> int:
    """Training batches per epoch (the last partial batch is dropped)."""

  @property
  @abc.abstractmethod
  def has_eval(self) -> bool:
    """Whether there is an evaluation split."""

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Examples in ``split`` (``"train"`` or ``"eval"``)."""

  @abc.abstractmethod
  def compile(self, *, model, tx, head_config, loss: str = "cross_entropy") -> Steps:
    """The train, eval and feature steps for this kind of data (jitted; sharded over
    :attr:`mesh`). Pipelines of the same kind and shapes can share them (a sweep over seeds
    compiles once)."""

  @abc.abstractmethod
  def train_batches(self, state: train.TrainState, epoch: int, start: int = 0
                    ) -> Iterator[tuple]:
    """Step arguments of the training batches ``start, start + 1, …`` of ``epoch`` (0-based).

    The iterator may hold a background thread: close it (``.close()``) when stopping early.
    It may also have ``get_state()`` (a JSON-serialisable dict): :func:`nc_jax.loop.fit`
    saves it with a mid-epoch position as ``position["data"]`` and, on resume, calls
    ``train_batches(state, epoch, start, data_state=...)``, which such a pipeline must accept
    and check against ``(epoch, start)``.
    """

  @abc.abstractmethod
  def eval_batches(self) -> Iterator[tuple]:
    """Step arguments covering the evaluation split once (last batch padded)."""

  @abc.abstractmethod
  def feature_batches(self, split: str, ids=None) -> Iterator[tuple]:
    """Step arguments of :attr:`Steps.features` over ``split``'s examples ``ids`` (all when
    ``None``), un-augmented, in order, the last batch padded."""

  def _check_split(self, split: str) -> None:
    if split not in SPLITS:
      raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if split == "eval" and not self.has_eval:
      raise ValueError("split: this pipeline has no evaluation split")


def _static(model, head_config, loss) -> dict:
  return dict(model=model, head_config=head_config, loss=loss)


def _features_fn(model, head_config):
  return functools.partial(train.features, model=model, head_config=head_config)


# --------------------------------------------------------------------------- #
# Device-resident data
# --------------------------------------------------------------------------- #


def _data_step(state, images, labels, idx, *, spec, **static):
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
  x, y = batching.make_batch(images, labels, idx, key, spec, True)
  return train.train_step(state, x, y, **static)


def _eval_data_step(state, images, labels, idx, *, spec, **static):
  x, y = batching.make_batch(images, labels, idx, None, spec, False)
  return train.eval_step(state, x, y, **static)


def _features_data_step(state, images, labels, idx, *, spec, features):
  x, y = batching.make_batch(images, labels, idx, None, spec, False)
  return features(state, x), y


def epoch_plan(state: train.TrainState, labels: jax.Array, epoch: int, batch_size: int,
               stratified: bool, num_classes: int) -> np.ndarray:
  """The ``(num_batches, B)`` index plan of ``epoch`` of device data (host copy): a pure
  function of the run key ``state.rng`` and the epoch."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), epoch)
  return np.asarray(batching.epoch_indices(key, labels, batch_size, stratified,
                                           num_classes=num_classes))


def place_indices(idx_row, mesh):
  """A global index row as the step's sharded input; each process passes its own slice."""
  if mesh is None:
    return jnp.asarray(idx_row)
  n = jax.process_count()
  local = np.asarray(idx_row).reshape(n, -1)[jax.process_index()]
  return train.global_batch(local, mesh)


@dataclasses.dataclass(frozen=True, eq=False)
class DevicePipeline(Pipeline):
  """Splits resident on the device: uint8 images ``(N, H, W, C)`` (the dataset's
  ``device_shape``) and int32 labels ``(N,)``, replicated over :attr:`mesh`; a batch is an
  index row ``(B,)`` sharded along ``"data"``, so each device gathers and augments its own
  slice inside the compiled step.

  Build it with :meth:`create` (which places host arrays on the mesh; arrays already placed
  there, e.g. shared by the runs of a sweep, are not copied again).

  Attributes:
    train_images, train_labels: the training split on the device.
    eval_images, eval_labels: the evaluation split, or ``None``.
    train_spec: augmentation and normalisation of training batches.
    eval_spec: normalisation of evaluation and feature batches.
  """
  train_images: jax.Array
  train_labels: jax.Array
  eval_images: jax.Array | None
  eval_labels: jax.Array | None
  train_spec: AugmentSpec
  eval_spec: AugmentSpec
  batch_size: int
  num_classes: int
  stratified: bool = False
  mesh: Any = None

  @classmethod
  def create(cls, train_split: tuple, eval_split: tuple | None = None, *,
             train_spec: AugmentSpec, eval_spec: AugmentSpec, batch_size: int,
             num_classes: int, stratified: bool = False, mesh=None) -> "DevicePipeline":
    """Places ``(images, labels)`` splits on ``mesh`` (replicated; one device if ``None``).

    Raises:
      ValueError: images not uint8 ``(N, H, W, C)``, labels not ``(N,)``, a batch size that
        is not a positive multiple of the device count or exceeds the training split.
    """
    batch_size = batching._check_batch_size(batch_size)  # pylint: disable=protected-access
    if mesh is not None:
      train.check_batch_size(batch_size, mesh)
    placed = []
    for name, split in (("train_split", train_split), ("eval_split", eval_split)):
      if split is None:
        placed += [None, None]
        continue
      images, labels = split
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{name}: expected uint8 images (N, H, W, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
      if tuple(labels.shape) != (images.shape[0],):
        raise ValueError(f"{name}: expected labels of shape ({images.shape[0]},), got "
                         f"{tuple(labels.shape)}")
      if isinstance(labels, np.ndarray):
        labels = labels.astype(np.int32)
      pair = (images, labels)
      placed += list(jax.device_put(pair) if mesh is None else train.replicate(pair, mesh))
    batching.num_batches(int(placed[0].shape[0]), batch_size)  # batch ≤ the training split
    return cls(*placed, train_spec=train_spec, eval_spec=eval_spec, batch_size=batch_size,
               num_classes=int(num_classes), stratified=bool(stratified), mesh=mesh)

  @property
  def steps_per_epoch(self) -> int:
    return batching.num_batches(self.num_examples("train"), self.batch_size)

  @property
  def has_eval(self) -> bool:
    return self.eval_images is not None

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return int((self.train_labels if split == "train" else self.eval_labels).shape[0])

  def compile(self, *, model, tx, head_config, loss: str = "cross_entropy") -> Steps:
    static = _static(model, head_config, loss)
    tr = functools.partial(_data_step, spec=self.train_spec, tx=tx, **static)
    ev = functools.partial(_eval_data_step, spec=self.eval_spec, **static)
    ft = functools.partial(_features_data_step, spec=self.eval_spec,
                           features=_features_fn(model, head_config))
    if self.mesh is None:
      return Steps(jax.jit(tr, donate_argnums=0), jax.jit(ev), jax.jit(ft))
    rep, data = train.replicated(self.mesh), train.batch_sharding(self.mesh)
    args = (rep, rep, rep, data)
    return Steps(jax.jit(tr, in_shardings=args, out_shardings=(rep, rep), donate_argnums=0),
                 jax.jit(ev, in_shardings=args, out_shardings=rep),
                 jax.jit(ft, in_shardings=args, out_shardings=(rep, rep)))

  def _rows(self, images, labels, plan) -> Iterator[tuple]:
    for row in plan:
      yield images, labels, place_indices(row, self.mesh)

  def train_batches(self, state, epoch: int, start: int = 0) -> Iterator[tuple]:
    plan = epoch_plan(state, self.train_labels, epoch, self.batch_size, self.stratified,
                      self.num_classes)
    return self._rows(self.train_images, self.train_labels, plan[start:])

  def eval_batches(self) -> Iterator[tuple]:
    self._check_split("eval")
    plan, _ = batching.eval_indices(self.num_examples("eval"), self.batch_size)
    return self._rows(self.eval_images, self.eval_labels, plan)

  def feature_batches(self, split: str, ids=None) -> Iterator[tuple]:
    self._check_split(split)
    images, labels = ((self.train_images, self.train_labels) if split == "train" else
                      (self.eval_images, self.eval_labels))
    n = self.num_examples(split) if ids is None else len(ids)
    plan, _ = batching.eval_indices(n, self.batch_size)
    if ids is not None:
      plan = np.where(plan >= 0, np.asarray(ids, np.int32)[np.maximum(plan, 0)], -1)
    return self._rows(images, labels, plan)


# --------------------------------------------------------------------------- #
# Streaming data
# --------------------------------------------------------------------------- #


def _host_batch(batch, mesh) -> tuple:
  """A host batch ``(images, labels)`` (this process's slice) as global step inputs."""
  pair = (batch.images, batch.labels)
  return tuple(jnp.asarray(a) for a in pair) if mesh is None else train.global_batch(pair, mesh)


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingPipeline(Pipeline):
  """Splits as random-access sources (``len(src)``, ``src[i] -> {"image", "label"}``: a
  ``tfds.data_source``, an :class:`~nc_jax.data.ArraySource`, a
  :class:`~nc_jax.data.subsets.Subset`), decoded and augmented on the host through Grain
  (:class:`~nc_jax.data.streaming.GrainLoader`: threads or worker processes); a batch is
  ``(images (B, h, w, C) float32, labels (B,) int32)``, this process's slice put on the mesh.

  Determinism: the training batches of an epoch are a pure function of ``seed``, the epoch
  and the batch index (plan from ``fold_in(key(seed), epoch)``, augmentation seeded by
  ``(seed, epoch, index)``), whatever ``num_threads`` and ``num_workers``.
  :meth:`train_batches` returns an iterator with ``get_state()`` (the Grain iterator state,
  JSON-serialisable), which :func:`nc_jax.loop.fit` saves with a mid-epoch position and hands
  back as ``data_state`` on resume, where it is checked against the epoch and batch.

  Attributes:
    train_source, eval_source: the splits (``eval_source`` may be ``None``).
    train_labels: ``(N,)`` labels of the training source, needed for ``stratified``.
    seed: seeds the epoch order and each example's augmentation (``(seed, epoch, index)``).
    num_threads: Grain read threads per process, each building whole batches (0: in the
      training loop's thread; ``None``: one per core, at most 16).
    num_workers: Grain worker processes (0: threads only); each has ``num_threads`` threads.
    prefetch: batches kept ready ahead per process (``None``: ``max(num_threads, 2)``); host
      memory holds about that many batches (ImageNet, 256 a process: 154 MB each).

  Raises:
    nc_jax.data.MissingExtraError: grain is not installed (the ``data`` extra), on
      construction.
  """
  train_source: Any
  eval_source: Any
  train_spec: AugmentSpec
  eval_spec: AugmentSpec
  batch_size: int
  num_classes: int
  stratified: bool = False
  mesh: Any = None
  train_labels: Any = None
  seed: int = 0
  num_threads: int | None = None
  num_workers: int = 0
  prefetch: int | None = None

  def __post_init__(self):
    if self.mesh is not None:
      train.check_batch_size(self.batch_size, self.mesh)
    _ = self._train_loader  # validates grain, batch size, stratification and labels now

  def _loader(self, source, spec, train_split: bool) -> GrainLoader:
    common = dict(batch_size=self.batch_size, num_threads=self.num_threads,
                  num_workers=self.num_workers, prefetch=self.prefetch)
    if train_split:
      return GrainLoader(source, spec, train=True, seed=self.seed, stratified=self.stratified,
                         labels=self.train_labels, num_classes=self.num_classes, **common)
    return GrainLoader(source, spec, train=False, **common)

  @functools.cached_property
  def _train_loader(self) -> GrainLoader:
    return self._loader(self.train_source, self.train_spec, True)

  @property
  def steps_per_epoch(self) -> int:
    return len(self._train_loader)

  @property
  def has_eval(self) -> bool:
    return self.eval_source is not None

  def num_examples(self, split: str) -> int:
    self._check_split(split)
    return len(self.train_source if split == "train" else self.eval_source)

  def compile(self, *, model, tx, head_config, loss: str = "cross_entropy") -> Steps:
    static = _static(model, head_config, loss)
    feat = _features_fn(model, head_config)

    def features(state, x, y):
      return feat(state, x), y
    if self.mesh is None:
      fj = jax.jit(features)
    else:
      rep, data = train.replicated(self.mesh), train.batch_sharding(self.mesh)
      fj = jax.jit(features, in_shardings=(rep, data, data), out_shardings=(rep, rep))
    return Steps(train.compile_train_step(self.mesh, tx=tx, **static),
                 train.compile_eval_step(self.mesh, **static), fj)

  def _put(self, batch) -> tuple:
    return _host_batch(batch, self.mesh)

  def train_batches(self, state, epoch: int, start: int = 0,
                    data_state: dict | None = None) -> EpochIterator:
    """Step arguments of the training batches ``start, …`` of ``epoch``, as an iterator with
    ``close()`` and ``get_state()``.

    Args:
      state: unused (the order is seeded by ``(seed, epoch)``).
      data_state: the iterator's ``get_state()`` saved at ``(epoch, start)``: restored with
        Grain's ``set_state()``.

    Raises:
      ValueError: ``data_state`` saved at another epoch or batch, or whose Grain state
        resumes at another batch (at the first batch).
    """
    del state
    return self._train_loader.epoch(epoch, start, state=data_state, transform=self._put)

  def eval_batches(self) -> Iterator[tuple]:
    self._check_split("eval")
    return self._loader(self.eval_source, self.eval_spec, False).epoch(0, transform=self._put)

  def feature_batches(self, split: str, ids=None) -> Iterator[tuple]:
    self._check_split(split)
    src = self.train_source if split == "train" else self.eval_source
    src = src if ids is None else Subset(src, ids)
    return self._loader(src, self.eval_spec, False).epoch(0, transform=self._put)

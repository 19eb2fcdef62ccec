"""Host streaming through Grain, for datasets that do not fit in device memory (ImageNet through
``tfds.data_source``).

A :class:`GrainLoader` reads any random-access source (``len(src)``, ``src[i] -> {"image",
"label"}``, optionally a batched ``src.__getitems__(ids)``): a ``tfds.data_source``
(:func:`nc_jax.data.sources.tfds_source`), an :class:`~nc_jax.data.sources.ArraySource`, or a
:class:`~nc_jax.data.subsets.Subset` of either. One epoch of one process is a Grain pipeline
(:meth:`GrainLoader.dataset`, :meth:`GrainLoader.epoch`)::

  grain.MapDataset.source(plan[:, lo:hi].ravel())   # source indices, -1 = padding
      .batch(local_batch_size)                      # row b: this process's slice of batch b
      .map_with_index(ReadBatch(...))               # read, augment, collate → batch b
      [offset:]                                     # a run resumed mid-epoch
      .to_iter_dataset(grain.ReadOptions(num_threads, prefetch))     # threads, or
      .mp_prefetch(grain.MultiprocessingOptions(num_workers))       # worker processes

* **The plan** is ours, not a Grain sampler: the device path's
  :func:`~nc_jax.data.batching.epoch_indices` for ``jax.random.fold_in(jax.random.key(seed),
  epoch)`` (plain shuffle, or stratified batches, the implicit method's recipe, which no Grain
  sampler expresses), or the examples in order (evaluation: the last batch padded with -1).
* **Per-example augmentation** (:func:`~nc_jax.data.augment.host_augment`) uses its own numpy
  generator seeded by ``(seed, epoch, index)``; a padded slot is a zero image (normalised:
  ``-mean/std``) with label -1 and mask False.
* **Sharding by JAX process**: process ``p`` of ``n`` reads only its contiguous slice
  ``[p·B/n, (p+1)·B/n)`` of every global batch, as ``jax.make_array_from_process_local_data``
  expects (``process_index``/``process_count`` default to JAX's).
* **Threads or worker processes**: Grain's read threads (``num_threads``; 0 reads in the
  iterating thread) or, with ``num_workers > 0``, Grain worker processes (``mp_prefetch``;
  batch ``b`` goes to worker ``b mod num_workers`` and the outputs are interleaved back in
  order). Whole batches are the unit of work, so a worker never splits a batch.
* **Iterator state**: :meth:`EpochIterator.get_state` is a JSON-serialisable dict holding the
  Grain iterator's ``get_state()`` with the epoch and batch it stands at; :meth:`GrainLoader.epoch`
  restores it with ``set_state()`` and checks it against the epoch and batch it is asked for.

**Determinism contract.** Batch ``b`` of epoch ``e`` on process ``p`` is a pure function of the
source, the spec, ``seed``, ``e``, ``b``, the batch size, ``p`` and ``process_count`` (and, when
stratified, the labels): it does not depend on threads, workers, prefetching, where the epoch
was started or whether it was resumed. So threads, workers and the synchronous
``dataset(e)[b]`` give bitwise the same batches, and the processes' batches concatenated are the
single-process batch. Every batch carries its index ``b``; the iterator checks the sequence, so
a restored Grain state that does not resume at the asked-for batch is an error, never a silent
shift of the data.

``grain`` is imported when a loader is built (the ``data`` extra); without it the loader raises
:class:`~nc_jax.data.sources.MissingExtraError`, one line naming ``pip install -e ".[data]"``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from absl import flags

from nc_jax.data.augment import AugmentSpec, host_augment
from nc_jax.data.batching import _check_batch_size, epoch_indices, eval_indices, shuffle_indices
from nc_jax.data.sources import MissingExtraError, fetch

#: Keys of :meth:`EpochIterator.get_state`.
STATE_KEYS = ("epoch", "batch", "offset", "num_workers", "grain")


def import_grain():
  """The ``grain`` module.

  Raises:
    MissingExtraError: grain is not installed (the ``data`` extra); one line.
  """
  try:
    return importlib.import_module("grain")
  except ImportError as err:
    missing = getattr(err, "name", None) or "grain"
    raise MissingExtraError(
        f"streaming data needs the 'data' extra (grain), which is not installed (cannot import "
        f"{missing}): run pip install -e \".[data]\" in the nc_jax repository") from None


#: The absl flag Grain's worker processes read (see :func:`_unparsed_flag_workaround`).
_WORKER_PROFILING_FLAG = "grain_enable_multiprocess_worker_profiling"


def _unparsed_flag_workaround() -> None:
  """Lets Grain start worker processes in a program that does not parse absl flags.

  With JAX installed, grain 0.2.18 reads the absl flag
  ``--grain_enable_multiprocess_worker_profiling`` when it starts a worker process, and that
  read raises ``UnparsedFlagAccessError`` unless the program parsed absl flags (an
  ``absl.app``), which ours do not (google/grain#1355; fixed upstream after 0.2.18). Marking
  that one flag as given, at its default (False, no profiling), is what Grain itself does for
  its debug flags inside a worker; nothing changes for a program that parses its flags.
  """
  if not flags.FLAGS.is_parsed() and _WORKER_PROFILING_FLAG in flags.FLAGS:
    flags.FLAGS[_WORKER_PROFILING_FLAG].present = True


def default_num_threads() -> int:
  """Grain read threads per process when none are given: one per core this process may use,
  at most 16. Each thread builds a whole batch, so threads beyond the cores add only start-up
  latency (that many batches are begun at once) and memory (as many batches in flight), no
  throughput."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, min(16, cores))


class Batch(NamedTuple):
  """One host batch of this process.

  Attributes:
    images: ``(b, h, w, C)`` float32, normalised (uint8, augmented but not normalised, when
      the loader's ``output_dtype`` is ``"uint8"``); padded slots are zero images.
    labels: ``(b,)`` int32, -1 where padded.
    mask: ``(b,)`` bool, False where padded.
    index: the batch's index in its epoch.
  """
  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray
  index: int


def normalise_in_place(images: np.ndarray, spec: AugmentSpec) -> np.ndarray:
  """:func:`~nc_jax.data.augment.normalise_np` of a uint8 batch, bitwise (the same float32
  operations in the same order), with one float32 buffer instead of four: an ImageNet batch is
  normalised about a fifth faster, a few per cent of the host's work per batch."""
  out = images.astype(np.float32)
  out /= np.float32(255.0)
  out -= np.asarray(spec.mean, np.float32)
  out /= np.asarray(spec.std, np.float32)
  return out


def _as_batch(element: dict) -> "Batch":
  # Copies of the small arrays: np.frombuffer views of bytes are read-only.
  return Batch(np.asarray(element["images"]), np.frombuffer(element["labels"], np.int32).copy(),
               np.frombuffer(element["mask"], np.bool_).copy(), int(element["index"]))


class ReadBatch:
  """Grain ``map_with_index`` transform: ``(b, ids (lb,) int32) -> batch b`` as a dict
  ``{"index": b, "images": array, "labels": bytes of int32, "mask": bytes of bool}`` (see
  :class:`Batch`).

  Reads the records of ``ids >= 0`` in one :func:`~nc_jax.data.sources.fetch` (batched through
  the source's ``__getitems__``: tfds array_record sources read in parallel), augments each
  with ``np.random.default_rng([seed, epoch, index])`` when training, stacks them (padded slots:
  zeros, label -1), and normalises (:func:`normalise_in_place`). A plain module-level class, so Grain can pickle it to
  worker processes.
  """

  def __init__(self, source, spec: AugmentSpec, *, train: bool, seed: int, epoch: int,
               output_dtype: str):
    self.source, self.spec, self.train = source, spec, train
    self.seed, self.epoch, self.output_dtype = seed, epoch, output_dtype

  def example(self, index: int, record) -> tuple[np.ndarray, int]:
    image = np.asarray(record["image"])
    rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
    return host_augment(image, rng, self.spec, self.train), int(record["label"])

  def __call__(self, b: int, ids: np.ndarray) -> dict:
    ids = np.asarray(ids)
    mask = ids >= 0
    valid = [int(i) for i in ids[mask]]
    done = [self.example(i, r) for i, r in zip(valid, fetch(self.source, valid))]
    # A slice that is all padding (the last evaluation batch of a later process) still needs
    # the output shape: augment example 0 for it.
    shape = (done[0][0] if done else self.example(0, fetch(self.source, [0])[0])[0]).shape
    images = np.zeros((len(ids),) + shape, np.uint8)
    labels = np.full(len(ids), -1, np.int32)
    for p, (img, lab) in zip(np.flatnonzero(mask), done):
      if img.shape != shape:
        raise ValueError(f"streaming: augmented images differ in shape ({img.shape} vs "
                         f"{shape}); set crop_size in the spec")
      images[p], labels[p] = img, lab
    if self.output_dtype == "float32":
      images = normalise_in_place(images, self.spec)
    # Labels and mask travel as bytes: a worker process would put every ndarray, however
    # small, in a shared-memory segment of its own (Grain's default), costing more than it
    # carries.
    return {"index": int(b), "images": images, "labels": labels.tobytes(),
            "mask": mask.tobytes()}


class EpochIterator:
  """This process's batches of one epoch, from a Grain iterator (threads or processes behind).

  Yields ``transform(batch)`` for each :class:`Batch` (the batch itself without a transform),
  in order, checking that batch ``b`` follows batch ``b - 1``. ``close()`` (also on ``with``
  exit, exhaustion, an error, and garbage collection) stops Grain's threads and worker
  processes; it is safe to call more than once.

  Attributes:
    epoch: the epoch.
    batch: the index of the next batch.
  """

  def __init__(self, grain_iter, *, epoch: int, start: int, offset: int, num_workers: int,
               restored: bool = False, transform: Callable[[Batch], Any] | None = None):
    self._it, self._transform = grain_iter, transform
    self.epoch, self.batch = int(epoch), int(start)
    self._offset, self._workers = int(offset), int(num_workers)
    self._restored = bool(restored)  # the first batch comes from a restored Grain state
    self._closed = False

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    try:
      element = next(self._it)
    except BaseException:  # exhausted, or an error (a worker's, with its own message)
      self.close()
      raise
    index = int(element["index"])
    if index != self.batch:
      self.close()
      if self._restored:
        raise ValueError(
            f"data state: the restored Grain iterator state resumes epoch {self.epoch} at batch "
            f"{index}, but the position says batch {self.batch}; the checkpoint's position and "
            f"data state disagree")
      raise RuntimeError(f"streaming: expected batch {self.batch} of epoch {self.epoch}, got "
                         f"batch {index}")
    self._restored = False
    self.batch += 1
    batch = _as_batch(element)
    return batch if self._transform is None else self._transform(batch)

  def get_state(self) -> dict:
    """Where the iterator stands, as a JSON-serialisable dict: ``epoch``, ``batch`` (the next
    batch), ``offset`` (the batch the Grain pipeline starts at), ``num_workers`` (the Grain
    state's layout depends on it) and ``grain`` (the Grain iterator's ``get_state()``).

    Every JAX process consumes the same number of batches in the same order, so the state is
    the same on every process: the one process 0 saves serves all of them.
    """
    return {"epoch": self.epoch, "batch": self.batch, "offset": self._offset,
            "num_workers": self._workers, "grain": self._it.get_state()}

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 -- interpreter shutdown
      pass


class GrainLoader:
  """Host-side batches of a random-access source through Grain (see the module docstring).

  Args:
    source: random-access source.
    spec: augmentation (e.g. ``get_dataset_info("imagenet2012").spec(train)``).
    batch_size: global batch size (all processes together); must be divisible by
      ``process_count``.
    train: random augmentation.
    seed: seeds the epoch plans (``jax.random.key(seed)`` folded with the epoch) and the
      per-example augmentation (``(seed, epoch, index)``).
    shuffle: new random order each epoch (default: ``train``).
    stratified: stratified plans (needs ``labels``, and ``batch_size >= K``).
    labels: ``(N,)`` labels of the whole source, for ``stratified``.
    num_classes: K (default ``max(labels) + 1``).
    drop_remainder: drop the last partial batch (default: ``shuffle``); otherwise it is
      padded. Shuffled plans always drop it.
    process_index, process_count: multi-host split (defaults: ``jax.process_index()``,
      ``jax.process_count()``).
    num_threads: Grain read threads per process (each worker process has as many), each
      building whole batches; 0: batches are built in the iterating thread; ``None``:
      :func:`default_num_threads` (one per core, at most 16).
    num_workers: Grain worker processes (0: none, threads only). Workers are started for
      each epoch's iterator (spawned: they import nc_jax), so they pay off for expensive
      batches (ImageNet decoding), not for small ones.
    prefetch: batches each process (or worker) keeps ready ahead (default:
      ``max(num_threads, 2)``, so that every thread has a batch to build).
    output_dtype: ``"float32"`` (normalised) or ``"uint8"`` (augmented, not normalised; then
      normalise on device with :func:`nc_jax.data.augment.normalise`, which moves 4× fewer
      bytes).

  Raises:
    MissingExtraError: grain is not installed.
    ValueError: bad batch size, process split, thread, worker or prefetch count, dtype, or
      stratified without labels.
  """

  def __init__(self, source: Any, spec: AugmentSpec, *, batch_size: int, train: bool,
               seed: int = 0, shuffle: bool | None = None, stratified: bool = False,
               labels: Any = None, num_classes: int | None = None,
               drop_remainder: bool | None = None, process_index: int | None = None,
               process_count: int | None = None, num_threads: int | None = None,
               num_workers: int = 0,
               prefetch: int | None = None, output_dtype: str = "float32"):
    self._grain = import_grain()
    self.source, self.spec, self.train = source, spec, bool(train)
    self.batch_size = _check_batch_size(batch_size)
    self.seed = int(seed)
    self.shuffle = self.train if shuffle is None else bool(shuffle)
    self.drop_remainder = self.shuffle if drop_remainder is None else bool(drop_remainder)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if self.process_count <= 0 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"GrainLoader: need 0 <= process_index < process_count, got "
                       f"{self.process_index}, {self.process_count}")
    if self.batch_size % self.process_count:
      raise ValueError(f"GrainLoader: batch_size {self.batch_size} is not divisible by "
                       f"process_count {self.process_count}")
    self.local_batch_size = self.batch_size // self.process_count
    if output_dtype not in ("float32", "uint8"):
      raise ValueError(f"GrainLoader: output_dtype must be 'float32' or 'uint8', got "
                       f"{output_dtype!r}")
    self.output_dtype = output_dtype
    if num_threads is None:
      num_threads = default_num_threads()
    for name, value in (("num_threads", num_threads), ("num_workers", num_workers)):
      if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"GrainLoader: {name} must be a non-negative integer, got {value!r}")
    self.num_threads, self.num_workers = int(num_threads), int(num_workers)
    self.prefetch = max(self.num_threads, 2) if prefetch is None else int(prefetch)
    if self.prefetch < 1:
      raise ValueError(f"GrainLoader: prefetch must be >= 1, got {prefetch}")
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError("GrainLoader: the source is empty")
    self.stratified = bool(stratified)
    if self.stratified:
      if labels is None:
        raise ValueError("GrainLoader: stratified=True needs labels= for the whole source")
      labels = np.asarray(labels).astype(np.int32)
      if labels.shape != (self.num_examples,):
        raise ValueError(f"GrainLoader: labels must have shape ({self.num_examples},), got "
                         f"{labels.shape}")
      if not self.shuffle:
        raise ValueError("GrainLoader: stratified=True needs shuffle=True")
      if labels.min() < 0:
        raise ValueError("GrainLoader: labels must be non-negative")
      num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
      if labels.max() >= num_classes:
        raise ValueError(f"GrainLoader: labels must lie in [0, {num_classes})")
    self.labels = labels
    self.num_classes = num_classes
    if (self.shuffle or self.drop_remainder) and self.num_examples < self.batch_size:
      raise ValueError(f"GrainLoader: batch_size {self.batch_size} is larger than the dataset "
                       f"({self.num_examples} examples)")
    if self.stratified:  # validate (B >= K etc.) now rather than in the first epoch
      self.plan(0)

  def __len__(self) -> int:
    """Batches per epoch."""
    n, b = self.num_examples, self.batch_size
    return n // b if (self.shuffle or self.drop_remainder) else -(-n // b)

  def plan(self, epoch: int) -> np.ndarray:
    """The global ``(len(self), batch_size)`` int32 plan of ``epoch``, -1 for padding."""
    n, b = self.num_examples, self.batch_size
    if self.shuffle:
      # The plan is the device path's (same seed → same plan), computed on the host's CPU
      # device so that it never occupies an accelerator.
      with jax.default_device(jax.devices("cpu")[0]):
        key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        if self.stratified:
          plan = epoch_indices(key, self.labels, b, True, num_classes=self.num_classes)
        else:
          plan = shuffle_indices(key, n, b)
      return np.asarray(jax.device_get(plan))
    if self.drop_remainder:
      s = n // b
      return np.arange(s * b, dtype=np.int32).reshape(s, b)
    return eval_indices(n, b)[0]

  def dataset(self, epoch: int):
    """This process's batches of ``epoch`` as a random-access ``grain.MapDataset``: element
    ``b`` is batch ``b`` as :class:`ReadBatch` returns it, computed when read (:meth:`batches`
    gives them as :class:`Batch`\\ es)."""
    lb, p = self.local_batch_size, self.process_index
    local = np.ascontiguousarray(self.plan(epoch)[:, p * lb:(p + 1) * lb]).reshape(-1)
    read = ReadBatch(self.source, self.spec, train=self.train, seed=self.seed, epoch=int(epoch),
                     output_dtype=self.output_dtype)
    return self._grain.MapDataset.source(local).batch(lb).map_with_index(read)

  def epoch(self, epoch: int, start: int = 0, state: Mapping | None = None,
            transform: Callable[[Batch], Any] | None = None) -> EpochIterator:
    """This process's batches of ``epoch`` from batch ``start`` on, built by Grain's threads or
    worker processes. Use as a context manager or call ``close()`` when stopping early.

    Args:
      epoch: the epoch (0-based).
      start: the first batch (a run resumed mid-epoch).
      state: an :meth:`EpochIterator.get_state` saved at ``(epoch, start)``; its Grain state is
        restored with ``set_state()`` (when it was saved with this ``num_workers``: Grain's
        state layout depends on it; otherwise the pipeline starts at ``start``, which gives the
        same batches).
      transform: applied to each :class:`Batch` (e.g. putting it on the mesh).

    Raises:
      ValueError: ``start`` outside the epoch; a ``state`` that is malformed or saved at
        another epoch or batch (and, at the first batch, a Grain state that resumes at
        another batch).
    """
    epoch, start = int(epoch), int(start)
    if not 0 <= start <= len(self):
      raise ValueError(f"start: expected a batch in [0, {len(self)}], got {start}")
    offset, restore = start, None
    if state is not None:
      if not isinstance(state, Mapping) or not set(STATE_KEYS) <= set(state):
        raise ValueError(f"data state: expected a dict with keys {STATE_KEYS}, got {state!r}")
      if (state["epoch"], state["batch"]) != (epoch, start):
        raise ValueError(
            f"data state: saved at epoch {state['epoch']}, batch {state['batch']}, but the "
            f"position says epoch {epoch}, batch {start}; the checkpoint's position and data "
            f"state disagree")
      if state["num_workers"] == self.num_workers:
        offset, restore = int(state["offset"]), state["grain"]
        if not 0 <= offset <= start:
          raise ValueError(f"data state: offset {offset} is not in [0, {start}]")
    grain = self._grain
    ds = self.dataset(epoch)[offset:].to_iter_dataset(
        grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
    if self.num_workers:
      _unparsed_flag_workaround()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                       per_worker_buffer_size=2))
    it = iter(ds)
    if restore is not None:
      it.set_state(restore)
    return EpochIterator(it, epoch=epoch, start=start, offset=offset,
                         num_workers=self.num_workers, restored=restore is not None,
                         transform=transform)

  def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
    """The same batches as :meth:`epoch`, computed one by one in the calling thread from
    :meth:`dataset` (no threads, no processes: the reference the others must equal)."""
    ds = self.dataset(epoch)
    for b in range(int(start), len(ds)):
      yield _as_batch(ds[b])

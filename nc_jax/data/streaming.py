"""Host streaming with a background prefetch thread, for datasets that do not fit in device
memory (ImageNet through ``tfds.data_source``).

A :class:`StreamingLoader` wraps any random-access source (``len(src)``, ``src[i] ->
{"image", "label"}``, optionally ``src.__getitems__(ids)``): a ``tfds.data_source``
(:func:`nc_jax.data.sources.tfds_source`) or an :class:`~nc_jax.data.sources.ArraySource`.

Per epoch:

* the index plan is the device path's :func:`~nc_jax.data.batching.epoch_indices` (plain or
  stratified; same seed → same plan as the device pipeline) when shuffling, otherwise the
  examples in order; with ``drop_remainder=False`` the last batch is padded (mask False,
  zero image, label -1);
* every example is decoded and augmented on the host (:func:`~nc_jax.data.augment.host_augment`)
  with its own numpy generator seeded by ``(seed, epoch, index)``, so the batches do not
  depend on threads, prefetching or the process split;
* each process takes its contiguous slice of every global batch (``process_index``,
  ``process_count``; defaults from JAX), as multi-host ``jax.make_array_from_process_local_data``
  expects.

:meth:`StreamingLoader.epoch` returns a :class:`PrefetchIterator`: a daemon thread fills a
bounded queue of ``prefetch`` batches; ``close()`` (also on ``with`` exit, on exhaustion and on
garbage collection) stops and joins the thread. :meth:`StreamingLoader.epoch_sync` is the same
stream without a thread.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from nc_jax.data.augment import AugmentSpec, host_augment, normalise_np
from nc_jax.data.batching import _check_batch_size, epoch_indices, eval_indices, shuffle_indices
from nc_jax.data.sources import fetch


class Batch(NamedTuple):
  """One host batch: images (B, h, w, C) float32 normalised (or uint8 if the loader's
  ``output_dtype`` is uint8), labels (B,) int32 (-1 where padded), mask (B,) bool."""
  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray


_END = object()



class _Error:

  def __init__(self, exc: BaseException):
    self.exc = exc


def _produce(q: queue.Queue, stop: threading.Event, make_batch, plan) -> None:
  """Producer loop (a plain function, so the thread holds no reference to the iterator and a
  dropped iterator can still be garbage-collected and closed)."""

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  try:
    for row in plan:
      if stop.is_set() or not put(make_batch(*row)):
        return
    put(_END)
  except BaseException as exc:  # noqa: BLE001 -- handed to the consumer
    put(_Error(exc))


class PrefetchIterator:
  """Iterator over one epoch's batches, produced by a background thread into a bounded
  queue. ``close()`` stops and joins it; safe to call more than once."""

  def __init__(self, make_batch, plan: list, prefetch: int, pool):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._pool = pool
    self._done = False
    self._thread = threading.Thread(target=_produce,
                                    args=(self._queue, self._stop, make_batch, plan),
                                    daemon=True, name="nc_jax-prefetch")
    self._thread.start()

  @property
  def thread(self) -> threading.Thread:
    return self._thread

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          self.close()
          raise StopIteration from None
    if item is _END:
      self.close()
      raise StopIteration
    if isinstance(item, _Error):
      self.close()
      raise item.exc
    return item

  def close(self) -> None:
    self._done = True
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout=10.0)
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

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


class StreamingLoader:
  """Host-side batches from a random-access source.

  Args:
    source: random-access source (see the module docstring).
    spec: augmentation (e.g. ``get_dataset_info("imagenet2012").spec(train)``).
    batch_size: global batch size (all processes together); must be divisible by
      ``process_count``.
    train: random augmentation.
    seed: seeds the epoch plans (``jax.random.key(seed)`` folded with the epoch) and the
      per-example augmentation.
    shuffle: new random order each epoch (default: ``train``).
    stratified: stratified plans (needs ``labels``, and ``batch_size >= K``).
    labels: (N,) labels of the whole source, for ``stratified``.
    num_classes: K (default ``max(labels) + 1``).
    drop_remainder: drop the last partial batch (default: ``shuffle``); otherwise it is padded.
      Shuffled plans always drop it.
    process_index, process_count: multi-host split (defaults: ``jax.process_index()``,
      ``jax.process_count()``).
    prefetch: queue size of :meth:`epoch` (batches ready ahead).
    num_threads: worker threads decoding and augmenting examples (0: in the prefetch thread).
    output_dtype: ``"float32"`` (normalised) or ``"uint8"`` (augmented, not normalised; then
      normalise on device with :func:`nc_jax.data.augment.normalise`, which moves 4× fewer bytes).

  Raises:
    ValueError: bad batch size, process split, dtype, or stratified without labels.
  """

  def __init__(self, source: Any, spec: AugmentSpec, *, batch_size: int, train: bool,
               seed: int = 0, shuffle: bool | None = None, stratified: bool = False,
               labels: Any = None, num_classes: int | None = None,
               drop_remainder: bool | None = None, process_index: int | None = None,
               process_count: int | None = None, prefetch: int = 2, num_threads: int = 4,
               output_dtype: str = "float32"):
    self.source, self.spec, self.train = source, spec, bool(train)
    self.batch_size = _check_batch_size(batch_size)
    self.seed = int(seed)
    self.shuffle = self.train if shuffle is None else bool(shuffle)
    self.drop_remainder = self.shuffle if drop_remainder is None else bool(drop_remainder)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if self.process_count <= 0 or not 0 <= self.process_index < self.process_count:
      raise ValueError(f"StreamingLoader: need 0 <= process_index < process_count, got "
                       f"{self.process_index}, {self.process_count}")
    if self.batch_size % self.process_count:
      raise ValueError(f"StreamingLoader: batch_size {self.batch_size} is not divisible by "
                       f"process_count {self.process_count}")
    self.local_batch_size = self.batch_size // self.process_count
    if output_dtype not in ("float32", "uint8"):
      raise ValueError(f"StreamingLoader: output_dtype must be 'float32' or 'uint8', got "
                       f"{output_dtype!r}")
    self.output_dtype = output_dtype
    if prefetch < 1:
      raise ValueError(f"StreamingLoader: prefetch must be >= 1, got {prefetch}")
    self.prefetch, self.num_threads = int(prefetch), max(0, int(num_threads))
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError("StreamingLoader: the source is empty")
    self.stratified = bool(stratified)
    if self.stratified:
      if labels is None:
        raise ValueError("StreamingLoader: stratified=True needs labels= for the whole source")
      labels = np.asarray(labels).astype(np.int32)
      if labels.shape != (self.num_examples,):
        raise ValueError(f"StreamingLoader: labels must have shape ({self.num_examples},), got "
                         f"{labels.shape}")
      if not self.shuffle:
        raise ValueError("StreamingLoader: stratified=True needs shuffle=True")
      if labels.min() < 0:
        raise ValueError("StreamingLoader: labels must be non-negative")
      num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
      if labels.max() >= num_classes:
        raise ValueError(f"StreamingLoader: labels must lie in [0, {num_classes})")
    self.labels = labels
    self.num_classes = num_classes
    self._shape = None
    if self.shuffle or self.drop_remainder:
      if self.num_examples < self.batch_size:
        raise ValueError(f"StreamingLoader: batch_size {self.batch_size} is larger than the "
                         f"dataset ({self.num_examples} examples)")
    if self.stratified:  # validate (B >= K etc.) now rather than in the first epoch
      self._plan(0)

  def __len__(self) -> int:
    """Batches per epoch."""
    n, b = self.num_examples, self.batch_size
    return n // b if (self.shuffle or self.drop_remainder) else -(-n // b)

  def _plan(self, epoch: int) -> np.ndarray:
    """Global (num_batches, batch_size) indices, -1 for padding."""
    n, b = self.num_examples, self.batch_size
    if self.shuffle:
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

  def _local(self, plan: np.ndarray) -> np.ndarray:
    lb = self.local_batch_size
    return plan[:, self.process_index * lb:(self.process_index + 1) * lb]

  def _example(self, epoch: int, index: int, record) -> tuple[np.ndarray, int]:
    image = np.asarray(record["image"])
    rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
    return host_augment(image, rng, self.spec, self.train), int(record["label"])

  def _example_shape(self, epoch: int) -> tuple[int, ...]:
    """Output shape of one example (for a process's slice that is all padding)."""
    if self._shape is None:
      self._shape = self._example(epoch, 0, fetch(self.source, [0])[0])[0].shape
    return self._shape

  def _batch(self, epoch: int, ids: np.ndarray, pool) -> Batch:
    mask = ids >= 0
    valid = [int(i) for i in ids[mask]]
    records = fetch(self.source, valid)
    jobs = list(zip(valid, records))
    if pool is not None:
      done = list(pool.map(lambda job: self._example(epoch, *job), jobs))
    else:
      done = [self._example(epoch, *job) for job in jobs]
    shape = done[0][0].shape if done else self._example_shape(epoch)
    images = np.zeros((len(ids),) + shape, np.uint8)
    labels = np.full(len(ids), -1, np.int32)
    pos = np.flatnonzero(mask)
    for p, (img, lab) in zip(pos, done):
      if img.shape != shape:
        raise ValueError(f"StreamingLoader: augmented images differ in shape ({img.shape} vs "
                         f"{shape}); set crop_size in the spec")
      images[p], labels[p] = img, lab
    if self.output_dtype == "float32":
      images = normalise_np(images, self.spec)
    return Batch(images, labels, mask)

  def epoch_sync(self, epoch: int, start: int = 0) -> Iterator[Batch]:
    """This process's batches of ``epoch`` from batch ``start`` on, computed in the calling
    thread."""
    plan = self._local(self._plan(epoch))[start:]
    pool = (concurrent.futures.ThreadPoolExecutor(self.num_threads)
            if self.num_threads > 0 else None)
    try:
      for ids in plan:
        yield self._batch(epoch, ids, pool)
    finally:
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)

  def epoch(self, epoch: int, start: int = 0) -> PrefetchIterator:
    """This process's batches of ``epoch`` from batch ``start`` on (to resume mid-epoch),
    prefetched by a background thread. Use as a context manager or call ``close()`` when
    stopping early."""
    plan = self._local(self._plan(epoch))[start:]
    pool = (concurrent.futures.ThreadPoolExecutor(self.num_threads)
            if self.num_threads > 0 else None)
    rows = [(epoch, ids, pool) for ids in plan]
    return PrefetchIterator(self._batch, rows, self.prefetch, pool)

"""Device-resident epochs: uint8 images on device, per-epoch index plans, batches gathered and
augmented inside ``jit``.

Typical use (``info.pipeline == "device"``)::

  images, labels, info = load_split("cifar10", "train", source="tfds")
  images, labels = put_on_device(images, labels)               # uint8 stays uint8
  K = info.num_classes
  for epoch in range(epochs):
    idx = epoch_indices(jax.random.fold_in(data_key, epoch), labels, 256,
                        stratified=True, num_classes=K)        # (num_batches, 256)
    for step in range(idx.shape[0]):
      x, y = make_batch(images, labels, idx[step], jax.random.fold_in(aug_key, ...),
                        info.train_spec, True)                  # usually inside the train step

Epoch plans (:func:`epoch_indices`) have a fixed shape ``(N // B, B)``: every batch is full, so
one compiled train step serves the whole run.

* **Plain shuffle** drops the ``N mod B`` samples left over by a fresh random permutation
  (``drop_last``); different samples are left out each epoch. (The official loaders keep a
  smaller last batch; a second batch shape would cost a recompile, so we drop it.)
* **Stratified** (the implicit method, docs/method.md §7/§10.3): like sklearn's
  ``StratifiedKFold(n_splits=N // B, shuffle=True)`` with one fold per batch, every batch
  contains class k about ``B·n_k/N`` times. Construction: classes are shuffled internally,
  each sample gets the position ``u = (r·K + π_k + ½)/(K·n_k)`` (r its random rank within
  its class of size n_k, π a random class order), all samples are sorted by u and cut into
  consecutive batches of B. Any run of consecutive positions then holds ⌊Δ·n_k⌋ or ⌈Δ·n_k⌉
  of class k for a common Δ ≈ B/N, so with balanced classes each batch has ⌊B/K⌋ or ⌈B/K⌉
  of every class, and unbalanced classes are represented in proportion to their size (within
  about one of B·n_k/N); a class with fewer than N//B samples cannot be in every batch. (The
  balanced case is exact while n_k·K < 2^24, e.g. ImageNet's 1.3M; beyond that float32 ties
  can move one sample across a batch boundary.) The ``N - (N//B)·B``
  leftover samples are the last in u order, i.e. drawn from every class in proportion, and
  change each epoch. Batch order is shuffled. Official code: folds of B or B+1 (MNIST: 234
  batches of 256–257); we use exactly B and drop the remainder (MNIST: 96 samples an epoch).

Padding: in :func:`make_batch` an index < 0 marks a padded slot (zero image, label -1); see
:func:`eval_indices`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.data.augment import AugmentSpec, augment_batch, check_device_size


def _check_batch_size(batch_size) -> int:
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
  return int(batch_size)


def num_batches(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch, ``num_examples // batch_size``.

  Raises:
    ValueError: ``batch_size <= 0`` or larger than the dataset.
  """
  batch_size = _check_batch_size(batch_size)
  if num_examples < batch_size:
    raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_examples} "
                     "examples)")
  return num_examples // batch_size


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def shuffle_indices(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """Plain shuffle: a random permutation cut into ``num_examples // batch_size`` full
  batches (int32, (num_batches, batch_size)); the remainder is dropped."""
  s = num_batches(num_examples, batch_size)
  return _shuffle_core(key, int(num_examples), s, batch_size)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _shuffle_core(key, n, s, b):
  perm = jax.random.permutation(key, n)
  return perm[:s * b].reshape(s, b).astype(jnp.int32)


def epoch_indices(key: jax.Array, labels: jax.Array, batch_size: int, stratified: bool = False,
                  *, num_classes: int | None = None) -> jax.Array:
  """One epoch's index plan, (num_batches, batch_size) int32 with num_batches = N // B.

  Pure and jit-able (``batch_size``, ``stratified`` and ``num_classes`` static; the sorting
  core is compiled once per shape); the same key gives the same plan. Use a new key each epoch, e.g. ``jax.random.fold_in(key, epoch)``.
  Every sample appears at most once; see the module docstring for how the remainder is
  dropped and how stratification works.

  Args:
    key: PRNG key.
    labels: (N,) integer labels in [0, K).
    batch_size: B > 0, at most N.
    stratified: stratified batches (needs B >= K).
    num_classes: K; required when ``stratified`` and ``labels`` is traced (under ``jit``);
      otherwise inferred as ``max(labels) + 1``.

  Raises:
    ValueError: ``batch_size <= 0`` or > N, ``stratified`` with B < K, labels not 1-D,
      labels outside [0, K) (checked when concrete), K unknown under ``jit``.
  """
  batch_size = _check_batch_size(batch_size)
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"epoch_indices: labels must be a 1-D integer array, got "
                     f"{labels.dtype} {tuple(labels.shape)}")
  n = labels.shape[0]
  s = num_batches(n, batch_size)
  if not stratified:
    return shuffle_indices(key, n, batch_size)

  concrete = _is_concrete(labels)
  if num_classes is None:
    if not concrete:
      raise ValueError("epoch_indices: pass num_classes= when labels are traced (under jit)")
    num_classes = int(jnp.max(labels)) + 1
  k = int(num_classes)
  if k < 1:
    raise ValueError(f"epoch_indices: num_classes must be positive, got {num_classes}")
  if concrete and (int(jnp.min(labels)) < 0 or int(jnp.max(labels)) >= k):
    raise ValueError(f"epoch_indices: labels must lie in [0, {k}), got range "
                     f"[{int(jnp.min(labels))}, {int(jnp.max(labels))}]")
  if batch_size < k:
    raise ValueError(f"epoch_indices: stratified batches need batch_size >= num_classes so "
                     f"that every class can be in every batch; got batch_size={batch_size} < "
                     f"K={k}")
  return _stratified_core(key, labels.astype(jnp.int32), s, batch_size, k)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _stratified_core(key, labels, s, batch_size, k):
  n = labels.shape[0]
  k_perm, k_cls, k_order = jax.random.split(key, 3)
  # Random order within each class: shuffle, then stable sort by label.
  perm = jax.random.permutation(k_perm, n)
  lab_p = labels[perm]
  by_class = jnp.argsort(lab_p, stable=True)
  idx_sorted = perm[by_class]
  lab_sorted = lab_p[by_class]
  counts = jnp.bincount(labels, length=k)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(n, dtype=jnp.int32) - starts[lab_sorted]
  cls_pos = jax.random.permutation(k_cls, k).astype(jnp.int32)
  # u = (r·K + π_k + ½)/(K·n_k); numerator and denominator are exact in float32 while
  # n_k·K < 2^24, so equal-size classes interleave exactly (round robin in the order π).
  num = (rank * k + cls_pos[lab_sorted]).astype(jnp.float32) + 0.5
  den = (k * counts[lab_sorted]).astype(jnp.float32)
  order = jnp.argsort(num / den, stable=True)
  plan = idx_sorted[order][:s * batch_size].reshape(s, batch_size)
  plan = plan[jax.random.permutation(k_order, s)]
  return plan.astype(jnp.int32)


def eval_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Every example exactly once, in order: (ceil(N/B), B) int32 indices padded with -1, and
  the matching boolean mask. :func:`make_batch` turns -1 into a zero image with label -1."""
  batch_size = _check_batch_size(batch_size)
  if num_examples <= 0:
    raise ValueError(f"eval_indices: num_examples must be positive, got {num_examples}")
  s = -(-num_examples // batch_size)
  idx = np.full(s * batch_size, -1, np.int32)
  idx[:num_examples] = np.arange(num_examples, dtype=np.int32)
  idx = idx.reshape(s, batch_size)
  return idx, idx >= 0


def make_batch(images_u8: jax.Array, labels: jax.Array, idx: jax.Array, key: jax.Array | None,
               spec: AugmentSpec, train: bool) -> tuple[jax.Array, jax.Array]:
  """Gathers ``idx`` from device-resident uint8 images and augments them.

  Pure ``jax.numpy``, compiled per (spec, train, shapes); call it directly or inside a jitted
  train step (``spec`` and ``train`` must then be static). Works on a batch sharded over a
  mesh (e.g. images replicated, ``idx`` and the outputs sharded along the batch). Per-sample randomness comes from ``key`` (ignored when ``train`` is
  False). Indices < 0 are padding: zero image (before normalisation), label -1.

  Args:
    images_u8: (N, H, W, C) uint8 (``info.device_shape``).
    labels: (N,) integer labels.
    idx: (B,) integer indices.
    key: PRNG key for the augmentation.
    spec: the registry's ``train_spec`` or ``eval_spec``.
    train: apply the random ops.

  Returns:
    float32 images (B, h, w, spec.channels), normalised; int32 labels (B,).
  """
  if images_u8.ndim != 4:
    raise ValueError(f"make_batch: images must be (N, H, W, C), got {tuple(images_u8.shape)}")
  idx = jnp.asarray(idx)
  if idx.ndim != 1:
    raise ValueError(f"make_batch: idx must be 1-D (one batch), got shape {tuple(idx.shape)}")
  if train and key is None:
    raise ValueError("make_batch: train=True needs a PRNG key")
  check_device_size("make_batch", images_u8.shape, spec)
  return _make_batch_core(images_u8, labels, idx, key, spec, bool(train))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _make_batch_core(images_u8, labels, idx, key, spec, train):
  valid = idx >= 0
  safe = jnp.where(valid, idx, 0)
  x = jnp.take(images_u8, safe, axis=0)
  x = jnp.where(valid[:, None, None, None], x, jnp.zeros((), x.dtype))
  y = jnp.where(valid, jnp.take(labels, safe, axis=0).astype(jnp.int32), -1)
  return augment_batch(key, x, spec, train), y


def put_on_device(images: np.ndarray, labels: np.ndarray,
                  sharding: jax.sharding.Sharding | None = None) -> tuple[jax.Array, jax.Array]:
  """Moves a preprocessed split to device as uint8 images and int32 labels (replicated over
  ``sharding``'s devices if given, e.g. ``NamedSharding(mesh, P())``)."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.dtype != np.uint8:
    raise ValueError(f"put_on_device: images must be uint8, got {images.dtype}")
  labels = labels.astype(np.int32)
  if sharding is None:
    return jax.device_put(images), jax.device_put(labels)
  return jax.device_put(images, sharding), jax.device_put(labels, sharding)

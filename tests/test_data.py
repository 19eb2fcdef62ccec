"""Tests of nc_jax.data: registry, readers, augmentation, epoch plans, streaming
(docs/method.md §10.3).

tfds tests need the ``data`` extra (tensorflow-datasets, array-record) and are skipped without
it; they use ``tfds.testing.mock_data`` (no TensorFlow, no network). A Pillow comparison of
the resize is skipped without Pillow.
"""

from __future__ import annotations

import functools
import gzip
import struct
import threading
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nc_jax import data
from nc_jax.data import augment as aug

# ---------------------------------------------------------------------------
# Registry


def test_registry_entries():
  names = data.dataset_names()
  for n in ("mnist", "fashion_mnist", "cifar10", "cifar100", "stl10", "svhn", "imagenet2012",
            "synthetic"):
    assert n in names
  k = {n: data.get_dataset_info(n).num_classes for n in names}
  assert k == {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10,
               "svhn": 10, "imagenet2012": 1000, "synthetic": 10}
  mnist = data.get_dataset_info("mnist")
  assert (mnist.source_shape, mnist.device_shape, mnist.input_shape) == (
      (28, 28, 1), (32, 32, 1), (32, 32, 3))
  assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
  assert mnist.train_spec.rotation_degrees == 25 and not mnist.train_spec.flip
  assert mnist.train_spec.crop_padding == 0 and mnist.train_spec.resize_shorter == 32
  assert data.get_dataset_info("fashion_mnist").mean == (0.2860,)
  assert data.get_dataset_info("fashion_mnist").std == (0.3530,)
  assert "NOT from the paper" in data.get_dataset_info("fashion_mnist").notes
  assert "NOT from the paper" in data.get_dataset_info("svhn").notes
  c10 = data.get_dataset_info("cifar10")
  assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
  assert (c10.train_spec.flip, c10.train_spec.crop_padding, c10.train_spec.crop_size) == (
      True, 4, 32)
  assert data.get_dataset_info("cifar100").std == (0.2673, 0.2564, 0.2762)
  stl = data.get_dataset_info("stl10")
  assert stl.input_shape == (96, 96, 3) and stl.train_spec.crop_size == 96
  assert stl.num_examples["train"] == 5000 and stl.num_examples["test"] == 8000
  inet = data.get_dataset_info("imagenet2012")
  assert inet.pipeline == "stream" and inet.input_shape == (224, 224, 3)
  ts = inet.train_spec
  assert (ts.resize_shorter, ts.flip, ts.crop_size, ts.crop_padding) == (256, True, 224, 4)
  assert inet.eval_spec.resize_shorter == 256 and inet.eval_spec.crop_size == 224
  assert inet.tfds_split("test") == "validation"
  assert data.get_dataset_info("svhn").tfds_name == "svhn_cropped"
  assert data.get_dataset_info("cifar10").tfds_split("train[:10%]") == "train[:10%]"
  for n in names:  # eval specs have no randomness, same normalisation
    info = data.get_dataset_info(n)
    e = info.eval_spec
    assert not e.flip and e.crop_padding == 0 and e.rotation_degrees == 0
    assert e.mean == info.train_spec.mean and e.std == info.train_spec.std
    hash(e), hash(info.train_spec)  # static jit arguments


def test_registry_aliases_and_errors():
  assert data.get_dataset_info("CIFAR10").name == "cifar10"
  assert data.get_dataset_info("Fashion-MNIST").name == "fashion_mnist"
  assert data.get_dataset_info("imagenet").name == "imagenet2012"
  with pytest.raises(ValueError, match="unknown dataset 'tinyimagenet'; valid names: mnist, .*cifar10.*synthetic"):
    data.get_dataset_info("tinyimagenet")
  with pytest.raises(ValueError, match="string"):
    data.get_dataset_info(10)
  info = data.synthetic_info(7, (16, 16, 1))
  assert info.num_classes == 7 and info.input_shape == (16, 16, 3)
  with pytest.raises(ValueError):
    data.synthetic_info(1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), "length"),
    (dict(mean=(0.5,), std=(0.0,)), "positive"),
    (dict(mean=(0.5,), std=(0.2,), crop_padding=-1), "crop_padding"),
    (dict(mean=(0.5,), std=(0.2,), rotation_interpolation="cubic"), "interpolation"),
    (dict(mean=(0.5,), std=(0.2,), channels=2), "channels"),
])
def test_augment_spec_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.AugmentSpec(**kwargs)


# ---------------------------------------------------------------------------
# IDX, npz, synthetic


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
  dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
  head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  return head + np.ascontiguousarray(arr.astype(dt)).tobytes()


def _write_idx_dir(directory, n_train=12, n_test=5, gz=False, dot=False, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    sep = "." if dot else "-"
    for stem, arr in ((f"{prefix}-images{sep}idx3-ubyte", x), (f"{prefix}-labels{sep}idx1-ubyte", y)):
      raw = _idx_bytes(arr)
      if gz:
        (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
      else:
        (directory / stem).write_bytes(raw)
    out[split] = (x, y)
  return out


@pytest.mark.parametrize("gz, dot", [(False, False), (True, False), (False, True)])
def test_idx_reader(tmp_path, gz, dot):
  ref = _write_idx_dir(tmp_path, gz=gz, dot=dot)
  for split in ("train", "test"):
    x, y = data.load_idx(tmp_path, split)
    assert x.dtype == np.uint8 and x.shape == ref[split][0].shape + (1,)
    assert y.dtype == np.int32 and y.shape == (len(ref[split][1]),)
    np.testing.assert_array_equal(x[..., 0], ref[split][0])
    np.testing.assert_array_equal(y, ref[split][1])


def test_idx_other_dtypes_and_errors(tmp_path):
  a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
  (tmp_path / "a.idx").write_bytes(_idx_bytes(a, 0x0C))
  np.testing.assert_array_equal(data.read_idx(tmp_path / "a.idx"), a)
  f = np.linspace(-1, 1, 6, dtype=np.float32)
  (tmp_path / "f.idx").write_bytes(gzip.compress(_idx_bytes(f, 0x0D)))
  np.testing.assert_array_equal(data.read_idx(tmp_path / "f.idx"), f)
  (tmp_path / "bad.idx").write_bytes(b"\x08\x03\x00\x00" + bytes(16))
  with pytest.raises(ValueError, match="magic number"):
    data.read_idx(tmp_path / "bad.idx")
  (tmp_path / "short.idx").write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
  with pytest.raises(ValueError, match="holds 5 data bytes"):
    data.read_idx(tmp_path / "short.idx")
  with pytest.raises(data.DataNotFoundError, match="nope.idx"):
    data.read_idx(tmp_path / "nope.idx")
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
    data.load_idx(tmp_path, "test")
  with pytest.raises(ValueError, match="split"):
    data.load_idx(tmp_path, "val")


def test_load_split_idx_resizes_mnist(tmp_path):
  ref = _write_idx_dir(tmp_path, gz=True)
  x, y, info = data.load_split("mnist", "train", source="idx", path=tmp_path)
  assert info.name == "mnist" and x.shape == (12, 32, 32, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(y, ref["train"][1])
  np.testing.assert_array_equal(x, data.resize_bilinear(ref["train"][0][..., None], 32, 32))
  with pytest.raises(ValueError, match="needs path"):
    data.load_split("mnist", source="idx")
  with pytest.raises(ValueError, match="unknown source"):
    data.load_split("mnist", source="hdf5", path=tmp_path)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_split("mnsit", source="idx", path=tmp_path)


def test_npz_reader(tmp_path):
  rng = np.random.default_rng(1)
  xtr = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
  ytr = rng.integers(0, 10, (9, 1))  # Keras CIFAR layout (N, 1)
  xte = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
  yte = rng.integers(0, 10, 4).astype(np.uint8)
  np.savez(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
  x, y = data.load_npz(tmp_path / "d.npz", "train")
  np.testing.assert_array_equal(x, xtr)
  np.testing.assert_array_equal(y, ytr[:, 0])
  assert y.dtype == np.int32
  x, y = data.load_npz(tmp_path / "d.npz", "test")
  assert x.shape == (4, 28, 28, 1)
  x, y, _ = data.load_split("cifar10", "train", source="npz", path=tmp_path / "d.npz")
  assert x.shape == (9, 32, 32, 3)
  np.savez(tmp_path / "m.npz", x_train=xtr)
  with pytest.raises(ValueError, match=r"missing arrays \['y_train'\]"):
    data.load_npz(tmp_path / "m.npz")
  np.savez(tmp_path / "f.npz", x_train=xtr / 255.0, y_train=ytr)
  with pytest.raises(ValueError, match="uint8"):
    data.load_npz(tmp_path / "f.npz")
  with pytest.raises(data.DataNotFoundError, match="missing.npz"):
    data.load_npz(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="labels must lie"):
    np.savez(tmp_path / "l.npz", x_train=xtr, y_train=ytr + 10)
    data.load_split("cifar10", "train", source="npz", path=tmp_path / "l.npz")
  with pytest.raises(ValueError, match="expected 1-channel images"):
    data.load_split("mnist", "train", source="npz", path=tmp_path / "d.npz")
  np.savez(tmp_path / "s.npz", x_train=xte[:, :20, :20], y_train=yte)
  with pytest.raises(ValueError, match="expected images of shape"):
    data.load_split("mnist", "train", source="npz", path=tmp_path / "s.npz")


def test_synthetic():
  x1, y1 = data.make_synthetic(200, 5, (16, 16, 3), seed=3)
  x2, y2 = data.make_synthetic(200, 5, (16, 16, 3), seed=3)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  x3, _ = data.make_synthetic(200, 5, (16, 16, 3), seed=4)
  assert not np.array_equal(x1, x3)
  assert x1.dtype == np.uint8 and x1.shape == (200, 16, 16, 3) and y1.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y1), [40] * 5)
  # Class dependent, shared between splits: nearest train class mean classifies test data.
  xt, yt = data.make_synthetic(100, 5, (16, 16, 3), seed=3, split="test")
  assert not np.array_equal(xt[:10], x1[:10])
  means = np.stack([x1[y1 == k].reshape(-1, 768).mean(0) for k in range(5)])
  dist = ((xt.reshape(100, 1, -1).astype(float) - means[None]) ** 2).sum(-1)
  assert (dist.argmin(1) == yt).mean() > 0.95
  x, y, info = data.load_split(data.synthetic_info(4, (8, 8, 1)), "train", source="synthetic",
                               num_examples=10)
  assert x.shape == (10, 8, 8, 1) and y.max() < 4
  with pytest.raises(ValueError, match="num_examples"):
    data.make_synthetic(0)


# ---------------------------------------------------------------------------
# tfds (mock data; no TensorFlow, no network)


def _tfds():
  return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name, shape, dev_shape", [
    ("mnist", (28, 28, 1), (32, 32, 1)), ("cifar10", (32, 32, 3), (32, 32, 3)),
    ("cifar100", (32, 32, 3), (32, 32, 3)), ("svhn", (32, 32, 3), (32, 32, 3))])
def test_tfds_mock(name, shape, dev_shape):
  tfds = _tfds()
  info = data.get_dataset_info(name)
  with tfds.testing.mock_data(num_examples=13, policy=tfds.testing.MockPolicy.USE_CODE):
    x, y = data.load_tfds(name, "train")
    assert x.shape == (13,) + shape and x.dtype == np.uint8
    assert y.shape == (13,) and y.dtype == np.int32
    assert y.min() >= 0 and y.max() < info.num_classes
    src = data.tfds_source(name, "test")
    np.testing.assert_array_equal(np.asarray(src[0]["image"]).shape, shape)
    x2, y2, _ = data.load_split(name, "train", source="tfds")
    assert x2.shape == (13,) + dev_shape
    np.testing.assert_array_equal(y2, y)


def test_tfds_mock_imagenet_streaming():
  tfds = _tfds()
  info = data.get_dataset_info("imagenet2012")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    src = data.tfds_source("imagenet2012", "test")  # tfds 'validation'
    assert len({np.asarray(src[i]["image"]).shape for i in range(6)}) > 1  # sizes vary
    loader = data.GrainLoader(src, info.train_spec, batch_size=4, train=True, seed=0,
                              num_threads=2)
    with loader.epoch(0) as it:
      batches = list(it)
    _same(list(loader.batches(0)), batches)
  assert len(batches) == 1
  assert batches[0].images.shape == (4, 224, 224, 3) and batches[0].images.dtype == np.float32
  assert batches[0].mask.all()


def _prepare_fake_mnist(data_dir, n_train=12, n_test=5):
  """Writes a real, prepared array_record 'mnist' (3.0.1, PNG-encoded images) under
  ``data_dir`` without TensorFlow: images are encoded by Pillow, records by tfds."""
  tfds = _tfds()
  Image = pytest.importorskip("PIL.Image")
  import io
  rng = np.random.default_rng(0)
  splits = {s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
            for s, n in (("train", n_train), ("test", n_test))}

  def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    buf.seek(0)
    return buf

  class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("3.0.1")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(28, 28, 1)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split):
      x, y = splits[split]
      for i in range(len(y)):
        yield i, {"image": png(x[i]), "label": int(y[i])}

  Mnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return splits


def test_tfds_prepared_array_record(tmp_path):
  """The real path: prepared array_record files, decoded through tfds.data_source."""
  splits = _prepare_fake_mnist(tmp_path)
  for split in ("train", "test"):
    x, y = data.load_tfds("mnist", split, data_dir=tmp_path)
    ref_x, ref_y = splits[split]
    assert x.shape == ref_x.shape + (1,) and x.dtype == np.uint8 and y.dtype == np.int32
    # tfds shuffles records on write: compare as a set of (image, label) pairs
    got = sorted((xi.tobytes(), int(yi)) for xi, yi in zip(x[..., 0], y))
    ref = sorted((xi.tobytes(), int(yi)) for xi, yi in zip(ref_x, ref_y))
    assert got == ref
  x, y, info = data.load_split("mnist", "train", source="tfds", data_dir=tmp_path)
  assert x.shape == (12, 32, 32, 1)
  src = data.tfds_source("mnist", "train", data_dir=tmp_path)
  loader = data.GrainLoader(src, info.eval_spec, batch_size=5, train=False, num_threads=2)
  with loader.epoch(0) as it:
    batches = list(it)
  assert len(batches) == 3 and batches[0].images.shape == (5, 32, 32, 3)  # Resize(32) on host
  assert batches[-1].mask.sum() == 2
  # the host path's Resize(32) + normalisation equals load-time resize + device path
  dev_x, _ = data.make_batch(jnp.asarray(x), jnp.asarray(y), jnp.arange(5), None,
                             info.eval_spec, False)
  np.testing.assert_allclose(batches[0].images, dev_x, atol=1.5 / 255 / 0.3081)
  with pytest.raises(ValueError, match="(?i)unknown split") as err:  # a real error, passed on
    data.tfds_source("mnist", "validation", data_dir=tmp_path)
  assert not isinstance(err.value, data.DataNotFoundError)


def test_tfds_unprepared_fails_fast(tmp_path, monkeypatch):
  tfds = _tfds()

  def no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  t0 = time.perf_counter()
  with pytest.raises(data.DataNotFoundError) as err:
    data.load_tfds("mnist", "train", data_dir=tmp_path)
  assert time.perf_counter() - t0 < 5.0
  msg = str(err.value)
  assert "tfds build mnist --file_format=array_record" in msg
  assert str(tmp_path) in msg and "never downloads" in msg
  assert isinstance(err.value, ValueError)
  with pytest.raises(data.DataNotFoundError, match="manual_dir"):
    data.tfds_source("imagenet2012", "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="no tfds"):
    data.tfds_source("synthetic")


# ---------------------------------------------------------------------------
# Epoch plans


def _balanced_labels(n, k, seed=0):
  return np.random.default_rng(seed).permutation(np.arange(n) % k).astype(np.int32)


def test_epoch_indices_plain_shuffle():
  labels = _balanced_labels(1003, 10)
  key = jax.random.key(0)
  plan = np.asarray(data.epoch_indices(key, labels, 100))
  assert plan.shape == (10, 100) and plan.dtype == np.int32
  assert len(np.unique(plan)) == plan.size and plan.min() >= 0 and plan.max() < 1003
  np.testing.assert_array_equal(plan, np.asarray(data.epoch_indices(key, labels, 100)))
  plan1 = np.asarray(data.epoch_indices(jax.random.fold_in(key, 1), labels, 100))
  assert not np.array_equal(plan, plan1)
  # different samples dropped in different epochs
  assert set(plan.ravel()) != set(plan1.ravel())
  assert data.num_batches(1003, 100) == 10


@pytest.mark.parametrize("n, k, b", [(1000, 10, 64), (3000, 100, 256), (960, 3, 7)])
def test_epoch_indices_stratified_balanced(n, k, b):
  labels = _balanced_labels(n, k, seed=k)
  plans = []
  for epoch in range(3):
    key = jax.random.fold_in(jax.random.key(5), epoch)
    plan = np.asarray(data.epoch_indices(key, labels, b, stratified=True))
    assert plan.shape == (n // b, b)
    assert len(np.unique(plan)) == plan.size
    counts = np.stack([np.bincount(labels[row], minlength=k) for row in plan])
    assert counts.min() == b // k and counts.max() == -(-b // k) or (b % k == 0 and
                                                                    (counts == b // k).all())
    plans.append(plan)
    np.testing.assert_array_equal(
        plan, np.asarray(data.epoch_indices(key, labels, b, stratified=True, num_classes=k)))
  assert not np.array_equal(plans[0], plans[1])


def test_epoch_indices_stratified_remainder_and_imbalance():
  # Balanced 105 per class, B = 100: 10 batches, the 50 leftovers are 5 of each class.
  labels = _balanced_labels(1050, 10, seed=2)
  plan = np.asarray(data.epoch_indices(jax.random.key(1), labels, 100, stratified=True))
  left = np.setdiff1d(np.arange(1050), plan.ravel())
  np.testing.assert_array_equal(np.bincount(labels[left], minlength=10), [5] * 10)
  # Unbalanced: proportional to class size, within 2 of B·n_k/N; the rarest class
  # (n_k >= number of batches) is still in every batch.
  rng = np.random.default_rng(3)
  labels = rng.choice(10, 5000, p=np.arange(1, 11) / 55).astype(np.int32)
  n_k = np.bincount(labels, minlength=10)
  plan = np.asarray(data.epoch_indices(jax.random.key(2), labels, 100, stratified=True))
  counts = np.stack([np.bincount(labels[row], minlength=10) for row in plan])
  assert np.abs(counts - 100 * n_k / 5000).max() < 2
  assert counts.min() >= 1
  assert len(np.unique(plan)) == plan.size


def test_epoch_indices_jit_and_errors():
  labels = jnp.asarray(_balanced_labels(500, 10))
  f = jax.jit(data.epoch_indices, static_argnames=("batch_size", "stratified", "num_classes"))
  key = jax.random.key(4)
  for strat in (False, True):
    np.testing.assert_array_equal(
        f(key, labels, 50, strat, num_classes=10),
        data.epoch_indices(key, labels, 50, strat, num_classes=10))
  with pytest.raises(ValueError, match="num_classes"):
    f(key, labels, 50, True)
  with pytest.raises(ValueError, match="batch_size >= num_classes.*batch_size=8 < K=10"):
    data.epoch_indices(key, labels, 8, stratified=True)
  data.epoch_indices(key, labels, 8, stratified=False)  # fine without stratification
  for bad in (0, -4, 2.5, True):
    with pytest.raises(ValueError, match="batch_size"):
      data.epoch_indices(key, labels, bad)
  with pytest.raises(ValueError, match="larger than the dataset"):
    data.epoch_indices(key, labels, 501)
  with pytest.raises(ValueError, match="lie in"):
    data.epoch_indices(key, labels, 50, stratified=True, num_classes=5)
  with pytest.raises(ValueError, match="1-D integer"):
    data.epoch_indices(key, labels.astype(jnp.float32), 50)


def test_eval_indices():
  idx, mask = data.eval_indices(10, 4)
  assert idx.shape == (3, 4)
  np.testing.assert_array_equal(idx.ravel()[:10], np.arange(10))
  np.testing.assert_array_equal(idx.ravel()[10:], [-1, -1])
  np.testing.assert_array_equal(mask, idx >= 0)


# ---------------------------------------------------------------------------
# Device augmentation


def _distinct_image(b, h, w, c, seed=0):
  """Pixel values 1..255 (no zeros), so zero fill is recognisable."""
  return np.random.default_rng(seed).integers(1, 256, (b, h, w, c)).astype(np.float32)


def _shift(img, dy, dx):
  """img shifted down by dy, right by dx, zero fill."""
  h, w = img.shape[:2]
  out = np.zeros_like(img)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def _which_shift(out, img, pad=4):
  for dy in range(-pad, pad + 1):
    for dx in range(-pad, pad + 1):
      if np.array_equal(out, _shift(img, dy, dx)):
        return dy, dx
  return None


def test_random_flip():
  x = _distinct_image(64, 5, 6, 2)
  out = np.asarray(aug.random_flip(jax.random.key(0), jnp.asarray(x)))
  flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)]
  same = [np.array_equal(o, xi) for o, xi in zip(out, x)]
  assert all(f != s for f, s in zip(flipped, same))
  assert 10 < sum(flipped) < 54


def test_crop_at_and_random_crop():
  x = _distinct_image(2, 8, 8, 3)
  out = np.asarray(aug.crop_at(jnp.asarray(x), jnp.array([[4, 4], [0, 8]]), 4, (8, 8)))
  np.testing.assert_array_equal(out[0], x[0])           # centre offset = identity
  np.testing.assert_array_equal(out[1], _shift(x[1], 4, -4))
  x = _distinct_image(48, 10, 10, 1, seed=1)
  out = np.asarray(aug.random_crop(jax.random.key(1), jnp.asarray(x), 4))
  shifts = [_which_shift(o, xi) for o, xi in zip(out, x)]
  assert None not in shifts
  assert len(set(shifts)) > 15  # per-sample offsets
  with pytest.raises(ValueError, match="larger"):
    aug.random_crop(jax.random.key(0), jnp.asarray(x), 0, 11)


def test_random_crop_covers_all_offsets():
  # 10x10 image of distinct values; pixel (5, 5) stays inside for any shift <= 4, so its
  # position in the output gives the shift. 2000 samples: all 81 shifts appear, none larger.
  img = np.arange(1, 101, dtype=np.float32).reshape(1, 10, 10, 1)
  x = jnp.asarray(np.repeat(img, 2000, axis=0))
  out = np.asarray(aug.random_crop(jax.random.key(11), x, 4))
  pos = np.argwhere(out[..., 0] == 56.0)
  assert pos.shape == (2000, 3)
  shifts = {(int(r) - 5, int(c) - 5) for r, c in pos[:, 1:]}
  assert shifts == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}


def test_random_rotation_angle_range():
  # A bright dot 8 px right of the centre: the centroid of the output gives the angle.
  img = np.zeros((1, 21, 21, 1), np.float32)
  img[0, 10, 18] = 255.0
  x = jnp.asarray(np.repeat(img, 300, axis=0))
  out = np.asarray(aug.random_rotation(jax.random.key(5), x, 25.0, "bilinear"))[..., 0]
  rows, cols = np.mgrid[:21, :21]
  mass = out.sum((1, 2))
  r = (out * rows).sum((1, 2)) / mass
  c = (out * cols).sum((1, 2)) / mass
  ang = np.degrees(np.arctan2(10 - r, c - 10))  # counter-clockwise positive
  assert np.abs(ang).max() <= 25.5
  assert ang.min() < -20 and ang.max() > 20
  out = np.asarray(aug.rotate(x[:1], jnp.array([20.0]), "bilinear"))[0, ..., 0]
  r, c = (out * rows).sum() / out.sum(), (out * cols).sum() / out.sum()
  np.testing.assert_allclose(np.degrees(np.arctan2(10 - r, c - 10)), 20.0, atol=0.5)


def test_rotation():
  x = _distinct_image(3, 9, 9, 2)
  for interp in ("nearest", "bilinear"):
    out = np.asarray(aug.rotate(jnp.asarray(x), jnp.zeros(3), interp))
    np.testing.assert_array_equal(out, x)                 # 0° is the identity
    out = np.asarray(aug.rotate(jnp.asarray(x), jnp.full(3, 90.0), interp))
    np.testing.assert_allclose(out, np.rot90(x, 1, axes=(1, 2)), atol=1e-3)  # counter-clockwise
  # 45°: shape kept, corners come from outside (zero), the centre pixel is kept.
  x = np.full((2, 11, 11, 1), 200.0, np.float32)
  out = np.asarray(aug.rotate(jnp.asarray(x), jnp.array([45.0, -45.0]), "bilinear"))
  assert out.shape == x.shape
  assert (out[:, 0, 0] == 0).all() and (out[:, -1, -1] == 0).all()
  np.testing.assert_allclose(out[:, 5, 5], 200.0, rtol=1e-6)
  x = np.full((2, 9, 13, 1), 200.0, np.float32)  # non-square: shape kept
  assert aug.rotate(jnp.asarray(x), jnp.array([10.0, 30.0])).shape == x.shape
  # Random angles differ per sample; all within ±25°: an image is never rotated by 90°.
  x = _distinct_image(16, 12, 12, 1, seed=2)
  out = np.asarray(aug.random_rotation(jax.random.key(3), jnp.asarray(x), 25.0))
  assert len({o.tobytes() for o in out}) == 16
  assert not any(np.array_equal(o, np.rot90(xi)) for o, xi in zip(out, x))


def _images_u8(n, h, w, c, seed=0):
  return np.random.default_rng(seed).integers(1, 256, (n, h, w, c), dtype=np.uint8)


def test_make_batch_eval_is_normalisation_only():
  info = data.get_dataset_info("mnist")
  imgs, labels = _images_u8(20, 32, 32, 1), _balanced_labels(20, 10)
  idx = jnp.array([3, 1, 4, 1, 5])
  xb, yb = data.make_batch(jnp.asarray(imgs), jnp.asarray(labels), idx, jax.random.key(0),
                           info.eval_spec, False)
  ref = (imgs[[3, 1, 4, 1, 5]].astype(np.float32) / 255 - 0.1307) / 0.3081
  np.testing.assert_allclose(xb, np.repeat(ref, 3, axis=-1), rtol=1e-6, atol=1e-6)
  assert xb.dtype == jnp.float32 and xb.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(yb, labels[[3, 1, 4, 1, 5]])
  xb2, _ = data.make_batch(jnp.asarray(imgs), jnp.asarray(labels), idx, jax.random.key(9),
                           info.train_spec, False)  # train spec, train=False: same
  np.testing.assert_array_equal(xb, xb2)
  # padding: index -1 -> zero image, label -1
  xb, yb = data.make_batch(jnp.asarray(imgs), jnp.asarray(labels), jnp.array([0, -1]), None,
                           info.eval_spec, False)
  np.testing.assert_allclose(xb[1], -0.1307 / 0.3081, rtol=1e-6)
  assert int(yb[1]) == -1 and int(yb[0]) == labels[0]


def test_make_batch_train_per_sample_randomness():
  info = data.get_dataset_info("cifar10")
  imgs = _images_u8(1, 32, 32, 3)
  idx = jnp.zeros(32, jnp.int32)  # the same image 32 times
  xb, _ = data.make_batch(jnp.asarray(imgs), jnp.zeros(1, jnp.int32), idx, jax.random.key(0),
                          info.train_spec, True)
  xb = np.asarray(xb)
  assert len({x.tobytes() for x in xb}) > 16
  # every output is a (maybe flipped) shift of the input by at most 4 px, zero filled
  base = imgs[0].astype(np.float32)
  undo = lambda x: np.rint(((x * np.array(info.std) + np.array(info.mean)) * 255)).astype(
      np.float32)
  for x in xb:
    raw = undo(x)
    assert _which_shift(raw, base) is not None or _which_shift(raw, base[:, ::-1]) is not None
  # MNIST: rotation changes images, 3 identical channels.
  info = data.get_dataset_info("mnist")
  imgs = _images_u8(1, 32, 32, 1)
  xb, _ = data.make_batch(jnp.asarray(imgs), jnp.zeros(1, jnp.int32), idx, jax.random.key(1),
                          info.train_spec, True)
  xb = np.asarray(xb)
  assert xb.shape == (32, 32, 32, 3)
  np.testing.assert_array_equal(xb[..., 0], xb[..., 2])
  assert len({x.tobytes() for x in xb}) > 24  # nearest: tiny angles can give the identity
  with pytest.raises(ValueError, match="key"):
    data.make_batch(jnp.asarray(imgs), jnp.zeros(1, jnp.int32), idx, None, info.train_spec, True)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_make_batch_jit_and_sharded(name):
  info = data.get_dataset_info(name)
  imgs = jnp.asarray(_images_u8(40, *info.device_shape))
  labels = jnp.asarray(_balanced_labels(40, 10))
  idx = jnp.asarray(np.random.default_rng(0).permutation(40)[:32].astype(np.int32))
  key = jax.random.key(7)
  eager = data.make_batch(imgs, labels, idx, key, info.train_spec, True)
  jitted = jax.jit(data.make_batch, static_argnames=("spec", "train"))
  single = jitted(imgs, labels, idx, key, info.train_spec, True)
  np.testing.assert_allclose(single[0], eager[0], rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(single[1], eager[1])
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py should provide 8 CPU devices"
  mesh = Mesh(np.array(devices[:8]), ("data",))
  rep, row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  sharded = jax.jit(functools.partial(data.make_batch, spec=info.train_spec, train=True),
                    in_shardings=(rep, rep, row, rep), out_shardings=(row, row))
  out = sharded(jax.device_put(imgs, rep), jax.device_put(labels, rep),
                jax.device_put(idx, row), key)
  assert out[0].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
  np.testing.assert_allclose(out[0], single[0], rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(out[1], single[1])


# ---------------------------------------------------------------------------
# Host ops


def _ref_upscale(img, oh, ow):
  """Independent bilinear upscale (half-pixel centres, edge clamp, rounding after each
  axis, horizontal first), which is Pillow's BILINEAR when enlarging."""

  def axis(x, n_out, ax):
    n_in = x.shape[ax]
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    t = src - lo
    xm = np.moveaxis(x.astype(np.float64), ax, 0)
    t = t.reshape((-1,) + (1,) * (xm.ndim - 1))
    out = np.clip(np.floor(xm[lo] * (1 - t) + xm[hi] * t + 0.5), 0, 255)
    return np.moveaxis(out, 0, ax)

  return axis(axis(img, ow, 1), oh, 0).astype(np.uint8)


def test_resize_bilinear():
  img = _images_u8(1, 28, 28, 1)[0]
  out = data.resize_bilinear(img, 32, 32)
  assert out.shape == (32, 32, 1) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - _ref_upscale(img, 32, 32).astype(int)).max() <= 1
  batch = _images_u8(3, 28, 28, 1)
  np.testing.assert_array_equal(data.resize_bilinear(batch, 32, 32)[2],
                                data.resize_bilinear(batch[2], 32, 32))
  const = np.full((50, 70, 3), 77, np.uint8)  # downscale keeps constants (normalised taps)
  assert (data.resize_bilinear(const, 21, 33) == 77).all()
  assert aug.shorter_side_size(375, 500, 256) == (256, 341)
  assert aug.shorter_side_size(500, 375, 256) == (341, 256)
  for use_pil in (False, None):
    out = aug.resize_shorter_side(np.zeros((375, 500, 1), np.uint8), 256, use_pil=use_pil)
    assert out.shape == (256, 341, 1)
  with pytest.raises(ValueError, match="uint8"):
    data.resize_bilinear(img.astype(np.float32), 4, 4)


def test_resize_matches_pillow():
  Image = pytest.importorskip("PIL.Image")
  rng = np.random.default_rng(0)
  for h, w, oh, ow in [(28, 28, 32, 32), (120, 90, 64, 48), (40, 60, 17, 80)]:
    x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(x).resize((ow, oh), Image.BILINEAR))
    assert np.abs(data.resize_bilinear(x, oh, ow).astype(int) - ref.astype(int)).max() <= 1
  x = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
  np.testing.assert_array_equal(aug.resize_shorter_side(x, 64, use_pil=True),
                                np.asarray(Image.fromarray(x).resize((85, 64), Image.BILINEAR)))


def test_host_augment():
  info = data.get_dataset_info("imagenet2012")
  img = _images_u8(1, 300, 400, 3)[0]
  a = data.host_augment(img, np.random.default_rng(0), info.train_spec, True)
  b = data.host_augment(img, np.random.default_rng(0), info.train_spec, True)
  assert a.shape == (224, 224, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  ev = data.host_augment(img, None, info.eval_spec, False)
  resized = aug.resize_shorter_side(img, 256)  # same backend as host_augment
  assert resized.shape == (256, 341, 3)
  np.testing.assert_array_equal(ev, resized[16:240, 58:282])
  # CIFAR recipe on the host: flip and shift by <= 4 px, zero fill (like the device op).
  spec = data.get_dataset_info("cifar10").train_spec
  img = _images_u8(1, 32, 32, 3, seed=5)[0]
  rng = np.random.default_rng(1)
  outs = [data.host_augment(img, rng, spec, True) for _ in range(20)]
  for o in outs:
    assert (_which_shift(o, img) is not None) or (_which_shift(o, img[:, ::-1]) is not None)
  assert len({o.tobytes() for o in outs}) > 10
  gray = data.host_augment(_images_u8(1, 32, 32, 1)[0], None, spec, False)
  assert gray.shape == (32, 32, 3)
  with pytest.raises(ValueError, match="resize at load time"):  # device data not resized
    data.make_batch(jnp.zeros((2, 28, 28, 1), jnp.uint8), jnp.zeros(2, jnp.int32),
                    jnp.arange(2), None, data.get_dataset_info("mnist").eval_spec, False)
  with pytest.raises(ValueError, match="device only"):
    data.host_augment(_images_u8(1, 32, 32, 1)[0], rng, data.get_dataset_info("mnist").train_spec,
                      True)


# ---------------------------------------------------------------------------
# Streaming (Grain)


def _grain_threads():
  """Live threads of Grain's read pools (``grain-prefetch_*``) and prefetch iterators."""
  return [t for t in threading.enumerate() if t.name.startswith("grain-") and t.is_alive()]


def _wait_until(predicate, timeout=10.0):
  t0 = time.perf_counter()
  while not predicate() and time.perf_counter() - t0 < timeout:
    time.sleep(0.02)
  return predicate()


def _stream_source(n=70, k=5):
  x, y = data.make_synthetic(n, k, (32, 32, 3), seed=1)
  return data.ArraySource(x, y), x, y


class BrokenSource(data.ArraySource):
  """Record 13 cannot be read (module level: worker processes unpickle it by reference)."""

  def __getitem__(self, i):
    if i == 13:
      raise RuntimeError("corrupt record 13")
    return super().__getitem__(i)

  __getitems__ = None


def _same(b1, b2):
  assert len(b1) == len(b2)
  for a, b in zip(b1, b2):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.index == b.index


def test_streaming_prefetch_equals_sync():
  """Grain's read threads, no threads, a mid-epoch start and the synchronous random-access
  dataset give bitwise the same batches; the plan is the device path's."""
  src, _, _ = _stream_source()
  spec = data.get_dataset_info("cifar10").train_spec
  loader = data.GrainLoader(src, spec, batch_size=16, train=True, seed=3, num_threads=3)
  assert len(loader) == 4
  sync = list(loader.batches(0))
  assert [b.index for b in sync] == [0, 1, 2, 3]
  with loader.epoch(0) as it:
    _same(sync, list(it))
  single = data.GrainLoader(src, spec, batch_size=16, train=True, seed=3, num_threads=0)
  _same(sync, list(single.epoch(0)))  # thread count does not change the data
  _same(sync[2:], list(loader.epoch(0, start=2)))
  assert list(loader.epoch(0, start=4)) == []
  other = list(loader.batches(1))
  assert not np.array_equal(sync[0].images, other[0].images)
  b = sync[0]
  assert b.images.shape == (16, 32, 32, 3) and b.images.dtype == np.float32
  assert b.labels.dtype == np.int32 and b.mask.all()
  seen = np.concatenate([s.labels for s in sync])
  assert len(seen) == 64
  # shuffled plan = the device path's plan for key(seed) folded with the epoch
  plan = np.asarray(data.shuffle_indices(jax.random.fold_in(jax.random.key(3), 0), 70, 16))
  np.testing.assert_array_equal(loader.plan(0), plan)
  np.testing.assert_array_equal(seen, src.labels[plan.ravel()])
  # each example augmented with its own generator, seeded by (seed, epoch, index)
  i = int(plan[1, 5])
  want = aug.normalise_np(data.host_augment(src[i]["image"], np.random.default_rng([3, 0, i]),
                                            spec, True)[None], spec)[0]
  np.testing.assert_array_equal(sync[1].images[5], want)
  assert _wait_until(lambda: not _grain_threads())
  u8 = _images_u8(4, 9, 7, 3, seed=2)
  for name in ("cifar10", "imagenet2012", "mnist"):
    s = data.get_dataset_info(name).eval_spec
    np.testing.assert_array_equal(data.streaming.normalise_in_place(u8, s),
                                  aug.normalise_np(u8, s))  # bitwise


def test_streaming_close_stops_threads():
  src, _, _ = _stream_source(200)
  spec = data.get_dataset_info("cifar10").train_spec
  loader = data.GrainLoader(src, spec, batch_size=10, train=True, num_threads=2, prefetch=2)
  it = loader.epoch(0)
  next(it)
  assert _grain_threads()
  it.close()
  assert _wait_until(lambda: not _grain_threads())
  with pytest.raises(StopIteration):
    next(it)
  it.close()  # idempotent
  with loader.epoch(1) as it2:
    next(it2)
  assert _wait_until(lambda: not _grain_threads())
  it3 = loader.epoch(2)
  next(it3)
  del it3  # dropped without close: garbage collection closes it
  import gc
  gc.collect()
  assert _wait_until(lambda: not _grain_threads())


def test_streaming_errors_propagate():
  x, y = data.make_synthetic(20, 2, (8, 8, 3))
  spec = data.AugmentSpec(mean=(0.5,), std=(0.25,))
  loader = data.GrainLoader(BrokenSource(x, y), spec, batch_size=5, train=False,
                            num_threads=2)
  it = loader.epoch(0)
  with pytest.raises(RuntimeError, match="corrupt record 13"):
    list(it)
  with pytest.raises(StopIteration):  # closed by the error
    next(it)
  assert _wait_until(lambda: not _grain_threads())


def test_streaming_workers_equal_threads_resume_close_and_errors():
  """Grain worker processes: the same batches as threads (whole batches per worker,
  interleaved back in order), the iterator state restored mid-epoch, processes gone after an
  early close, and a worker's error raised here with its own message."""
  import multiprocessing
  src, _, _ = _stream_source(100)
  spec = data.get_dataset_info("cifar10").train_spec
  kw = dict(batch_size=16, train=True, seed=5, num_threads=1)
  sync = list(data.GrainLoader(src, spec, **kw).batches(1))
  loader = data.GrainLoader(src, spec, num_workers=2, **kw)
  it = loader.epoch(1)
  got = [next(it), next(it)]
  state = it.get_state()
  it.close()  # early close: the worker processes end
  assert _wait_until(lambda: not multiprocessing.active_children())
  _same(sync[:2], got)
  assert (state["epoch"], state["batch"], state["num_workers"]) == (1, 2, 2)
  import json
  state = json.loads(json.dumps(state))  # as the checkpoint's JSON gives it back
  with loader.epoch(1, 2, state=state) as rest:
    _same(sync[2:], list(rest))
  # a state saved with other workers: the pipeline starts at the batch (same batches)
  threads = data.GrainLoader(src, spec, **kw)
  _same(sync[2:], list(threads.epoch(1, 2, state=state)))
  assert _wait_until(lambda: not multiprocessing.active_children())
  x, y = data.make_synthetic(20, 2, (8, 8, 3))
  broken = data.GrainLoader(BrokenSource(x, y), data.AugmentSpec(mean=(0.5,), std=(0.25,)),
                            batch_size=5, train=False, num_threads=1, num_workers=1)
  with pytest.raises(RuntimeError, match="corrupt record 13"):
    list(broken.epoch(0))
  assert _wait_until(lambda: not multiprocessing.active_children())


def test_streaming_state_round_trip_and_cross_check():
  """get_state() mid-epoch (JSON) → epoch(..., state=) continues bitwise; a state that
  disagrees with the asked-for (epoch, batch), or whose Grain state resumes elsewhere, is a
  clear error."""
  import json
  src, _, _ = _stream_source(100)
  spec = data.get_dataset_info("cifar10").train_spec
  loader = data.GrainLoader(src, spec, batch_size=16, train=True, seed=1, num_threads=2)
  sync = list(loader.batches(0))
  assert len(sync) == 6
  states = {}
  with loader.epoch(0) as it:
    for b in it:
      states[it.batch] = json.loads(json.dumps(it.get_state()))
      if it.batch == 3:
        break
  assert set(states[2]) == set(data.streaming.STATE_KEYS) and states[2]["offset"] == 0
  with loader.epoch(0, 2, state=states[2]) as rest:
    _same(sync[2:], list(rest))
  # a run resumed without a state (offset 1) and stopped again: its state restores too
  with loader.epoch(0, 1) as it:
    next(it)
    later = json.loads(json.dumps(it.get_state()))
  assert (later["batch"], later["offset"]) == (2, 1)
  _same(sync[2:], list(loader.epoch(0, 2, state=later)))
  with pytest.raises(ValueError, match=r"saved at epoch 0, batch 2, but the position says "
                                       r"epoch 0, batch 3; .* disagree"):
    loader.epoch(0, 3, state=states[2])
  with pytest.raises(ValueError, match="saved at epoch 0, batch 2, but the position says epoch 1"):
    loader.epoch(1, 2, state=states[2])
  forged = dict(states[3], batch=2)  # the Grain state stands at batch 3, the envelope says 2
  it = loader.epoch(0, 2, state=forged)
  with pytest.raises(ValueError, match="resumes epoch 0 at batch 3, but the position says batch "
                                       "2"):
    next(it)
  with pytest.raises(ValueError, match="expected a dict with keys"):
    loader.epoch(0, 2, state={"epoch": 0, "batch": 2})
  with pytest.raises(ValueError, match=r"start: expected a batch in \[0, 6\]"):
    loader.epoch(0, 7)
  assert _wait_until(lambda: not _grain_threads())


def test_streaming_without_grain_fails_fast(monkeypatch):
  """No grain (the data extra): one line naming the extra, when the pipeline is built."""
  import sys
  from nc_jax.pipeline import StreamingPipeline
  monkeypatch.setitem(sys.modules, "grain", None)
  src, _, y = _stream_source()
  spec = data.get_dataset_info("cifar10").train_spec
  with pytest.raises(data.MissingExtraError) as err:
    data.GrainLoader(src, spec, batch_size=16, train=True)
  message = str(err.value)
  assert "\n" not in message and "'data' extra (grain)" in message
  assert 'pip install -e ".[data]"' in message
  assert isinstance(err.value, ValueError)
  with pytest.raises(data.MissingExtraError, match="data"):
    StreamingPipeline(src, None, train_spec=spec, eval_spec=spec, batch_size=16,
                      num_classes=5)


def test_streaming_eval_padding_and_process_split():
  src, x, y = _stream_source(70)
  spec = data.get_dataset_info("cifar10").eval_spec
  ev = list(data.GrainLoader(src, spec, batch_size=16, train=False).epoch(0))
  assert len(ev) == 5
  assert ev[-1].mask.sum() == 6 and (ev[-1].labels[6:] == -1).all()
  labels = np.concatenate([b.labels[b.mask] for b in ev])
  np.testing.assert_array_equal(labels, y)  # every example once, in order
  np.testing.assert_allclose(ev[0].images, aug.normalise_np(x[:16], spec), rtol=1e-6)
  np.testing.assert_allclose(
      ev[-1].images[-1],
      np.broadcast_to(-np.array(spec.mean) / np.array(spec.std), (32, 32, 3)), rtol=1e-6)
  u8 = list(data.GrainLoader(src, spec, batch_size=16, train=False,
                             output_dtype="uint8").epoch(0))
  assert u8[0].images.dtype == np.uint8
  np.testing.assert_allclose(aug.normalise_np(u8[0].images, spec), ev[0].images, rtol=1e-6)
  # eval over two processes: the second one's last slice is all padding
  halves = [list(data.GrainLoader(src, spec, batch_size=16, train=False, process_index=p,
                                  process_count=2).epoch(0)) for p in (0, 1)]
  assert [b.mask.sum() for b in halves[1]] == [8, 8, 8, 8, 0]
  assert halves[1][-1].images.shape == (8, 32, 32, 3) and (halves[1][-1].labels == -1).all()
  np.testing.assert_array_equal(
      np.concatenate([np.concatenate([a.labels, b.labels]) for a, b in zip(*halves)]),
      np.concatenate([b.labels for b in ev]))
  # two processes: each reads only its half of every global batch, through Grain's threads
  tspec = data.get_dataset_info("cifar10").train_spec
  full = list(data.GrainLoader(src, tspec, batch_size=16, train=True, seed=2,
                               process_index=0, process_count=1).batches(0))
  parts = [list(data.GrainLoader(src, tspec, batch_size=16, train=True, seed=2,
                                 process_index=p, process_count=2, num_threads=2).epoch(0))
           for p in (0, 1)]
  for g, a, b in zip(full, *parts):
    assert a.images.shape[0] == 8 and a.index == b.index == g.index
    np.testing.assert_array_equal(np.concatenate([a.images, b.images]), g.images)
    np.testing.assert_array_equal(np.concatenate([a.labels, b.labels]), g.labels)

  class Counting(data.ArraySource):
    read: list = []

    def __getitems__(self, ids):
      Counting.read.extend(ids)
      return super().__getitems__(ids)

  counting = Counting(x, y)
  list(data.GrainLoader(counting, tspec, batch_size=16, train=True, seed=2, process_index=1,
                        process_count=2, num_threads=0).epoch(0))
  plan = data.GrainLoader(src, tspec, batch_size=16, train=True, seed=2).plan(0)
  assert sorted(Counting.read) == sorted(plan[:, 8:].ravel().tolist())  # its slice only


def test_streaming_stratified_and_config_errors():
  src, x, y = _stream_source(100, 5)
  spec = data.get_dataset_info("cifar10").train_spec
  loader = data.GrainLoader(src, spec, batch_size=12, train=True, stratified=True, labels=y,
                            num_threads=0)
  key = jax.random.fold_in(jax.random.key(0), 0)
  np.testing.assert_array_equal(loader.plan(0), data.epoch_indices(key, y, 12, True,
                                                                   num_classes=5))
  for b in loader.epoch(0):
    counts = np.bincount(b.labels, minlength=5)
    assert counts.min() == 2 and counts.max() == 3
  with pytest.raises(ValueError, match="needs labels"):
    data.GrainLoader(src, spec, batch_size=12, train=True, stratified=True)
  with pytest.raises(ValueError, match="batch_size >= num_classes"):
    data.GrainLoader(src, spec, batch_size=4, train=True, stratified=True, labels=y)
  with pytest.raises(ValueError, match="batch_size"):
    data.GrainLoader(src, spec, batch_size=0, train=True)
  with pytest.raises(ValueError, match="divisible"):
    data.GrainLoader(src, spec, batch_size=10, train=True, process_count=3, process_index=0)
  with pytest.raises(ValueError, match="process_index"):
    data.GrainLoader(src, spec, batch_size=10, train=True, process_count=2, process_index=2)
  with pytest.raises(ValueError, match="larger than the dataset"):
    data.GrainLoader(src, spec, batch_size=101, train=True)
  with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
    data.GrainLoader(src, spec, batch_size=10, train=True, num_workers=-1)
  with pytest.raises(ValueError, match="prefetch must be >= 1"):
    data.GrainLoader(src, spec, batch_size=10, train=True, prefetch=0)

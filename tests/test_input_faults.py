"""Bad input never yields a silent NaN, a stale result or a raw traceback (issue #11).

Each test produces the real condition: NaN reaching the RGD solver under ``jit``, the
metrics traced by ``jit``, degenerate features, files cut with ``os.truncate`` or with
bytes overwritten, empty splits, and a missing ``data`` extra (simulated by hiding the
module in ``sys.modules``, since the test environment has it installed).
"""

import gzip
import math
import os
import struct
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nc_jax as nc
from nc_jax import data, metrics


def _one_line(err: pytest.ExceptionInfo) -> str:
  msg = str(err.value)
  assert "\n" not in msg, msg
  return msg


# ---------------------------------------------------------------------------
# 1. nearest_etf(method="rgd") under jit: NaN in, NaN out (not the previous frame).
# ---------------------------------------------------------------------------

def _solver_problem(dtype=jnp.float32, d=6, k=3):
  means = nc.normalise_means(jax.random.normal(jax.random.PRNGKey(0), (d, k), dtype))
  return means, nc.nearest_etf(means)


@pytest.mark.parametrize("bad", ["means_nan", "means_inf", "prox_nan"])
def test_rgd_under_jit_returns_nan_not_the_previous_frame(bad):
  means, prox = _solver_problem()
  if bad == "means_nan":
    means = means.at[1, 2].set(jnp.nan)
  elif bad == "means_inf":
    means = means.at[0, 0].set(jnp.inf)
  else:
    prox = prox.at[3, 1].set(jnp.nan)
  solve = jax.jit(lambda y, p: nc.nearest_etf(y, p, method="rgd", return_info=True))
  p, info = solve(means, prox)
  assert bool(jnp.all(jnp.isnan(p))), p  # before the fix: p == prox, silently
  assert not bool(jnp.isfinite(info.grad_norm))
  # The polar path behaves the same way.
  p_polar = jax.jit(lambda y, q: nc.nearest_etf(y, q, factorisation="svd"))(means, prox)
  assert bool(jnp.all(jnp.isnan(p_polar)))


def test_rgd_under_jit_unchanged_for_finite_input():
  means, prox = _solver_problem(jnp.float64)
  rgd = jax.jit(lambda y, p: nc.nearest_etf(y, p, method="rgd"))(means, prox)
  polar = nc.nearest_etf(means, prox, factorisation="svd")
  np.testing.assert_allclose(rgd, polar, atol=1e-10)


def test_rgd_concrete_nan_still_raises():
  means, prox = _solver_problem()
  with pytest.raises(ValueError, match=r"^means: expected finite values") as err:
    nc.nearest_etf(means.at[0, 0].set(jnp.nan), prox, method="rgd")
  _one_line(err)


# ---------------------------------------------------------------------------
# 2. Metrics: host functions under jit; NaN metrics carry a warning.
# ---------------------------------------------------------------------------

def _problem(n=40, d=8, k=4, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % k)
  means = rng.normal(size=(k, d))
  h = (means[labels] + 0.3 * rng.normal(size=(n, d))).astype(dtype)
  w = rng.normal(size=(k, d)).astype(dtype)
  return h, labels, w


HOST_MSG = r"expected a concrete array, got a tracer: {} is a host function \(its final linear"


def test_nc_metrics_under_jit_raises_clear_error():
  h, y, w = _problem()
  with pytest.raises(ValueError, match="^features: " + HOST_MSG.format("nc_metrics")) as err:
    jax.jit(lambda f: metrics.nc_metrics(f, y, w, None, 4)["nc1"])(h)
  assert "update_class_stats" in _one_line(err)
  with pytest.raises(ValueError, match="^W: " + HOST_MSG.format("nc_metrics")):
    jax.jit(lambda ww: metrics.nc_metrics(h, y, ww, None, 4)["nc1"])(w)
  with pytest.raises(ValueError, match="^features: " + HOST_MSG.format("nc_metrics")):
    jax.vmap(lambda f: metrics.nc_metrics(f, y, w, None, 4)["nc1"])(h[None])


def test_streaming_and_finalisation_under_jit_raise_clear_error():
  h, y, w = _problem()

  def streamed(f):
    return metrics.nc_metrics_streaming(lambda: [(f[:20], y[:20]), (f[20:], y[20:])], w, None,
                                        4)["nc1"]

  pattern = r"^features \(batch 0\): " + HOST_MSG.format("nc_metrics_streaming")
  with pytest.raises(ValueError, match=pattern) as err:
    jax.jit(streamed)(h)
  _one_line(err)

  def finalised(f):  # the jit-able updates inside, the host finalisation too: refused
    stats = metrics.update_class_stats(metrics.init_class_stats(4, 8), f, y)
    return metrics.finalise_class_stats(stats).means

  with pytest.raises(ValueError, match="^stats: " + HOST_MSG.format("finalise_class_stats")):
    jax.jit(finalised)(h)

  # finalise_metrics with traced pass-2 statistics.
  class_means = metrics.finalise_class_stats(
      metrics.update_class_stats(metrics.init_class_stats(4, 8), h, y))
  ctx = metrics.make_second_pass_context(class_means, w)

  def second(f):
    stats, _ = metrics.update_second_pass(metrics.init_second_pass(8), ctx, f, y)
    return metrics.finalise_metrics(class_means, stats, w)["nc1"]

  with pytest.raises(ValueError, match="^stats: " + HOST_MSG.format("finalise_metrics")):
    jax.jit(second)(h)
  # The jit-able parts themselves still run under jit.
  stats, _ = jax.jit(lambda f: metrics.update_second_pass(metrics.init_second_pass(8), ctx, f,
                                                          y))(h)
  assert int(stats.count) == 40


def _nan_keys(m):
  return {k for k in metrics.METRIC_KEYS if math.isnan(m[k])}


H_KEYS = {"nc1", "nc2_equinorm_h", "wh_equinorm", "nc3", "ncc_mismatch", "h_etf_dist",
          "wh_etf_dist"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [0.0, 0.1, "random"])
def test_identical_features_for_all_samples_warn(dtype, value):
  n, d, k = 50, 8, 4
  rng = np.random.default_rng(3)
  labels = np.concatenate([np.arange(k), np.zeros(n - k, int)])  # imbalanced: rounding in H
  row = rng.normal(size=d) * 3 if value == "random" else np.full(d, value)
  h = np.tile(row, (n, 1)).astype(dtype)
  w = rng.normal(size=(k, d)).astype(dtype)
  with pytest.warns(metrics.DegenerateMetricsWarning) as rec:
    m = metrics.nc_metrics(h, labels, w, None, k)
  assert _nan_keys(m) == H_KEYS | {"vci", "avg_cosine_margin"}
  assert np.all(np.isnan(m["cosine_margins"]))
  msg = str(rec[0].message)
  assert "\n" not in msg and rec[0].filename == __file__  # points at the caller
  assert "identical features for every sample" in msg and "H = 0" in msg
  for key in H_KEYS | {"vci", "avg_cosine_margin"}:
    assert key in msg
  # W's metrics and the accuracies are well defined and stay finite.
  for key in ("top1", "top5", "nc2_etf", "nc2_equinorm_w", "bias_collapse", "w_etf_dist"):
    assert math.isfinite(m[key]), key


def test_zero_classifier_warns():
  h, y, _ = _problem()
  with pytest.warns(metrics.DegenerateMetricsWarning, match=r"W = 0") as rec:
    m = metrics.nc_metrics(h, y, np.zeros((4, 8), np.float32), None, 4)
  assert _nan_keys(m) == {"nc2_etf", "nc2_equinorm_w", "wh_equinorm", "nc3", "w_etf_dist",
                          "wh_etf_dist", "avg_cosine_margin"}
  assert "centred classifier row" in str(rec[0].message)
  assert math.isfinite(m["nc1"]) and math.isfinite(m["h_etf_dist"])


def test_equal_classifier_rows_warn_for_cosine_margins():
  h, y, w = _problem()
  with pytest.warns(metrics.DegenerateMetricsWarning, match=r"avg_cosine_margin.*class\(es\) "
                    r"\[0, 1, 2, 3\]"):
    m = metrics.nc_metrics(h, y, np.tile(w[:1], (4, 1)), None, 4)
  assert math.isnan(m["avg_cosine_margin"]) and math.isfinite(m["nc3"])


def test_d_smaller_than_k_warns_naming_etf_distances():
  h, y, w = _problem(d=3, k=5)
  with pytest.warns(metrics.DegenerateMetricsWarning, match=r"need d >= K, got d=3 < K=5"):
    m = metrics.nc_metrics(h, y, w, None, 5)
  assert _nan_keys(m) == {"w_etf_dist", "h_etf_dist", "wh_etf_dist"}


@pytest.mark.parametrize("case", ["random", "collapsed", "one_class_collapsed"])
def test_well_posed_inputs_do_not_warn(case):
  h, y, w = _problem(dtype=np.float64)
  if case == "collapsed":  # zero within-class scatter: NC1 = 0, nothing divides by it
    h = np.stack([h[y == c].mean(axis=0) for c in range(4)])[y]
  elif case == "one_class_collapsed":
    h[y == 2] = h[y == 2].mean(axis=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    m = metrics.nc_metrics(h, y, w, None, 4)
  assert not _nan_keys(m) and np.all(np.isfinite(m["cosine_margins"]))
  if case == "collapsed":
    assert m["nc1"] == pytest.approx(0.0, abs=1e-20) and m["vci"] == pytest.approx(0.0, abs=1e-9)


def test_overflowing_features_raise():
  h, y, w = _problem()
  with pytest.raises(ValueError, match=r"^features: expected \|values\| <= .* float32 .* got "
                     r"max \|features\| = \d\.\d+e\+20") as err:
    metrics.nc_metrics(h * np.float32(1e20), y, w, None, 4)
  assert "float64" in _one_line(err)
  with pytest.raises(ValueError, match=r"^W: expected \|values\|"):
    metrics.nc_metrics_streaming(lambda: [(h, y)], w * np.float32(1e20), None, 4)
  stats = metrics.ClassStats(jnp.full((4, 8), jnp.inf, jnp.float32), jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"^stats: expected finite class sums.*overflowed float32"):
    metrics.finalise_class_stats(stats)


# ---------------------------------------------------------------------------
# 3. Data loading: corrupt files, empty splits, a missing extra.
# ---------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
  header = b"\x00\x00" + bytes([code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
  return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_idx_split(directory, split="train", n=6, gz=True):
  prefix = {"train": "train", "test": "t10k"}[split]
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  y = (np.arange(n) % 10).astype(np.uint8)
  paths = []
  for stem, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
    raw = _idx_bytes(arr)
    path = directory / (stem + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    paths.append(path)
  return paths


def _cut(path, keep: float = 0.5):
  os.truncate(path, int(os.path.getsize(path) * keep))


def _overwrite_middle(path, n: int = 64):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2 - n // 2)
    f.write(bytes(range(256))[:n])


def test_truncated_gzip_idx(tmp_path):
  images, _ = _write_idx_split(tmp_path)
  _cut(images)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip "
                     r"data .*EOFError") as err:
    data.load_split("mnist", "train", source="idx", path=tmp_path)
  _one_line(err)


def test_corrupt_gzip_idx(tmp_path):
  _, labels = _write_idx_split(tmp_path, "test", n=200)
  _overwrite_middle(labels, 16)
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: truncated or corrupt gzip"):
    data.load_idx(tmp_path, "test")


def test_truncated_raw_idx_and_bad_magic(tmp_path):
  images, labels = _write_idx_split(tmp_path, gz=False)
  _cut(images, 0.75)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: IDX header says shape "
                     r"\(6, 28, 28\) \(4704 bytes\) but the file holds \d+ data bytes "
                     r"\(truncated or corrupt file\)") as err:
    data.load_idx(tmp_path, "train")
  _one_line(err)
  labels.write_bytes(b"PK\x03\x04" + bytes(20))  # e.g. a zip saved under the IDX name
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: not an IDX file \(bad magic "
                     r"number 504b0304"):
    data.read_idx(labels)
  labels.write_bytes(b"\x00\x00\x08\xff" + bytes(20))  # 255 dimensions claimed
  with pytest.raises(ValueError, match=r"truncated IDX header: 255 dimensions need 1024"):
    data.read_idx(labels)


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_npz(tmp_path, compressed):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
            "y_train": np.arange(20) % 10, "x_test": np.zeros((2, 32, 32, 3), np.uint8),
            "y_test": np.arange(2)}
  path = tmp_path / "cifar.npz"
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  _cut(path)
  with pytest.raises(ValueError, match=r"cifar\.npz: not a readable \.npz archive \(truncated "
                     r"or corrupt\?\): zipfile\.BadZipFile: File is not a zip file") as err:
    data.load_split("cifar10", "train", source="npz", path=path)
  _one_line(err)


def test_corrupt_npz_member(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "d.npz"
  np.savez_compressed(path, x_train=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8),
                      y_train=np.arange(200) % 10)
  _overwrite_middle(path)  # the archive's directory is intact, x_train's data is not
  with pytest.raises(ValueError, match=r"d\.npz: cannot read array 'x_train' \(truncated or "
                     r"corrupt file\?\)") as err:
    data.load_npz(path, "train")
  _one_line(err)
  path.write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match=r"d\.npz: not a readable \.npz archive"):
    data.load_npz(path)
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(ValueError, match=r"single\.npy: expected an \.npz archive"):
    data.load_npz(tmp_path / "single.npy")


@pytest.mark.parametrize("name, split", [("mnist", "train"), ("mnist", "test"),
                                         ("cifar10", "test")])
def test_empty_npz_split(tmp_path, name, split):
  shape = (28, 28) if name == "mnist" else (32, 32, 3)
  full, empty = np.zeros((3, *shape), np.uint8), np.zeros((0, *shape), np.uint8)
  arrays = {"x_train": full, "y_train": np.arange(3), "x_test": full, "y_test": np.arange(3)}
  arrays[f"x_{split}"], arrays[f"y_{split}"] = empty, np.zeros((0,), np.int64)
  np.savez(tmp_path / "e.npz", **arrays)
  with pytest.raises(ValueError, match=rf"e\.npz: the {split} split is empty \(0 images") as err:
    data.load_split(name, split, source="npz", path=tmp_path / "e.npz")
  _one_line(err)


def test_empty_idx_split(tmp_path):
  _write_idx_split(tmp_path, "train", n=0)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: the train split is empty"):
    data.load_split("fashion_mnist", "train", source="idx", path=tmp_path)
  with pytest.raises(ValueError, match=r"^mnist: expected a non-empty batch of images"):
    data.preprocess(np.zeros((0, 28, 28, 1), np.uint8), data.get_dataset_info("mnist"))
  with pytest.raises(ValueError, match=r"num_test must be a positive integer"):
    data.synthetic_info(num_test=0)
  with pytest.raises(ValueError, match=r"image_shape must be \(H, W, 1 or 3\)"):
    data.synthetic_info(image_shape=32)


@pytest.mark.parametrize("hidden", ["tensorflow_datasets",
                                    "array_record.python.array_record_data_source"])
def test_tfds_without_data_extra(monkeypatch, hidden):
  monkeypatch.setitem(sys.modules, hidden, None)  # importing `hidden` now raises ImportError
  with pytest.raises(data.MissingExtraError) as err:
    data.load_split("mnist", "train")  # the default source is tfds
  msg = _one_line(err)
  assert isinstance(err.value, ValueError) and isinstance(err.value, ImportError)
  assert 'pip install -e ".[data]"' in msg and hidden in msg and "'data' extra" in msg
  assert err.value.__cause__ is None and err.value.__suppress_context__
  with pytest.raises(data.MissingExtraError):
    data.tfds_source("cifar10")

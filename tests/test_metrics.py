"""Tests of nc_jax.metrics against a plain numpy float64 transcription of docs/method.md §9."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from nc_jax import geometry, metrics

SCALAR_KEYS = metrics.METRIC_KEYS


# ---------------------------------------------------------------------------
# Reference: the formulas written out directly (d×d pseudo-inverses, loops).
# ---------------------------------------------------------------------------

def _ref_etf(y_mat):
  """Nearest unit-Frobenius ETF to Y (d×K) and the squared distance ‖Ŷ − E‖²."""
  k = y_mat.shape[1]
  y_hat = y_mat / np.linalg.norm(y_mat)
  m = np.eye(k) - np.ones((k, k)) / k
  u, _, vt = np.linalg.svd(y_hat @ m, full_matrices=False)
  etf = u[:, : k - 1] @ vt[: k - 1] / np.sqrt(k - 1)  # polar(ŶM)·M̃ (rank K-1)
  return float(np.sum((y_hat - etf) ** 2)), etf


def reference_metrics(h, y, w, b, k):
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  b = np.zeros(k) if b is None else np.asarray(b, np.float64)
  y = np.asarray(y)
  n, d = h.shape
  mu = np.stack([h[y == c].mean(axis=0) for c in range(k)])
  mu_g = h.mean(axis=0)
  hm = (mu - mu_g).T  # d×K

  sw = np.zeros((d, d))
  for i in range(n):
    diff = h[i] - mu[y[i]]
    sw += np.outer(diff, diff)
  sw /= n
  sb = np.zeros((d, d))
  for c in range(k):
    sb += np.outer(hm[:, c], hm[:, c])
  sb /= k
  nc1 = np.trace(sw @ scipy.linalg.pinv(sb)) / k
  st = sw + sb
  vci = 1.0 - np.trace(scipy.linalg.pinv(st) @ sb) / min(d, k - 1)

  logits = h @ w.T + b
  pred = np.argmax(logits, axis=1)
  top1 = 100.0 * np.mean(pred == y)
  kk = min(5, k)
  top5 = 100.0 * np.mean([y[i] in np.argsort(-logits[i], kind="stable")[:kk] for i in range(n)])

  m_tilde = (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)
  g = w @ w.T
  nc2 = np.linalg.norm(g / np.linalg.norm(g) - m_tilde)
  wn = np.linalg.norm(w, axis=1)
  hn = np.linalg.norm(hm, axis=0)
  eq_w = np.std(wn, ddof=1) / np.mean(wn)
  eq_h = np.std(hn, ddof=1) / np.mean(hn)
  wh = w @ hm
  nc3 = np.linalg.norm(wh / np.linalg.norm(wh) - m_tilde)

  dist = np.array([[np.linalg.norm(h[i] - mu[c]) for c in range(k)] for i in range(n)])
  ncc = np.argmin(dist, axis=1)
  ncc_mismatch = 100.0 - 100.0 * np.mean(ncc == pred)
  bias_collapse = np.linalg.norm(w @ mu_g + b)

  wt = w - w.mean(axis=0)
  ht = h - mu_g
  margins = np.empty(n)
  for i in range(n):
    cos = [ht[i] @ wt[j] / (np.linalg.norm(ht[i]) * np.linalg.norm(wt[j])) for j in range(k)]
    margins[i] = cos[y[i]] - max(cos[j] for j in range(k) if j != y[i])

  w_dist, e_w = _ref_etf(w.T)
  h_dist, e_h = _ref_etf(hm)
  return {
      "top1": top1, "top5": top5, "nc1": nc1, "vci": vci, "nc2_etf": nc2,
      "nc2_equinorm_w": eq_w, "nc2_equinorm_h": eq_h, "wh_equinorm": abs(eq_h - eq_w),
      "nc3": nc3, "ncc_mismatch": ncc_mismatch, "bias_collapse": bias_collapse,
      "avg_cosine_margin": margins.mean(), "w_etf_dist": w_dist, "h_etf_dist": h_dist,
      "wh_etf_dist": float(np.sum((e_w - e_h) ** 2)), "cosine_margins": margins,
  }


def _random_problem(seed, n, d, k, balanced=False, dtype=np.float64):
  rng = np.random.default_rng(seed)
  if balanced:
    y = rng.permutation(np.arange(n) % k)
  else:
    y = rng.integers(0, k, size=n)
    y[:k] = np.arange(k)  # every class present
  centres = 0.5 * rng.normal(size=(k, d))
  h = centres[y] + rng.normal(size=(n, d))
  w = rng.normal(size=(k, d)) + 0.5 * centres
  b = 0.3 * rng.normal(size=k)
  return h.astype(dtype), y, w.astype(dtype), b.astype(dtype)


def _assert_close(got, ref, rtol, atol, keys=SCALAR_KEYS):
  for key in keys:
    assert isinstance(got[key], float), key
    np.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=atol, err_msg=key)


# ---------------------------------------------------------------------------
# Agreement with the reference.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("balanced", [False, True])
def test_matches_reference_float64(balanced):
  h, y, w, b = _random_problem(0, n=300, d=20, k=5, balanced=balanced)
  got = metrics.nc_metrics(h, y, w, b, 5)
  ref = reference_metrics(h, y, w, b, 5)
  assert set(SCALAR_KEYS) | {"cosine_margins"} <= set(got)
  _assert_close(got, ref, rtol=1e-9, atol=1e-11)
  assert got["cosine_margins"].shape == (300,)
  np.testing.assert_allclose(got["cosine_margins"], ref["cosine_margins"], rtol=1e-10, atol=1e-12)
  # Sanity: the data is informative (not all metrics trivially 0 or 100).
  assert 0 < got["top1"] < 100 and got["nc1"] > 0.05 and 0 < got["vci"] < 1


def test_matches_reference_zero_bias_and_few_classes():
  # K = 3 < 5: top-5 is top-3, i.e. always 100 %; b = None means zero bias.
  h, y, w, _ = _random_problem(1, n=90, d=6, k=3)
  got = metrics.nc_metrics(h, y, w, None, 3)
  ref = reference_metrics(h, y, w, None, 3)
  _assert_close(got, ref, rtol=1e-9, atol=1e-11)
  assert got["top5"] == 100.0


def test_matches_reference_float32():
  h, y, w, b = _random_problem(2, n=400, d=64, k=10, balanced=True, dtype=np.float32)
  got = metrics.nc_metrics(h, y, w, b, 10)
  ref = reference_metrics(h, y, w, b, 10)  # float64 maths on the float32 values
  _assert_close(got, ref, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(got["cosine_margins"], ref["cosine_margins"], atol=2e-5)


def test_d_smaller_than_k_gives_nan_etf_distances():
  h, y, w, b = _random_problem(3, n=120, d=4, k=6)
  got = metrics.nc_metrics(h, y, w, b, 6)
  for key in ("w_etf_dist", "h_etf_dist", "wh_etf_dist"):
    assert math.isnan(got[key])
  etf_keys = {"w_etf_dist", "h_etf_dist", "wh_etf_dist"}
  ref = reference_metrics(h, y, w, b, 6)
  _assert_close(got, ref, rtol=1e-9, atol=1e-11, keys=[k for k in SCALAR_KEYS if k not in etf_keys])


def test_perfect_collapse():
  k, d, per_class, scale = 6, 16, 15, 3.0
  etf = np.asarray(geometry.random_etf(jax.random.key(0), d, k, jnp.float64))  # d×K, unit columns
  rng = np.random.default_rng(4)
  offset = rng.normal(size=d)
  y = rng.permutation(np.repeat(np.arange(k), per_class))
  h = offset + scale * etf[:, y].T
  w = 2.0 * etf.T
  b = -w @ h.mean(axis=0)
  got = metrics.nc_metrics(h, y, w, b, k)
  assert got["top1"] == 100.0 and got["top5"] == 100.0 and got["ncc_mismatch"] == 0.0
  for key in ("nc1", "nc2_etf", "nc3", "nc2_equinorm_w", "nc2_equinorm_h", "wh_equinorm",
              "w_etf_dist", "h_etf_dist", "wh_etf_dist", "bias_collapse"):
    assert abs(got[key]) < 1e-9, (key, got[key])
  assert abs(got["vci"]) < 1e-9
  np.testing.assert_allclose(got["cosine_margins"], k / (k - 1), atol=1e-12)
  assert got["avg_cosine_margin"] == pytest.approx(k / (k - 1), abs=1e-12)


def test_perfect_collapse_is_not_trivially_zero():
  # The same configuration, perturbed: the collapse metrics must move off 0.
  k, d = 6, 16
  etf = np.asarray(geometry.random_etf(jax.random.key(0), d, k, jnp.float64))
  rng = np.random.default_rng(5)
  y = rng.permutation(np.repeat(np.arange(k), 15))
  h = 3.0 * etf[:, y].T + 0.1 * rng.normal(size=(y.size, d))
  w = 2.0 * etf.T + 0.1 * rng.normal(size=(k, d))
  got = metrics.nc_metrics(h, y, w, None, k)
  for key in ("nc1", "nc2_etf", "nc3", "w_etf_dist", "h_etf_dist", "wh_etf_dist"):
    assert got[key] > 1e-5, key


# ---------------------------------------------------------------------------
# Streaming.
# ---------------------------------------------------------------------------

def _uneven_batches(h, y, sizes):
  edges = np.cumsum([0] + list(sizes))
  assert edges[-1] == len(y)
  return [(h[a:e], y[a:e]) for a, e in zip(edges[:-1], edges[1:])]


def test_streaming_equals_in_memory_with_missing_classes_in_batches():
  h, y, w, b = _random_problem(6, n=300, d=20, k=5)
  # First batch only holds classes 0 and 1; the others arrive later.
  first = np.flatnonzero(y < 2)[:7]
  order = np.concatenate([first, np.setdiff1d(np.arange(300), first)])
  h, y = h[order], y[order]
  batches = _uneven_batches(h, y, [7, 100, 50, 143])
  assert len(np.unique(batches[0][1])) < 5
  streamed = metrics.nc_metrics_streaming(lambda: iter(batches), w, b, 5)
  in_memory = metrics.nc_metrics(h, y, w, b, 5)
  _assert_close(streamed, in_memory, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(streamed["cosine_margins"], in_memory["cosine_margins"],
                             rtol=1e-12, atol=1e-13)
  ref = reference_metrics(h, y, w, b, 5)
  _assert_close(streamed, ref, rtol=1e-9, atol=1e-11)


def test_streaming_float32_generator_batches():
  h, y, w, b = _random_problem(7, n=250, d=32, k=8, dtype=np.float32)

  def batches():  # a fresh generator per pass
    for start in range(0, 250, 64):
      yield h[start:start + 64], y[start:start + 64]

  streamed = metrics.nc_metrics_streaming(batches, w, b, 8)
  in_memory = metrics.nc_metrics(h, y, w, b, 8)
  _assert_close(streamed, in_memory, rtol=1e-4, atol=1e-5)


def test_functional_api_matches_and_does_not_retrace():
  h, y, w, b = _random_problem(8, n=200, d=12, k=4)
  batches = _uneven_batches(h, y, [50, 50, 50, 50])
  stats = metrics.init_class_stats(4, 12, jnp.float64)
  sizes = []
  for f, lab in batches:
    stats = metrics.update_class_stats(stats, f, lab)
    sizes.append(metrics._update_class_stats._cache_size())
  assert sizes[1:] == sizes[:1] * 3  # one compilation for the four same-shape batches
  np.testing.assert_array_equal(np.asarray(stats.counts), np.bincount(y, minlength=4))
  means = metrics.finalise_class_stats(stats)
  ctx = metrics.make_second_pass_context(means, w, b)
  stats2 = metrics.init_second_pass(12, jnp.float64)
  margins, sizes = [], []
  for f, lab in batches:
    stats2, m = metrics.update_second_pass(stats2, ctx, f, lab)
    margins.append(m)
    sizes.append(metrics._update_second_pass._cache_size())
  assert sizes[1:] == sizes[:1] * 3
  got = metrics.finalise_metrics(means, stats2, w, b, margins)
  _assert_close(got, metrics.nc_metrics(h, y, w, b, 4), rtol=1e-10, atol=1e-12)


def test_updates_run_under_user_jit_and_scan():
  h, y, _, _ = _random_problem(9, n=120, d=10, k=3)
  stats0 = metrics.init_class_stats(3, 10, jnp.float64)
  eager = metrics.update_class_stats(stats0, h, y)
  jitted = jax.jit(metrics.update_class_stats)(stats0, h, y)
  np.testing.assert_allclose(jitted.sums, eager.sums, rtol=1e-13)

  def body(s, batch):
    return metrics.update_class_stats(s, *batch), None

  scanned, _ = jax.lax.scan(body, stats0, (h.reshape(4, 30, 10), y.reshape(4, 30)))
  np.testing.assert_allclose(scanned.sums, eager.sums, rtol=1e-12)
  np.testing.assert_array_equal(scanned.counts, eager.counts)


def test_sorted_cosine_margins():
  h, y, w, b = _random_problem(10, n=60, d=8, k=3)
  margins = metrics.nc_metrics(h, y, w, b, 3)["cosine_margins"]
  s = metrics.sorted_cosine_margins(margins)
  assert np.all(np.diff(s) >= 0)
  np.testing.assert_array_equal(s, np.sort(margins))
  assert np.all(np.abs(margins) <= 2.0 + 1e-12)


# ---------------------------------------------------------------------------
# CE lower bound.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k, tau, expected", [
    (10, 5.0, 0.0342), (100, 5.0, 0.4912), (200, 5.0, 0.8362), (1000, 5.0, 2.0409),
    (10, 1.0, 1.3769)])
def test_ce_lower_bound(k, tau, expected):
  assert metrics.ce_lower_bound(k, tau) == pytest.approx(expected, abs=5e-5)


def test_ce_lower_bound_is_attained_by_the_etf():
  # Mean CE of logits tau*cos at a simplex ETF with zero bias equals the bound.
  k, tau = 7, 5.0
  logits = tau * np.asarray(geometry.simplex_etf(k, jnp.float64)).T @ np.asarray(
      geometry.simplex_etf(k, jnp.float64))
  ce = np.mean([-logits[c, c] + np.log(np.sum(np.exp(logits[c]))) for c in range(k)])
  assert metrics.ce_lower_bound(k, tau) == pytest.approx(ce, rel=1e-12)


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------

def _good():
  h, y, w, b = _random_problem(11, n=40, d=6, k=4)
  return dict(features=h, labels=y, W=w, b=b, num_classes=4)


def _with(**changes):
  args = _good()
  args.update(changes)
  return args


def _nan_at(x, idx=0):
  x = np.array(x, dtype=np.float64)
  x.flat[idx] = np.nan
  return x


_G = _good()
BAD_INPUTS = [
    ("features", _with(features=_G["features"][0])),
    ("features", _with(features=_G["features"][None])),
    ("features", _with(features=np.zeros((0, 6)), labels=np.zeros((0,), int))),
    ("features", _with(features=_nan_at(_G["features"], 7))),
    ("features", _with(features=np.full((40, 6), np.inf))),
    ("labels", _with(labels=_G["labels"].astype(np.float64))),
    ("labels", _with(labels=_G["labels"][:, None])),
    ("labels", _with(labels=_G["labels"][:-1])),
    ("labels", _with(labels=np.where(np.arange(40) == 3, 4, _G["labels"]))),
    ("labels", _with(labels=np.where(np.arange(40) == 3, -1, _G["labels"]))),
    ("labels", _with(labels=np.where(_G["labels"] == 2, 1, _G["labels"]))),  # class 2 missing
    ("W", _with(W=_G["W"][0])),
    ("W", _with(W=_G["W"][:3])),
    ("W", _with(W=_G["W"][:, :5])),
    ("W", _with(W=_nan_at(_G["W"], 3))),
    ("b", _with(b=_G["b"][:3])),
    ("b", _with(b=_G["b"][None])),
    ("b", _with(b=np.array([0.0, np.inf, 0.0, 0.0]))),
    ("num_classes", _with(num_classes=1)),
    ("num_classes", _with(num_classes=2.5)),
]


@pytest.mark.parametrize("name, args", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise(name, args):
  with pytest.raises(ValueError, match=rf"^{name}\b.*expected.*got"):
    metrics.nc_metrics(**args)


def test_bad_streaming_inputs_raise():
  g = _good()
  h, y, w, b = g["features"], g["labels"], g["W"], g["b"]
  batches = _uneven_batches(h, y, [10, 30])
  with pytest.raises(ValueError, match=r"^batches: expected.*callable.*got list"):
    metrics.nc_metrics_streaming(batches, w, b, 4)
  with pytest.raises(ValueError, match=r"^batches: expected at least one.*got none"):
    metrics.nc_metrics_streaming(lambda: [], w, b, 4)
  with pytest.raises(ValueError, match=r"^batches: expected each batch.*pair.*got"):
    metrics.nc_metrics_streaming(lambda: [h], w, b, 4)
  with pytest.raises(ValueError, match=r"^batches: expected an? .*got int"):
    metrics.nc_metrics_streaming(lambda: 3, w, b, 4)
  with pytest.raises(ValueError, match=r"^features \(batch 1\): expected feature dimension"):
    metrics.nc_metrics_streaming(lambda: [batches[0], (h[10:, :5], y[10:])], w, b, 4)
  bad_y = y.copy()
  bad_y[-1] = 7
  with pytest.raises(ValueError, match=r"^labels \(batch 1\): expected labels in \[0, 4\)"):
    metrics.nc_metrics_streaming(lambda: _uneven_batches(h, bad_y, [10, 30]), w, b, 4)
  with pytest.raises(ValueError, match=r"^W: expected"):
    metrics.nc_metrics_streaming(lambda: batches, w[:3], b, 4)
  calls = []

  def shrinking():  # the second pass drops a batch
    calls.append(1)
    return batches if len(calls) == 1 else batches[1:]

  with pytest.raises(ValueError, match=r"^batches: expected the second pass.*same number.*got 30"):
    metrics.nc_metrics_streaming(shrinking, w, b, 4)


def test_bad_misc_inputs_raise():
  with pytest.raises(ValueError, match=r"^num_classes: expected"):
    metrics.ce_lower_bound(1)
  with pytest.raises(ValueError, match=r"^tau: expected a positive.*got"):
    metrics.ce_lower_bound(10, -1.0)
  with pytest.raises(ValueError, match=r"^tau: expected"):
    metrics.ce_lower_bound(10, float("nan"))
  with pytest.raises(ValueError, match=r"^margins: expected a rank-1.*got"):
    metrics.sorted_cosine_margins(np.zeros((2, 2)))
  stats = metrics.init_class_stats(3, 5)
  with pytest.raises(ValueError, match=r"^features: expected feature dimension d=5"):
    metrics.update_class_stats(stats, np.zeros((4, 6), np.float32), np.zeros(4, int))
  with pytest.raises(ValueError, match=r"^labels: expected labels in \[0, 3\)"):
    metrics.update_class_stats(stats, np.zeros((4, 5), np.float32), np.array([0, 1, 2, 3]))
  with pytest.raises(ValueError, match=r"^labels: expected every class.*got no samples of 1"):
    stats = metrics.update_class_stats(stats, np.zeros((4, 5), np.float32), np.array([0, 1, 0, 1]))
    metrics.finalise_class_stats(stats)


# ---------------------------------------------------------------------------
# Scale.
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_large_float32_is_fast_and_finite():
  n, d, k = 3000, 2048, 1000
  rng = np.random.default_rng(12)
  y = rng.permutation(np.arange(n) % k)
  centres = rng.normal(size=(k, d)).astype(np.float32)
  h = (centres[y] + rng.normal(size=(n, d)).astype(np.float32))
  h = (5.0 * h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32)
  w = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
  start = time.perf_counter()
  got = metrics.nc_metrics(h, y, w, None, k)
  elapsed = time.perf_counter() - start
  assert elapsed < 20.0, elapsed
  for key in SCALAR_KEYS:
    assert math.isfinite(got[key]), key
  assert got["cosine_margins"].shape == (n,) and np.all(np.isfinite(got["cosine_margins"]))
  assert got["top1"] > 50.0  # W rows point at the class centres
  assert 0.0 <= got["vci"] <= 1.0 and got["nc1"] > 0.0

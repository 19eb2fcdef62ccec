"""nc_jax.class_metrics: per-class collapse and accuracy, numerical rank, minority collapse,
distances to a reference epoch's ETFs — checked against definitions and closed forms."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nc_jax as nc
from nc_jax import class_metrics, evaluate, heads


def imbalanced_blobs(counts=(40, 25, 10, 5), d=12, seed=0, spread=1.0):
  rng = np.random.default_rng(seed)
  k = len(counts)
  labels = np.repeat(np.arange(k), counts)
  h = 4.0 * rng.standard_normal((k, d))[labels] + spread * rng.standard_normal((labels.size, d))
  return h, labels


def test_docstring_example():
  assert doctest.testmod(class_metrics).failed == 0


def test_numerical_rank_from_its_definition_and_its_range():
  h, y = imbalanced_blobs()
  want = np.mean([np.linalg.norm(h[y == c], "nuc") ** 2 / np.linalg.norm(h[y == c]) ** 2
                  for c in range(4)])
  got = class_metrics.numerical_rank(h, y, 4)
  assert got == pytest.approx(want, rel=1e-12)
  assert 1.0 < got <= 12.0
  # Collapse onto one direction per class: rank 1 (uncentred: the class mean is that direction).
  collapsed = np.outer(np.arange(1, 81), np.ones(12))[: y.size] * (y[:, None] + 1)
  assert class_metrics.numerical_rank(collapsed, y, 4) == pytest.approx(1.0, abs=1e-12)


def test_per_class_nc1_weighted_by_class_size_is_nc1():
  """NC1 = Σ_c (n_c/N)·nc1_c, on an imbalanced set; and a tighter class has a smaller nc1_c."""
  h, y = imbalanced_blobs()
  h[y == 3] = h[y == 3].mean(0) + 0.01 * (h[y == 3] - h[y == 3].mean(0))
  per = class_metrics.nc1_per_class(h, y, 4)
  w = np.eye(4, 12)
  overall = nc.nc_metrics(h, y, w, None, 4)["nc1"]
  assert np.sum(np.bincount(y) / y.size * per) == pytest.approx(overall, rel=1e-10)
  assert per[3] < 1e-3 * per[:3].min()


def test_per_class_top1_against_a_direct_count():
  h, y = imbalanced_blobs(seed=3, spread=6.0)
  w = np.random.default_rng(1).standard_normal((4, 12))
  b = np.array([0.5, 0.0, -0.5, 1.0])
  got = class_metrics.top1_per_class(h, y, w, b)
  pred = np.argmax(h @ w.T + b, axis=1)
  want = [100.0 * np.mean(pred[y == c] == c) for c in range(4)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  overall = nc.nc_metrics(h, y, w, b, 4)["top1"]
  assert np.sum(np.bincount(y) / y.size * got) == pytest.approx(overall, rel=1e-12)


def test_minority_collapse_closed_forms():
  k, d = 6, 8
  etf = np.asarray(nc.random_etf(jax.random.PRNGKey(0), d, k, jnp.float64)).T  # (K, d) rows
  out = class_metrics.minority_collapse(etf, [3, 4, 5])
  assert out["minority_cosine"] == pytest.approx(-1 / (k - 1), abs=1e-12)
  assert out["minority_collapse"] == pytest.approx(0.0, abs=1e-12)
  merged = etf.copy()
  merged[[4, 5]] = 2.0 * merged[3]                            # the minority rows coincide
  out = class_metrics.minority_collapse(merged, [3, 4, 5])
  assert out["minority_cosine"] == pytest.approx(1.0, abs=1e-12)
  assert out["minority_collapse"] == pytest.approx(k / (k - 1), abs=1e-12)
  assert np.isnan(class_metrics.minority_collapse(etf, [2])["minority_cosine"])
  with pytest.raises(ValueError, match=r"^minority: expected class ids in \[0, 6\)"):
    class_metrics.minority_collapse(etf, [6])


def test_etf_reference_distances_zero_at_the_reference_and_rotation_covariant():
  """The nearest ETF of a rotated classifier is the rotated ETF: its distance to the
  reference is ‖Q E − E‖², computed independently."""
  h, y = imbalanced_blobs()
  w = np.random.default_rng(2).standard_normal((4, 12))
  ref = nc.nc_metrics(h, y, w, None, 4)
  same = class_metrics.etf_reference_distances(ref, ref)
  assert same == {"w_etf_ref_dist": 0.0, "h_etf_ref_dist": 0.0}
  q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((12, 12)))
  moved = nc.nc_metrics(h @ q.T, y, w @ q.T, None, 4)
  got = class_metrics.etf_reference_distances(moved, ref)
  for name in ("w", "h"):
    e = ref[f"{name}_etf_frame"]
    assert got[f"{name}_etf_ref_dist"] == pytest.approx(np.sum((q @ e - e) ** 2), rel=1e-9)
  assert np.isnan(class_metrics.etf_reference_distances(moved, None)["w_etf_ref_dist"])


def test_nc_evaluate_adds_rank_reference_and_imbalance_entries():
  h, y = imbalanced_blobs(d=8)
  h = np.asarray(heads.normalise_features(jnp.asarray(h, jnp.float32), 5.0))
  cfg = heads.HeadConfig("standard", num_classes=4, feature_dim=8)
  params, state = heads.init(cfg, jax.random.PRNGKey(0))
  first = evaluate.nc_evaluate(h, y, cfg, params, state)
  assert set(evaluate.SCALAR_KEYS) <= set(first) and np.isnan(first["w_etf_ref_dist"])
  again = evaluate.nc_evaluate(h, y, cfg, params, state, reference=first, minority=[2, 3])
  assert again["w_etf_ref_dist"] == 0.0 and again["h_etf_ref_dist"] == 0.0
  assert again["numerical_rank"] == pytest.approx(class_metrics.numerical_rank(h, y, 4))
  per = again["nc1_per_class"]
  assert again["nc1_minority"] == pytest.approx(per[2:].mean())
  assert again["nc1_majority"] == pytest.approx(per[:2].mean())
  w, _ = heads.classifier(cfg, params, state, h.mean(0))
  assert again["minority_cosine"] == pytest.approx(
      class_metrics.minority_collapse(np.asarray(w), [2, 3])["minority_cosine"])
  assert set(evaluate.IMBALANCE_KEYS) <= set(again)

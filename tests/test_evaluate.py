"""nc_jax.evaluate: features collected from batches, and the NC metrics of a head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nc_jax as nc
from nc_jax import evaluate, heads


def blobs(n=60, k=3, d=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  h = 3.0 * rng.standard_normal((k, d))[labels] + rng.standard_normal((n, d))
  return heads.normalise_features(jnp.asarray(h, jnp.float32), 5.0), labels.astype(np.int32)


def test_collect_features_concatenates_and_drops_padding():
  h, y = blobs()
  padded = [(h[:32], jnp.asarray(y[:32])), (jnp.concatenate([h[32:], jnp.zeros((4, 8))]),
                                             jnp.asarray(np.r_[y[32:], [-1] * 4]))]
  got_h, got_y = evaluate.collect_features(iter(padded))
  np.testing.assert_array_equal(got_h, np.asarray(h))
  np.testing.assert_array_equal(got_y, y)
  with pytest.raises(ValueError, match="batches: expected at least one batch"):
    evaluate.collect_features(iter([]))


@pytest.mark.parametrize("kind", heads.HEAD_KINDS)
def test_nc_evaluate_equals_nc_metrics_with_the_heads_classifier(kind):
  """The same numbers as nc_metrics with heads.classifier at the features' mean, also when the
  passes stream in several chunks."""
  h, y = blobs()
  cfg = heads.HeadConfig(kind, num_classes=3, feature_dim=8)
  params, state = heads.init(cfg, jax.random.PRNGKey(0))
  if kind == "implicit":  # a trained-looking classifier: one training step's W and b
    _, state = heads.train_logits(cfg, params, state, h, jnp.asarray(y))
  w, b = heads.classifier(cfg, params, state, np.asarray(h).mean(0, dtype=np.float64)
                          .astype(np.float32))
  want = nc.nc_metrics(np.asarray(h), y, np.asarray(w), np.asarray(b), 3)
  for chunk in (7, evaluate.CHUNK):
    got = evaluate.nc_evaluate(np.asarray(h), y, cfg, params, state, chunk=chunk)
    for key in nc.metrics.METRIC_KEYS:
      # (float32 sums in other chunks: quantities at rounding level, e.g. bias_collapse ~1e-7)
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(got["cosine_margins"], want["cosine_margins"], rtol=1e-6,
                               atol=1e-6)  # float32 sums, chunked differently


def test_nc_evaluate_missing_class_is_nan_with_a_warning():
  h, y = blobs()
  cfg = heads.HeadConfig("fixed", num_classes=4, feature_dim=8)   # class 3 has no example
  params, state = heads.init(cfg, jax.random.PRNGKey(0))
  with pytest.warns(UserWarning, match="1 of 4 classes have no example"):
    got = evaluate.nc_evaluate(np.asarray(h), y, cfg, params, state)
  assert np.isnan(got["nc1"]) and got["cosine_margins"] is None


def test_nc_evaluate_without_numerical_rank_omits_only_that_key():
  """``numerical_rank=False`` (the UFM runner's) drops the key and changes nothing else, also
  on the missing-class path."""
  h, y = blobs()
  cfg = heads.HeadConfig("standard", num_classes=3, feature_dim=8)
  params, state = heads.init(cfg, jax.random.PRNGKey(0))
  full = evaluate.nc_evaluate(np.asarray(h), y, cfg, params, state)
  lean = evaluate.nc_evaluate(np.asarray(h), y, cfg, params, state, numerical_rank=False)
  assert 1.0 <= full["numerical_rank"] <= 8.0 and "numerical_rank" not in lean
  assert set(full) - set(lean) == {"numerical_rank"}
  for key in lean:
    np.testing.assert_array_equal(np.asarray(lean[key], float), np.asarray(full[key], float),
                                  err_msg=key)
  cfg4 = heads.HeadConfig("fixed", num_classes=4, feature_dim=8)
  params4, state4 = heads.init(cfg4, jax.random.PRNGKey(0))
  with pytest.warns(UserWarning, match="no example"):
    lean = evaluate.nc_evaluate(np.asarray(h), y, cfg4, params4, state4, numerical_rank=False)
  assert "numerical_rank" not in lean and np.isnan(lean["nc1"])

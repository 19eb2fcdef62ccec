"""Tests of nc_jax.class_means: the official feature-mean moving average (docs/method.md §7).

The reference ``_RefLayer`` below is a line-by-line numpy transcription of the
official ``FeaturesMovingAverageLayer.forward(..., method='EMA')`` and
``update`` (commit 00cdf29), written as explicit loops over classes; it shares
no code with the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from nc_jax import class_means as cm


# ---------------------------------------------------------------------------
# Independent reference (numpy, float64).


class _RefLayer:
  """Literal port of the official layer: FMA_prev, count, alpha, has_sampled_point."""

  def __init__(self, d, k, alpha_min=1e-4):
    self.d, self.k, self.alpha_min = d, k, alpha_min
    self.fma_prev = np.zeros((d, k))
    self.count = 0
    self.alpha = 1.0
    self.has_sampled = np.zeros(k, dtype=bool)

  def forward(self, features, targets):
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets)
    d, k = self.d, self.k
    mu = features.mean(axis=0)
    m = np.full((d, k), np.nan)
    for c in range(k):
      rows = [features[i] for i in range(len(targets)) if targets[i] == c]
      if rows:
        m[:, c] = np.sum(rows, axis=0) / len(rows) - mu
    if len(set(targets.tolist())) < k:
      nan_cols = np.isnan(m).any(axis=0)
      m[:, nan_cols] = mu[:, None]
      self.has_sampled = self.has_sampled | ~nan_cols
      if self.fma_prev.sum() == 0:
        m[:, nan_cols] = mu[:, None]
      else:
        for c in range(k):
          if nan_cols[c] and not self.has_sampled[c]:
            m[:, c] = mu
            self.fma_prev[:, c] = mu
        for c in range(k):
          if nan_cols[c] and self.has_sampled[c]:
            m[:, c] = self.fma_prev[:, c]
    # update(val, n=1, method='EMA')
    if self.alpha > self.alpha_min:
      self.alpha = 2 / (self.count + 1 + 1)
    else:
      self.alpha = self.alpha_min
    cur = self.alpha * m + (1 - self.alpha) * self.fma_prev
    self.fma_prev = cur.copy()
    self.count += 1
    return cur / np.sqrt(np.sum(cur * cur)), mu


def _official_alphas(t_max, alpha_min=1e-4):
  alphas, alpha = [], 1.0
  for count in range(t_max):
    alpha = 2 / (count + 2) if alpha > alpha_min else alpha_min
    alphas.append(alpha)
  return alphas  # alphas[t - 1] = alpha_t


def _assert_state_matches(state, ref, tol=1e-13):
  np.testing.assert_allclose(np.asarray(state.ema), ref.fma_prev, rtol=tol, atol=tol)
  np.testing.assert_array_equal(np.asarray(state.seen), ref.has_sampled)
  assert int(state.step) == ref.count


def _f64(x):
  return jnp.asarray(np.asarray(x, dtype=np.float64))


def _i32(x):
  return jnp.asarray(np.asarray(x, dtype=np.int32))


# ---------------------------------------------------------------------------
# Hand-worked sequence, d = 2, K = 3 (numbers worked out by hand).


def test_hand_worked_sequence_d2_k3():
  s = cm.init(2, 3, jnp.float64)
  # Step 1: class 2 missing, history empty -> its column is the uncentred mu_G.
  h1 = _f64([[1, 0], [3, 0], [0, 2]])
  ybar, mu, s = cm.update(s, h1, _i32([0, 0, 1]))
  np.testing.assert_allclose(mu, [4 / 3, 2 / 3], rtol=1e-15)
  f1 = np.array([[2 / 3, -4 / 3, 4 / 3], [-2 / 3, 4 / 3, 2 / 3]])   # alpha_1 = 1
  np.testing.assert_allclose(s.ema, f1, rtol=1e-14)
  np.testing.assert_allclose(ybar, f1 / (np.sqrt(60) / 3), rtol=1e-14)
  np.testing.assert_array_equal(s.seen, [True, True, False])
  assert int(s.step) == 1

  # Step 2: only class 0; class 1 seen & missing (kept), class 2 never seen &
  # missing (column reset to mu_G = (2, 1)). alpha_2 = 2/3, m_0 = 0.
  h2 = _f64([[3, 0], [1, 2], [2, 1]])
  ybar, mu, s = cm.update(s, h2, _i32([0, 0, 0]))
  np.testing.assert_allclose(mu, [2, 1], rtol=1e-15)
  f2 = np.array([[2 / 9, -4 / 3, 2], [-2 / 9, 4 / 3, 1]])
  np.testing.assert_allclose(s.ema, f2, rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(ybar, f2 / np.linalg.norm(f2), rtol=1e-14, atol=1e-15)
  np.testing.assert_array_equal(s.seen, [True, True, False])

  # Step 3: classes 0 and 2; class 1 seen & missing stays. alpha_3 = 1/2.
  h3 = _f64([[0, 0], [4, 2]])
  ybar, mu, s = cm.update(s, h3, _i32([0, 2]))
  f3 = np.array([[-8 / 9, -4 / 3, 2], [-11 / 18, 4 / 3, 1]])
  np.testing.assert_allclose(s.ema, f3, rtol=1e-14)
  np.testing.assert_allclose(ybar, f3 / np.linalg.norm(f3), rtol=1e-14)
  np.testing.assert_array_equal(s.seen, [True, True, True])
  assert int(s.step) == 3


def test_seen_only_updated_when_a_class_is_missing():
  """Official quirk: a full batch does not mark classes as seen."""
  s = cm.init(2, 3, jnp.float64)
  # Unbalanced full batch (2, 1, 1 samples), so the stored sum is nonzero (0.25).
  _, _, s = cm.update(s, _f64([[1, 0], [0, 1], [2, 2], [3, 0]]), _i32([0, 1, 2, 0]))
  np.testing.assert_array_equal(s.seen, [False, False, False])
  np.testing.assert_allclose(s.ema, [[0.5, -1.5, 0.5], [-0.75, 0.25, 1.25]], rtol=1e-15)
  h = _f64([[1, 1], [3, 1], [2, 4]])
  _, mu, s = cm.update(s, h, _i32([0, 1, 1]))
  np.testing.assert_array_equal(s.seen, [True, True, False])
  # Class 2 is missing and counts as never seen: reset to mu_G = (2, 2), not kept.
  np.testing.assert_allclose(np.asarray(s.ema)[:, 2], [2, 2], rtol=1e-15)


def test_zero_sum_history_counts_as_empty():
  """Official quirk: "history empty" is ``sum(FMA_prev) == 0``, which also holds
  after a *balanced* full batch (sum_k n_k (mean_k - mu_G) = 0). A missing class
  then gets m = mu_G while its stored column is kept: alpha*mu_G + (1-alpha)*prev."""
  s = cm.init(2, 3, jnp.float64)
  _, _, s = cm.update(s, _f64([[1, 0], [0, 1], [2, 2]]), _i32([0, 1, 2]))
  f1 = np.array([[0, -1, 1], [-1, 0, 1]], float)      # mu_G = (1, 1); sums to 0
  np.testing.assert_array_equal(s.ema, f1)
  _, mu, s = cm.update(s, _f64([[1, 1], [3, 1], [2, 4]]), _i32([0, 1, 1]))
  np.testing.assert_array_equal(s.seen, [True, True, False])
  np.testing.assert_allclose(mu, [2, 2], rtol=1e-15)
  # m_2 = mu_G = (2, 2), alpha_2 = 2/3: (2/3)*2 + (1/3)*1 = 5/3.
  np.testing.assert_allclose(np.asarray(s.ema)[:, 2], [5 / 3, 5 / 3], rtol=1e-15)


# ---------------------------------------------------------------------------
# Longer sequences against the reference.


def _random_batches(rng, n, d, k, steps, class_sets):
  out = []
  for i in range(steps):
    allowed = class_sets[i % len(class_sets)]
    y = rng.choice(allowed, size=n)
    out.append((rng.normal(size=(n, d)), y.astype(np.int32)))
  return out


def test_sequence_matches_reference():
  rng = np.random.default_rng(0)
  d, k = 3, 5
  class_sets = [[0, 1, 2], [0, 1, 2, 3, 4], [0, 3], [1, 2, 3, 4], [4], [0, 1, 2, 3, 4], [2, 3]]
  batches = _random_batches(rng, 7, d, k, 14, class_sets)
  ref = _RefLayer(d, k)
  s = cm.init(d, k, jnp.float64)
  for h, y in batches:
    ybar, mu, s = cm.update(s, _f64(h), _i32(y))
    rybar, rmu = ref.forward(h, y)
    np.testing.assert_allclose(ybar, rybar, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(mu, rmu, rtol=1e-13, atol=1e-15)
    _assert_state_matches(s, ref)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ybar)), 1.0, rtol=1e-14)


def test_float32_matches_reference():
  rng = np.random.default_rng(1)
  d, k = 4, 3
  batches = _random_batches(rng, 6, d, k, 6, [[0, 1], [0, 1, 2], [2]])
  ref = _RefLayer(d, k)
  s = cm.init(d, k)  # float32 default
  for h, y in batches:
    ybar, mu, s = cm.update(s, jnp.asarray(h, jnp.float32), _i32(y))
    assert ybar.dtype == mu.dtype == s.ema.dtype == jnp.float32
    rybar, rmu = ref.forward(h, y)
    np.testing.assert_allclose(ybar, rybar, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mu, rmu, rtol=1e-5, atol=1e-6)
  assert s.step.dtype == jnp.int32


# ---------------------------------------------------------------------------
# Alpha schedule.


def test_alpha_sequence_and_floor():
  official = _official_alphas(20_002)
  assert official[:3] == [1.0, 2 / 3, 0.5]
  assert official[19_997] == 2 / 19_999 > 1e-4      # alpha_19998
  assert official[19_998] == 1e-4                   # alpha_19999
  ts = np.array([1, 2, 3, 4, 10, 19_997, 19_998, 19_999, 20_000, 20_001, 10**6])
  got = np.asarray(cm.ema_alpha(jnp.asarray(ts), dtype=jnp.float64))
  want = [official[t - 1] if t <= 20_001 else 1e-4 for t in ts]
  np.testing.assert_array_equal(got, want)
  got32 = np.asarray(cm.ema_alpha(jnp.asarray(ts), dtype=jnp.float32))
  np.testing.assert_allclose(got32, want, rtol=1e-7)


@pytest.mark.parametrize("step", [19_996, 19_997, 19_998, 19_999, 20_000])
def test_alpha_floor_through_update(step):
  """A state at a large step uses alpha_{step+1} exactly (history nonzero, all classes present)."""
  rng = np.random.default_rng(2)
  d, k = 2, 3
  prev = rng.normal(size=(d, k))
  s = cm.ClassMeanState(_f64(prev), jnp.ones(k, bool), jnp.asarray(step, jnp.int32))
  h, y = rng.normal(size=(6, d)), np.array([0, 1, 2, 0, 1, 2], np.int32)
  _, _, s2 = cm.update(s, _f64(h), _i32(y))
  ref = _RefLayer(d, k)
  ref.fma_prev, ref.count, ref.has_sampled = prev.copy(), step, np.ones(k, bool)
  ref.alpha = _official_alphas(step)[-1]
  ref.forward(h, y)
  assert ref.alpha == _official_alphas(step + 1)[-1]
  np.testing.assert_allclose(s2.ema, ref.fma_prev, rtol=1e-15, atol=1e-16)
  assert int(s2.step) == step + 1


# ---------------------------------------------------------------------------
# Gradients.


def _loss_fn(state, y, g_bar, g_mu):
  def loss(h):
    ybar, mu, _ = cm.update(state, h, y)
    return jnp.sum(g_bar * ybar) + jnp.sum(g_mu * mu)
  return jax.jit(loss)


def _central_fd(f, x, eps=1e-6):
  x = np.asarray(x)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = eps
    grad[idx] = (float(f(jnp.asarray(x + e))) - float(f(jnp.asarray(x - e)))) / (2 * eps)
  return grad


def _state_after(d, k, batches):
  s = cm.init(d, k, jnp.float64)
  for h, y in batches:
    _, _, s = cm.update(s, _f64(h), _i32(y))
  return s


@pytest.mark.parametrize("case", ["empty_history", "all_column_kinds"])
def test_gradient_matches_finite_differences(case):
  rng = np.random.default_rng(3)
  d, k = 3, 5
  if case == "empty_history":
    s = cm.init(d, k, jnp.float64)
    y = np.array([0, 1, 1, 0, 1], np.int32)                 # 2, 3, 4 missing: mu_G columns
  else:
    # After this, seen = {0, 1, 2}; the test batch has 0, 3 present, 1 and 2
    # seen-missing (kept) and 4 never-seen missing (reset to mu_G).
    s = _state_after(d, k, [(rng.normal(size=(6, d)), np.array([0, 1, 2, 0, 1, 2]))])
    y = np.array([0, 3, 3, 0, 0, 3], np.int32)
  h = rng.normal(size=(len(y), d))
  g_bar, g_mu = _f64(rng.normal(size=(d, k))), _f64(rng.normal(size=d))
  f = _loss_fn(s, _i32(y), g_bar, g_mu)
  grad = np.asarray(jax.grad(f)(_f64(h)))
  fd = _central_fd(f, h)
  assert np.max(np.abs(fd)) > 1e-3
  np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)


def test_history_is_detached():
  rng = np.random.default_rng(4)
  d, k = 3, 4
  h1, y1 = _f64(rng.normal(size=(6, d))), _i32([0, 1, 2, 3, 0, 1])
  h2, y2 = _f64(rng.normal(size=(5, d))), _i32([0, 1, 1, 3, 0])
  g_bar = _f64(rng.normal(size=(d, k)))

  def two_steps(a, b):
    _, _, s1 = cm.update(cm.init(d, k, jnp.float64), a, y1)
    ybar2, mu2, s2 = cm.update(s1, b, y2)
    return jnp.sum(g_bar * ybar2) + jnp.sum(mu2) + jnp.sum(g_bar * s2.ema)

  g1, g2 = jax.grad(two_steps, argnums=(0, 1))(h1, h2)
  np.testing.assert_array_equal(g1, np.zeros_like(h1))
  assert np.max(np.abs(np.asarray(g2))) > 1e-3
  # The value does depend on batch 1 (so a zero gradient is a real detachment).
  fd = _central_fd(jax.jit(lambda a: two_steps(a, h2)), h1)
  assert np.max(np.abs(fd)) > 1e-3
  # The stored average carries no gradient.
  g_state = jax.grad(lambda b: jnp.sum(g_bar * cm.update(cm.init(d, k, jnp.float64), b, y1)[2].ema))(h1)
  np.testing.assert_array_equal(g_state, np.zeros_like(h1))
  # Nor does a gradient reach the incoming state's average (FMA_{t-1} is detached).
  s1 = cm.update(cm.init(d, k, jnp.float64), h1, y1)[2]
  g_prev = jax.grad(lambda e: jnp.sum(g_bar * cm.update(s1._replace(ema=e), h2, y2)[0]))(s1.ema)
  np.testing.assert_array_equal(g_prev, np.zeros_like(g_prev))


# ---------------------------------------------------------------------------
# Transformations: jit, scan, vmap.


def test_jit_and_no_jit_agree():
  rng = np.random.default_rng(5)
  d, k = 3, 4
  s = _state_after(d, k, [(rng.normal(size=(5, d)), np.array([0, 1, 1, 0, 2]))])
  h, y = _f64(rng.normal(size=(6, d))), _i32([0, 3, 3, 0, 0, 3])
  eager = cm.update(s, h, y)
  jitted = jax.jit(cm.update)(s, h, y)
  with jax.disable_jit():
    nojit = cm.update(s, h, y)
  for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(nojit)):
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(a, c, rtol=1e-14, atol=1e-15)


def test_scan_carry_and_vmap():
  rng = np.random.default_rng(6)
  d, k, n, steps, streams = 3, 4, 5, 4, 3
  hs = rng.normal(size=(streams, steps, n, d))
  ys = np.stack([np.stack([rng.choice([0, 1, 2] if t % 2 == 0 else [0, 1, 2, 3], size=n)
                           for t in range(steps)]) for _ in range(streams)]).astype(np.int32)

  def run(h_seq, y_seq):
    def body(s, hy):
      ybar, mu, s = cm.update(s, hy[0], hy[1])
      return s, (ybar, mu)
    return jax.lax.scan(body, cm.init(d, k, jnp.float64), (h_seq, y_seq))

  final, (ybars, mus) = jax.jit(jax.vmap(run))(_f64(hs), _i32(ys))
  for j in range(streams):
    ref = _RefLayer(d, k)
    for t in range(steps):
      rybar, rmu = ref.forward(hs[j, t], ys[j, t])
      np.testing.assert_allclose(ybars[j, t], rybar, rtol=1e-13, atol=1e-14)
      np.testing.assert_allclose(mus[j, t], rmu, rtol=1e-13, atol=1e-15)
    _assert_state_matches(jax.tree.map(lambda x: x[j], final), ref)


# ---------------------------------------------------------------------------
# Data parallelism: shard_map over the 8 fake CPU devices.


def _mesh():
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py should provide 8 CPU devices"
  return Mesh(np.array(devices[:8]), ("data",))


def test_sharded_update_equals_global_batch():
  rng = np.random.default_rng(7)
  d, k, shards, per = 3, 5, 8, 4
  mesh = _mesh()
  sharded = jax.jit(jax.shard_map(
      lambda s, h, y: cm.update(s, h, y, axis_name="data"),
      mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P(), P())))
  # Per-step, per-shard allowed classes: uneven, classes missing on some shards,
  # and globally missing classes (4 at step 1: never seen; 2 at step 3: seen).
  plans = [
      [[0], [0, 1], [1], [2, 3], [3], [0, 2], [1, 1], [0, 3]],
      [[4], [0], [0, 1, 2, 3], [4, 4], [1], [2], [3], [0, 4]],
      [[0], [0], [1], [1, 3], [3], [4], [0, 1], [3]],
      [[0, 1, 2, 3, 4]] * 4 + [[2], [2], [2], [2]],
      [[1], [3], [1, 3], [3], [1], [1], [3], [1]],
  ]
  s_single = s_shard = cm.init(d, k, jnp.float64)
  ref = _RefLayer(d, k)
  for plan in plans:
    y = np.concatenate([rng.choice(c, size=per) for c in plan]).astype(np.int32)
    h = rng.normal(size=(shards * per, d))
    out_single = cm.update(s_single, _f64(h), _i32(y))
    out_shard = sharded(s_shard, _f64(h), _i32(y))
    for a, b in zip(jax.tree.leaves(out_single), jax.tree.leaves(out_shard)):
      np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    rybar, _ = ref.forward(h, y)
    np.testing.assert_allclose(out_shard[0], rybar, rtol=1e-13, atol=1e-14)
    _, _, s_single = out_single
    _, _, s_shard = out_shard
    _assert_state_matches(s_shard, ref)
  assert int(s_shard.step) == len(plans)


def test_sharded_gradient_equals_global_batch():
  rng = np.random.default_rng(8)
  d, k, shards, per = 3, 5, 8, 3
  mesh = _mesh()
  s = _state_after(d, k, [(rng.normal(size=(6, d)), np.array([0, 1, 2, 0, 1, 2]))])
  y = _i32(np.concatenate([rng.choice(c, size=per) for c in
                           [[0], [3], [0, 3], [3], [0], [0], [3], [0, 3]]]))
  h = _f64(rng.normal(size=(shards * per, d)))
  g_bar, g_mu = _f64(rng.normal(size=(d, k))), _f64(rng.normal(size=d))

  def loss_local(hh, yy):
    ybar, mu, _ = cm.update(s, hh, yy, axis_name="data")
    return jnp.sum(g_bar * ybar) + jnp.sum(g_mu * mu)

  loss_sharded = jax.shard_map(loss_local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  g_shard = jax.jit(jax.grad(loss_sharded))(h, y)
  g_single = jax.grad(_loss_fn(s, y, g_bar, g_mu))(h)
  np.testing.assert_allclose(g_shard, g_single, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# class_means.


def test_class_means_plain_and_sharded():
  rng = np.random.default_rng(9)
  d, k = 3, 6
  y = np.array([0, 2, 2, 5, 0, 0, 1, 2] * 4, np.int32)    # classes 3 and 4 empty
  h = rng.normal(size=(len(y), d))
  means, counts = cm.class_means(_f64(h), _i32(y), k)
  want_counts = [int(np.sum(y == c)) for c in range(k)]
  np.testing.assert_array_equal(counts, want_counts)
  assert counts.dtype == jnp.int32
  for c in range(k):
    want = h[y == c].mean(axis=0) if want_counts[c] else np.zeros(d)
    np.testing.assert_allclose(means[:, c], want, rtol=1e-14, atol=1e-15)
  sharded = jax.shard_map(lambda a, b: cm.class_means(a, b, k, axis_name="data"), mesh=_mesh(),
                          in_specs=(P("data"), P("data")), out_specs=(P(), P()))
  means_s, counts_s = sharded(_f64(h), _i32(y))
  np.testing.assert_array_equal(counts_s, want_counts)
  np.testing.assert_allclose(means_s, means, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------
# Validation.


def _good():
  return cm.init(3, 4, jnp.float64), _f64(np.ones((5, 3))), _i32([0, 1, 2, 3, 0])


@pytest.mark.parametrize("name, call", [
    ("dim", lambda: cm.init(0, 4)),
    ("dim", lambda: cm.init(2.5, 4)),
    ("num_classes", lambda: cm.init(3, 1)),
    ("num_classes", lambda: cm.init(3, 2.0)),
    ("dtype", lambda: cm.init(3, 4, jnp.int32)),
    ("features", lambda: cm.update(_good()[0], _f64(np.ones(3)), _good()[2])),
    ("features", lambda: cm.update(_good()[0], _f64(np.ones((5, 2))), _good()[2])),
    ("features", lambda: cm.update(_good()[0], _f64(np.ones((0, 3))), _i32(np.zeros(0)))),
    ("features", lambda: cm.update(_good()[0], _f64(np.full((5, 3), np.nan)), _good()[2])),
    ("features", lambda: cm.update(_good()[0], _f64(np.full((5, 3), np.inf)), _good()[2])),
    ("features", lambda: cm.update(_good()[0], "abc", _good()[2])),
    ("labels", lambda: cm.update(_good()[0], _good()[1], _i32([[0, 1, 2, 3, 0]]))),
    ("labels", lambda: cm.update(_good()[0], _good()[1], _f64([0, 1, 2, 3, 0]))),
    ("labels", lambda: cm.update(_good()[0], _good()[1], _i32([0, 1, 2, 3]))),
    ("labels", lambda: cm.update(_good()[0], _good()[1], _i32([0, 1, 2, 4, 0]))),
    ("labels", lambda: cm.update(_good()[0], _good()[1], _i32([0, -1, 2, 3, 0]))),
    ("alpha_min", lambda: cm.update(*_good(), alpha_min=1.5)),
    ("alpha_min", lambda: cm.update(*_good(), alpha_min=-0.1)),
    ("axis_name", lambda: cm.update(*_good(), axis_name=["data"])),
    ("state", lambda: cm.update("state", _good()[1], _good()[2])),
    ("state.ema", lambda: cm.update(_good()[0]._replace(ema=_f64(np.zeros(3))), *_good()[1:])),
    ("state.seen", lambda: cm.update(_good()[0]._replace(seen=jnp.zeros(3, bool)), *_good()[1:])),
    ("state.step", lambda: cm.update(_good()[0]._replace(step=jnp.zeros(2, jnp.int32)), *_good()[1:])),
    ("num_classes", lambda: cm.class_means(_good()[1], _good()[2], 1)),
    ("features", lambda: cm.class_means(_f64(np.ones((5, 3, 1))), _good()[2], 4)),
    ("labels", lambda: cm.class_means(_good()[1], _good()[2], 3)),
])
def test_bad_inputs_raise_value_error_naming_argument(name, call):
  with pytest.raises(ValueError, match=rf"^{name.replace('.', r'[.]')}\b"):
    call()


def test_value_checks_skipped_under_jit():
  """Under a user's jit only static checks run; out-of-range labels match no class."""
  s, h, y = _good()
  ybar, mu, s2 = jax.jit(cm.update)(s, h, _i32([0, 1, 2, 9, 0]))
  assert np.all(np.isfinite(np.asarray(ybar)))
  np.testing.assert_array_equal(s2.seen, [True, True, True, False])
  with pytest.raises(ValueError, match="^features"):
    jax.jit(cm.update)(s, _f64(np.ones((5, 2))), y)

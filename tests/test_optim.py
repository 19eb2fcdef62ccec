"""Tests of nc_jax.optim: AGD (docs/method.md §10.1), its initialisation, the optimiser and
schedule factories.

The AGD reference ``_ref_agd_step`` is a numpy float64 transcription of the official
``AGD.step`` (``nc/optimisers/agd.py``, commit 00cdf29) in PyTorch layout
((out, in) and (out, in, kh, kw)); Flax kernels are transposed into that layout
and back. The OneCycle reference ``_ref_onecycle`` transcribes PyTorch's
``OneCycleLR.get_lr`` (cosine annealing). Neither shares code with the
implementation.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from nc_jax.optim import (AGDState, agd, agd_eta, agd_eta_from_state, agd_init,
                          agd_singular_value, make_optimizer, make_schedule)


# ---------------------------------------------------------------------------
# Independent references.


def _to_torch(w):
  """Flax (in, out) / (kh, kw, in, out) -> PyTorch (out, in) / (out, in, kh, kw)."""
  w = np.asarray(w, dtype=np.float64)
  return w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)


def _from_torch(w):
  return w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)


def _ref_sv(w):
  sv = math.sqrt(w.shape[0] / w.shape[1])
  if w.ndim == 4:
    sv /= math.sqrt(w.shape[2] * w.shape[3])
  return sv


def _ref_agd_step(weights, grads, gain):
  """Official AGD.step on lists of torch-layout float64 arrays; returns (new weights, log)."""
  depth = len(weights)
  g_sum = 0.0
  for w, g in zip(weights, grads):
    g_sum += _ref_sv(w) * np.linalg.norm(g, axis=(0, 1)).sum()
  g_sum /= depth
  log = math.log(0.5 * (1 + math.sqrt(1 + 4 * g_sum)))
  new = []
  for w, g in zip(weights, grads):
    with np.errstate(divide="ignore", invalid="ignore"):
      factor = _ref_sv(w) / np.linalg.norm(g, axis=(0, 1), keepdims=True)
    # Official: torch.nan_to_num(factor), which maps sv/0 = inf to the largest float, so a
    # zero slice gets (gain·log/depth·FLT_MAX)·0 = 0, or inf·0 = NaN once gain·log/depth > 1.
    # The intended (and implemented) result is a zero update: map inf to 0.
    factor = np.nan_to_num(factor, nan=0.0, posinf=0.0)
    new.append(w - gain * log / depth * factor * g)
  return new, log


def _ref_onecycle(step, total, max_lr=0.25, div_factor=25.0, final_div_factor=1e4,
                  pct_start=0.3, three_phase=True):
  """PyTorch OneCycleLR.get_lr (anneal_strategy='cos') at ``step`` (0-based)."""
  initial = max_lr / div_factor
  minimum = initial / final_div_factor
  if three_phase:
    phases = [
        {"end_step": float(pct_start * total) - 1, "start_lr": initial, "end_lr": max_lr},
        {"end_step": float(2 * pct_start * total) - 2, "start_lr": max_lr, "end_lr": initial},
        {"end_step": total - 1, "start_lr": initial, "end_lr": minimum},
    ]
  else:
    phases = [
        {"end_step": float(pct_start * total) - 1, "start_lr": initial, "end_lr": max_lr},
        {"end_step": total - 1, "start_lr": max_lr, "end_lr": minimum},
    ]
  start_step = 0
  for i, phase in enumerate(phases):
    end_step = phase["end_step"]
    if step <= end_step or i == len(phases) - 1:
      pct = (step - start_step) / (end_step - start_step)
      start, end = phase["start_lr"], phase["end_lr"]
      return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    start_step = phase["end_step"]
  raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# Fixtures.

_SHAPES = {
    "dense": {"kernel": (12, 5)},       # Dense, in=12 > out=5
    "square": {"kernel": (4, 4)},       # Dense, square
    "conv3": {"kernel": (3, 3, 4, 6)},  # Conv 3x3, in=4 < out=6
    "conv25": {"kernel": (2, 5, 6, 3)},  # Conv 2x5 (kh != kw), in=6 > out=3
}


def _random_tree(seed, dtype, scale=1.0):
  """Gaussian pytree of _SHAPES (numpy RNG: eager jax.random would compile per shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype),
                                _SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _loss(params, targets):
  """0.5‖p − T‖² + 0.25 Σ p⁴ per leaf: gradient p − T + p³ (elementwise, layout-free)."""
  terms = jax.tree_util.tree_map(
      lambda p, t: 0.5 * jnp.sum((p - t) ** 2) + 0.25 * jnp.sum(p ** 4), params, targets)
  return sum(jax.tree_util.tree_leaves(terms))


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


# ---------------------------------------------------------------------------
# AGD update.


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)])
def test_agd_matches_official_transcription(dtype, tol):
  params = _random_tree(0, dtype, scale=0.3)
  targets = _random_tree(1, dtype)
  gain = 10.0
  opt = agd(gain)
  state = opt.init(params)
  assert isinstance(state, AGDState) and state.eta.dtype == dtype

  ref_w = [_to_torch(p) for p in _leaves(params)]
  ref_t = [_to_torch(t) for t in _leaves(targets)]
  grad_fn, update_fn = jax.jit(jax.grad(_loss)), jax.jit(opt.update)  # (eager: other tests)
  for _ in range(3):
    grads = grad_fn(params, targets)
    updates, state = update_fn(grads, state, params)
    params = optax.apply_updates(params, updates)

    ref_g = [w - t + w ** 3 for w, t in zip(ref_w, ref_t)]
    ref_w, ref_log = _ref_agd_step(ref_w, ref_g, gain)

    np.testing.assert_allclose(float(state.eta), ref_log, rtol=tol)
    np.testing.assert_allclose(float(jax.jit(agd_eta)(grads)), ref_log, rtol=tol)
    for p, w in zip(_leaves(params), ref_w):
      assert p.dtype == dtype
      np.testing.assert_allclose(np.asarray(p, np.float64), _from_torch(w), rtol=tol, atol=tol)
  # The three steps moved the parameters substantially (the comparison is not vacuous).
  assert ref_log > 0.1


def test_agd_torch_layout_leaves_match_official_transcription():
  """Leaves marked by ``torch_layout`` are read as (out, in[, kh, kw]), e.g. a (K, d) head."""
  rng = np.random.default_rng(20)
  params = {"backbone": {"kernel": rng.standard_normal((3, 3, 4, 6))},  # Flax conv
            "head": {"kernel": rng.standard_normal((5, 12)),               # torch (K, d)
                     "conv": rng.standard_normal((6, 2, 3, 1))}}           # torch conv
  grads = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape), params)
  is_torch = lambda path: path.startswith("head/")  # noqa: E731
  opt = agd(torch_layout=is_torch)
  updates, state = opt.update(grads, opt.init(params))
  new = optax.apply_updates(params, updates)
  ref_w, ref_log = _ref_agd_step(
      [params["backbone"]["kernel"].transpose(3, 2, 0, 1), params["head"]["conv"],
       params["head"]["kernel"]],
      [grads["backbone"]["kernel"].transpose(3, 2, 0, 1), grads["head"]["conv"],
       grads["head"]["kernel"]], 10.0)
  np.testing.assert_allclose(float(state.eta), ref_log, rtol=1e-12)
  np.testing.assert_allclose(new["backbone"]["kernel"], ref_w[0].transpose(2, 3, 1, 0),
                             rtol=1e-12)
  np.testing.assert_allclose(new["head"]["conv"], ref_w[1], rtol=1e-12)
  np.testing.assert_allclose(new["head"]["kernel"], ref_w[2], rtol=1e-12)
  np.testing.assert_allclose(
      float(agd_eta(grads, torch_layout=is_torch)), ref_log, rtol=1e-12)
  # Without the predicate the (5, 12) head would be read as in=5, out=12: a different step.
  plain, _ = agd().update(grads, agd().init(params))
  assert not np.allclose(plain["head"]["kernel"], updates["head"]["kernel"])
  # Initialisation: the official standard-method classifier is orthogonal × sqrt(K/d).
  init = jax.jit(functools.partial(agd_init, torch_layout=is_torch))(params, jax.random.key(0))
  w = np.asarray(init["head"]["kernel"])
  np.testing.assert_allclose(w @ w.T, 5 / 12 * np.eye(5), atol=1e-12)
  c = np.asarray(init["head"]["conv"])  # (out=6, in=2, 3, 1): sv² = (6/2)/(3·1)
  for i in range(3):
    np.testing.assert_allclose(c[:, :, i, 0].T @ c[:, :, i, 0], (6 / 2) / 3 * np.eye(2),
                               atol=1e-12)
  assert not np.allclose(c[:, :, 0, 0], c[:, :, 1, 0])
  assert make_optimizer("agd", torch_layout=is_torch) is not None
  with pytest.raises(ValueError, match="torch_layout"):
    make_optimizer("sgd", learning_rate=0.1, torch_layout=is_torch)


def test_agd_singular_value_layout():
  assert agd_singular_value((12, 5)) == pytest.approx(math.sqrt(5 / 12))
  assert agd_singular_value((3, 3, 4, 6)) == pytest.approx(math.sqrt(6 / 4) / 3)
  assert agd_singular_value((2, 5, 6, 3)) == pytest.approx(math.sqrt(3 / 6) / math.sqrt(10))
  with pytest.raises(ValueError):
    agd_singular_value((7,))


def test_agd_zero_gradient_slice_gives_no_nan():
  params = _random_tree(2, jnp.float64)
  grads = _random_tree(3, jnp.float64)
  grads["conv3"]["kernel"] = grads["conv3"]["kernel"].at[1, 2].set(0.0)  # one kernel position
  grads["square"]["kernel"] = jnp.zeros((4, 4))                          # a whole 2-D gradient
  opt = agd()
  updates, state = opt.update(grads, opt.init(params))
  for u in _leaves(updates):
    assert np.all(np.isfinite(np.asarray(u)))
  assert np.all(np.asarray(updates["conv3"]["kernel"][1, 2]) == 0)
  assert np.all(np.asarray(updates["square"]["kernel"]) == 0)
  assert np.all(np.asarray(updates["conv3"]["kernel"][0, 0]) != 0)
  ref_w, ref_log = _ref_agd_step([_to_torch(p) for p in _leaves(params)],
                                 [_to_torch(g) for g in _leaves(grads)], 10.0)
  new = optax.apply_updates(params, updates)
  for p, w in zip(_leaves(new), ref_w):
    np.testing.assert_allclose(np.asarray(p), _from_torch(w), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(float(state.eta), ref_log, rtol=1e-12)
  # All-zero gradients: η = 0 and no update.
  zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
  updates, state = opt.update(zeros, state)
  assert float(state.eta) == 0.0
  assert all(np.all(np.asarray(u) == 0) for u in _leaves(updates))


@pytest.mark.parametrize("bad,path", [
    ({"Dense_0": {"kernel": np.ones((3, 4)), "bias": np.ones(4)}}, "Dense_0/bias"),
    ({"layers": [np.ones((3, 4)), np.ones(())]}, "layers/1"),
])
def test_agd_rejects_low_rank_parameters_with_path(bad, path):
  with pytest.raises(ValueError, match=path):
    agd().init(bad)
  with pytest.raises(ValueError, match=path):
    agd_init(bad, jax.random.key(0))


def test_agd_rejects_flax_bias_and_bn_scale():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=True)(x)  # affine: scale and bias (1-D)
      return nn.Dense(3, use_bias=False)(x.mean((1, 2)))

  variables = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 8, 8, 2), jnp.float32))
  with pytest.raises(ValueError, match="BatchNorm_0/"):
    jax.eval_shape(agd().init, variables["params"])


def test_agd_gain_validation():
  with pytest.raises(ValueError, match="gain"):
    agd(0.0)
  with pytest.raises(ValueError, match="gain"):
    agd(float("nan"))


def test_agd_jit_equals_eager():
  params = _random_tree(4, jnp.float32)
  grads = _random_tree(5, jnp.float32)
  opt = agd()
  state = opt.init(params)
  u0, s0 = opt.update(grads, state)
  u1, s1 = jax.jit(opt.update)(grads, state)
  np.testing.assert_allclose(float(s1.eta), float(s0.eta), rtol=1e-6)
  for a, b in zip(_leaves(u0), _leaves(u1)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_agd_under_shard_map_matches_single_device():
  """Data parallel: AGD on replicated params and gradients inside shard_map = one device."""
  devices = np.array(jax.devices()[:4])
  mesh = Mesh(devices, ("data",))
  params = _random_tree(6, jnp.float32, scale=0.3)
  xs = jax.random.normal(jax.random.key(7), (8, 4), jnp.float32)
  opt = agd()
  state = opt.init(params)

  def loss(p, x):
    scale = jnp.mean(x ** 2)  # depends on the shard
    return scale * sum(jnp.sum(leaf ** 3) for leaf in jax.tree_util.tree_leaves(p))

  def step(p, s, x):
    # shard_map (check_vma) types p as replicated, so the gradient with respect to it is
    # already summed over "data" (an explicit pmean would be a no-op on it): scaling each
    # shard's mean loss by 1/4 gives the whole-batch gradient on every device.
    g = jax.grad(lambda q: loss(q, x) / len(devices))(p)
    u, s = opt.update(g, s)
    return optax.apply_updates(p, u), s

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data")),
                                  out_specs=(P(), P())))
  p1, s1 = sharded(params, state, xs)
  # One device, whole batch: its gradient is the mean of the shards' (equal shard sizes).
  def step_single(p, s, x):
    u, s = opt.update(jax.grad(loss)(p, x), s)
    return optax.apply_updates(p, u), s

  p0, s0 = jax.jit(step_single)(params, state, xs)
  np.testing.assert_allclose(float(s1.eta), float(s0.eta), rtol=1e-5)
  for a, b in zip(_leaves(p0), _leaves(p1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_agd_inside_multi_transform_counts_only_its_leaves():
  """With optax.multi_transform, L counts only AGD's leaves; 1-D params elsewhere are fine."""
  params = _random_tree(8, jnp.float64)
  params["bn"] = {"scale": jnp.ones(6)}  # 1-D, handled by another transformation
  grads = _random_tree(9, jnp.float64)
  grads["bn"] = {"scale": jnp.full(6, 0.5)}
  labels = jax.tree_util.tree_map(lambda x: "agd" if x.ndim >= 2 else "sgd", params)
  tx = optax.multi_transform({"agd": agd(), "sgd": optax.sgd(0.1)}, labels)
  updates, state = tx.update(grads, tx.init(params), params)

  kernels = {k: v for k, v in params.items() if k != "bn"}
  kgrads = {k: v for k, v in grads.items() if k != "bn"}
  opt = agd()
  ref_updates, ref_state = opt.update(kgrads, opt.init(kernels))
  for k in kernels:
    np.testing.assert_allclose(updates[k]["kernel"], ref_updates[k]["kernel"], rtol=1e-13)
  np.testing.assert_allclose(updates["bn"]["scale"], -0.05)
  np.testing.assert_allclose(float(agd_eta_from_state(state)), float(ref_state.eta), rtol=1e-13)
  chained = optax.chain(optax.identity(), agd())
  assert float(agd_eta_from_state(chained.init(kernels))) == 0.0
  with pytest.raises(ValueError, match="opt_state"):
    agd_eta_from_state(optax.sgd(0.1).init(kernels))


# ---------------------------------------------------------------------------
# AGD initialisation.


def test_agd_init_orthogonal_slices_with_scale():
  params = _random_tree(10, jnp.float64)
  params["f32"] = {"kernel": jnp.ones((3, 3, 8, 8), jnp.float32)}
  init = jax.jit(agd_init)(params, jax.random.key(11))
  for p0, p in zip(_leaves(params), _leaves(init)):
    assert p.shape == p0.shape and p.dtype == p0.dtype
    w = _to_torch(p)  # (out, in[, kh, kw])
    sv = _ref_sv(w)
    out_dim, in_dim = w.shape[:2]
    mats = [w] if w.ndim == 2 else [w[:, :, i, j] for i in range(w.shape[2])
                                    for j in range(w.shape[3])]
    tol = 1e-5 if p.dtype == jnp.float32 else 1e-12
    for m in mats:
      if out_dim >= in_dim:
        np.testing.assert_allclose(m.T @ m, sv ** 2 * np.eye(in_dim), atol=tol)
      if out_dim <= in_dim:
        np.testing.assert_allclose(m @ m.T, sv ** 2 * np.eye(out_dim), atol=tol)
    if len(mats) > 1:  # independent slices
      assert not np.allclose(mats[0], mats[1])


def test_agd_init_deterministic_and_key_dependent():
  params = _random_tree(12, jnp.float32)
  init = jax.jit(agd_init)
  a = init(params, jax.random.key(13))
  b = init(params, jax.random.key(13))
  c = init(params, jax.random.key(14))
  d = agd_init(params, jax.random.key(13))  # outside a user's jit
  for x, y, z, w in zip(_leaves(a), _leaves(b), _leaves(c), _leaves(d)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.allclose(np.asarray(x), np.asarray(z))
    np.testing.assert_allclose(np.asarray(w), np.asarray(x), atol=1e-5)
  # Raw uint32 keys work too.
  init(params, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------
# SGD / Adam / AdamW against hand computation.


def _run(opt, p0, grads):
  state = opt.init(p0)
  p, out = p0, []
  for g in grads:
    u, state = opt.update(g, state, p)
    p = optax.apply_updates(p, u)
    out.append(np.asarray(p))
  return out


_P0 = np.array([[1.0, -2.0], [0.5, 3.0]])
_G = [np.array([[0.3, -0.1], [0.2, 0.4]]), np.array([[-0.5, 0.25], [0.1, -0.2]])]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_coupled_weight_decay_and_momentum(nesterov):
  lr, mom, wd = 0.1, 0.9, 0.01
  # lr halves from step 1 on (multistep), to check the schedule's step indexing.
  opt = make_optimizer("sgd", learning_rate=lr, momentum=mom, nesterov=nesterov,
                       weight_decay=wd, schedule="multistep",
                       schedule_kwargs={"milestones": [1], "gamma": 0.5})
  got = _run(opt, jnp.asarray(_P0), [jnp.asarray(g) for g in _G])

  p, buf, lrs = _P0.copy(), np.zeros_like(_P0), [lr, lr * 0.5]
  for t, g in enumerate(_G):
    d = g + wd * p
    buf = mom * buf + d
    step = d + mom * buf if nesterov else buf
    p = p - lrs[t] * step
    np.testing.assert_allclose(got[t], p, rtol=1e-14)


def test_sgd_defaults_and_no_momentum():
  # momentum unset -> 0.9 (official); momentum 0 -> plain SGD.
  got = _run(make_optimizer("sgd", learning_rate=0.1), jnp.asarray(_P0),
             [jnp.asarray(g) for g in _G])
  p1 = _P0 - 0.1 * _G[0]
  np.testing.assert_allclose(got[1], p1 - 0.1 * (0.9 * _G[0] + _G[1]), rtol=1e-14)
  got = _run(make_optimizer("sgd", learning_rate=0.1, momentum=0.0), jnp.asarray(_P0),
             [jnp.asarray(g) for g in _G])
  np.testing.assert_allclose(got[1], _P0 - 0.1 * (_G[0] + _G[1]), rtol=1e-14)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_coupled_and_adamw_decoupled(name):
  lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
  opt = make_optimizer(name, learning_rate=lr, weight_decay=wd)
  got = _run(opt, jnp.asarray(_P0), [jnp.asarray(g) for g in _G])
  p, m, v = _P0.copy(), 0.0, 0.0
  for t, g in enumerate(_G, start=1):
    if name == "adam":
      g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    if name == "adamw":
      step = step + wd * p
    p = p - lr * step
    np.testing.assert_allclose(got[t - 1], p, rtol=1e-13)


def test_make_optimizer_agd_is_agd():
  params = _random_tree(15, jnp.float64)
  grads = _random_tree(16, jnp.float64)
  a = make_optimizer("AGD")
  u_a, s_a = a.update(grads, a.init(params))
  u_b, s_b = agd(10.0).update(grads, agd(10.0).init(params))
  for x, y in zip(_leaves(u_a), _leaves(u_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Neutral values of unused arguments are accepted; total_steps is ignored.
  make_optimizer("agd", momentum=0, weight_decay=0.0, schedule="constant", warmup_steps=0,
                 total_steps=1000, gain=10)


def test_onecycle_optimizer_without_learning_rate():
  opt = make_optimizer("sgd", momentum=0.0, schedule="onecycle", total_steps=100)
  p = _run(opt, jnp.zeros(2), [jnp.ones(2)])
  np.testing.assert_allclose(p[0], -0.01 * np.ones(2), rtol=1e-12)  # 0.25/25 at step 0


# ---------------------------------------------------------------------------
# Schedules.


def _values(schedule, steps):
  return np.array([float(schedule(jnp.asarray(s, jnp.int32))) for s in steps])


def test_schedule_constant_with_warmup():
  s = make_schedule("constant", 0.1, warmup_steps=4)
  np.testing.assert_allclose(_values(s, [0, 1, 2, 4, 10]), [0, 0.025, 0.05, 0.1, 0.1],
                             rtol=1e-12, atol=1e-15)
  s = make_schedule("constant", 0.1, warmup_steps=4, warmup_init_lr=0.02)
  np.testing.assert_allclose(_values(s, [0, 2, 4]), [0.02, 0.06, 0.1], rtol=1e-12)
  np.testing.assert_allclose(_values(make_schedule("constant", 0.3), [0, 7]), [0.3, 0.3])


def test_schedule_step():
  s = make_schedule("step", 0.2, warmup_steps=2, step_size=3, gamma=0.5)
  steps = [0, 1, 2, 4, 5, 7, 8, 11]
  expected = [0.0, 0.1] + [0.2 * 0.5 ** ((t - 2) // 3) for t in steps[2:]]
  np.testing.assert_allclose(_values(s, steps), expected, rtol=1e-12, atol=1e-15)
  assert _values(s, [5])[0] == pytest.approx(0.1)


def test_schedule_multistep():
  s = make_schedule("multistep", 1.0, milestones=[2, 5], gamma=0.1)
  np.testing.assert_allclose(_values(s, [0, 1, 2, 4, 5, 100]),
                             [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-12)
  s = make_schedule("multistep", 1.0, warmup_steps=3, milestones=[2], gamma=0.1)
  np.testing.assert_allclose(_values(s, [0, 3, 4, 5]), [0, 1, 1, 0.1], rtol=1e-12, atol=1e-15)


def test_schedule_cosine():
  base, lo, total, warm = 0.4, 0.01, 12, 2
  s = make_schedule("cosine", base, total, warm, min_lr=lo)
  steps = [0, 1, 2, 3, 7, 11, 12, 30]
  length = total - warm

  def closed(t):
    if t < warm:
      return base * t / warm
    k = min(t - warm, length)
    return lo + (base - lo) * (1 + math.cos(math.pi * k / length)) / 2
  np.testing.assert_allclose(_values(s, steps), [closed(t) for t in steps], rtol=1e-12)
  assert _values(s, [7])[0] == pytest.approx((base + lo) / 2)
  assert _values(s, [12])[0] == pytest.approx(lo)


@pytest.mark.parametrize("total,three_phase", [(100, True), (55, True), (100, False)])
def test_schedule_onecycle_matches_torch_transcription(total, three_phase):
  s = make_schedule("onecycle", 123.0, total, three_phase=three_phase)  # base_lr ignored
  steps = list(range(total))
  got = _values(s, steps)
  ref = [_ref_onecycle(t, total, three_phase=three_phase) for t in steps]
  np.testing.assert_allclose(got, ref, rtol=1e-10)
  # Endpoints and peak (official defaults max_lr 0.25, div 25, final div 1e4).
  assert got[0] == pytest.approx(0.01)
  assert got[-1] == pytest.approx(1e-6)
  assert got.max() <= 0.25 * (1 + 1e-12)
  if total == 100:
    assert got[29] == pytest.approx(0.25) and np.argmax(got) == 29
    if three_phase:
      assert got[58] == pytest.approx(0.01)
  assert _values(s, [total + 10])[0] == pytest.approx(1e-6)


def test_schedule_onecycle_with_warmup():
  s = make_schedule("onecycle", 0.0, 110, 10, max_lr=0.5, div_factor=10,
                    final_div_factor=100)
  np.testing.assert_allclose(_values(s, [0, 5, 10, 39, 109]),
                             [0.0, 0.025, 0.05, 0.5, 0.0005], rtol=1e-10, atol=1e-15)


def test_schedules_are_jittable():
  s = make_schedule("onecycle", 0.0, 100, 5)
  f = jax.jit(s)
  for t in (0, 3, 40, 99):
    assert float(f(t)) == pytest.approx(float(s(t)))


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="sgdd", learning_rate=0.1), "sgd, adam, adamw, agd"),
    (dict(name="sgd", learning_rate=0.1, schedule="linear"), "constant, step, multistep"),
    (dict(name="sgd"), "learning_rate"),
    (dict(name="sgd", learning_rate=-0.1), "learning_rate"),
    (dict(name="sgd", learning_rate=float("nan")), "learning_rate"),
    (dict(name="sgd", learning_rate=0.1, momentum=1.0), "momentum"),
    (dict(name="sgd", learning_rate=0.1, momentum=-0.1), "momentum"),
    (dict(name="sgd", learning_rate=0.1, weight_decay=-1e-4), "weight_decay"),
    (dict(name="sgd", learning_rate=0.1, momentum=0.0, nesterov=True), "nesterov"),
    (dict(name="sgd", learning_rate=0.1, b1=0.9), "b1"),
    (dict(name="sgd", learning_rate=0.1, gain=10.0), "gain"),
    (dict(name="adam", learning_rate=0.1, momentum=0.9), "momentum"),
    (dict(name="adam", learning_rate=0.1, b2=1.0), "b2"),
    (dict(name="adamw", learning_rate=0.1, eps=0.0), "eps"),
    (dict(name="agd", learning_rate=0.1), "learning_rate"),
    (dict(name="agd", weight_decay=5e-4), "weight_decay"),
    (dict(name="agd", momentum=0.9), "momentum"),
    (dict(name="agd", schedule="cosine", total_steps=10), "schedule"),
    (dict(name="agd", warmup_steps=5), "warmup_steps"),
    (dict(name="agd", gain=-1.0), "gain"),
    (dict(name="sgd", learning_rate=0.1, warmup_steps=-1), "warmup_steps"),
])
def test_make_optimizer_bad_input(kwargs, match):
  name = kwargs.pop("name")
  with pytest.raises(ValueError, match=match):
    make_optimizer(name, **kwargs)


@pytest.mark.parametrize("args,kwargs,match", [
    (("exp", 0.1), {}, "constant, step, multistep, cosine, onecycle"),
    (("constant", -0.1), {}, "base_lr"),
    (("step", 0.1), {}, "step_size"),
    (("step", 0.1), {"step_size": 0}, "step_size"),
    (("step", 0.1), {"step_size": 3, "gamma": 0.0}, "gamma"),
    (("multistep", 0.1), {}, "milestones"),
    (("multistep", 0.1), {"milestones": [5, 3]}, "milestones"),
    (("cosine", 0.1), {}, "total_steps"),
    (("cosine", 0.1, 10, 10), {}, "warmup_steps"),
    (("cosine", 0.1, 10), {"min_lr": -1.0}, "min_lr"),
    (("onecycle", 0.1, 100), {"pct_start": 0.6}, "pct_start"),
    (("onecycle", 0.1, 100), {"max_lr": 0.0}, "max_lr"),
    (("onecycle", 0.1, 100), {"div_factor": -1.0}, "div_factor"),
    (("onecycle", 0.1, 3), {}, "total_steps"),
    (("onecycle", 0.1), {}, "total_steps"),
    (("constant", 0.1, 0), {}, "total_steps"),
])
def test_make_schedule_bad_input(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_schedule(*args, **kwargs)

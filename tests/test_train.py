"""Heads, losses and the jit/sharded train and eval steps."""

import functools

import flax.linen as nn
import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nc_jax as nc
from nc_jax import heads, train


class TinyNet(nn.Module):
  """Two-layer MLP backbone with non-affine BatchNorm (as the paper's no-bias mode)."""
  width: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(32, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_scale=False,
                     use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(x)
    x = nn.relu(x)
    return nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(x)


def blobs(n=256, k=4, dim=8, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.standard_normal((k, dim))
  labels = np.arange(n) % k
  x = centres[labels] + rng.standard_normal((n, dim))
  return jnp.asarray(x, dtype), jnp.asarray(labels, jnp.int32)


def setup(kind, k=4, width=16, lr=0.05, dtype=jnp.float32, seed=0, **head_kwargs):
  model = TinyNet(width=width, dtype=dtype)
  cfg = heads.HeadConfig(kind, num_classes=k, feature_dim=width, **head_kwargs)
  tx = optax.sgd(lr, momentum=0.9)
  x, y = blobs(k=k, dtype=np.float64 if dtype == jnp.float64 else np.float32)
  state = train.create_train_state(model, tx, cfg, jax.random.PRNGKey(seed), x[:8])
  return model, cfg, tx, state, x, y


# --------------------------------------------------------------------------- #
# Heads
# --------------------------------------------------------------------------- #


def test_normalise_features():
  h = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(heads.normalise_features(h, 5.0), [[3.0, 4.0], [0.0, 0.0]])


def test_fixed_head_is_canonical_etf_with_batch_mean_bias():
  cfg = heads.HeadConfig("fixed", num_classes=4, feature_dim=6)
  _, state = heads.init(cfg, jax.random.PRNGKey(0), jnp.float64)
  w = np.asarray(state.weight)
  np.testing.assert_allclose(w[:, :4], np.asarray(nc.simplex_etf(4, jnp.float64)), atol=1e-14)
  np.testing.assert_allclose(w[:, 4:], 0)
  h = jax.random.normal(jax.random.PRNGKey(1), (10, 6), jnp.float64)
  logits, _ = heads.train_logits(cfg, {}, state, h, jnp.zeros(10, jnp.int32))
  np.testing.assert_allclose(logits, (h - h.mean(0)) @ w.T, atol=1e-13)
  np.testing.assert_allclose(heads.eval_logits(cfg, {}, state, h), logits, atol=1e-13)
  # The bias carries no gradient: d logits / d h = W(I - sg) = W only.
  g = jax.grad(lambda a: heads.train_logits(cfg, {}, state, a, None)[0][0, 0])(h)
  np.testing.assert_allclose(g[0], w[0], atol=1e-13)
  np.testing.assert_allclose(g[1:], 0, atol=1e-13)
  rotated = heads.init(heads.HeadConfig("fixed", 4, 6, rotation_seed=3), jax.random.PRNGKey(0),
                       jnp.float64)[1].weight
  np.testing.assert_allclose(rotated @ rotated.T, w @ w.T, atol=1e-13)  # same geometry
  assert np.abs(np.asarray(rotated)[:, 4:]).max() > 1e-3


def test_implicit_head_first_and_later_steps():
  k, d, n = 4, 8, 32
  cfg = heads.HeadConfig("implicit", num_classes=k, feature_dim=d)
  _, state = heads.init(cfg, jax.random.PRNGKey(0), jnp.float64)
  h = heads.normalise_features(jax.random.normal(jax.random.PRNGKey(1), (n, d), jnp.float64), 5.0)
  labels = jnp.arange(n) % k
  logits, s1 = heads.train_logits(cfg, {}, state, h, labels)
  # First step: P is the feasibility solution for Ȳ (its own proximal solution).
  y_bar = nc.normalise_means(nc.class_means.class_means(h, labels, k)[0], h.mean(0))
  np.testing.assert_allclose(s1.frame, nc.feasibility_solution(y_bar), atol=1e-10)
  w = np.asarray(s1.weight)
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-12)   # unit rows
  np.testing.assert_allclose(w @ w.T, np.asarray(nc.simplex_etf(k, jnp.float64)) @ np.asarray(
      nc.simplex_etf(k, jnp.float64)), atol=1e-12)                          # an ETF
  np.testing.assert_allclose(s1.bias, -w @ np.asarray(h.mean(0)), atol=1e-12)
  np.testing.assert_allclose(logits, h @ w.T + s1.bias, atol=1e-12)
  assert bool(s1.initialised) and int(s1.means.step) == 1
  # Second step: prox is the stored frame; evaluation uses the last training W and b.
  h2 = h + 0.1 * jax.random.normal(jax.random.PRNGKey(2), h.shape, jnp.float64)
  _, s2 = heads.train_logits(cfg, {}, s1, h2, labels)
  y2 = nc.class_means.update(s1.means, h2, labels)[0]
  np.testing.assert_allclose(s2.frame, nc.nearest_etf(y2, s1.frame), atol=1e-10)
  np.testing.assert_allclose(heads.eval_logits(cfg, {}, s2, h), h @ s2.weight.T + s2.bias,
                             atol=1e-12)


def test_forward_only_ablation_drops_the_etf_gradient_path():
  k, d, n = 4, 8, 16
  h = heads.normalise_features(jax.random.normal(jax.random.PRNGKey(3), (n, d), jnp.float64), 5.0)
  labels = jnp.arange(n) % k
  grads = {}
  for fo in (False, True):
    cfg = heads.HeadConfig("implicit", k, d, forward_only=fo)
    _, state = heads.init(cfg, jax.random.PRNGKey(0), jnp.float64)
    f = lambda a: heads.loss("cross_entropy", heads.train_logits(cfg, {}, state, a, labels)[0],
                             labels)
    grads[fo] = jax.grad(f)(h)
  assert np.all(np.isfinite(grads[True])) and np.all(np.isfinite(grads[False]))
  assert float(jnp.linalg.norm(grads[True] - grads[False])) > 1e-6


@pytest.mark.parametrize("name", heads.LOSSES)
def test_losses_against_numpy(name):
  rng = np.random.default_rng(0)
  z = rng.standard_normal((6, 5))
  y = rng.integers(0, 5, 6)
  got = float(heads.loss(name, jnp.asarray(z), jnp.asarray(y)))
  if name == "cross_entropy":
    want = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(6), y])
  elif name == "mse":
    want = np.mean(np.sum((z - np.eye(5)[y]) ** 2, 1))
  else:
    want = 0.5 * np.mean((z[np.arange(6), y] - 1) ** 2)
  assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="linear", num_classes=4, feature_dim=8), r"^kind: expected one of"),
    (dict(kind="implicit", num_classes=1, feature_dim=8), r"^num_classes"),
    (dict(kind="implicit", num_classes=10, feature_dim=8), r"^feature_dim: .*d >= .*K"),
    (dict(kind="fixed", num_classes=10, feature_dim=8), r"^feature_dim"),
    (dict(kind="implicit", num_classes=4, feature_dim=8, tau=0.0), r"^tau"),
    (dict(kind="implicit", num_classes=4, feature_dim=8, solver="tr"), r"^solver"),
])
def test_bad_head_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    heads.HeadConfig(**kwargs)


def test_bad_loss_name():
  with pytest.raises(ValueError, match=r"^loss: expected one of"):
    heads.loss("hinge", jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32))


# --------------------------------------------------------------------------- #
# Train and eval steps
# --------------------------------------------------------------------------- #


def nc1_of(state, model, cfg, x, y):
  h = train.features(state, x, model=model, head_config=cfg)
  w, b = heads.classifier(cfg, state.params["head"], state.head, h.mean(0))
  return nc.nc_metrics(h, y, w, b, cfg.num_classes)


@pytest.mark.parametrize("kind", heads.HEAD_KINDS)
def test_each_head_trains_to_full_accuracy_and_collapses(kind):
  model, cfg, tx, state, x, y = setup(kind)
  step = train.compile_train_step(None, model=model, tx=tx, head_config=cfg)
  evaluate = train.compile_eval_step(None, model=model, head_config=cfg)
  before = nc1_of(state, model, cfg, x, y)["nc1"]
  for epoch in range(60):
    perm = np.random.default_rng(epoch).permutation(len(y))
    for i in range(0, len(y), 64):
      idx = perm[i:i + 64]
      state, _ = step(state, x[idx], y[idx])
  metrics = train.summarise(evaluate(state, x, y))
  assert metrics["top1"] == 100.0
  after = nc1_of(state, model, cfg, x, y)
  assert after["top1"] == 100.0
  assert after["nc1"] < 0.2 * before, (before, after["nc1"])  # collapsing within-class variability
  if kind != "standard":
    assert after["nc2_etf"] < 1e-5  # ETF by construction


@pytest.mark.parametrize("kind,programs", [("implicit", 2), ("standard", 1), ("fixed", 1)])
def test_train_step_does_not_retrace_and_updates_state(kind, programs):
  """The implicit head's first step is its own program (selected by the static
  ``initialised`` flag, not by a ``lax.cond``); every later step reuses the second one."""
  model, cfg, tx, state, x, y = setup(kind)
  traces = []

  def counted(*a, **kw):
    traces.append(1)
    return train.train_step(*a, **kw)

  step = jax.jit(functools.partial(counted, model=model, tx=tx, head_config=cfg))
  s1, m1 = step(state, x[:32], y[:32])
  s2, m2 = step(s1, x[32:64], y[32:64])
  s3, _ = step(s2, x[64:96], y[64:96])
  assert len(traces) == programs
  assert s1.head.initialised == (kind == "implicit") == s3.head.initialised
  assert not state.head.initialised
  assert int(s2.step) == 2 and int(s2.head.means.step) == (2 if kind == "implicit" else 0)
  assert float(m1["etf_unconverged"]) == 0.0
  assert float(m1["count"]) == 32
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.batch_stats,
                         s2.batch_stats)
  assert max(jax.tree.leaves(changed)) > 0


def test_standard_head_rows_renormalised_after_each_step():
  model, cfg, tx, state, x, y = setup("standard")
  step = train.compile_train_step(None, model=model, tx=tx, head_config=cfg)
  state, _ = step(state, x[:32], y[:32])
  np.testing.assert_allclose(np.linalg.norm(state.params["head"]["kernel"], axis=1), 1.0,
                             atol=1e-6)


@pytest.mark.parametrize("kind", heads.HEAD_KINDS)
def test_sharded_step_equals_single_device(kind):
  """float64, so that only summation order differs: equal to ~1e-12."""
  assert jax.device_count() == 8
  model, cfg, tx, state, x, y = setup(kind, dtype=jnp.float64)
  mesh = train.make_mesh()
  single = train.compile_train_step(None, model=model, tx=tx, head_config=cfg)
  sharded = train.compile_train_step(mesh, model=model, tx=tx, head_config=cfg)
  s_single, s_shard = state, train.replicate(jax.device_get(state), mesh)  # no shared buffers
  for i in range(3):
    xb, yb = x[64 * i:64 * (i + 1)], y[64 * i:64 * (i + 1)]
    s_single, m_single = single(s_single, xb, yb)
    s_shard, m_shard = sharded(s_shard, *train.global_batch((xb, yb), mesh))
  assert s_shard.params["backbone"]["Dense_0"]["kernel"].sharding.is_fully_replicated
  for a, b in zip(jax.tree.leaves(s_single), jax.tree.leaves(s_shard)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-10)
  for key in m_single:
    np.testing.assert_allclose(m_single[key], m_shard[key], rtol=1e-10)


def test_batch_size_must_divide_devices():
  with pytest.raises(ValueError, match=r"^batch_size: expected a multiple of the number of devices"):
    train.check_batch_size(30, train.make_mesh())


def test_feature_dim_mismatch_is_reported():
  model = TinyNet(width=16)
  cfg = heads.HeadConfig("implicit", num_classes=4, feature_dim=12)
  with pytest.raises(ValueError, match=r"^head_config.feature_dim: expected .* 16, got 12"):
    train.create_train_state(model, optax.sgd(0.1), cfg, jax.random.PRNGKey(0),
                             jnp.zeros((2, 8)))


def test_implicit_head_gradient_matches_finite_differences_float64():
  """Loss of one implicit-head step w.r.t. the first-layer weights, float64, tiny model."""
  model, cfg, tx, state, x, y = setup("implicit", dtype=jnp.float64, width=6, k=3)
  state, _ = train.train_step(state, x[:24], y[:24], model=model, tx=tx, head_config=cfg)
  xb, yb = x[24:48], y[24:48]

  def loss_of(kernel, config=cfg):
    params = {**state.params, "backbone": {**state.params["backbone"],
                                           "Dense_0": {"kernel": kernel}}}
    h, _ = train._forward(model, cfg, params, state.batch_stats, xb, True)
    logits, _ = heads.train_logits(config, params["head"], state.head, h, yb)
    return heads.loss("cross_entropy", logits, yb)

  kernel = state.params["backbone"]["Dense_0"]["kernel"]
  assert kernel.dtype == jnp.float64
  jax.test_util.check_grads(loss_of, (kernel,), order=1, modes=["rev"], atol=1e-7, rtol=1e-6,
                            eps=1e-6)
  # The implicit path matters: the forward-only ablation's gradient differs.
  g_full = jax.grad(loss_of)(kernel)
  g_fo = jax.grad(loss_of)(kernel, heads.HeadConfig("implicit", 3, 6, forward_only=True))
  assert float(jnp.linalg.norm(g_full - g_fo)) > 1e-8 * float(jnp.linalg.norm(g_full))


@pytest.mark.slow
def test_paper_resnet18_implicit_agd_steps_on_cpu():
  """The paper's recipe end to end: ResNet18 (ImageNet stem, no-affine BN), implicit ETF, AGD."""
  from nc_jax import optim
  from nc_jax.config import TrainConfig
  cfg = TrainConfig(dataset="cifar10", batch_size=16).validate()
  model, tx = cfg.backbone(), cfg.optimizer_transform(steps_per_epoch=10)
  head = cfg.head_config(10, 512)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 32, 32, 3), jnp.float32)
  y = jnp.arange(16) % 10
  state = train.create_train_state(model, tx, head, jax.random.PRNGKey(1), x[:2],
                                   init_params=cfg.init_params())
  kernel = state.params["backbone"]["conv1"]["kernel"]
  step = train.compile_train_step(None, model=model, tx=tx, head_config=head)
  before = jax.device_get(kernel)
  for _ in range(2):
    state, metrics = step(state, x, y)
  loss = float(metrics["loss_sum"]) / 16
  assert np.isfinite(loss) and 0 < loss < 10
  assert float(jnp.abs(state.params["backbone"]["conv1"]["kernel"] - before).max()) > 0
  assert float(optim.agd_eta_from_state(state.opt_state)) > 0
  assert float(nc.stiefel.orthonormality_error(state.head.frame)) < 1e-5
  assert int(state.head.means.step) == 2


def test_standard_head_without_normalisation_is_the_papers_ablation():
  """normalise=False passes the backbone features through unscaled (and only the standard
  head allows it); the method 'standard-nonorm' also leaves the rows unnormalised."""
  from nc_jax.config import METHOD_VARIANTS, TrainConfig
  h = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8)) * 3.0)
  off = heads.HeadConfig("standard", num_classes=4, feature_dim=8, normalise=False)
  on = heads.HeadConfig("standard", num_classes=4, feature_dim=8)
  np.testing.assert_array_equal(heads.head_features(off, h), h)
  np.testing.assert_allclose(jnp.linalg.norm(heads.head_features(on, h), axis=1), 5.0)
  for kind in ("fixed", "implicit"):
    with pytest.raises(ValueError, match=r"^normalise: the .* ETF head needs features of norm"):
      heads.HeadConfig(kind, num_classes=4, feature_dim=8, normalise=False)
  cfg = METHOD_VARIANTS["standard-nonorm"].train_config(
      TrainConfig(dataset="synthetic", source="synthetic", model="mlp")).validate()
  head = cfg.head_config(10, 512)
  assert (head.kind, head.normalise, head.renormalise_rows) == ("standard", False, False)

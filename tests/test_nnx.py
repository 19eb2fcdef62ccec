"""The heads as Flax NNX modules (nc_jax.nnx) against the functional heads (nc_jax.heads)."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nc_jax.nnx as ncnnx
from nc_jax import checkpoint, heads, train

F64 = jnp.float64
TOL = dict(rtol=1e-12, atol=1e-12)
K, D = 4, 6


def assert_trees_close(a, b, **tol):
  """Same structure (static metadata included) and leaves equal to ``tol`` (exact if none)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tol and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def head_state(head):
  return head.head_state.get_value()


# --------------------------------------------------------------------------- #
# Each head equals the functional head, step by step
# --------------------------------------------------------------------------- #


HEADS = {
    "standard": lambda: ncnnx.StandardHead(K, D, tau=5.0, bias=True, dtype=F64,
                                          rngs=nnx.Rngs(3)),
    "fixed": lambda: ncnnx.FixedETFHead(K, D, tau=5.0, rotation_seed=7, dtype=F64),
    "implicit": lambda: ncnnx.ImplicitETFHead(K, D, tau=5.0, dtype=F64),
    "implicit_forward_only": lambda: ncnnx.ImplicitETFHead(K, D, tau=5.0, forward_only=True,
                                                           dtype=F64),
}


def batches(steps=4, n=16, seed=0):
  """Random features; labels with all classes, then classes missing (step 2)."""
  rng = np.random.default_rng(seed)
  out = []
  for s in range(steps):
    labels = np.arange(n) % K if s != 2 else np.arange(n) % 2
    out.append((jnp.asarray(rng.standard_normal((n, D)) + labels[:, None] * 0.3),
                jnp.asarray(labels, jnp.int32)))
  return out


@pytest.mark.parametrize("name", list(HEADS))
def test_head_matches_functional_over_steps(name):
  head = HEADS[name]()
  cfg = head.config
  params = {k: v.get_value() for k, v in nnx.state(head, nnx.Param).items()}
  state = heads.init(cfg, jax.random.PRNGKey(0), F64)[1]
  assert_trees_close(head_state(head), state)
  lr = 0.3

  def nnx_loss(head, feats, labels):
    logits = head(feats, labels)
    return heads.loss("cross_entropy", logits, labels), logits

  def fn_loss(params, feats, labels, state):
    h = heads.normalise_features(feats, cfg.tau)
    logits, new_state = heads.train_logits(cfg, params, state, h, labels)
    return heads.loss("cross_entropy", logits, labels), (logits, new_state)

  nnx_vg = nnx.value_and_grad(nnx_loss, argnums=(nnx.DiffState(0, nnx.Param), 1), has_aux=True)
  fn_vg = jax.value_and_grad(fn_loss, argnums=(0, 1), has_aux=True)
  for step, (feats, labels) in enumerate(batches()):
    (l1, z1), (g_head, g_feat1) = nnx_vg(head, feats, labels)
    (l2, (z2, state)), (g_params, g_feat2) = fn_vg(params, feats, labels, state)
    np.testing.assert_allclose(l1, l2, **TOL)
    np.testing.assert_allclose(z1, z2, **TOL)
    np.testing.assert_allclose(g_feat1, g_feat2, **TOL)
    assert float(jnp.linalg.norm(g_feat1)) > 1e-3
    g_head = {k: v.get_value() for k, v in g_head.items()}
    assert_trees_close(g_head, g_params, **TOL)
    assert_trees_close(head_state(head), state, **TOL)       # `initialised` included
    assert head_state(head).initialised == (cfg.kind == "implicit")
    # An optimiser step on the standard head's parameters, then the row renormalisation.
    if params:
      params = heads.renormalise(cfg, jax.tree.map(lambda p, g: p - lr * g, params, g_params))
      for k, g in g_head.items():
        var = getattr(head, k)
        var.set_value(var.get_value() - lr * g)
      ncnnx.renormalise(head)
      assert_trees_close({k: v.get_value() for k, v in nnx.state(head, nnx.Param).items()},
                         params, **TOL)
  if cfg.kind == "standard":
    np.testing.assert_allclose(jnp.linalg.norm(head.kernel.get_value(), axis=1), 1.0, **TOL)
  assert float(head.unconverged_solves()) == 0.0


def test_implicit_gradient_goes_through_the_etf():
  """The full head's feature gradient differs from the forward-only ablation's (the part
  through P, by the implicit VJP), and the ETF heads have no trainable parameters."""
  feats, labels = batches(1)[0]

  def grad(head):
    return nnx.grad(lambda head, f: heads.loss("cross_entropy", head(f, labels), labels),
                    argnums=1)(head, feats)

  full, fwd = HEADS["implicit"](), HEADS["implicit_forward_only"]()
  g_full, g_fwd = grad(full), grad(fwd)
  assert float(jnp.linalg.norm(g_full - g_fwd)) > 1e-3 * float(jnp.linalg.norm(g_full))
  assert not nnx.state(full, nnx.Param) and not nnx.state(fwd, nnx.Param)


# --------------------------------------------------------------------------- #
# A jitted NNX train step against the functional train step
# --------------------------------------------------------------------------- #


class Backbone(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, param_dtype=F64, rngs=rngs)
    self.l2 = nnx.Linear(16, 8, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


class Net(nnx.Module):
  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.backbone = Backbone(rngs)
    self.head = ncnnx.ImplicitETFHead(K, 8, tau=5.0, dtype=F64, rngs=rngs)

  def __call__(self, x, labels=None):
    return self.head(self.backbone(x), labels)


def blobs(n=32, seed=0):
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.standard_normal((K, 8))
  labels = np.arange(n) % K
  return (jnp.asarray(centres[labels] + rng.standard_normal((n, 8)), F64),
          jnp.asarray(labels, jnp.int32))


TX = optax.sgd(0.05, momentum=0.9)


def make_step():
  """A fresh ``nnx.jit`` train step (its own compilation cache) counting its traces."""
  traces = []

  @nnx.jit
  def step(model, optimizer, x, labels):
    traces.append(1)  # a Python side effect: runs once per trace

    def loss_fn(model):
      return heads.loss("cross_entropy", model(x, labels), labels)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
    optimizer.update(model, grads)
    ncnnx.renormalise(model)
    return loss, ncnnx.unconverged_solves(model)

  step.traces = traces
  return step


def run_nnx(steps, mesh=None, model=None, optimizer=None, step=None):
  if model is None:
    model = Net()
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
  step = make_step() if step is None else step
  x, y = blobs()
  if mesh is not None:
    both = nnx.state((model, optimizer))
    nnx.update((model, optimizer), jax.device_put(both, NamedSharding(mesh, P())))
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  losses, unconverged = [], 0.0
  for _ in range(steps):
    loss, bad = step(model, optimizer, x, y)
    losses.append(float(loss))
    unconverged += float(bad)
  assert unconverged == 0.0
  return np.array(losses), model, optimizer


@functools.cache
def reference_run(steps=5):
  """The same training with the functional API: split backbone params, optax, heads.*."""
  model = Net()  # same seed: the same initial parameters
  graphdef, params = nnx.split(model.backbone, nnx.Param)
  cfg = model.head.config
  state = heads.init(cfg, jax.random.PRNGKey(0), F64)[1]
  opt_state = TX.init(params)

  @jax.jit
  def step(params, opt_state, state, x, labels):
    def loss_fn(params):
      h = heads.normalise_features(nnx.merge(graphdef, params)(x), cfg.tau)
      logits, new_state = heads.train_logits(cfg, {}, state, h, labels)
      return heads.loss("cross_entropy", logits, labels), new_state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  x, y = blobs()
  losses = []
  for _ in range(steps):
    params, opt_state, state, loss = step(params, opt_state, state, x, y)
    losses.append(float(loss))
  return np.array(losses), params, state


def test_jitted_train_step_matches_functional_and_traces_twice():
  step = make_step()
  losses, model, _ = run_nnx(5, step=step)
  assert len(step.traces) == 2  # the first step (feasibility solve), then one steady-state program
  assert losses[-1] < 0.7 * losses[0]
  ref_losses, ref_params, ref_state = reference_run()
  np.testing.assert_allclose(losses, ref_losses, **TOL)
  assert_trees_close(nnx.state(model.backbone, nnx.Param), ref_params, **TOL)
  assert_trees_close(head_state(model.head), ref_state, **TOL)
  assert int(head_state(model.head).means.step) == 5


def test_sharded_batch_matches_single_device():
  assert jax.device_count() == 8
  mesh = train.make_mesh()  # a 1-D ("data",) mesh with Auto axes
  losses, model, _ = run_nnx(3, mesh=mesh)
  ref_losses, ref_params, ref_state = reference_run(3)
  np.testing.assert_allclose(losses, ref_losses, **TOL)
  assert_trees_close(nnx.state(model.backbone, nnx.Param), ref_params, **TOL)
  assert_trees_close(head_state(model.head), ref_state, **TOL)
  frame = head_state(model.head).frame
  assert frame.sharding.is_fully_replicated and len(frame.sharding.device_set) == 8


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #


def test_orbax_round_trip_continues_bitwise(tmp_path):
  step = make_step()
  uninterrupted, full_model, _ = run_nnx(4, step=step)
  first, model, optimizer = run_nnx(2, step=step)
  assert head_state(model.head).initialised
  path = os.fspath(tmp_path / "ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"model": nnx.state(model), "opt": nnx.state(optimizer)})
  fresh = Net(seed=1)  # other parameters: everything must come from the checkpoint
  fresh_opt = nnx.Optimizer(fresh, TX, wrt=nnx.Param)
  template = {"model": nnx.state(fresh), "opt": nnx.state(fresh_opt)}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, template)
  nnx.update(fresh, restored["model"])
  nnx.update(fresh_opt, restored["opt"])
  assert not head_state(fresh.head).initialised  # static: from the fresh template ...
  ncnnx.sync_initialised(fresh)
  assert head_state(fresh.head).initialised      # ... re-derived from the step counter
  assert_trees_close(nnx.state(fresh), nnx.state(model))
  traced = len(step.traces)
  second, fresh, _ = run_nnx(2, model=fresh, optimizer=fresh_opt, step=step)
  assert len(step.traces) == traced == 2  # the restored model reuses the steady-state program
  np.testing.assert_array_equal(np.concatenate([first, second]), uninterrupted)
  assert_trees_close(nnx.state(fresh), nnx.state(full_model))


def test_checkpointer_saves_nnx_state_with_empty_class_means(tmp_path):
  """nc_jax.checkpoint.Checkpointer takes nnx.state(model) with the standard head (whose
  empty class-mean state plain Orbax refuses) and re-derives `initialised` itself."""

  class Two(nnx.Module):
    def __init__(self, seed):
      rngs = nnx.Rngs(seed)
      self.standard = ncnnx.StandardHead(K, D, dtype=F64, rngs=rngs)
      self.implicit = ncnnx.ImplicitETFHead(K, D, dtype=F64)

  model = Two(0)
  optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  feats, labels = batches(1)[0]
  model.implicit(feats, labels)
  grads = nnx.grad(lambda m: jnp.sum(m.standard(feats) ** 2))(model)
  optimizer.update(model, grads)
  with checkpoint.Checkpointer(tmp_path) as ckptr:
    ckptr.save(1, {"model": nnx.state(model), "opt": nnx.state(optimizer)},
               {"epoch": 0, "batch": 1})
  fresh = Two(1)
  fresh_opt = nnx.Optimizer(fresh, optax.adam(0.1), wrt=nnx.Param)
  with checkpoint.Checkpointer(tmp_path) as ckptr:
    state, position = ckptr.restore({"model": nnx.state(fresh), "opt": nnx.state(fresh_opt)})
  nnx.update(fresh, state["model"])
  nnx.update(fresh_opt, state["opt"])
  assert position == {"epoch": 0, "batch": 1}
  assert_trees_close(nnx.state(fresh), nnx.state(model))
  assert_trees_close(nnx.state(fresh_opt), nnx.state(optimizer))
  assert head_state(fresh.implicit).initialised


# --------------------------------------------------------------------------- #
# Evaluation mode
# --------------------------------------------------------------------------- #


def test_eval_mode_uses_last_training_classifier_and_keeps_state():
  head = HEADS["implicit"]()
  (f1, y1), (f2, y2) = batches(2)
  head(f1, y1)
  train_logits = head(f2, y2)
  before = head_state(head)
  w, b = head.classifier()
  np.testing.assert_array_equal(w, before.weight)
  head.eval()
  assert head.deterministic
  eval_logits = head(f2)  # no labels needed
  np.testing.assert_allclose(eval_logits, train_logits, **TOL)  # the last step's W and b
  np.testing.assert_allclose(head(f1), head.normalise(f1) @ w.T + b, **TOL)
  assert_trees_close(head_state(head), before)  # nothing written, bitwise
  # The same through nnx.view, a per-call override, and a jitted call in eval mode.
  head.train()
  np.testing.assert_array_equal(nnx.view(head, deterministic=True)(f2), eval_logits)
  np.testing.assert_array_equal(head(f2, deterministic=True), eval_logits)
  assert_trees_close(head_state(head), before)
  head.eval()
  np.testing.assert_allclose(nnx.jit(lambda m, f: m(f))(head, f2), eval_logits, **TOL)
  assert_trees_close(head_state(head), before)


def test_eval_mode_standard_and_fixed_match_functional():
  feats, labels = batches(1)[0]
  valid = jnp.arange(feats.shape[0]) < 11
  for name in ("standard", "fixed"):
    head = HEADS[name]()
    params = {k: v.get_value() for k, v in nnx.state(head, nnx.Param).items()}
    before = head_state(head)
    h = heads.normalise_features(feats, 5.0)
    expected = heads.eval_logits(head.config, params, before, h, valid=valid)
    np.testing.assert_allclose(head(feats, valid=valid, deterministic=True), expected, **TOL)
    assert_trees_close(head_state(head), before)


def test_validation_errors_name_the_argument():
  with pytest.raises(ValueError, match="feature_dim"):
    ncnnx.ImplicitETFHead(5, 3)
  with pytest.raises(ValueError, match="tau"):
    ncnnx.FixedETFHead(4, 6, tau=0.0)
  with pytest.raises(ValueError, match="rngs"):
    ncnnx.StandardHead(4, 6)
  with pytest.raises(ValueError, match="dtype"):
    ncnnx.ImplicitETFHead(4, 6, dtype=jnp.int32)
  with pytest.raises(TypeError, match="rotation_seed"):
    ncnnx.ImplicitETFHead(4, 6, rotation_seed=1)
  head = ncnnx.ImplicitETFHead(4, 6)
  with pytest.raises(ValueError, match="labels"):
    head(jnp.ones((3, 6)))
  with pytest.raises(ValueError, match="features"):
    head(jnp.ones((3, 5)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="valid"):
    head(jnp.ones((3, 6)), jnp.zeros((3,), jnp.int32), valid=jnp.ones((3,), bool))
  cfg = heads.HeadConfig("implicit", 4, 6, forward_only=True, delta=1e-2)
  assert ncnnx.from_config(cfg).config == cfg
  assert isinstance(ncnnx.from_config(heads.HeadConfig("standard", 4, 6), rngs=nnx.Rngs(0)),
                    ncnnx.StandardHead)


# --------------------------------------------------------------------------- #
# The documentation's example runs as written
# --------------------------------------------------------------------------- #


def test_docs_example_runs():
  doc = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "heads_nnx.md")
  with open(doc, encoding="utf-8") as f:
    blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
  assert len(blocks) == 2
  namespace = {"__name__": "docs_heads_nnx"}
  for i, block in enumerate(blocks):  # the first block (the README's) runs on its own
    exec(compile(block, f"docs/heads_nnx.md[python block {i}]", "exec"), namespace)
  losses, model = namespace["losses"], namespace["model"]
  assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
  assert namespace["acc"] > 0.5
  assert head_state(model.head).initialised and not model.head.deterministic

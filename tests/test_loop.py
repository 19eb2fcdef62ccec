"""The epoch loop and its data pipelines: device-resident and streaming data through one
interface, checkpoints, resume == uninterrupted, faults, signals, sharding."""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nc_jax import evaluate, heads, loop, solver, train
from nc_jax.checkpoint import Checkpointer
from nc_jax.data import ArraySource
from nc_jax.data.augment import AugmentSpec
from nc_jax.pipeline import DevicePipeline, StreamingPipeline

K = 4
SPEC_TRAIN = AugmentSpec(mean=(0.5,), std=(0.25,), channels=1, flip=True, crop_padding=1)
SPEC_EVAL = AugmentSpec(mean=(0.5,), std=(0.25,), channels=1)


class FlatNet(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    x = nn.Dense(32, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                     dtype=self.dtype, param_dtype=self.dtype)(x)
    return nn.Dense(8, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(nn.relu(x))


def image_data(n=96, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % K
  protos = rng.integers(0, 256, (K, 6, 6, 1))
  images = np.clip(protos[labels] + rng.integers(-40, 40, (n, 6, 6, 1)), 0, 255).astype(np.uint8)
  return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def make_run(kind="implicit", mesh=None, dtype=jnp.float32, labels=None, stratified=True,
             **head_kwargs):
  """(state, steps, data): a device pipeline whose evaluation split is the training split."""
  model = FlatNet(dtype)
  cfg = heads.HeadConfig(kind, num_classes=K, feature_dim=8, **head_kwargs)
  tx = optax.sgd(0.05, momentum=0.9)
  images, clean = image_data()
  labels = clean if labels is None else labels
  state = train.create_train_state(model, tx, cfg, jax.random.PRNGKey(1),
                                   jnp.zeros((8, 6, 6, 1), dtype))
  data = DevicePipeline.create((images, labels), (images, clean), train_spec=SPEC_TRAIN,
                               eval_spec=SPEC_EVAL, batch_size=32, num_classes=K,
                               stratified=stratified, mesh=mesh)
  if mesh is not None:
    state = train.replicate(state, mesh)
  return state, data.compile(model=model, tx=tx, head_config=cfg), data


def run(state, steps, data, **kw):
  kw.setdefault("epochs", 3)
  return loop.fit(state, data, steps=steps, **kw)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fit_runs_epochs_and_reports(tmp_path):
  state, steps, data = make_run()
  records = []
  with Checkpointer(tmp_path / "ck", keep=2) as ck:
    out = run(state, steps, data, checkpointer=ck, on_epoch=lambda record, state: records.append(record))
    assert ck.all_steps() == [6, 9]                       # keep-2 of epochs 1..3 (3 steps each)
  assert not out.stopped and out.position == {"epoch": 3, "batch": 0}
  assert [r["epoch"] for r in out.history] == [1, 2, 3] and records == out.history
  assert out.history[-1]["train"]["count"] == 96 and out.history[-1]["eval"]["count"] == 96
  assert int(out.state.step) == 9


@pytest.mark.parametrize("stop_after, kind", [(2, "implicit"), (3, "implicit"),
                                              (5, "implicit"), (4, "standard"), (4, "fixed")])
def test_resume_equals_uninterrupted_bitwise(tmp_path, stop_after, kind):
  # The standard and fixed heads keep zero-size placeholder state, which Orbax cannot
  # write as such.
  state, steps, data = make_run(kind)
  full = run(state, steps, data)
  state2, steps2, data2 = make_run(kind)
  with Checkpointer(tmp_path / "ck") as ck:
    part = run(state2, steps2, data2, checkpointer=ck, max_steps=stop_after)
    assert part.stopped
    # A new process: fresh template, restore, continue.
    template, steps3, data3 = make_run(kind)
    restored, position = ck.restore(template)
  assert position == part.position and int(restored.step) == stop_after
  # The static first-step flag is re-derived from the restored arrays: the resumed run takes
  # the steady-state program, not a second feasibility solve.
  assert restored.head.initialised == (kind == "implicit") and not template.head.initialised
  rest = run(restored, steps3, data3, position=position)
  assert_trees_equal(full.state, rest.state)
  # Every epoch's record, the interrupted one included (its running sums were checkpointed).
  assert [r["train"] for r in full.history[-len(rest.history):]] == [r["train"] for r in
                                                                      rest.history]
  assert [r["eval"] for r in full.history[-len(rest.history):]] == [r["eval"] for r in
                                                                    rest.history]


def test_restore_refuses_a_checkpoint_of_another_structure(tmp_path):
  """E.g. one written by an nc_jax whose train state differed (or another head): a clear
  error naming the folder, never a partial or silently mixed state."""
  state, steps, data = make_run("standard")
  with Checkpointer(tmp_path / "ck") as ck:
    run(state, steps, data, checkpointer=ck, max_steps=1)
    template, _, _ = make_run("implicit")
    with pytest.raises(ValueError, match=r"ck: the checkpoint at step 1 does not match the "
                       r"train state given to restore"):
      ck.restore(template)


@pytest.mark.parametrize("max_steps", [None, 2])
def test_unconverged_solves_stop_the_run_without_a_checkpoint(tmp_path, monkeypatch, max_steps):
  """A matmul-only solve whose fixed schedule is too short (simulated: no schedule at all)
  is counted on device; the host stops at the next read of the metrics — the end of the
  epoch, or a stop request — before anything is checkpointed."""
  monkeypatch.setattr(solver, "newton_schulz_bound", lambda delta, k: 1.0)
  jax.clear_caches()  # no trace of the solver made with the real bound
  try:
    state, steps, data = make_run(factorisation="newton_schulz")
    with Checkpointer(tmp_path / "ck") as ck:
      with pytest.raises(train.SolveNotConverged, match=r"^\d training step\(s\) .* did not "
                         r"converge in its fixed Newton–Schulz schedule.*factorisation='svd'"):
        run(state, steps, data, checkpointer=ck, checkpoint_every=1, max_steps=max_steps)
      assert ck.latest_step() is None
  finally:
    jax.clear_caches()


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  """A non-finite parameter (here injected after epoch 1; a too-large learning rate does the
  same) is counted on device; the host stops at the end of the epoch, naming it and the first
  faulty step, and saves nothing: the epoch-1 checkpoint stays the newest."""
  state, steps, data = make_run()
  with Checkpointer(tmp_path / "ck", keep=1) as ck:
    first = run(state, steps, data, epochs=1, checkpointer=ck)
    assert ck.all_steps() == [3]
    params = first.state.params
    kernel = params["backbone"]["Dense_0"]["kernel"]
    bad = first.state.replace(params={**params, "backbone": {**params["backbone"], "Dense_0": {
        "kernel": kernel.at[0, 0].set(jnp.nan)}}})
    with pytest.raises(train.Diverged, match=r"^training diverged: 3 step\(s\) with a "
                       r"non-finite loss or parameters \(first at global step 4, epoch 2\);.*"
                       r"nothing after the last checkpoint was saved"):
      run(bad, steps, data, epochs=3, checkpointer=ck, position=first.position)
    assert ck.all_steps() == [3]
    restored, position = ck.restore(make_run()[0])
  assert position["epoch"] == 1 and np.isfinite(np.asarray(
      restored.params["backbone"]["Dense_0"]["kernel"])).all()


def test_out_of_range_labels_stop_the_run(tmp_path):
  """Labels outside [0, K) would be dropped by the class sums and the loss mask and training
  would go on; they are counted on device and stop the run when the epoch is read."""
  # (Stratified plans check labels on the host already; a plain shuffle does not look.)
  state, steps, data = make_run(labels=image_data()[1].at[5].set(K), stratified=False)
  with Checkpointer(tmp_path / "ck") as ck:
    with pytest.raises(train.BadLabels, match=r"^labels: 1 training label\(s\) outside "
                       r"\[0, K\) \(first at global step \d, epoch 1\)"):
      loop.fit(state, data, steps=steps, epochs=2, checkpointer=ck)
    assert ck.latest_step() is None


def test_sigterm_checkpoints_and_stops(tmp_path):
  state, steps, data = make_run()

  def kill_at_second_step(epoch, batch):
    if (epoch, batch) == (0, 1):
      os.kill(os.getpid(), signal.SIGTERM)

  with Checkpointer(tmp_path / "ck") as ck:
    out = run(state, steps, data, checkpointer=ck, on_step=kill_at_second_step)
    assert out.stopped and (out.position["epoch"], out.position["batch"]) == (0, 2)
    assert out.position["sums"]["count"] == 64.0  # the epoch's running sums, for resume
    assert ck.latest_step() == 2
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_sharded_fit_equals_single_device():
  """8 fake devices, float64: the data-parallel run computes the single-device run."""
  single = run(*make_run(dtype=jnp.float64), epochs=2)
  mesh = train.make_mesh()
  sharded = run(*make_run(mesh=mesh, dtype=jnp.float64), epochs=2)
  for a, b in zip(jax.tree.leaves(single.state), jax.tree.leaves(sharded.state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-10)
  assert single.history[-1]["eval"] == pytest.approx(sharded.history[-1]["eval"])


def streaming_run(stratified=True, seed=3, num_workers=0, with_eval=True):
  model = FlatNet()
  cfg = heads.HeadConfig("implicit", num_classes=K, feature_dim=8)
  tx = optax.sgd(0.05, momentum=0.9)
  images, labels = (np.asarray(a) for a in image_data())
  source = ArraySource(images, labels)
  data = StreamingPipeline(source, source if with_eval else None, train_spec=SPEC_TRAIN,
                           eval_spec=SPEC_EVAL, batch_size=32, num_classes=K,
                           stratified=stratified, train_labels=labels, seed=seed,
                           num_threads=2, num_workers=num_workers)
  state = train.create_train_state(model, tx, cfg, jax.random.PRNGKey(1), jnp.zeros((8, 6, 6, 1)))
  return state, data.compile(model=model, tx=tx, head_config=cfg), data


def test_streaming_fit_resumes_bitwise(tmp_path):
  state, steps, data = streaming_run()
  full = loop.fit(state, data, steps=steps, epochs=2)
  assert full.history[-1]["eval"]["count"] == 96          # padded last eval batch masked
  state2, steps2, data2 = streaming_run()
  with Checkpointer(tmp_path / "ck") as ck:
    part = loop.fit(state2, data2, steps=steps2, epochs=2, checkpointer=ck, max_steps=4)
    template, steps3, data3 = streaming_run()
    restored, position = ck.restore(template)
  assert part.stopped and (position["epoch"], position["batch"]) == (1, 1)
  # the Grain iterator state, saved in the checkpoint's JSON with the position
  assert position["data"] == part.position["data"]
  assert (position["data"]["epoch"], position["data"]["batch"]) == (1, 1)
  rest = loop.fit(restored, data3, steps=steps3, epochs=2, position=position)
  assert_trees_equal(full.state, rest.state)
  assert full.history[-1]["eval"] == rest.history[-1]["eval"]
  assert full.history[-1]["train"] == rest.history[-1]["train"]   # the resumed epoch's record
  # a data state that disagrees with the position is refused, naming both
  _, steps4, data4 = streaming_run()
  bad = {**position, "batch": 2, "sums": position["sums"]}
  with pytest.raises(ValueError, match=r"data state: saved at epoch 1, batch 1, but the position "
                                       r"says epoch 1, batch 2"):
    loop.fit(restored, data4, steps=steps4, epochs=2, position=bad)


def test_streaming_fit_with_worker_processes_resumes_bitwise(tmp_path):
  """Grain worker processes: stopped mid-epoch, checkpointed with the workers' iterator state
  and resumed from it, the run ends bitwise where an uninterrupted run with threads does."""
  state, steps, data = streaming_run(with_eval=False)
  full = loop.fit(state, data, steps=steps, epochs=2)
  state2, steps2, data2 = streaming_run(num_workers=2, with_eval=False)
  with Checkpointer(tmp_path / "ck") as ck:
    part = loop.fit(state2, data2, steps=steps2, epochs=2, checkpointer=ck, max_steps=5)
    template, steps3, data3 = streaming_run(num_workers=2, with_eval=False)
    restored, position = ck.restore(template)
  assert part.stopped and part.position == position
  assert (position["epoch"], position["batch"], position["data"]["num_workers"]) == (1, 2, 2)
  rest = loop.fit(restored, data3, steps=steps3, epochs=2, position=position)
  assert_trees_equal(full.state, rest.state)
  assert full.history[-1]["train"] == rest.history[-1]["train"]


def test_device_and_streaming_pipelines_agree_on_evaluation_and_features():
  """One interface, two kinds of data: on the same examples and state, the evaluation split's
  metrics and the feature batches (all, and a subset with a padded last batch) agree; the
  training batches cover one epoch of full batches from any start."""
  state, steps, stream = streaming_run()
  _, dsteps, device = make_run()
  assert device.steps_per_epoch == stream.steps_per_epoch == 3
  got = {name: loop.evaluate(s, state, d) for name, s, d in
         (("device", dsteps, device), ("stream", steps, stream))}
  assert got["device"]["count"] == got["stream"]["count"] == 96
  for key in ("loss", "top1", "top5"):
    assert got["device"][key] == pytest.approx(got["stream"][key], rel=1e-5, abs=1e-6)
  for split, ids in (("train", None), ("eval", [5, 0, 17, 93, 42])):
    h_dev, y_dev = evaluate.collect_features(dsteps.features(state, *a)
                                             for a in device.feature_batches(split, ids))
    h_str, y_str = evaluate.collect_features(steps.features(state, *a)
                                             for a in stream.feature_batches(split, ids))
    want = image_data()[1] if ids is None else image_data()[1][np.asarray(ids)]
    np.testing.assert_array_equal(y_dev, want)
    np.testing.assert_array_equal(y_str, want)
    np.testing.assert_allclose(h_dev, h_str, rtol=1e-5, atol=1e-6)
  for data in (device, stream):
    rows = list(data.train_batches(state, epoch=1, start=1))
    assert len(rows) == 2
  with pytest.raises(ValueError, match=r"^split: expected one of \('train', 'eval'\), got 'test'"):
    device.feature_batches("test")


def test_pipeline_validates_its_splits():
  images, labels = image_data()
  common = dict(train_spec=SPEC_TRAIN, eval_spec=SPEC_EVAL, batch_size=32, num_classes=K)
  with pytest.raises(ValueError, match=r"^train_split: expected uint8 images \(N, H, W, C\), "
                     r"got float32"):
    DevicePipeline.create((images.astype(jnp.float32), labels), **common)
  with pytest.raises(ValueError, match=r"^eval_split: expected labels of shape \(96,\), got "
                     r"\(95,\)"):
    DevicePipeline.create((images, labels), (images, labels[:95]), **common)
  with pytest.raises(ValueError, match=r"batch_size 128 is larger than the dataset \(96"):
    DevicePipeline.create((images, labels), **{**common, "batch_size": 128})
  no_eval = DevicePipeline.create((images, labels), **common)
  with pytest.raises(ValueError, match=r"^split: this pipeline has no evaluation split"):
    no_eval.eval_batches()

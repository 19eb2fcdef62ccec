"""Tests of nc_jax.models: the ResNet / VGG / MLP backbones (docs/method.md §10.2).

Expected numbers are written out independently of the implementation: the
torchvision parameter totals (minus ``fc``), parameter counts summed by hand
from the VGG configurations and the ResNet block structure, a plain
lax/numpy transcription of the stem and of the residual blocks in PyTorch
semantics (explicit padding, −inf max-pool padding, BN with eps 1e-5), and the
Kaiming-normal / PyTorch-Linear initialiser formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax
import optax
from flax import traverse_util

from nc_jax import models
from nc_jax.models import BasicBlock, Bottleneck

F32 = jnp.float32


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _abstract_init(model, shape=(2, 32, 32, 3)):
  """(features, variables) as ShapeDtypeStructs: no compute, no compile."""
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros(shape, F32), train=False))


def _images(seed, shape):
  # numpy RNG: jax.random would compile a new program for every shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F32)


@pytest.fixture(scope="module")
def r18():
  model = models.create("resnet18")
  variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3), F32), train=False)
  return model, variables


# ---------------------------------------------------------------------------
# Factory, shapes, feature dimensions.

_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "vgg11": 512, "vgg13": 512,
         "vgg16": 512, "vgg19": 512, "mlp": 512}


def test_registry_names():
  assert set(models.MODEL_NAMES) == set(_DIMS)


@pytest.mark.parametrize("name", sorted(_DIMS))
def test_output_shape_and_feature_dim(name):
  model = models.create(name)
  feats, variables = _abstract_init(model, (3, 32, 32, 3))
  assert feats.shape == (3, _DIMS[name]) and feats.dtype == F32
  assert models.feature_dim(name) == _DIMS[name] == model.feature_dim
  assert set(variables) == {"params", "batch_stats"} or name == "mlp"


def test_mlp_widths_and_flattening():
  model = models.create("mlp", widths=(64, 32), use_bn=True)
  x = _images(1, (5, 4, 4, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert variables["params"]["dense0"]["kernel"].shape == (48, 64)
  h, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert h.shape == (5, 32) and h.dtype == F32 and bool(jnp.all(h >= 0))
  assert models.feature_dim("mlp", widths=(64, 32)) == 32
  # The last ReLU can be switched off: features then take negative values.
  raw = models.create("mlp", widths=(64, 32), activate_last=False)
  h_raw = raw.apply(raw.init(jax.random.key(0), x, train=False), x, train=False)
  assert bool(jnp.any(h_raw < 0))


def test_real_forward_vgg13():
  model = models.create("vgg13")
  x = _images(2, (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  h, state = model.apply(variables, x, train=True, capture_intermediates=True,
                         mutable=["batch_stats", "intermediates"])
  assert h.shape == (2, 512) and bool(jnp.all(jnp.isfinite(h))) and bool(jnp.all(h >= 0))
  # Config 'B': two convs per resolution, a 2x2 max-pool after each pair.
  sizes = [state["intermediates"][f"conv{i}"]["__call__"][0].shape[1:] for i in range(10)]
  assert sizes == [(32, 32, 64), (32, 32, 64), (16, 16, 128), (16, 16, 128), (8, 8, 256),
                   (8, 8, 256), (4, 4, 512), (4, 4, 512), (2, 2, 512), (2, 2, 512)]


def test_invalid_arguments():
  with pytest.raises(ValueError) as err:
    models.create("resnet101")
  for name in _DIMS:
    assert name in str(err.value)
  with pytest.raises(ValueError, match="valid names"):
    models.feature_dim("vgg13_bn")
  with pytest.raises(ValueError, match="fixes"):
    models.create("resnet18", stage_sizes=(1, 1, 1, 1))
  with pytest.raises(ValueError, match="stem"):
    models.create("resnet18", stem="cifar10")
  with pytest.raises(TypeError):
    models.create("vgg13", no_such_field=1)
  model = models.create("resnet18")
  with pytest.raises(ValueError, match="floating"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)
  with pytest.raises(ValueError, match="rank-4"):
    model.init(jax.random.key(0), jnp.zeros((32, 32, 3), F32), train=False)
  with pytest.raises(ValueError, match=">= 32"):
    _abstract_init(models.create("vgg11"), (1, 16, 16, 3))


# ---------------------------------------------------------------------------
# Parameter counts.


def _resnet_bn_channels(stage_sizes, expansion):
  """Total BN channels of a torchvision ResNet, summed block by block."""
  total, c_in = 64, 64  # stem BN
  for i, n in enumerate(stage_sizes):
    width = 64 * 2 ** i
    for j in range(n):
      stride = 2 if i > 0 and j == 0 else 1
      # Basic: bn1, bn2 of `width`; Bottleneck: bn1, bn2 of `width`, bn3 of 4·width.
      total += 2 * width if expansion == 1 else 2 * width + 4 * width
      if stride != 1 or c_in != width * expansion:
        total += width * expansion  # downsample BN
      c_in = width * expansion
  return total


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512 - 513_000),     # torchvision total minus fc (512·1000 + 1000)
    ("resnet34", 21_797_672 - 513_000),
    ("resnet50", 25_557_032 - 2_049_000),   # minus fc (2048·1000 + 1000)
])
def test_resnet_param_counts(name, expected):
  stage_sizes = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3),
                 "resnet50": (3, 4, 6, 3)}[name]
  expansion = 4 if name == "resnet50" else 1
  bn = 2 * _resnet_bn_channels(stage_sizes, expansion)
  _, v = _abstract_init(models.create(name))
  assert _count(v["params"]) == expected
  _, v0 = _abstract_init(models.create(name, affine=False))
  assert _count(v0["params"]) == expected - bn
  # No-bias mode: only 4-D conv kernels remain (AGD rejects 1-D parameters) ...
  assert all(a.ndim == 4 for a in jax.tree.leaves(v0["params"]))
  # AGD's L (docs/method.md §10.1): 20 conv kernels for ResNet18, 53 for ResNet50.
  n_kernels = {"resnet18": 20, "resnet34": 36, "resnet50": 53}[name]
  assert len(jax.tree.leaves(v0["params"])) == n_kernels
  # ... and the running statistics are unchanged (mean + var per BN channel).
  assert _count(v0["batch_stats"]) == _count(v["batch_stats"]) == bn
  # A narrower net (width w): every conv kernel scales by (w/64)^2 but the stem's, whose
  # input has 3 channels (w/64); features by w/64.
  narrow = models.create(name, affine=False, width=16)
  _, vn = _abstract_init(narrow)
  stem = 7 * 7 * 3 * 64
  assert _count(vn["params"]) == (expected - bn - stem) // 16 + stem // 4
  assert narrow.feature_dim * 4 == models.create(name).feature_dim


# Conv widths of the standard VGG configurations, max-pools omitted.
_VGG_WIDTHS = {
    11: [64, 128, 256, 256, 512, 512, 512, 512],
    13: [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    16: [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    19: [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512],
}


@pytest.mark.parametrize("depth", sorted(_VGG_WIDTHS))
def test_vgg_param_counts(depth):
  widths = _VGG_WIDTHS[depth]
  c_in = [3] + widths[:-1]
  conv = sum(9 * ci * co for ci, co in zip(c_in, widths))
  bn = sum(2 * co for co in widths)
  _, v = _abstract_init(models.create(f"vgg{depth}"))
  assert _count(v["params"]) == conv + bn
  _, v0 = _abstract_init(models.create(f"vgg{depth}", affine=False))
  assert _count(v0["params"]) == conv
  assert all(a.ndim == 4 for a in jax.tree.leaves(v0["params"]))
  if depth == 13:  # the paper's VGG13 guess, spelled out
    assert conv + bn == 9_407_936


def test_mlp_param_count_and_no_bias_mode():
  model = models.create("mlp", widths=(100, 50), use_bn=True)
  _, v = _abstract_init(model, (2, 8, 8, 3))
  assert _count(v["params"]) == (192 * 100 + 100) + (100 * 50 + 50) + 2 * (100 + 50)
  model = models.create("mlp", widths=(100, 50), use_bn=True, use_bias=False, affine=False)
  _, v = _abstract_init(model, (2, 8, 8, 3))
  assert all(a.ndim == 2 for a in jax.tree.leaves(v["params"]))


# ---------------------------------------------------------------------------
# Spatial sizes and PyTorch semantics of the stem and blocks.


def _intermediates(model, variables, x):
  _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  return state["intermediates"]


def test_imagenet_stem_spatial_sizes_32(r18):
  model, variables = r18
  inter = _intermediates(model, variables, _images(3, (2, 32, 32, 3)))
  assert inter["conv1"]["__call__"][0].shape == (2, 16, 16, 64)
  assert inter["stem"][0].shape == (2, 8, 8, 64)
  for k, (s, c) in enumerate([(8, 64), (4, 128), (2, 256), (1, 512)]):
    assert inter[f"layer{k + 1}"][0].shape == (2, s, s, c)


@pytest.mark.parametrize("name,stem,size,expected", [
    ("resnet50", "imagenet", 96, [48, 24, 24, 12, 6, 3]),
    ("resnet18", "cifar", 32, [32, 32, 32, 16, 8, 4]),
])
def test_stem_spatial_sizes(name, stem, size, expected):
  model = models.create(name, stem=stem)
  x = jnp.zeros((1, size, size, 3), F32)

  def fwd():
    variables = model.init(jax.random.key(0), x, train=False)
    return _intermediates(model, variables, x)

  inter = jax.eval_shape(fwd)
  got = [inter["conv1"]["__call__"][0].shape[1], inter["stem"][0].shape[1]]
  got += [inter[f"layer{k}"][0].shape[1] for k in range(1, 5)]
  assert got == expected


def _conv_ref(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)


def _bn_ref(x, p, s):
  y = (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5)
  return y * p["scale"] + p["bias"] if p else y


def _maxpool_ref(x, k, stride, pad):
  """PyTorch MaxPool2d semantics in numpy: −inf padding, floor output size."""
  x = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)),
             constant_values=-np.inf)
  n, h, w, c = x.shape
  oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
  out = np.full((n, oh, ow, c), -np.inf, np.float32)
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = x[:, i * stride:i * stride + k, j * stride:j * stride + k].max(axis=(1, 2))
  return out


def _randomise_stats(variables, seed, var_range=(1e-6, 1e-3)):
  """Non-trivial running statistics (small variances make eps matter) and BN params."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name == "var":
      return jnp.asarray(rng.uniform(*var_range, a.shape), F32)
    if name in ("mean", "bias"):
      return jnp.asarray(0.01 * rng.standard_normal(a.shape), F32)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), F32)
    return a

  return jax.tree.map_with_path(draw, variables)


def test_imagenet_stem_matches_pytorch_semantics(r18):
  model, variables = r18
  variables = _randomise_stats(variables, 4)
  # Even height: Flax 'SAME' would pad (2, 3), PyTorch pads (3, 3). Odd width: PyTorch's
  # floor((33 + 6 - 7)/2) + 1 = 17, pool floor((17 + 2 - 3)/2) + 1 = 9.
  x = _images(5, (2, 32, 33, 3))
  stem = _intermediates(model, variables, x)["stem"][0]
  p, s = variables["params"], variables["batch_stats"]
  y = jax.nn.relu(_bn_ref(_conv_ref(x, p["conv1"]["kernel"], 2, 3), p["bn1"], s["bn1"]))
  ref = _maxpool_ref(y, 3, 2, 1)
  assert stem.shape == ref.shape == (2, 8, 9, 64)
  np.testing.assert_allclose(np.asarray(stem), ref, rtol=1e-4, atol=1e-4)


def _basic_ref(x, p, s, stride):
  out = jax.nn.relu(_bn_ref(_conv_ref(x, p["conv1"]["kernel"], stride, 1), p["bn1"], s["bn1"]))
  out = _bn_ref(_conv_ref(out, p["conv2"]["kernel"], 1, 1), p["bn2"], s["bn2"])
  sc = _bn_ref(_conv_ref(x, p["downsample_conv"]["kernel"], stride, 0), p["downsample_bn"],
               s["downsample_bn"])
  return jax.nn.relu(out + sc)


def _bottleneck_ref(x, p, s, stride):
  out = jax.nn.relu(_bn_ref(_conv_ref(x, p["conv1"]["kernel"], 1, 0), p["bn1"], s["bn1"]))
  out = jax.nn.relu(_bn_ref(_conv_ref(out, p["conv2"]["kernel"], stride, 1), p["bn2"], s["bn2"]))
  out = _bn_ref(_conv_ref(out, p["conv3"]["kernel"], 1, 0), p["bn3"], s["bn3"])
  sc = _bn_ref(_conv_ref(x, p["downsample_conv"]["kernel"], stride, 0), p["downsample_bn"],
               s["downsample_bn"])
  return jax.nn.relu(out + sc)


@pytest.mark.parametrize("cls,ref,out_c", [(BasicBlock, _basic_ref, 32),
                                           (Bottleneck, _bottleneck_ref, 128)])
def test_residual_blocks_match_reference(cls, ref, out_c):
  block = cls(32, strides=2)
  # Even height (Flax 'SAME' would pad a stride-2 3x3 conv (0, 1), PyTorch (1, 1)); odd
  # width (floor output size of PyTorch's 1x1 stride-2 downsample).
  x = _images(6, (2, 8, 9, 16))
  variables = _randomise_stats(block.init(jax.random.key(1), x, train=False), 7, (0.1, 2.0))
  y = block.apply(variables, x, train=False)
  expected = ref(x, variables["params"], variables["batch_stats"], 2)
  assert y.shape == expected.shape == (2, 4, 5, out_c)
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_identity_shortcut_has_no_downsample(r18):
  params = r18[1]["params"]
  assert "downsample_conv" not in params["layer1_0"]
  assert "downsample_conv" not in params["layer2_1"]
  assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
  _, v = _abstract_init(models.create("resnet50"))
  # Bottleneck: layer1_0 widens 64 -> 256 at stride 1, so it has a downsample.
  assert v["params"]["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
  assert v["params"]["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


# ---------------------------------------------------------------------------
# Initialisers.


@pytest.mark.parametrize("path,fan_out", [
    ("conv1", 7 * 7 * 64),                  # fan_in 147: fan_in/fan_out mix-up is 4.6x off
    ("layer4_0/conv1", 3 * 3 * 512),        # fan_in 2304: a mix-up is 1.41x off
])
def test_conv_kernel_init_kaiming_fan_out(r18, path, fan_out):
  params = traverse_util.flatten_dict(r18[1]["params"], sep="/")
  w = np.asarray(params[f"{path}/kernel"], np.float64)
  std = math.sqrt(2.0 / fan_out)
  assert abs(w.std() / std - 1) < 0.05
  assert abs(w.mean()) < 0.05 * std
  # Untruncated normal (torch.nn.init.kaiming_normal_): kurtosis 3; Flax's std-corrected
  # truncated normal has 2.4 and no samples beyond 2.3 std.
  kurtosis = np.mean((w - w.mean()) ** 4) / w.var() ** 2
  assert abs(kurtosis - 3) < 0.3
  assert np.abs(w).max() > 3.5 * std


def test_bn_init(r18):
  flat = traverse_util.flatten_dict(r18[1]["params"], sep="/")
  scales = [v for k, v in flat.items() if k.endswith("scale")]
  biases = [v for k, v in flat.items() if k.endswith("bias")]
  assert len(scales) == len(biases) == 20  # 17 convs' BNs + 3 downsample BNs
  assert all(bool(jnp.all(v == 1)) for v in scales)
  assert all(bool(jnp.all(v == 0)) for v in biases)


def test_mlp_init_is_pytorch_linear():
  model = models.create("mlp", widths=(1000, 10))
  params = model.init(jax.random.key(0), jnp.zeros((1, 400), F32), train=False)["params"]
  for name, fan_in in (("dense0", 400), ("dense1", 1000)):
    bound = 1 / math.sqrt(fan_in)
    for leaf in ("kernel", "bias"):
      w = np.asarray(params[name][leaf])
      assert np.all(np.abs(w) <= bound)
      assert np.abs(w).max() > 0.9 * bound  # uniform over the whole interval, nonzero bias
  w = np.asarray(params["dense0"]["kernel"])
  assert abs(w.std() / (1 / math.sqrt(3 * 400)) - 1) < 0.02


# ---------------------------------------------------------------------------
# BatchNorm modes.


def test_batchnorm_train_vs_eval(r18):
  model, variables = r18
  x = _images(8, (4, 32, 32, 3))
  other = _images(9, (4, 32, 32, 3))
  mixed = jnp.concatenate([x[:2], other[:2]])

  # Eval: running averages, nothing mutated, each row independent of the rest of the batch.
  h_eval, upd = model.apply(variables, x, train=False, mutable=["batch_stats"])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), upd["batch_stats"],
                                   variables["batch_stats"]))
  h_mixed = model.apply(variables, mixed, train=False)
  np.testing.assert_allclose(np.asarray(h_mixed[:2]), np.asarray(h_eval[:2]), rtol=1e-5,
                             atol=1e-6)

  # Train: batch statistics (rows depend on the batch) and running averages updated with
  # PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic.
  h_train, state = model.apply(variables, x, train=True, capture_intermediates=True,
                               mutable=["batch_stats", "intermediates"])
  h_train_mixed, _ = model.apply(variables, mixed, train=True, mutable=["batch_stats"])
  assert float(jnp.max(jnp.abs(h_train_mixed[:2] - h_train[:2]))) > 1e-3
  conv1 = state["intermediates"]["conv1"]["__call__"][0].astype(jnp.float64)
  stats = state["batch_stats"]["bn1"]
  np.testing.assert_allclose(stats["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-4)
  # Every running statistic moved.
  for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
    assert bool(jnp.all(a != b))
  # Training mode without a mutable batch_stats collection is an error, not a silent no-op.
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(variables, x, train=True)


# ---------------------------------------------------------------------------
# Mixed precision.


def test_bfloat16_compute(r18):
  model, variables = r18
  model16 = models.create("resnet18", dtype=jnp.bfloat16)
  _, abstract16 = _abstract_init(model16)
  assert all(a.dtype == F32 for a in jax.tree.leaves(abstract16))  # params stay float32
  x = _images(10, (8, 32, 32, 3))
  h16, state = model16.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
  assert h16.dtype == F32 and bool(jnp.all(jnp.isfinite(h16)))
  assert all(a.dtype == F32 for a in jax.tree.leaves(state["batch_stats"]))
  assert state["intermediates"]["layer2"][0].dtype == jnp.bfloat16  # bf16 really computes
  # Accuracy in eval mode. (In train mode at init, batch-statistics BN makes the network
  # chaotic: a 3e-3 relative input perturbation already moves float32 ResNet18 features by
  # 2.5 % and ResNet50's by ~50 %, so a train-mode comparison measures that, not precision.)
  h32 = model.apply(variables, x, train=False)
  h16 = model16.apply(variables, x, train=False)
  rel = float(jnp.linalg.norm(h16 - h32) / jnp.linalg.norm(h32))
  assert 1e-4 < rel < 2e-2  # bf16 really used (not silently float32), yet close


# ---------------------------------------------------------------------------
# A real training step.


@pytest.mark.slow
def test_resnet18_sgd_training_step(r18):
  model, variables = r18
  num_classes, d = 10, models.feature_dim("resnet18")
  params = {"backbone": variables["params"],
            "readout": 0.01 * _images(1, (d, num_classes))}
  batch_stats = variables["batch_stats"]
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    traces.append(1)

    def loss_fn(params):
      h, upd = model.apply({"params": params["backbone"], "batch_stats": batch_stats}, x,
                           train=True, mutable=["batch_stats"])
      logits = h @ params["readout"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, upd["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  x = _images(11, (8, 32, 32, 3))
  y = jnp.arange(8) % num_classes
  p1, s1, o1, loss1 = step(params, batch_stats, opt_state, x, y)
  p2, s2, _, loss2 = step(p1, s1, o1, _images(12, (8, 32, 32, 3)), y)
  assert len(traces) == 1  # no retrace on the second step
  assert np.isfinite(float(loss1)) and np.isfinite(float(loss2))
  assert abs(float(loss1) - math.log(num_classes)) < 1.0
  for new, old in ((p1, params), (s1, batch_stats), (p2, p1), (s2, s1)):
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
      assert a.dtype == b.dtype and bool(jnp.any(a != b))

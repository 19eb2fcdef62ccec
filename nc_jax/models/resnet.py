r"""torchvision-style ResNet18/34/50 feature extractors (docs/method.md §10.2), Flax Linen.

Shapes. Input ``x``: ``(N, H, W, C)`` (NHWC), any float dtype, any ``C``.
Output: penultimate features ``(N, d)`` in **float32**, d = 512·expansion
(512 for ResNet18/34, 2048 for ResNet50), taken after the global average pool;
there is no ``fc`` layer (the classifier lives outside the backbone).

Architecture (torchvision ``resnet18/34/50`` with ``fc`` removed):

* ``stem="imagenet"`` (the paper's, on every dataset including 32×32): 7×7
  stride-2 conv, 64 channels, padding 3; BN; ReLU; 3×3 stride-2 max-pool with
  padding 1 (−inf padding, like PyTorch). On 32×32: 16 (conv) → 8 (pool) → stages
  8 → 4 → 2 → 1.
* ``stem="cifar"`` (not the paper's; offered for ablations): 3×3 stride-1 conv,
  64 channels, padding 1; BN; ReLU; no max-pool. On 32×32: 32 → 32 → 16 → 8 → 4.
* Stages of widths 64/128/256/512 with strides 1/2/2/2. ``BasicBlock``
  (expansion 1) for ResNet18 ``[2,2,2,2]`` and ResNet34 ``[3,4,6,3]``;
  ``Bottleneck`` (expansion 4) v1.5 — stride on the 3×3 conv, as torchvision —
  for ResNet50 ``[3,4,6,3]``.
* Shortcut: identity, or 1×1 conv (stride s) + BN when the stride is not 1 or the
  channel count changes. ReLU after the residual addition.

Design decisions (differences from torchvision and why):

* No ``fc``: the paper's classifiers (learned, fixed ETF, implicit ETF) are built
  outside; the feature count without ``fc`` is ResNet18 11,176,512, ResNet50
  23,508,032 (torchvision totals minus 513,000 / 2,049,000).
* ``affine`` switches BN scale and shift together (paper ``--no-bias`` mode: off);
  convs never have a bias, so ``affine=False`` leaves only 4-D kernels (AGD).
* BN eps 1e-5, momentum 0.1 (Flax 0.9); no zero-init of the last BN of each
  residual branch (torchvision's default ``zero_init_residual=False``).
* Conv init: Kaiming normal, fan_out, ReLU gain (torchvision); BN scale 1, bias 0.
* Explicit PyTorch padding (``(3,3)`` for 7×7, ``(1,1)`` for 3×3, ``(0,0)`` for
  1×1): Flax ``'SAME'`` would pad stride-2 convs asymmetrically.
* Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``),
  ``param_dtype`` the storage dtype (float32); BN statistics and running
  averages are float32, the global pool accumulates in float32 and the features
  are returned in float32.
* ``bn_axis_name``: optional axis name for cross-device BN statistics inside
  ``pmap``/``shard_map`` (under plain ``jit`` with a sharded batch the batch
  mean is already global).
* The stem output and each stage output are ``sow``-n into the
  ``'intermediates'`` collection (``stem``, ``layer1`` … ``layer4``); a no-op
  unless that collection is mutable.
* Variable names follow torchvision (``conv1``, ``bn1``, ``layer2_0/conv1``,
  ``layer2_0/downsample_conv``, …), ``.`` replaced by ``_``.

BatchNorm differences inherited from Flax (biased running variance, one-pass
variance) are listed in :mod:`nc_jax.models.layers`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn

from nc_jax.models import layers

Dtype = Any

STEMS = ("imagenet", "cifar")
BLOCKS = ("basic", "bottleneck")


class _Block(nn.Module):
  """Fields shared by the residual blocks (``features``: width of the block's convs)."""

  features: int
  strides: int = 1
  affine: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None


class BasicBlock(_Block):
  """Two 3×3 convs (stride on the first) + shortcut; output channels = ``features``.

  ``(N, H, W, C_in) -> (N, ceil(H/strides), ceil(W/strides), features)``.
  """

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = dict(affine=self.affine, axis_name=self.bn_axis_name, **kw)
    out = layers.conv(self.features, 3, self.strides, name="conv1", **kw)(x)
    out = nn.relu(layers.batch_norm(train, name="bn1", **bn)(out))
    out = layers.conv(self.features, 3, 1, name="conv2", **kw)(out)
    out = layers.batch_norm(train, name="bn2", **bn)(out)
    return nn.relu(out + _shortcut(self, x, self.features, train))


class Bottleneck(_Block):
  """1×1 → 3×3 (stride here: v1.5) → 1×1 convs + shortcut; output ``4·features`` channels.

  ``(N, H, W, C_in) -> (N, ceil(H/strides), ceil(W/strides), 4·features)``.
  """

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = dict(affine=self.affine, axis_name=self.bn_axis_name, **kw)
    out = layers.conv(self.features, 1, 1, name="conv1", **kw)(x)
    out = nn.relu(layers.batch_norm(train, name="bn1", **bn)(out))
    out = layers.conv(self.features, 3, self.strides, name="conv2", **kw)(out)
    out = nn.relu(layers.batch_norm(train, name="bn2", **bn)(out))
    out = layers.conv(self.features * self.expansion, 1, 1, name="conv3", **kw)(out)
    out = layers.batch_norm(train, name="bn3", **bn)(out)
    return nn.relu(out + _shortcut(self, x, self.features * self.expansion, train))


def _shortcut(block: nn.Module, x: jax.Array, out_channels: int, train: bool) -> jax.Array:
  """Identity, or 1×1 conv (stride s, no padding) + BN when the shape changes (torchvision)."""
  if block.strides == 1 and x.shape[-1] == out_channels:
    return x
  kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
  y = layers.conv(out_channels, 1, block.strides, name="downsample_conv", **kw)(x)
  return layers.batch_norm(train, affine=block.affine, axis_name=block.bn_axis_name,
                           name="downsample_bn", **kw)(y)


class ResNet(nn.Module):
  """ResNet feature extractor: ``(N, H, W, C)`` float → ``(N, feature_dim)`` float32.

  Use :func:`nc_jax.models.create` (``'resnet18'``, ``'resnet34'``, ``'resnet50'``)
  rather than setting ``stage_sizes``/``block`` by hand.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet18.
    block: ``'basic'`` (expansion 1) or ``'bottleneck'`` (expansion 4, v1.5).
    stem: ``'imagenet'`` (paper default: 7×7/2 conv + 3×3/2 max-pool) or
      ``'cifar'`` (3×3/1 conv, no max-pool).
    affine: BN scale and shift on (True) or off (False, the paper's no-bias mode).
    dtype: compute dtype (activations); ``param_dtype``: parameter dtype.
    bn_axis_name: axis name for cross-device BN statistics (pmap/shard_map), or None.
    width: channels of the stem and first stage (64, torchvision's); stage i has
      ``width·2^i``. Smaller widths give narrower, cheaper nets (d = 8·width for ResNet18)
      for reduced CPU runs; the paper uses 64.

  Call: ``model.apply(variables, x, train=...)``; with ``train=True`` pass
  ``mutable=['batch_stats']`` (batch statistics, running averages updated); with
  ``train=False`` the running averages are used and nothing is mutated.
  """

  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  block: str = "basic"
  stem: str = "imagenet"
  affine: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  width: int = 64

  def __post_init__(self):
    object.__setattr__(self, "stage_sizes", layers.as_tuple(self.stage_sizes, "stage_sizes"))
    if not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f"width: expected a positive integer, got {self.width!r}")
    if self.block not in BLOCKS:
      raise ValueError(f"block: expected one of {BLOCKS}, got {self.block!r}")
    if self.stem not in STEMS:
      raise ValueError(f"stem: expected one of {STEMS}, got {self.stem!r}")
    super().__post_init__()

  @property
  def expansion(self) -> int:
    return Bottleneck.expansion if self.block == "bottleneck" else BasicBlock.expansion

  @property
  def feature_dim(self) -> int:
    """Length d of the returned feature vector (512 for ResNet18/34, 2048 for ResNet50, at
    the default width 64)."""
    return self.width * 2 ** (len(self.stage_sizes) - 1) * self.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_input(x, ndim=4, name=f"{type(self).__name__} input")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bn = dict(affine=self.affine, axis_name=self.bn_axis_name, **kw)
    if self.stem == "imagenet":
      x = layers.conv(self.width, 7, 2, name="conv1", **kw)(x)
      x = nn.relu(layers.batch_norm(train, name="bn1", **bn)(x))
      x = layers.max_pool_torch(x, 3, 2, 1)
    else:
      x = layers.conv(self.width, 3, 1, name="conv1", **kw)(x)
      x = nn.relu(layers.batch_norm(train, name="bn1", **bn)(x))
    self.sow("intermediates", "stem", x)

    block_cls = Bottleneck if self.block == "bottleneck" else BasicBlock
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2 ** i, strides, affine=self.affine, bn_axis_name=self.bn_axis_name,
                      name=f"layer{i + 1}_{j}", **kw)(x, train)
      self.sow("intermediates", f"layer{i + 1}", x)
    return layers.global_avg_pool_f32(x)

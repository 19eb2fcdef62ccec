r"""VGG11/13/16/19 with BatchNorm as feature extractors (docs/method.md §10.2), Flax Linen.

Shapes. Input ``x``: ``(N, H, W, C)`` (NHWC), any float dtype, any ``C``, with
``H, W >= 32`` (five 2×2 max-pools). Output: ``(N, 512)`` float32 features.

**The paper's VGG13 is not defined anywhere** (it appears in the paper but not in
the official release; docs/method.md §10.2). This module is the documented natural
guess: the standard VGG conv stack with BatchNorm (torchvision ``vgg13_bn``
``features``, config 'B') followed by global average pooling to 512 features.
VGG11/16/19 use configs 'A'/'D'/'E' the same way.

Each conv unit is 3×3 conv (stride 1, padding 1) → BN → ReLU; ``'M'`` is a 2×2
stride-2 max-pool (no padding). On 32×32 inputs the five pools leave 1×1, so the
global pool is then a plain reshape.

Design decisions (differences from torchvision ``vggXX_bn`` and why):

* No ``avgpool(7×7)`` + three-layer classifier: global average pooling to the
  512 channels instead (the paper's heads live outside the backbone, and a 4096-d
  MLP head has no counterpart in the ResNet pipeline).
* Convs have no bias (torchvision's have one): a bias before BN is cancelled by
  the mean subtraction in training mode, and the paper's no-bias mode (AGD)
  rejects 1-D parameters. Parameter count:
  :math:`\sum_\text{convs} 9\,c_\text{in}c_\text{out} + 2c_\text{out}` (the last
  term only with ``affine=True``).
* Init as torchvision: conv kernels Kaiming normal, fan_out, ReLU gain; BN
  scale 1, bias 0. BN eps 1e-5, momentum 0.1 (Flax 0.9), ``affine`` switches
  scale and shift together.
* Mixed precision: ``dtype`` compute dtype, ``param_dtype`` parameter dtype; BN
  statistics, the global pool and the returned features are float32.
* Variable names ``conv{i}``, ``bn{i}`` with ``i`` the index of the conv (0-based).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from nc_jax.models import layers

Dtype = Any

#: Standard VGG configurations (Simonyan & Zisserman 2015, torchvision names A/B/D/E).
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # 'A'
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # 'B'
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),  # 'D'
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),  # 'E'
}

#: Input height and width must be at least this (2**number of max-pools).
MIN_SPATIAL = 32


class VGG(nn.Module):
  """VGG-BN feature extractor: ``(N, H, W, C)`` float → ``(N, 512)`` float32.

  Attributes:
    depth: 11, 13, 16 or 19 (configs A, B, D, E).
    affine: BN scale and shift on (True) or off (False, the paper's no-bias mode).
    dtype: compute dtype; ``param_dtype``: parameter dtype.
    bn_axis_name: axis name for cross-device BN statistics (pmap/shard_map), or None.

  Call: ``model.apply(variables, x, train=...)`` (``mutable=['batch_stats']``
  when ``train=True``).
  """

  depth: int = 13
  affine: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def __post_init__(self):
    if self.depth not in CONFIGS:
      raise ValueError(f"depth: expected one of {sorted(CONFIGS)}, got {self.depth!r}")
    super().__post_init__()

  @property
  def feature_dim(self) -> int:
    """Length of the returned feature vector (512)."""
    return [c for c in CONFIGS[self.depth] if c != "M"][-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_input(x, ndim=4, name="VGG input")
    if x.shape[1] < MIN_SPATIAL or x.shape[2] < MIN_SPATIAL:
      raise ValueError(f"VGG input: height and width must be >= {MIN_SPATIAL} (five 2×2 "
                       f"max-pools), got shape {tuple(x.shape)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    i = 0
    for c in CONFIGS[self.depth]:
      if c == "M":
        x = layers.max_pool_torch(x, 2, 2, 0)
        continue
      x = layers.conv(c, 3, 1, name=f"conv{i}", **kw)(x)
      x = layers.batch_norm(train, affine=self.affine, axis_name=self.bn_axis_name,
                            name=f"bn{i}", **kw)(x)
      x = nn.relu(x)
      i += 1
    return layers.global_avg_pool_f32(x)

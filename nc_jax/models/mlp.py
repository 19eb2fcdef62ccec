r"""A small MLP feature extractor (not in the paper; for quick experiments and tests).

Shapes. Input ``x``: ``(N, ...)`` any float dtype; everything after the batch
axis is flattened (so NHWC images work). Output: ``(N, widths[-1])`` float32.

Each layer is Dense(width) → [BatchNorm] → ReLU (the ReLU on the last layer only
when ``activate_last``, the default, so the features are post-activation like the
ResNet/VGG pooled features).

Design decisions:

* Dense init is PyTorch's default ``nn.Linear`` init (kernel and bias both
  U(−1/√fan_in, 1/√fan_in)), not Flax's lecun-normal kernel / zero bias, to match
  a PyTorch MLP.
* ``use_bias=False`` with ``affine=False`` (or ``use_bn=False``) leaves only 2-D
  kernels, as AGD requires (docs/method.md §10.1).
* BN as in the conv nets: eps 1e-5, momentum 0.1 (Flax 0.9), float32 statistics.
* Mixed precision: ``dtype`` compute dtype, ``param_dtype`` parameter dtype;
  features returned in float32.
* Variable names ``dense{i}``, ``bn{i}``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from nc_jax.models import layers

Dtype = Any


class MLP(nn.Module):
  """MLP feature extractor: ``(N, ...)`` float → ``(N, widths[-1])`` float32.

  Attributes:
    widths: output width of each Dense layer, e.g. ``(512, 512)``.
    use_bn: BatchNorm after each Dense (before the ReLU).
    use_bias: Dense biases.
    affine: BN scale and shift (only with ``use_bn``).
    activate_last: apply ReLU after the last layer too.
    dtype: compute dtype; ``param_dtype``: parameter dtype.
    bn_axis_name: axis name for cross-device BN statistics (pmap/shard_map), or None.
  """

  widths: tuple[int, ...] = (512, 512)
  use_bn: bool = False
  use_bias: bool = True
  affine: bool = True
  activate_last: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "widths", layers.as_tuple(self.widths, "widths"))
    super().__post_init__()

  @property
  def feature_dim(self) -> int:
    """Length of the returned feature vector (``widths[-1]``)."""
    return self.widths[-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layers.check_input(x, ndim=None, name="MLP input")
    if x.ndim < 2:
      raise ValueError(f"MLP input: expected shape (N, ...), got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.widths):
      x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=layers.torch_linear_kernel_init(),
                   bias_init=layers.torch_linear_bias_init(x.shape[-1]), name=f"dense{i}")(x)
      if self.use_bn:
        x = layers.batch_norm(train, affine=self.affine, dtype=self.dtype,
                              param_dtype=self.param_dtype, axis_name=self.bn_axis_name,
                              name=f"bn{i}")(x)
      if self.activate_last or i < len(self.widths) - 1:
        x = nn.relu(x)
    return x.astype(jnp.float32)

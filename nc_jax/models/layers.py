r"""Building blocks shared by the backbones: PyTorch-matching convs, BatchNorm and inits.

Every backbone in :mod:`nc_jax.models` is built from these helpers so that the
choices below are made once:

* :func:`conv`: ``nn.Conv`` without bias, with **explicit symmetric padding**
  (PyTorch's ``padding=k//2``). Flax's ``'SAME'`` pads ``(0, 1)`` for a stride-2
  3×3 conv on an even input, shifting the sampling grid by one pixel relative to
  PyTorch; explicit padding gives PyTorch's output size and alignment.
* :func:`batch_norm`: ``nn.BatchNorm`` with PyTorch's ``eps = 1e-5`` and
  momentum 0.1 (Flax ``momentum = 0.9``, the weight of the old running average),
  ``use_scale = use_bias = affine`` (the paper's ``--no-bias`` mode sets
  ``affine=False``, which AGD requires: it rejects 1-D parameters), statistics
  and running averages in float32 whatever the compute ``dtype``.
* :data:`conv_kernel_init`: torchvision's ``kaiming_normal_(mode='fan_out',
  nonlinearity='relu')``, i.e. an *untruncated* normal with std
  :math:`\sqrt{2/\text{fan\_out}}`, fan_out = out_channels·kh·kw.
* :func:`torch_linear_kernel_init` / :func:`torch_linear_bias_init`: PyTorch's
  default ``nn.Linear`` init, :math:`U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})`
  for the kernel (``kaiming_uniform_(a=√5)``) and for the bias.

Two known differences from ``torch.nn.BatchNorm2d`` (Flax behaviour, kept):

* the running variance is updated with the *biased* batch variance (PyTorch uses
  the unbiased one, a factor n/(n−1), n = batch·H·W; ≤ 0.4 % at batch 256 on the
  last 1×1 stage of a 32×32 ResNet, negligible elsewhere);
* the batch variance is computed as E[x²] − E[x]² in float32 (Flax's
  ``use_fast_variance``), one fused reduction instead of two passes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

#: BatchNorm constants (PyTorch defaults: eps 1e-5, momentum 0.1 = Flax 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

#: torchvision conv init: Kaiming normal, fan_out, ReLU gain (untruncated normal).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_kernel_init() -> nn.initializers.Initializer:
  """PyTorch ``nn.Linear`` weight init: U(-1/√fan_in, 1/√fan_in) (kaiming_uniform, a=√5)."""
  # variance_scaling 'uniform' draws U(-√(3s/fan_in), √(3s/fan_in)); s = 1/3 gives 1/√fan_in.
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch ``nn.Linear`` bias init: U(-1/√fan_in, 1/√fan_in) (needs the layer's fan_in)."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(features: int, kernel: int, strides: int = 1, *, dtype: Dtype, param_dtype: Dtype,
         name: str) -> nn.Conv:
  """Bias-free ``kernel×kernel`` conv with PyTorch padding ``kernel//2`` on each side."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=param_dtype, kernel_init=conv_kernel_init, name=name)


def batch_norm(train: bool, *, affine: bool, dtype: Dtype, param_dtype: Dtype,
               axis_name: str | None, name: str) -> nn.BatchNorm:
  """PyTorch-default BatchNorm; batch statistics when ``train``, running averages otherwise."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype,
                      axis_name=axis_name, name=name)


def max_pool_torch(x: jax.Array, window: int, strides: int, padding: int) -> jax.Array:
  """``nn.MaxPool2d(window, strides, padding)`` on NHWC: pads with −inf, like PyTorch."""
  return nn.max_pool(x, (window, window), strides=(strides, strides),
                     padding=((padding, padding), (padding, padding)))


def global_avg_pool_f32(x: jax.Array) -> jax.Array:
  """Mean over H and W of an NHWC array, accumulated and returned in float32: (N, C)."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def check_input(x: Any, *, ndim: int | None, name: str) -> None:
  """Raise ValueError unless ``x`` is a real floating array (of rank ``ndim`` if given)."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{name}: expected an array, got {type(x).__name__}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating-point input (cast images to float first), "
                     f"got dtype {dtype}")
  if ndim is not None and len(shape) != ndim:
    raise ValueError(f"{name}: expected a rank-{ndim} NHWC input (N, H, W, C), got shape "
                     f"{tuple(shape)}")


def as_tuple(values: Sequence[int], name: str) -> tuple[int, ...]:
  """Validate a non-empty sequence of positive ints (module fields must be hashable)."""
  out = tuple(int(v) for v in values)
  if not out or any(v <= 0 for v in out):
    raise ValueError(f"{name}: expected a non-empty sequence of positive integers, got {values!r}")
  return out

"""Backbone feature extractors (Flax Linen, pure ``init``/``apply``): docs/method.md §10.2.

Every model maps a float input (NHWC images; any shape ``(N, ...)`` for the MLP)
to penultimate features ``(N, d)`` in float32 — no classifier head — and is called
as ``model.apply(variables, x, train=bool)``; in training pass
``mutable=['batch_stats']``::

    model = create("resnet18", affine=False)        # the paper's no-bias backbone
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32),
                           train=False)
    h, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])  # (N, 512)
    variables = {**variables, **updates}

Names (:data:`MODEL_NAMES`): ``resnet18``, ``resnet34``, ``resnet50`` (torchvision,
ImageNet stem by default), ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (BN, global
pool; VGG13 is this package's guess at the paper's undefined VGG13), ``mlp``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from nc_jax.models import layers
from nc_jax.models.mlp import MLP
from nc_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from nc_jax.models.vgg import VGG

# name -> (module class, the architecture fields the name fixes)
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic")),
    "resnet34": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="basic")),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck")),
    "vgg11": (VGG, dict(depth=11)),
    "vgg13": (VGG, dict(depth=13)),
    "vgg16": (VGG, dict(depth=16)),
    "vgg19": (VGG, dict(depth=19)),
    "mlp": (MLP, {}),
}

#: The names :func:`create` accepts.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def create(name: str, **kwargs: Any) -> nn.Module:
  """Build the backbone called ``name`` (see :data:`MODEL_NAMES`).

  ``kwargs`` are the module's fields: ``affine``, ``dtype``, ``param_dtype``,
  ``bn_axis_name`` for all; ``stem`` (``'imagenet'``/``'cifar'``) for ResNets;
  ``widths``, ``use_bn``, ``use_bias``, ``activate_last`` for the MLP. The
  architecture fields a name fixes (``stage_sizes``/``block``, ``depth``) cannot
  be overridden.

  Raises:
    ValueError: unknown name (the message lists the valid ones), an attempt to
      override a fixed architecture field, or an invalid field value.
    TypeError: an unknown field.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  cls, fixed = _REGISTRY[name]
  clash = sorted(set(fixed) & set(kwargs))
  if clash:
    raise ValueError(f"{name} fixes {', '.join(clash)}; use the {cls.__name__} class directly "
                     "for a custom architecture")
  return cls(**fixed, **kwargs)


def feature_dim(name: str, **kwargs: Any) -> int:
  """Length d of the features ``create(name, **kwargs)`` returns (512, 2048, or MLP width)."""
  return create(name, **kwargs).feature_dim


__all__ = [
    "BasicBlock", "Bottleneck", "MLP", "MODEL_NAMES", "ResNet", "VGG", "create", "feature_dim",
    "layers",
]

"""One validated description of a training run, and the builders that turn it into parts.

:class:`TrainConfig` names everything a run needs (dataset, backbone, head,
optimiser, batch and epochs, …) with the paper's recipe as defaults
(docs/method.md §10: ResNet18 with the ImageNet stem, BatchNorm without affine
parameters, τ = 5, AGD with gain 10, batch 256, 200 epochs, stratified batches
for the implicit method). :meth:`TrainConfig.validate` rejects a bad
configuration before any data is read or anything compiled, naming the field,
the valid choices and what was given. The ``build_*`` functions assemble the
backbone, head, optimiser and parameter initialisation for
:func:`nc_jax.train.create_train_state`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nc_jax import heads, models, optim
from nc_jax import pipeline as pipeline_lib
from nc_jax.data import imbalance, registry
from nc_jax.data.subsets import Relabelled, Subset, source_labels
from nc_jax.data.sources import SOURCES

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class MethodVariant:
  """A method as the experiments, reports and benchmarks name it.

  Attributes:
    head: the head kind (:data:`nc_jax.heads.HEAD_KINDS`), :attr:`TrainConfig.head`.
    forward_only: no gradient through the nearest ETF (the paper's ablation).
    colour: its colour in every figure.
    options: further :class:`TrainConfig` fields the method sets, ``((name, value), ...)``.
  """
  head: str
  forward_only: bool
  colour: str
  options: tuple[tuple[str, Any], ...] = ()

  def train_config(self, base: "TrainConfig") -> "TrainConfig":
    """``base`` with this method's head, forward-only flag and options."""
    return dataclasses.replace(base, head=self.head, forward_only=self.forward_only,
                               **dict(self.options))

  @property
  def loss(self) -> str:
    """The training loss this method uses (:data:`nc_jax.heads.LOSSES`): its ``loss``
    option, else cross-entropy."""
    return dict(self.options).get("loss", "cross_entropy")

  def head_options(self) -> dict[str, Any]:
    """The :class:`nc_jax.heads.HeadConfig` fields this method sets besides its kind (for
    code without a TrainConfig, e.g. the UFM); the loss is not a head field (:attr:`loss`)."""
    names = {"normalise_features": "normalise"}
    return {"forward_only": self.forward_only,
            **{names.get(k, k): v for k, v in self.options if k != "loss"}}


# The one table of methods: the paper's three heads, its two ablations, and the fixed ETF
# trained with the dot-regression loss (Yang et al., NeurIPS 2022), the fixed-classifier
# baseline for class-imbalanced data. Its τ is 1: the loss ½(z_y − 1)² then asks for
# cos(h, w_y) = 1 (Yang et al.'s target with unit features and rows); with the paper's
# τ = 5 it would ask for a cosine of 0.2.
METHOD_VARIANTS = types.MappingProxyType({
    "standard": MethodVariant("standard", False, "tab:blue"),
    "fixed": MethodVariant("fixed", False, "tab:orange"),
    "implicit": MethodVariant("implicit", False, "tab:green"),
    "implicit-fo": MethodVariant("implicit", True, "tab:red"),
    # The paper's ablation: standard training without feature and weight normalisation.
    "standard-nonorm": MethodVariant("standard", False, "tab:purple",
                                     (("normalise_features", False),
                                      ("renormalise_rows", False))),
    "fixed-dotreg": MethodVariant("fixed", False, "tab:brown",
                                  (("loss", "dot_regression"), ("tau", 1.0))),
})
METHODS = tuple(METHOD_VARIANTS)


def _field(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A field with its one-line description (the experiments' ``--help`` shows it)."""
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run (defaults: the paper's released recipe).

  Data: ``dataset`` (a :func:`nc_jax.data.dataset_names` name), ``augment``
  (the dataset's training augmentation; off: training batches are only normalised,
  as in Papyan et al.'s neural-collapse experiments), ``source``
  (``tfds``/``idx``/``npz``/``synthetic``), ``data_path`` (idx folder or npz file),
  ``data_dir`` (tfds), ``num_examples`` (synthetic size).
  Model: ``model`` (:data:`nc_jax.models.MODEL_NAMES`), ``stem`` (ResNets:
  ``imagenet`` as the paper, or ``cifar``), ``affine`` (BatchNorm scale/shift;
  the paper's ``--no-bias`` turns it off), ``compute_dtype`` (``float32`` or
  ``bfloat16``; parameters stay float32), ``width`` (ResNets: stem/first-stage
  channels, ``None`` = 64 as the paper; narrower nets for reduced CPU runs; MLP: both
  hidden layers, ``None`` = 512).
  Head: ``head`` (standard/fixed/implicit), ``forward_only`` (implicit
  ablation), ``tau``, ``loss``, ``bias`` (standard), ``renormalise_rows``
  (standard), ``rotation_seed`` (fixed), ``delta``, ``solver``,
  ``factorisation`` (implicit).
  Optimisation: ``optimizer`` (sgd/adam/adamw/agd), ``learning_rate``,
  ``momentum``, ``nesterov``, ``weight_decay``, ``schedule``,
  ``warmup_epochs``, ``gain`` (AGD), ``batch_size`` (global), ``epochs``,
  ``stratified`` (``None``: on for the implicit method when batch_size ≥ K,
  as the paper).
  Run: ``seed``.
  """
  dataset: str = _field("cifar10", "dataset name (nc_jax.data.dataset_names())")
  augment: bool = _field(
      True, "the dataset's training augmentation (off: training batches are only normalised)")
  source: str = _field(
      "tfds",
      "tfds (prepared tensorflow-datasets), idx (MNIST-format files in data_path), npz "
      "(data_path file) or synthetic (random images, for smoke tests)")
  data_path: str | None = _field(None, "folder of IDX files (source idx) or .npz file (source npz)")
  data_dir: str | None = _field(None, "tfds data_dir (None: tfds's default)")
  num_examples: int | None = _field(
      None, "examples per split for source synthetic (None: the registry's size)")
  imbalance: str = _field(
      "none", "class imbalance of the training set: none, longtail (exponential profile) or "
      "step (the minority classes reduced); the test set stays balanced")
  imbalance_ratio: float = _field(
      1.0, "largest / smallest class size of an imbalanced training set (the official "
      "--imb_factor is its inverse)")
  minority_fraction: float = _field(
      0.5, "fraction of the classes that are minority classes (the last ones)")
  label_noise: float = _field(
      0.0, "fraction of training labels replaced by a random other class (symmetric noise)")
  model: str = _field("resnet18", "backbone (nc_jax.models.MODEL_NAMES)")
  stem: str = _field(
      "imagenet",
      "ResNet stem: imagenet (7x7 stride 2 and max-pool, the paper's) or cifar (3x3 "
      "stride 1)")
  affine: bool = _field(
      False, "BatchNorm scale and shift (off in the paper's recipe; AGD needs them off)")
  compute_dtype: str = _field("float32", "compute dtype (parameters stay float32)")
  width: int | None = _field(
      None,
      "ResNets: stem/first-stage channels (None: 64, the paper's); MLP: hidden width "
      "(None: 512)")
  head: str = _field("implicit", "classifier head (the method's; nc_jax.heads.HEAD_KINDS)")
  forward_only: bool = _field(
      False, "implicit head: no gradient through the nearest ETF (the paper's ablation)")
  tau: float = _field(5.0, "feature norm τ the heads scale features to (the paper's: 5)")
  normalise_features: bool = _field(
      True, "scale features to norm τ (off: the standard head's ablation without feature "
      "normalisation; the ETF heads need it)")
  loss: str = _field("cross_entropy", "training loss on the logits")
  bias: bool = _field(False, "standard head: a learned classifier bias (AGD needs it off)")
  renormalise_rows: bool = _field(
      True, "standard head: unit-norm classifier rows after every step (the official code's)")
  rotation_seed: int | None = _field(
      None, "fixed head: seed of a random rotation of the ETF (None: the canonical ETF)")
  delta: float = _field(1e-3, "implicit head: proximal weight δ of the nearest-ETF problem")
  solver: str = _field(
      "polar", "implicit head: polar (closed form) or rgd (Riemannian gradient descent)")
  factorisation: str = _field(
      "auto", "implicit head, polar solver: auto (by platform) or a fixed factorisation")
  optimizer: str = _field("agd", "optimiser (AGD is the paper's; it needs no learning rate)")
  learning_rate: float | None = _field(None, "base learning rate (sgd/adam/adamw; not used by AGD)")
  momentum: float | None = _field(None, "sgd momentum (None: 0.9, the official default)")
  nesterov: bool = _field(False, "sgd: Nesterov momentum")
  weight_decay: float | None = _field(
      None, "weight decay (None: 0; coupled for sgd/adam, decoupled for adamw)")
  schedule: str = _field("constant", "learning-rate schedule (in optimiser steps)")
  warmup_epochs: int = _field(0, "linear warm-up epochs of the schedule")
  gain: float | None = _field(None, "AGD gain (None: 10, the paper's)")
  batch_size: int = _field(256, "global batch size (all devices together)")
  epochs: int = _field(200, "training epochs")
  stratified: bool | None = _field(
      None,
      "stratified batches, every class in every batch (None: on for the implicit head "
      "when batch_size >= K, as the paper)")
  seed: int = _field(0, "run seed (initialisation, data order, augmentation)")

  @property
  def use_stratified(self) -> bool:
    """Explicit ``stratified``, else on for the implicit method whenever every class fits
    in a batch (batch_size ≥ K; not possible for ImageNet at batch 256)."""
    if self.stratified is not None:
      return self.stratified
    return self.head == "implicit" and self.batch_size >= self.info.num_classes

  def data_spec(self, train: bool):
    """The augmentation and normalisation of training (``train``) or evaluation batches;
    training batches get the evaluation transform when ``augment`` is off."""
    return self.info.spec(train and self.augment)

  @property
  def info(self) -> registry.DatasetInfo:
    return registry.get_dataset_info(self.dataset)

  def validate(self) -> "TrainConfig":
    """Checks every field and their combinations; returns ``self``.

    Raises:
      ValueError: naming the field, the valid values and the given one.
    """
    try:
      registry.get_dataset_info(self.dataset)
    except ValueError:
      _choice("dataset", self.dataset, registry.dataset_names())
    _choice("source", self.source, SOURCES)
    imbalance.check(self.imbalance, self.imbalance_ratio, self.minority_fraction,
                    self.label_noise)
    if self.source in ("idx", "npz") and not self.data_path:
      raise ValueError(f"data_path: source {self.source!r} needs a data_path (a folder of IDX "
                       f"files or an .npz file), got {self.data_path!r}")
    _choice("model", self.model, models.MODEL_NAMES)
    _choice("stem", self.stem, ("imagenet", "cifar"))
    _choice("compute_dtype", self.compute_dtype, tuple(COMPUTE_DTYPES))
    _choice("head", self.head, heads.HEAD_KINDS)
    _choice("loss", self.loss, heads.LOSSES)
    _choice("optimizer", self.optimizer.lower(), optim.OPTIMIZERS)
    _choice("schedule", self.schedule, optim.SCHEDULES)
    for name in ("batch_size", "epochs"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if self.warmup_epochs < 0 or (self.warmup_epochs and self.warmup_epochs >= self.epochs):
      raise ValueError(f"warmup_epochs: expected 0 <= warmup_epochs < epochs={self.epochs}, "
                       f"got {self.warmup_epochs}")
    k = self.info.num_classes
    if self.use_stratified and self.batch_size < k:
      raise ValueError(f"batch_size: stratified batches need every class in every batch, so "
                       f"batch_size >= number of classes K={k}, got {self.batch_size}")
    if self.width is not None and (not (self.model.startswith("resnet") or self.model == "mlp")
                                   or not isinstance(self.width, int) or self.width < 1):
      raise ValueError(f"width: expected None or a positive integer for a ResNet or the MLP "
                       f"(model {self.model!r}), got {self.width!r}")
    d = self.backbone().feature_dim
    # The head checks d ≥ K for the ETF methods (and every other head field).
    self.head_config(k, d)
    if self.optimizer.lower() == "agd" and self.affine:
      raise ValueError("affine: AGD cannot train 1-D parameters, so BatchNorm must run without "
                       "scale and shift (affine=False: drop --affine), got affine=True")
    if self.optimizer.lower() == "agd" and self.head == "standard" and self.bias:
      raise ValueError("bias: AGD cannot train 1-D parameters: the standard head's classifier "
                       "bias must be off (bias=False: drop --bias), got bias=True")
    self.optimizer_transform(steps_per_epoch=1)  # the factory validates the numbers
    return self

  def head_config(self, num_classes: int, feature_dim: int) -> heads.HeadConfig:
    return heads.HeadConfig(
        self.head, num_classes=num_classes, feature_dim=feature_dim, tau=self.tau,
        normalise=self.normalise_features, bias=self.bias, renormalise_rows=self.renormalise_rows, rotation_seed=self.rotation_seed,
        forward_only=self.forward_only, delta=self.delta, solver=self.solver,
        factorisation=self.factorisation)

  @property
  def minority(self) -> tuple[int, ...] | None:
    """The minority classes of an imbalanced training set (:mod:`nc_jax.data.imbalance`),
    ``None`` when it is balanced."""
    if self.imbalance == "none":
      return None
    return imbalance.minority_classes(self.info.num_classes, self.minority_fraction)

  def training_labels(self, labels) -> tuple[np.ndarray | None, np.ndarray]:
    """``(ids, labels)``: the examples of the training split ``labels`` that this run trains
    on (``None``: all) and their labels after label noise; fixed for every seed (seed 0).
    Identity for a balanced, noise-free configuration."""
    labels = np.asarray(labels).astype(np.int32)
    k = self.info.num_classes
    ids = imbalance.imbalanced_ids(labels, k, self.imbalance, self.imbalance_ratio,
                                   self.minority_fraction, seed=0)
    kept = labels if ids is None else labels[ids]
    noisy, _ = imbalance.symmetric_label_noise(kept, k, self.label_noise, seed=0)
    return ids, noisy

  def training_split(self, split: tuple) -> tuple:
    """A ``(images or source, labels)`` training split as this run trains on it: the
    imbalanced subset and the label noise of :meth:`training_labels` (the split itself when
    neither is set; a source's labels are read when needed)."""
    if self.imbalance == "none" and self.label_noise == 0.0:
      return split
    data, labels = split
    if labels is None:
      labels = source_labels(data)
    ids, noisy = self.training_labels(labels)
    if isinstance(data, (np.ndarray, jax.Array)):
      images = data if ids is None else data[ids]
      return images, noisy
    source = data if ids is None else Subset(data, ids)
    return (Relabelled(source, noisy) if self.label_noise else source), noisy

  def pipeline(self, train_split: tuple, eval_split: tuple | None = None,
               mesh=None) -> pipeline_lib.Pipeline:
    """The run's data (:mod:`nc_jax.pipeline`): batch size, stratification, augmentation
    (``augment``) and seed from this configuration; the training split as
    :meth:`training_split` makes it (class imbalance, label noise).

    Args:
      train_split, eval_split: ``(images, labels)``: uint8 ``(N, H, W, C)`` images (the
        dataset's ``device_shape``, host or already on ``mesh``) and ``(N,)`` labels for the
        datasets that fit on the device (→ :class:`~nc_jax.pipeline.DevicePipeline`);
        ``(source, labels or None)`` with a random-access source for the streamed ones
        (ImageNet → :class:`~nc_jax.pipeline.StreamingPipeline`; labels are needed for
        stratified batches). ``eval_split`` may be ``None``.
      mesh: the data-parallel mesh (``None``: one device).
    """
    info = self.info
    train_split = self.training_split(train_split)
    common = dict(train_spec=self.data_spec(True), eval_spec=self.data_spec(False),
                  batch_size=self.batch_size, num_classes=info.num_classes,
                  stratified=self.use_stratified, mesh=mesh)
    if info.pipeline == "stream":
      source, labels = train_split
      return pipeline_lib.StreamingPipeline(
          source, None if eval_split is None else eval_split[0], train_labels=labels,
          seed=self.seed, **common)
    return pipeline_lib.DevicePipeline.create(train_split, eval_split, **common)

  def backbone(self):
    kwargs: dict[str, Any] = {"affine": self.affine,
                              "dtype": COMPUTE_DTYPES[self.compute_dtype]}
    if self.model.startswith("resnet"):
      kwargs["stem"] = self.stem
      if self.width is not None:
        kwargs["width"] = self.width
    if self.model == "mlp":
      kwargs["use_bias"] = self.affine  # no-bias mode: no 1-D parameters anywhere
      if self.width is not None:
        kwargs["widths"] = (self.width, self.width)
    return models.create(self.model, **kwargs)

  def optimizer_transform(self, steps_per_epoch: int) -> optax.GradientTransformation:
    name = self.optimizer.lower()
    # Everything goes to the factory, which rejects what an optimiser cannot honour
    # (e.g. a learning rate for AGD, momentum for Adam).
    kwargs: dict[str, Any] = {
        "learning_rate": self.learning_rate, "momentum": self.momentum,
        "nesterov": self.nesterov, "weight_decay": self.weight_decay, "schedule": self.schedule,
        "total_steps": self.epochs * steps_per_epoch,
        "warmup_steps": self.warmup_epochs * steps_per_epoch, "gain": self.gain}
    if name == "agd":
      kwargs["torch_layout"] = _head_is_torch_layout
    return optim.make_optimizer(name, **kwargs)

  def init_params(self) -> Callable[[Any, Any], Any] | None:
    """AGD's orthogonal re-initialisation (official), else ``None`` (model initialisers)."""
    if self.optimizer.lower() != "agd":
      return None
    return functools.partial(optim.agd_init, torch_layout=_head_is_torch_layout)


def _head_is_torch_layout(path: str) -> bool:
  """The standard head stores W as (K, d) = (out, in), PyTorch's order."""
  return path.startswith("head/")


def _choice(name: str, value: Any, valid) -> None:
  if value in valid:
    return
  raise ValueError(f"{name}: expected one of {', '.join(map(str, valid))}; got {value!r}")

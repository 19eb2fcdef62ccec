"""Per-dataset metadata: classes, shapes, normalisation, augmentation, tfds names and splits.

The recipes follow the official code (docs/method.md §10.3). Entries the paper does not use
(FashionMNIST, SVHN, synthetic) say where their numbers come from in ``notes``.

Shapes:

* ``source_shape``: what the readers return (MNIST 28×28×1); ``None`` when images vary
  (ImageNet).
* ``device_shape``: what is stored, as uint8, for the device-resident pipeline, after the
  one-off host preprocessing of :func:`nc_jax.data.sources.preprocess` (MNIST resized to
  32×32, still one channel); ``None`` for stream-only datasets.
* ``input_shape``: the model input after :func:`nc_jax.data.batching.make_batch` or the
  streaming loader (MNIST 32×32×3: grey replicated to three channels).
"""

from __future__ import annotations

import dataclasses
import types

from nc_jax.data.augment import AugmentSpec

_MNIST_NOTE = ("torchvision: Grayscale(3), Resize(32), RandomRotation(25) [train], ToTensor, "
               "Normalize. Resize is done once at load time; RandomRotation uses torchvision's "
               "default nearest interpolation.")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of one dataset (see the module docstring for the three shapes).

  Attributes:
    name: registry name.
    num_classes: K.
    source_shape, device_shape, input_shape: (H, W, C) at the three stages.
    train_spec, eval_spec: augmentation and normalisation for training and evaluation.
    tfds_name: ``tfds`` builder name (with version if pinned).
    splits: canonical split (``"train"``, ``"test"``) → tfds split name.
    num_examples: canonical split → number of examples (of the full dataset).
    pipeline: ``"device"`` (fits in accelerator memory: uint8 on device, augmentation in
      jit) or ``"stream"`` (host streaming with prefetch).
    idx_prefixes: canonical split → MNIST-format IDX file prefix (``None``: no IDX files).
    notes: provenance of the recipe and of any number not from the paper.
  """

  name: str
  num_classes: int
  source_shape: tuple[int, int, int] | None
  device_shape: tuple[int, int, int] | None
  input_shape: tuple[int, int, int]
  train_spec: AugmentSpec
  eval_spec: AugmentSpec
  tfds_name: str | None
  splits: types.MappingProxyType
  num_examples: types.MappingProxyType
  pipeline: str = "device"
  idx_prefixes: types.MappingProxyType | None = None
  notes: str = ""

  @property
  def mean(self) -> tuple[float, ...]:
    return self.train_spec.mean

  @property
  def std(self) -> tuple[float, ...]:
    return self.train_spec.std

  def spec(self, train: bool) -> AugmentSpec:
    return self.train_spec if train else self.eval_spec

  def tfds_split(self, split: str) -> str:
    """The tfds split for a canonical name; any other string (``"train[:10%]"``) passes
    through unchanged."""
    return self.splits.get(split, split)


def _ro(d):
  return types.MappingProxyType(dict(d))


_IDX = _ro({"train": "train", "test": "t10k"})


def _mnist_like(name, mean, std, note):
  train = AugmentSpec(mean=mean, std=std, channels=3, rotation_degrees=25.0,
                      rotation_interpolation="nearest", resize_shorter=32)
  return DatasetInfo(
      name=name, num_classes=10, source_shape=(28, 28, 1), device_shape=(32, 32, 1),
      input_shape=(32, 32, 3), train_spec=train, eval_spec=train.eval_spec(),
      tfds_name=name, splits=_ro({"train": "train", "test": "test"}),
      num_examples=_ro({"train": 60000, "test": 10000}), idx_prefixes=_IDX, notes=note)


def _flip_crop(name, k, size, mean, std, tfds_name, splits, num, note, flip=True):
  train = AugmentSpec(mean=mean, std=std, channels=3, flip=flip, crop_padding=4, crop_size=size)
  return DatasetInfo(
      name=name, num_classes=k, source_shape=(size, size, 3), device_shape=(size, size, 3),
      input_shape=(size, size, 3), train_spec=train, eval_spec=train.eval_spec(),
      tfds_name=tfds_name, splits=_ro(splits), num_examples=_ro(num), notes=note)


_TT = {"train": "train", "test": "test"}

_IMAGENET_TRAIN = AugmentSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              channels=3, flip=True, crop_padding=4, crop_size=224,
                              resize_shorter=256)

_SYNTHETIC_TRAIN = AugmentSpec(mean=(0.5,), std=(0.25,), channels=3, flip=True, crop_padding=4,
                               crop_size=32)

DATASETS: types.MappingProxyType = _ro({
    "mnist": _mnist_like("mnist", (0.1307,), (0.3081,), "docs/method.md §10.3. " + _MNIST_NOTE),
    "fashion_mnist": _mnist_like(
        "fashion_mnist", (0.2860,), (0.3530,),
        "Not used by the paper. Recipe copied from MNIST (the official code's FashionMNIST "
        "transform was not retrieved). Mean/std 0.2860/0.3530 are the FashionMNIST training-set "
        "pixel statistics, NOT from the paper. " + _MNIST_NOTE),
    "cifar10": _flip_crop(
        "cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar10", _TT,
        {"train": 50000, "test": 10000},
        "docs/method.md §10.3: RandomHorizontalFlip, RandomCrop(32, padding=4); test: normalise."),
    "cifar100": _flip_crop(
        "cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar100",
        _TT, {"train": 50000, "test": 10000},
        "docs/method.md §10.3 (same recipe as CIFAR10); fine labels (tfds key 'label')."),
    "stl10": _flip_crop(
        "stl10", 10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), "stl10", _TT,
        {"train": 5000, "test": 8000},
        "docs/method.md §10.3: flip, RandomCrop(96, padding=4). The 100k 'unlabelled' split is "
        "not used."),
    "svhn": _flip_crop(
        "svhn", 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "svhn_cropped", _TT,
        {"train": 73257, "test": 26032},
        "Not used by the paper. Mean/std are the commonly used SVHN training-set statistics, "
        "NOT from the paper. RandomCrop(32, padding=4) without horizontal flip (digits are "
        "not mirror-symmetric). The 'extra' split is not used.", flip=False),
    "imagenet2012": DatasetInfo(
        name="imagenet2012", num_classes=1000, source_shape=None, device_shape=None,
        input_shape=(224, 224, 3), train_spec=_IMAGENET_TRAIN,
        eval_spec=_IMAGENET_TRAIN.eval_spec(), tfds_name="imagenet2012",
        splits=_ro({"train": "train", "test": "validation"}),
        num_examples=_ro({"train": 1281167, "test": 50000}), pipeline="stream",
        notes="docs/method.md §10.3: Resize(256), RandomHorizontalFlip, RandomCrop(224, "
        "padding=4) (not RandomResizedCrop); test: Resize(256), CenterCrop(224). Standard ImageNet "
        "mean/std. 'test' is the tfds 'validation' split."),
    "synthetic": DatasetInfo(
        name="synthetic", num_classes=10, source_shape=(32, 32, 3), device_shape=(32, 32, 3),
        input_shape=(32, 32, 3), train_spec=_SYNTHETIC_TRAIN,
        eval_spec=_SYNTHETIC_TRAIN.eval_spec(), tfds_name=None, splits=_ro(_TT),
        num_examples=_ro({"train": 2560, "test": 512}),
        notes="Class-dependent random images (nc_jax.data.sources.make_synthetic), for tests "
        "and smoke runs; nominal mean/std 0.5/0.25. K, shape and sizes can be overridden "
        "with synthetic_info()."),
})


def _is_int(x) -> bool:
  """True for an integral number (``3``, ``np.int64(3)``, ``3.0``), False for anything else."""
  try:
    return int(x) == x and not isinstance(x, bool)
  except (TypeError, ValueError, OverflowError):
    return False


def dataset_names() -> tuple[str, ...]:
  return tuple(DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
  """The registry entry of ``name`` (case-insensitive; ``-`` and ``_`` equivalent).

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  if not isinstance(name, str):
    raise ValueError(f"dataset name must be a string, got {type(name).__name__}")
  key = name.strip().lower().replace("-", "_")
  key = {"fashionmnist": "fashion_mnist", "imagenet": "imagenet2012",
         "svhn_cropped": "svhn"}.get(key, key)
  if key not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
  return DATASETS[key]


def synthetic_info(num_classes: int = 10, image_shape: tuple[int, int, int] = (32, 32, 3),
                   num_train: int = 2560, num_test: int = 512) -> DatasetInfo:
  """A ``synthetic`` registry entry with other K, image shape or sizes (flip + pad-4 crop of
  the full size; 1-channel images are replicated to 3 channels like MNIST)."""
  if not _is_int(num_classes) or num_classes < 2:
    raise ValueError(f"synthetic_info: num_classes must be an integer >= 2, got {num_classes!r}")
  try:
    shape_ok = (len(image_shape) == 3 and all(_is_int(s) and s > 0 for s in image_shape)
                and image_shape[2] in (1, 3))
  except TypeError:  # not a sequence
    shape_ok = False
  if not shape_ok:
    raise ValueError(f"synthetic_info: image_shape must be (H, W, 1 or 3) of positive "
                     f"integers, got {image_shape!r}")
  for name, value in (("num_train", num_train), ("num_test", num_test)):
    # An empty split would only fail later, far from here (e.g. in a concatenate).
    if not _is_int(value) or value < 1:
      raise ValueError(f"synthetic_info: {name} must be a positive integer (the {name[4:]} "
                       f"split needs at least one example), got {value!r}")
  image_shape = tuple(int(s) for s in image_shape)
  h, w, _ = image_shape
  base = DATASETS["synthetic"]
  train = dataclasses.replace(base.train_spec, crop_size=None if h != w else h)
  return dataclasses.replace(
      base, num_classes=int(num_classes), source_shape=tuple(image_shape),
      device_shape=tuple(image_shape), input_shape=(h, w, 3), train_spec=train,
      eval_spec=train.eval_spec(),
      num_examples=_ro({"train": int(num_train), "test": int(num_test)}))

"""Dataset readers. Every reader returns ``(images, labels)``: uint8 NHWC numpy images and
int32 labels, or (for streaming) a random-access source.

* :func:`load_tfds` / :func:`tfds_source`: prepared tfds data through ``tfds.data_source``
  (``download=False``; TensorFlow is not needed to *read*, only to prepare). A dataset that
  is not prepared fails at once with the command that prepares it.
* :func:`load_idx`, :func:`read_idx`: a folder of MNIST-format IDX files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``; gzip detected from the
  content). The Debian package ``dataset-fashion-mnist`` installs FashionMNIST in this form in
  ``/usr/share/datasets/fashion-mnist``.
* :func:`load_npz`: one ``.npz`` with arrays ``x_train, y_train, x_test, y_test``; images
  uint8 (N, H, W) or (N, H, W, C), labels integer (N,) or (N, 1).
* :func:`make_synthetic`: class-dependent random images, deterministic from a seed.
* :func:`load_split`: any of these by name, followed by the registry's load-time
  preprocessing (:func:`preprocess`: MNIST 28→32 bilinear resize).
* :class:`ArraySource`: in-memory arrays as a random-access source for the streaming loader.

Bad input ends in one ``ValueError`` line naming the file (or split) and the problem:
truncated or corrupt ``.npz`` and gzip files, IDX files with a bad magic number or a size
that does not match the header, empty splits; a missing ``data`` extra is a
:class:`MissingExtraError` (also a ``ValueError``) naming the install command.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nc_jax.data.augment import resize_bilinear
from nc_jax.data.registry import DatasetInfo, get_dataset_info


class DataNotFoundError(FileNotFoundError, ValueError):
  """Data files or a prepared dataset are missing (message says what was expected where).

  Both a ``FileNotFoundError`` and a ``ValueError``.
  """


class MissingExtraError(ImportError, ValueError):
  """An optional dependency (a pip extra) is not installed; the message names the command.

  Both an ``ImportError`` and a ``ValueError`` (the experiments' entry points print
  a ``ValueError`` as one line).
  """


#: What a truncated or corrupt compressed file raises from gzip, zipfile and numpy.
_CORRUPT_ERRORS = (EOFError, zlib.error, zipfile.BadZipFile, OSError, ValueError)


def _one_line(err: BaseException) -> str:
  """``Type: message`` of ``err`` on one line (numpy/zlib messages may hold newlines); the
  type with its module unless a builtin (``zlib.error``, ``zipfile.BadZipFile``)."""
  kind = type(err).__qualname__
  if type(err).__module__ != "builtins":
    kind = f"{type(err).__module__}.{kind}"
  return f"{kind}: {' '.join(str(err).split())}"


SOURCES = ("tfds", "idx", "npz", "synthetic")

# ---------------------------------------------------------------------------
# IDX (MNIST format): magic 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 dims.

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_maybe_gzip(path: Path) -> bytes:
  """The bytes of ``path``, gunzipped if they start with the gzip magic ``1f 8b``.

  Raises:
    ValueError: unreadable file, or truncated/corrupt gzip data (which gzip reports as
      ``EOFError``, ``zlib.error`` or ``BadGzipFile``), naming the file.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as err:
    raise ValueError(f"{path}: cannot read the file ({_one_line(err)})") from None
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (EOFError, zlib.error, OSError) as err:
      raise ValueError(f"{path}: truncated or corrupt gzip data ({len(data)} compressed bytes; "
                       f"{_one_line(err)}); download the file again") from None
  return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (raw or gzip-compressed, detected from the content).

  Raises:
    DataNotFoundError: the file does not exist.
    ValueError: bad magic number, unknown type code, or a size that does not match the header.
  """
  path = Path(path)
  if not path.is_file():
    raise DataNotFoundError(f"IDX file not found: {path}")
  data = _read_maybe_gzip(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()}; expected "
                     f"00 00 <type code in {sorted(_IDX_DTYPES)}> <ndim>)")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header} header "
                     f"bytes, the file holds {len(data)}")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  count = math.prod(dims)  # exact (python ints): np.prod could overflow on a corrupt header
  if len(data) - header != count * dtype.itemsize:
    raise ValueError(f"{path}: IDX header says shape {dims} ({count * dtype.itemsize} bytes) "
                     f"but the file holds {len(data) - header} data bytes (truncated or "
                     "corrupt file)")
  arr = np.frombuffer(data, dtype, count=count, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
  # Official names use '-' before 'idx'; some mirrors use '.'.
  alt = stem.replace("-idx", ".idx")
  for name in (stem, stem + ".gz", alt, alt + ".gz"):
    if (directory / name).is_file():
      return directory / name
  return None


def load_idx(directory: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Loads ``split`` (``"train"`` or ``"test"``) from a folder of MNIST-format IDX files.

  Returns uint8 images (N, H, W, 1) and int32 labels (N,).
  """
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"load_idx: split must be 'train' or 'test', got {split!r}")
  directory = Path(directory)
  paths = {}
  for what, stem in (("images", f"{prefix}-images-idx3-ubyte"),
                     ("labels", f"{prefix}-labels-idx1-ubyte")):
    p = _find_idx(directory, stem)
    if p is None:
      raise DataNotFoundError(
          f"load_idx: no {what} file for split {split!r}: expected {directory / stem} or "
          f"{directory / (stem + '.gz')}")
    paths[what] = p
  images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"{paths['images']}: expected uint8 images (N, H, W), got "
                     f"{images.dtype} {images.shape}")
  if images.shape[0] == 0:
    raise ValueError(f"{paths['images']}: the {split} split is empty (0 images); expected at "
                     "least one")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f"{paths['labels']}: expected {images.shape[0]} labels (N,), got shape "
                     f"{labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{paths['labels']}: expected integer labels, got {labels.dtype}")
  return images[..., None], labels.astype(np.int32)


# ---------------------------------------------------------------------------
# npz


def _check_arrays(where: str, images: np.ndarray, labels: np.ndarray, split: str | None = None):
  """uint8 (N, H, W, C) images and int32 (N,) labels, or a ValueError naming ``where`` (and
  ``split``): wrong rank, dtype or length, or no images at all (an empty split would
  otherwise fail later, e.g. in the load-time resize, with an unrelated numpy message)."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{where}: images must be (N, H, W) or (N, H, W, C), got {images.shape}")
  if images.shape[0] == 0:
    what = f"the {split} split" if split else "the image array"
    raise ValueError(f"{where}: {what} is empty (0 images, shape {images.shape}); expected at "
                     "least one")
  if images.dtype != np.uint8:
    if np.issubdtype(images.dtype, np.integer) and images.size and (
        images.min() >= 0 and images.max() <= 255):
      images = images.astype(np.uint8)
    else:
      raise ValueError(f"{where}: images must be uint8 (0..255), got {images.dtype}")
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f"{where}: labels must be ({images.shape[0]},), got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
  return images, labels.astype(np.int32)


def load_npz(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Loads ``split`` from an ``.npz`` holding ``x_train, y_train, x_test, y_test`` (the Keras
  layout): images uint8 (N, H, W) or (N, H, W, C) (NHWC), labels integer (N,) or (N, 1)."""
  if split not in ("train", "test"):
    raise ValueError(f"load_npz: split must be 'train' or 'test', got {split!r}")
  path = Path(path)
  if not path.is_file():
    raise DataNotFoundError(f"load_npz: file not found: {path} (expected an .npz with arrays "
                            "x_train, y_train, x_test, y_test)")
  try:
    z = np.load(path, allow_pickle=False)
  except _CORRUPT_ERRORS as err:  # e.g. BadZipFile of a truncated archive
    raise ValueError(f"{path}: not a readable .npz archive (truncated or corrupt?): "
                     f"{_one_line(err)}") from None
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: expected an .npz archive with arrays x_train, y_train, x_test, "
                     f"y_test, got a single {type(z).__name__} (an .npy file)")
  with z:
    kx, ky = f"x_{split}", f"y_{split}"
    missing = [k for k in (kx, ky) if k not in z.files]
    if missing:
      raise ValueError(f"{path}: missing arrays {missing}; found {sorted(z.files)} "
                       "(expected x_train, y_train, x_test, y_test)")
    arrays = []
    for key in (kx, ky):
      try:
        arrays.append(z[key])
      except _CORRUPT_ERRORS as err:  # a member cut short: EOFError, zlib.error, bad CRC
        raise ValueError(f"{path}: cannot read array {key!r} (truncated or corrupt file?): "
                         f"{_one_line(err)}") from None
    return _check_arrays(str(path), *arrays, split=split)


# ---------------------------------------------------------------------------
# synthetic


def make_synthetic(num_examples: int, num_classes: int = 10,
                   image_shape: Sequence[int] = (32, 32, 3), seed: int = 0, split: str = "train",
                   noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
  """Class-dependent random uint8 images, deterministic from ``seed``.

  Each class has a smooth random prototype (a 4×4 random colour field upsampled bilinearly,
  so it survives flips and crops); an example is its class prototype plus Gaussian pixel
  noise of standard deviation ``noise``, clipped to 0..255. Prototypes depend on ``seed``
  only, so the ``"train"`` and ``"test"`` splits (different noise and labels) share them.
  Labels are balanced (``n // K`` or ``n // K + 1`` per class) in random order.
  """
  if int(num_examples) != num_examples or num_examples <= 0:
    raise ValueError(f"make_synthetic: num_examples must be a positive integer, got {num_examples}")
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"make_synthetic: num_classes must be an integer >= 2, got {num_classes}")
  image_shape = tuple(int(s) for s in image_shape)
  if len(image_shape) != 3 or min(image_shape) <= 0:
    raise ValueError(f"make_synthetic: image_shape must be (H, W, C), got {image_shape}")
  h, w, c = image_shape
  proto_rng = np.random.default_rng([int(seed), 0])
  coarse = proto_rng.integers(0, 256, (num_classes, 4, 4, c), dtype=np.uint8)
  protos = resize_bilinear(coarse, h, w).astype(np.float32)
  rng = np.random.default_rng([int(seed), 1 if split == "train" else 2])
  labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
  x = protos[labels] + rng.normal(0.0, noise, (num_examples, h, w, c)).astype(np.float32)
  images = np.clip(np.rint(x), 0, 255).astype(np.uint8)
  return images, labels


# ---------------------------------------------------------------------------
# tfds


def _import_tfds():
  """``tensorflow_datasets``, after checking that array_record (which ``tfds.data_source``
  needs; without it tfds reports an unrelated error) imports too.

  Raises:
    MissingExtraError: either is not importable (the ``data`` extra is not installed).
  """
  try:  # import_module consults sys.modules for the full name (a hidden module fails here)
    tfds = importlib.import_module("tensorflow_datasets")
    importlib.import_module("array_record.python.array_record_data_source")
  except ImportError as err:
    missing = getattr(err, "name", None) or str(err)
    raise MissingExtraError(
        f"source='tfds' needs the 'data' extra (tensorflow-datasets, array-record, pillow), "
        f"which is not installed (cannot import {missing}): run pip install -e \".[data]\" in "
        "the nc_jax repository, or use source='idx', 'npz' or 'synthetic'") from None
  return tfds


def _not_prepared_message(tfds_name: str, data_dir: str | None, detail: str) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  msg = (f"tfds dataset {tfds_name!r} is not prepared (in array_record format) under data_dir "
         f"{where!r}; nc_jax never downloads. On a machine with internet, run\n"
         f"    pip install tensorflow tensorflow-datasets array-record\n"
         f"    tfds build {tfds_name} --file_format=array_record --data_dir=<DIR>\n"
         f"then copy <DIR>/{tfds_name.split(':')[0]} into {where} (or pass data_dir=<DIR>, or set "
         f"$TFDS_DATA_DIR). ")
  if tfds_name.startswith("imagenet2012"):
    msg += ("ImageNet needs the ILSVRC2012 tar files placed by hand first "
            "(tfds build ... --manual_dir=<folder with ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar>). ")
  return msg + f"[tfds: {detail}]"


def tfds_source(name: str, split: str = "train", data_dir: str | os.PathLike | None = None):
  """A random-access ``tfds.data_source`` for a registry dataset (or a raw tfds name).

  Never downloads. Items are dicts with a decoded ``"image"`` (H, W, C) uint8 and a
  ``"label"``. Decoding real (PNG/JPEG) records needs Pillow or OpenCV.

  Raises:
    DataNotFoundError: the dataset is not prepared (message: how to prepare it).
  """
  tfds = _import_tfds()
  try:
    info = get_dataset_info(name)
  except ValueError:
    info = None  # not a registry name: a raw tfds name
  if info is None:
    tfds_name, tfds_split = name, split
  elif info.tfds_name is None:
    raise ValueError(f"dataset {info.name!r} has no tfds version")
  else:
    tfds_name, tfds_split = info.tfds_name, info.tfds_split(split)
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    return tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir, download=False)
  except Exception as err:  # noqa: BLE001 -- re-raised with the preparation recipe
    not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
    if not_found and isinstance(err, not_found):
      raise ValueError(f"tfds has no dataset named {tfds_name!r}") from err
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
      prepared = builder.is_prepared() and str(builder.info.file_format).lower().endswith(
          ("array_record", "parquet"))
    except Exception:  # noqa: BLE001 -- treat as not prepared
      prepared = False
    if prepared:  # a genuine error (e.g. an unknown split) on prepared data
      raise
    raise DataNotFoundError(
        _not_prepared_message(tfds_name, data_dir, f"{type(err).__name__}: {err}")) from err


def fetch(source, ids: Sequence[int]) -> list:
  """Records ``ids`` of a random-access source: batched through ``__getitems__`` when the
  source has it (tfds array_record sources read in parallel), else one by one. (Falls back
  to single reads on a TypeError: ``tfds.testing.mock_data`` installs an unbound
  ``__getitems__``.)"""
  ids = [int(i) for i in ids]
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None and ids:
    try:
      return list(getitems(ids))
    except TypeError:
      pass
  return [source[i] for i in ids]


def _read_all(source, what: str, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  if n == 0:
    raise ValueError(f"{what}: the split is empty")
  images, labels = [], []
  for start in range(0, n, chunk):
    for r in fetch(source, range(start, min(n, start + chunk))):
      images.append(np.asarray(r["image"]))
      labels.append(int(r["label"]))
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    raise ValueError(f"{what}: images have different shapes ({len(shapes)} distinct, e.g. "
                     f"{sorted(shapes)[:3]}); use the streaming loader")
  return _check_arrays(what, np.stack(images), np.asarray(labels, np.int64))


def load_tfds(name: str, split: str = "train",
              data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole prepared tfds split into memory: uint8 (N, H, W, C), int32 (N,)."""
  src = tfds_source(name, split, data_dir)
  return _read_all(src, f"tfds {name}/{split}")


# ---------------------------------------------------------------------------
# random-access source over arrays (streaming tests, small datasets)


class ArraySource:
  """In-memory ``(images, labels)`` as a random-access source like ``tfds.data_source``:
  ``len(src)``, ``src[i] -> {"image", "label"}``, ``src.__getitems__(ids)``. Images may be a
  list of differently sized (H, W, C) arrays."""

  def __init__(self, images: Any, labels: Any):
    if len(images) != len(labels):
      raise ValueError(f"ArraySource: {len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, np.asarray(labels)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[int(i)], "label": self.labels[int(i)]}

  def __getitems__(self, ids: Sequence[int]) -> list[dict]:
    return [self[i] for i in ids]


# ---------------------------------------------------------------------------
# by name


def preprocess(images: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """One-off host preprocessing to the registry's ``device_shape`` (MNIST: 28×28 → 32×32
  bilinear, as torchvision ``Resize(32)`` on PIL images); other datasets pass through."""
  if info.device_shape is None:
    raise ValueError(f"{info.name}: stream-only dataset (images vary in size); use "
                     "nc_jax.data.streaming")
  h, w, c = info.device_shape
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"{info.name}: expected a non-empty batch of images (N, H, W, C), got "
                     f"shape {images.shape}")
  if images.shape[-1] != c:
    raise ValueError(f"{info.name}: expected {c}-channel images, got shape {images.shape}")
  if images.shape[1:3] != (h, w):
    if info.source_shape is not None and images.shape[1:] != info.source_shape:
      raise ValueError(f"{info.name}: expected images of shape {info.source_shape} or "
                       f"{info.device_shape}, got {images.shape[1:]}")
    images = np.concatenate([resize_bilinear(images[i:i + 4096], h, w)
                             for i in range(0, images.shape[0], 4096)])
  return images


def load_split(name: str | DatasetInfo, split: str = "train", *, source: str = "tfds",
               path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
               num_examples: int | None = None, seed: int = 0,
               ) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
  """Loads a split for the device-resident pipeline and preprocesses it.

  Args:
    name: registry name or a :class:`DatasetInfo` (e.g. from ``synthetic_info``).
    split: ``"train"`` or ``"test"`` (tfds also takes tfds split strings).
    source: ``"tfds"`` (``data_dir``), ``"idx"`` (``path``: folder), ``"npz"`` (``path``:
      file) or ``"synthetic"`` (``num_examples``, ``seed``; registry K and shape).

  Returns:
    ``(images, labels, info)``: uint8 ``(N, *info.device_shape)``, int32 ``(N,)``, the entry.

  Raises:
    ValueError: unknown dataset or source, labels outside [0, K), wrong image shape.
    DataNotFoundError: missing files or unprepared tfds data.
  """
  info = name if isinstance(name, DatasetInfo) else get_dataset_info(name)
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
  if source in ("idx", "npz") and path is None:
    raise ValueError(f"source={source!r} needs path=")
  if source == "tfds":
    images, labels = load_tfds(info.name, split, data_dir)
  elif source == "idx":
    images, labels = load_idx(path, split)
  elif source == "npz":
    images, labels = load_npz(path, split)
  else:
    if info.source_shape is None:
      raise ValueError(f"{info.name}: no fixed image shape for synthetic data")
    n = num_examples if num_examples is not None else info.num_examples.get(split, 512)
    images, labels = make_synthetic(n, info.num_classes, info.source_shape, seed, split)
  if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
    raise ValueError(f"{info.name}: labels must lie in [0, {info.num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  return preprocess(images, info), labels, info

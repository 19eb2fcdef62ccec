"""Image augmentation: jit-able device ops and their numpy host counterparts.

The paper's torchvision pipelines (docs/method.md §10.3) are reproduced as two sets of ops:

* **Device** (pure ``jax.numpy``, batched, per-sample randomness from one key, no host
  callbacks, so they run under ``jit`` and on a batch sharded over a mesh):
  :func:`random_flip`, :func:`random_crop`, :func:`rotate`, :func:`random_rotation`,
  :func:`center_crop`, :func:`to_channels`, :func:`normalise`, and :func:`augment_batch`,
  which applies an :class:`AugmentSpec`.
* **Host** (numpy, one image at a time, for the streaming path and load-time preprocessing):
  :func:`resize_bilinear` (Pillow's antialiased bilinear resampling, which torchvision's
  ``Resize`` uses on PIL images), :func:`resize_shorter_side` (Pillow itself when installed),
  :func:`center_crop_np`, :func:`host_augment`.

All augmentation works in pixel units (0–255, float32) *before* normalisation, as
torchvision does on PIL images: the zero fill of padding and rotation is pixel value 0, which
becomes ``-mean/std`` after :func:`normalise`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.ndimage import map_coordinates

_INTERPOLATION_ORDER = {"nearest": 0, "bilinear": 1}


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """What :func:`augment_batch` / :func:`host_augment` do to a batch. Hashable: pass it to
  ``jax.jit`` as a static argument.

  Train path (``train=True``), in this order: host-only resize of the shorter side to
  ``resize_shorter``; random rotation by U(-rotation_degrees, rotation_degrees) degrees
  (device only); zero-pad ``crop_padding`` pixels on each side and take a random
  ``crop_size`` crop; random horizontal flip with probability 1/2 if ``flip``; replicate a
  1-channel image to ``channels``; normalise.

  Eval path (``train=False``): host-only resize to ``resize_shorter``; centre crop to
  ``crop_size`` when the image is larger; channel replication; normalise. No randomness.

  Attributes:
    mean, std: per-channel normalisation of ``x/255`` (length 1 or ``channels``).
    channels: output channels; a 1-channel input is replicated (torchvision
      ``Grayscale(num_output_channels=3)``).
    flip: random horizontal flip (``RandomHorizontalFlip()``).
    crop_padding: zero padding of ``RandomCrop(crop_size, padding=crop_padding)``.
    crop_size: crop side; ``None`` means the input's own height and width.
    rotation_degrees: ``RandomRotation(rotation_degrees)``; 0 disables it.
    rotation_interpolation: ``"nearest"`` (torchvision's default for ``RandomRotation``,
      hence the default here) or ``"bilinear"``.
    resize_shorter: ``Resize(resize_shorter)`` on the host (streaming path only; device
      data is resized once at load time).
  """

  mean: tuple[float, ...]
  std: tuple[float, ...]
  channels: int = 3
  flip: bool = False
  crop_padding: int = 0
  crop_size: int | None = None
  rotation_degrees: float = 0.0
  rotation_interpolation: str = "nearest"
  resize_shorter: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.channels):
      raise ValueError(
          f"AugmentSpec: mean and std must have length 1 or channels={self.channels}, "
          f"got {len(self.mean)} and {len(self.std)}")
    if any(s <= 0 for s in self.std):
      raise ValueError(f"AugmentSpec: std must be positive, got {self.std}")
    if self.channels not in (1, 3):
      raise ValueError(f"AugmentSpec: channels must be 1 or 3, got {self.channels}")
    if self.crop_padding < 0:
      raise ValueError(f"AugmentSpec: crop_padding must be >= 0, got {self.crop_padding}")
    if self.crop_size is not None and self.crop_size <= 0:
      raise ValueError(f"AugmentSpec: crop_size must be positive, got {self.crop_size}")
    if self.rotation_degrees < 0:
      raise ValueError(f"AugmentSpec: rotation_degrees must be >= 0, got {self.rotation_degrees}")
    if self.rotation_interpolation not in _INTERPOLATION_ORDER:
      raise ValueError(
          f"AugmentSpec: rotation_interpolation must be one of "
          f"{sorted(_INTERPOLATION_ORDER)}, got {self.rotation_interpolation!r}")
    if self.resize_shorter is not None and self.resize_shorter <= 0:
      raise ValueError(f"AugmentSpec: resize_shorter must be positive, got {self.resize_shorter}")

  def eval_spec(self) -> "AugmentSpec":
    """The same normalisation and geometry with every random op switched off."""
    return dataclasses.replace(self, flip=False, crop_padding=0, rotation_degrees=0.0)


# ---------------------------------------------------------------------------
# Device ops. ``x``: (B, H, W, C) float32 in pixel units.


def _check_batch(name: str, x) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name}: expected a (B, H, W, C) batch, got shape {tuple(x.shape)}")


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 1/2 (independently per sample)."""
  _check_batch("random_flip", x)
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def crop_at(x: jax.Array, offsets: jax.Array, padding: int, size: tuple[int, int]) -> jax.Array:
  """Zero-pads ``padding`` pixels on each side, then crops ``size`` at per-sample
  ``offsets`` (B, 2) = (top, left) in padded coordinates."""
  _check_batch("crop_at", x)
  p = int(padding)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
  c = x.shape[-1]

  def one(img, off):
    return lax.dynamic_slice(img, (off[0], off[1], jnp.zeros((), jnp.int32)),
                             (size[0], size[1], c))

  return jax.vmap(one)(xp, offsets.astype(jnp.int32))


def random_crop(key: jax.Array, x: jax.Array, padding: int, size: int | None = None) -> jax.Array:
  """``RandomCrop(size, padding)``: zero-pad, then a uniformly random ``size`` crop per sample
  (offsets uniform in ``[0, H + 2·padding - size]``, as torchvision)."""
  _check_batch("random_crop", x)
  h, w = x.shape[1], x.shape[2]
  sh, sw = (h, w) if size is None else (int(size), int(size))
  hp, wp = h + 2 * padding, w + 2 * padding
  if sh > hp or sw > wp:
    raise ValueError(
        f"random_crop: crop {sh}x{sw} larger than the padded image {hp}x{wp}")
  return _random_crop_core(key, x, int(padding), (sh, sw))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random_crop_core(key, x, padding, size):
  h, w = x.shape[1], x.shape[2]
  hi = jnp.array([h + 2 * padding - size[0] + 1, w + 2 * padding - size[1] + 1])
  offsets = jax.random.randint(key, (x.shape[0], 2), 0, hi)
  return crop_at(x, offsets, padding, size)


def center_crop(x: jax.Array, size: int) -> jax.Array:
  """Centre crop of a batch (torchvision ``CenterCrop``: top = round((H - size)/2))."""
  _check_batch("center_crop", x)
  h, w = x.shape[1], x.shape[2]
  if size > h or size > w:
    raise ValueError(f"center_crop: crop {size} larger than the image {h}x{w}")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return x[:, top:top + size, left:left + size, :]


def rotate(x: jax.Array, angles_deg: jax.Array, interpolation: str = "nearest") -> jax.Array:
  """Rotates each image counter-clockwise by its angle (degrees) about the image centre
  ((H-1)/2, (W-1)/2) in pixel-centre coordinates; pixels from outside are 0.

  ``interpolation``: ``"nearest"`` or ``"bilinear"`` (``jax.scipy.ndimage.map_coordinates``
  orders 0 and 1, ``mode="constant"``). An angle of 0 is the identity exactly.
  """
  _check_batch("rotate", x)
  if interpolation not in _INTERPOLATION_ORDER:
    raise ValueError(f"rotate: interpolation must be one of {sorted(_INTERPOLATION_ORDER)}, "
                     f"got {interpolation!r}")
  return _rotate_core(x, jnp.asarray(angles_deg), _INTERPOLATION_ORDER[interpolation])


@functools.partial(jax.jit, static_argnums=(2,))
def _rotate_core(x, angles_deg, order):
  b, h, w, c = x.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                            indexing="ij")
  # y axis points up: (dx, dy) = (col - cx, cy - row). Output pixel p samples the input at
  # R(-theta) p, which rotates the content counter-clockwise by theta.
  dx, dy = cols - cx, cy - rows
  theta = jnp.deg2rad(angles_deg.astype(jnp.float32))

  def one(img, t):
    cos, sin = jnp.cos(t), jnp.sin(t)
    sx = cos * dx + sin * dy
    sy = -sin * dx + cos * dy
    src_r, src_c = cy - sy, cx + sx

    def channel(ch):
      return map_coordinates(ch, [src_r, src_c], order=order, mode="constant", cval=0.0)

    return jax.vmap(channel, in_axes=2, out_axes=2)(img)

  return jax.vmap(one)(x.astype(jnp.float32), theta)


def random_rotation(key: jax.Array, x: jax.Array, degrees: float,
                    interpolation: str = "nearest") -> jax.Array:
  """``RandomRotation(degrees)``: per-sample angle ~ U(-degrees, degrees), zero fill."""
  angles = jax.random.uniform(key, (x.shape[0],), jnp.float32, -degrees, degrees)
  return rotate(x, angles, interpolation)


def to_channels(x: jax.Array, channels: int) -> jax.Array:
  """Replicates a 1-channel batch to ``channels`` (no-op if it already has them)."""
  c = x.shape[-1]
  if c == channels:
    return x
  if c != 1:
    raise ValueError(f"to_channels: cannot map {c} channels to {channels}")
  return jnp.broadcast_to(x, x.shape[:-1] + (channels,))


def normalise(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """``Normalize(mean, std)`` of ``ToTensor`` output: ``(x/255 - mean)/std`` in float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x.astype(jnp.float32) / 255.0 - mean) / std


def check_device_size(name: str, shape: tuple, spec: AugmentSpec) -> None:
  """Device data must be pre-resized: its shorter side must equal ``spec.resize_shorter``."""
  if spec.resize_shorter is not None and min(shape[1], shape[2]) != spec.resize_shorter:
    raise ValueError(
        f"{name}: the spec resizes to shorter side {spec.resize_shorter}, which the device path "
        f"does not do; resize at load time (nc_jax.data.sources.preprocess), got images of "
        f"shape {tuple(shape[1:])}")


def augment_batch(key: jax.Array | None, images: jax.Array, spec: AugmentSpec,
                  train: bool) -> jax.Array:
  """Applies ``spec`` to a uint8 (or pixel-unit float) batch (B, H, W, C) on device.

  Returns normalised float32 (B, h, w, spec.channels). ``train=False`` uses no randomness
  (``key`` may be None). Resizing is not done here: if ``spec.resize_shorter`` is set, the
  images' shorter side must already equal it (resize at load time).
  """
  _check_batch("augment_batch", images)
  check_device_size("augment_batch", images.shape, spec)
  if train and key is None:
    raise ValueError("augment_batch: train=True needs a PRNG key")
  return _augment_core(key, images, spec, bool(train))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _augment_core(key, images, spec, train):
  x = images.astype(jnp.float32)
  h, w = x.shape[1], x.shape[2]
  size = spec.crop_size
  if train:
    k_rot, k_crop, k_flip = jax.random.split(key, 3)
    if spec.rotation_degrees > 0:
      x = random_rotation(k_rot, x, spec.rotation_degrees, spec.rotation_interpolation)
    if spec.crop_padding > 0 or (size is not None and (size, size) != (h, w)):
      x = random_crop(k_crop, x, spec.crop_padding, size)
    if spec.flip:
      x = random_flip(k_flip, x)
  elif size is not None and (size, size) != (h, w):
    x = center_crop(x, size)
  x = to_channels(x, spec.channels)
  return normalise(x, spec.mean, spec.std)


# ---------------------------------------------------------------------------
# Host ops (numpy). Images: (H, W, C) uint8; resize also takes (N, H, W, C).


@functools.lru_cache(maxsize=256)
def _resample_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's bilinear resampling coefficients (``precompute_coeffs`` in Resample.c): a
  triangle filter whose support widens by the downscale factor (antialiasing)."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale
  taps = int(math.ceil(support)) * 2 + 1
  idx = np.zeros((out_size, taps), np.int64)
  wts = np.zeros((out_size, taps), np.float64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    js = np.arange(xmin, xmax)
    wj = np.maximum(0.0, 1.0 - np.abs((js - center + 0.5) / filterscale))
    wj = wj / wj.sum()
    idx[xx, :len(js)] = js
    wts[xx, :len(js)] = wj
  return idx, wts


def _resample_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  idx, wts = _resample_taps(in_size, out_size)
  xm = np.moveaxis(x, axis, 0)
  shape = (out_size,) + (1,) * (xm.ndim - 1)
  out = np.zeros((out_size,) + xm.shape[1:], np.float32)
  for t in range(idx.shape[1]):  # a few taps: sum_t w[:, t] * x[idx[:, t]]
    out += wts[:, t].astype(np.float32).reshape(shape) * xm[idx[:, t]]
  out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)  # Pillow rounds after each pass
  return np.moveaxis(out, 0, axis)


def resize_bilinear(images: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize of uint8 images (H, W, C) or (N, H, W, C), as Pillow's
  ``Image.resize(..., BILINEAR)`` (antialiased when downscaling; horizontal pass, rounding to
  uint8, vertical pass), which torchvision's ``Resize`` calls on PIL images. Matches Pillow to
  within one grey level (Pillow uses fixed-point coefficients)."""
  images = np.asarray(images)
  if images.ndim not in (3, 4):
    raise ValueError(f"resize_bilinear: expected (H, W, C) or (N, H, W, C), got {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"resize_bilinear: expected uint8 images, got {images.dtype}")
  h_axis = images.ndim - 3
  x = _resample_axis(images, h_axis + 1, int(out_w))
  return _resample_axis(x, h_axis, int(out_h))


def shorter_side_size(h: int, w: int, size: int) -> tuple[int, int]:
  """torchvision ``Resize(size)`` output (height, width): shorter side ``size``, longer side
  ``int(size * long / short)``."""
  if h <= w:
    return size, int(size * w / h)
  return int(size * h / w), size


def _pil_image_module():
  try:
    from PIL import Image  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return Image


def resize_shorter_side(image: np.ndarray, size: int, use_pil: bool | None = None) -> np.ndarray:
  """torchvision ``Resize(size)`` of one (H, W, C) uint8 image.

  ``use_pil``: resize with Pillow itself (exactly torchvision's result, and ~10× faster than
  the numpy path); ``None`` uses Pillow when it is installed, else :func:`resize_bilinear`
  (within one grey level of Pillow).
  """
  h, w = image.shape[:2]
  oh, ow = shorter_side_size(h, w, size)
  if (oh, ow) == (h, w):
    return image
  pil = _pil_image_module() if use_pil is not False else None
  if use_pil and pil is None:
    raise ImportError("resize_shorter_side(use_pil=True) needs Pillow")
  if pil is not None and image.dtype == np.uint8 and image.shape[-1] in (1, 3):
    src = pil.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(src.resize((ow, oh), pil.BILINEAR))
    return out[..., None] if out.ndim == 2 else out
  return resize_bilinear(image, oh, ow)


def _pad_np(image: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
  if pad_h == 0 and pad_w == 0:
    return image
  return np.pad(image, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)))


def center_crop_np(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop(size)`` of one (H, W, C) image (zero-pads if it is smaller)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    image = _pad_np(image, max(0, (size - h + 1) // 2), max(0, (size - w + 1) // 2))
    h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def host_augment(image: np.ndarray, rng: np.random.Generator | None, spec: AugmentSpec,
                 train: bool) -> np.ndarray:
  """Host (numpy) version of the spec for one (H, W, C) uint8 image; returns uint8
  (h, w, spec.channels), *not* normalised (see :func:`normalise_np`).

  Train: resize shorter side, zero-pad + random crop, random flip; eval: resize, centre crop.
  Random rotation is device-only (a spec with ``rotation_degrees > 0`` raises).
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f"host_augment: expected an (H, W, C) image, got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"host_augment: expected a uint8 image, got {image.dtype}")
  if spec.resize_shorter is not None:
    image = resize_shorter_side(image, spec.resize_shorter)
  h, w = image.shape[:2]
  sh, sw = (h, w) if spec.crop_size is None else (spec.crop_size, spec.crop_size)
  if train:
    if rng is None:
      raise ValueError("host_augment: train=True needs a numpy Generator")
    if spec.rotation_degrees > 0:
      raise ValueError("host_augment: random rotation is implemented on device only "
                       "(nc_jax.data.augment.random_rotation)")
    p = spec.crop_padding
    if p > 0 or (sh, sw) != (h, w):
      image = _pad_np(image, p, p)
      # pad further if the image is still smaller than the crop (torchvision pad_if_needed)
      extra_h, extra_w = max(0, sh - image.shape[0]), max(0, sw - image.shape[1])
      if extra_h or extra_w:
        image = np.pad(image, ((0, extra_h), (0, extra_w), (0, 0)))
      top = int(rng.integers(0, image.shape[0] - sh + 1))
      left = int(rng.integers(0, image.shape[1] - sw + 1))
      image = image[top:top + sh, left:left + sw]
    if spec.flip and rng.random() < 0.5:
      image = image[:, ::-1]
  elif (sh, sw) != (h, w):
    image = center_crop_np(image, sh)
  if image.shape[-1] != spec.channels:
    if image.shape[-1] != 1:
      raise ValueError(f"host_augment: cannot map {image.shape[-1]} channels to {spec.channels}")
    image = np.repeat(image, spec.channels, axis=-1)
  return np.ascontiguousarray(image)


def normalise_np(images: np.ndarray, spec: AugmentSpec) -> np.ndarray:
  """Host version of :func:`normalise` (float32)."""
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return (np.asarray(images, np.float32) / np.float32(255.0) - mean) / std

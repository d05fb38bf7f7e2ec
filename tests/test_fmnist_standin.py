"""The synthetic Fashion-MNIST stand-in the tests use where the Debian package is missing."""

import numpy as np

from pixeldit_jax import data
from pixeldit_jax.data import fashion_mnist, fmnist_standin


def test_stand_in_is_deterministic_class_structured_and_read_by_the_loader(tmp_path, monkeypatch):
  labels = np.arange(200) % 10
  a = fmnist_standin.draw(labels, np.random.default_rng(3))
  np.testing.assert_array_equal(a, fmnist_standin.draw(labels, np.random.default_rng(3)))
  assert a.shape == (200, 28, 28) and a.dtype == np.uint8
  assert (a.reshape(200, -1).max(1) == 255).all() and 20 < a.mean() < 150
  # Class means differ far more than images of one class: something to learn.
  means = np.stack([a[labels == k].astype(float).mean(0) for k in range(10)])
  within = np.mean([np.abs(a[labels == k] - means[k]).mean() for k in range(10)])
  between = np.abs(means[:, None] - means[None]).mean() * 10 / 9  # off-diagonal mean
  assert between > 1.5 * within, (between, within)

  # A small version through the real loader, pointed at it the way conftest does.
  monkeypatch.setattr(fmnist_standin, "SPLITS", {"train": ("train", 50, 0), "test": ("t10k", 20, 1)})
  out = fmnist_standin.write(str(tmp_path / "fm"))
  assert fmnist_standin.is_written(out) and sorted(p.name for p in (tmp_path).iterdir()) == ["fm"]
  monkeypatch.setenv(fashion_mnist.DIR_ENV, out)
  images, labels = data.load_fashion_mnist("train")
  assert images.shape == (50, 28, 28) and np.bincount(labels).tolist() == [5] * 10
  assert fashion_mnist.resolve("fashion_mnist", "test", None) == ("fashion_mnist", out)
  assert fmnist_standin.write(out) == out  # already there: kept
  assert fmnist_standin.main(["--out", str(tmp_path / "cli")]) == 0
  assert fmnist_standin.is_written(str(tmp_path / "cli"))

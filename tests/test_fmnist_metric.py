"""The offline Fashion-MNIST metric: classifier training and caching, accuracy / Fréchet distance, CLI.

The fast tests share one classifier trained for 120 steps (a quarter epoch, ~15-25 s on 2 CPU
cores; conftest's fmnist_quick_classifier); the full training (>= 90% test accuracy, ~4 minutes) is
the one slow test. Without the Debian package they run on conftest's synthetic stand-in.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FMNIST_QUICK_STEPS as QUICK_STEPS, timeout

from pixeldit_jax.data import load_fashion_mnist
from pixeldit_jax.evaluation import fmnist
from pixeldit_jax.evaluation import fmnist_classifier as clf_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def quick(fmnist_quick_classifier):
  """(classifier, cache_dir): trained for QUICK_STEPS through load_or_train's train-and-save path."""
  return fmnist_quick_classifier


@pytest.fixture(scope="module")
def test_split():
  return load_fashion_mnist("test")


def test_quick_training_learns_and_is_cached(quick):
  classifier, cache_dir = quick
  meta = classifier.meta
  assert meta["steps"] == QUICK_STEPS and meta["epochs"] < 0.3
  assert meta["test_accuracy"] > 0.6, meta
  assert set(os.listdir(cache_dir)) >= {clf_lib.WEIGHTS_FILE, clf_lib.META_FILE}
  with open(os.path.join(cache_dir, clf_lib.META_FILE)) as f:
    on_disk = json.load(f)
  assert on_disk["weights_md5"] == clf_lib.file_md5(os.path.join(cache_dir, clf_lib.WEIGHTS_FILE))
  assert len(on_disk["train_md5"]) == len(on_disk["test_md5"]) == 32


def test_test_split_against_itself(quick, test_split):
  classifier, cache_dir = quick
  images, labels = test_split
  result = fmnist.fmnist_metrics(images, labels, classifier)
  assert set(result) == {"fmnist_accuracy", "fmnist_fd"}
  assert result["fmnist_accuracy"] == pytest.approx(classifier.test_accuracy, abs=1e-9)
  assert result["fmnist_fd"] < 1e-4  # round-off of the eigendecompositions only
  assert os.path.isfile(os.path.join(cache_dir, fmnist.STATS_FILE))  # reference stats were cached
  # Shuffled labels: the classes no longer match, so accuracy falls to chance.
  shuffled = np.random.default_rng(0).permutation(labels)
  assert 0.07 < fmnist.fmnist_metrics(images, shuffled, classifier)["fmnist_accuracy"] < 0.13


def test_noise_is_far_from_real_train_images(quick):
  classifier, _ = quick
  train_x, train_y = load_fashion_mnist("train")
  real = fmnist.fmnist_metrics(train_x[:2000], train_y[:2000], classifier)
  noise = np.random.default_rng(0).integers(0, 256, (2000, 28, 28), dtype=np.uint8)
  fake = fmnist.fmnist_metrics(noise, train_y[:2000], classifier)
  assert real["fmnist_accuracy"] > 0.6
  assert fake["fmnist_fd"] > 10 * real["fmnist_fd"] and fake["fmnist_fd"] > 1.0, (real, fake)


def test_reference_stats_reload_from_cache(quick, test_split):
  classifier, cache_dir = quick
  fresh = clf_lib.load(cache_dir)  # no in-memory stats: they come from test_stats.npz
  mu, sigma = fmnist.reference_stats(fresh)
  want_mu, want_sigma = fmnist.feature_statistics(classifier.features(test_split[0]))
  np.testing.assert_allclose(mu, want_mu, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-6, atol=1e-8)


def test_input_layouts_give_the_same_metrics(quick, test_split):
  classifier, _ = quick
  images, labels = test_split[0][:300], test_split[1][:300]
  want = fmnist.fmnist_metrics(images, labels, classifier)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # the pipeline's 28 -> 32 zero padding
  for variant in (images[..., None], padded, padded[..., None],
                  np.repeat(images[..., None], 3, axis=-1)):
    got = fmnist.fmnist_metrics(variant, labels.tolist(), classifier)
    assert got["fmnist_accuracy"] == want["fmnist_accuracy"]
    assert got["fmnist_fd"] == pytest.approx(want["fmnist_fd"], rel=1e-6)


def test_load_or_train_uses_the_cache(quick, monkeypatch, tmp_path, test_split):
  classifier, cache_dir = quick

  def no_training(*args, **kwargs):
    raise AssertionError("load_or_train retrained although the cache was there")

  monkeypatch.setattr(clf_lib, "train", no_training)
  again = clf_lib.load_or_train(cache_dir)
  assert again.weights_md5 == classifier.weights_md5
  assert again.meta["test_accuracy"] == classifier.meta["test_accuracy"]
  images = test_split[0][:64]
  np.testing.assert_array_equal(again.apply(images)[1], classifier.apply(images)[1])

  # A missing cache trains exactly once, saves, and the next call loads.
  calls = []

  def fake_train(settings=None, data_path=None, progress=True):
    calls.append(settings)
    return clf_lib.Classifier(clf_lib.FashionMNISTCNN(rngs=clf_lib.nnx.Rngs(1)), {
        "format": clf_lib.FORMAT, "test_accuracy": 0.1})

  monkeypatch.setattr(clf_lib, "train", fake_train)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert clf_lib.default_cache_dir() == str(tmp_path / "pixeldit_jax" / "fmnist_classifier")
  first = clf_lib.load_or_train()
  second = clf_lib.load_or_train()
  assert len(calls) == 1 and clf_lib.is_cached(clf_lib.default_cache_dir())
  assert first.weights_md5 == second.weights_md5


def test_damaged_cache_is_reported(quick, tmp_path):
  _, cache_dir = quick
  with pytest.raises(FileNotFoundError, match="No Fashion-MNIST classifier"):
    clf_lib.load(str(tmp_path))
  for name in (clf_lib.WEIGHTS_FILE, clf_lib.META_FILE):
    with open(os.path.join(cache_dir, name), "rb") as src, open(tmp_path / name, "wb") as dst:
      dst.write(src.read())
  with open(tmp_path / clf_lib.WEIGHTS_FILE, "ab") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match="does not match the md5"):
    clf_lib.load(str(tmp_path))


@pytest.mark.parametrize("samples, labels, match", [
    (np.zeros((4, 28, 28), np.float32), np.zeros(4, int), "must be uint8"),
    (np.zeros((4, 27, 28), np.uint8), np.zeros(4, int), "28x28"),
    (np.zeros((4, 64, 64, 1), np.uint8), np.zeros(4, int), "28x28"),
    (np.zeros((4, 28, 28, 2), np.uint8), np.zeros(4, int), "1 or 3 channels"),
    (np.zeros((28, 28), np.uint8), np.zeros(4, int), r"\(N, 28, 28\)"),
    (np.zeros((0, 28, 28), np.uint8), np.zeros(0, int), "no samples"),
    (np.zeros((4, 28, 28), np.uint8), np.zeros(3, int), "one label per sample"),
    (np.zeros((4, 28, 28), np.uint8), np.full(4, 10), r"in \[0, 10\)"),
    (np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.float32), "integers"),
    (np.zeros((1, 28, 28), np.uint8), np.zeros(1, int), "at least 2"),
])
def test_bad_inputs_are_rejected(samples, labels, match):
  # Checked before any classifier is needed (classifier=None would otherwise load or train one).
  with pytest.raises(ValueError, match=match):
    fmnist.fmnist_metrics(samples, labels, classifier=None)


def test_cli_eval_end_to_end(quick, test_split, tmp_path):
  _, cache_dir = quick
  images, labels = test_split[0][:200], test_split[1][:200]
  npz = tmp_path / "samples.npz"
  np.savez(npz, images[..., None], labels=labels)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "pixeldit_jax.evaluation.fmnist", "eval",
                         "--samples", str(npz), "--cache-dir", cache_dir],
                        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=timeout(300))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "NOT FID" in proc.stdout and "fmnist_fd" in proc.stdout
  with open(tmp_path / "samples_fmnist.json") as f:
    record = json.load(f)
  assert record["num_samples"] == 200 and "NOT FID" in record["note"]
  want = fmnist.fmnist_metrics(images, labels, quick[0])
  assert record["fmnist_accuracy"] == pytest.approx(want["fmnist_accuracy"])
  assert record["fmnist_fd"] == pytest.approx(want["fmnist_fd"], rel=1e-5)

  bad = tmp_path / "bad.npz"
  np.savez(bad, images=images)
  assert fmnist.main(["eval", "--samples", str(bad), "--cache-dir", cache_dir]) == 2


@pytest.mark.slow
def test_full_training_reaches_90_percent(tmp_path, capsys):
  assert fmnist.main(["train", "--out", str(tmp_path)]) == 0
  meta = clf_lib.load(str(tmp_path)).meta
  assert meta["test_accuracy"] >= 0.90, meta
  assert "test accuracy" in capsys.readouterr().out

"""A small Fashion-MNIST CNN that the project trains itself: the feature network of the offline metric.

No Inception (FID) weights can be had offline, so the embedded Fashion-MNIST demo is scored with a
classifier trained here on the official train split (see ``pixeldit_jax.evaluation.fmnist``).

Network (fp32, NHWC, input uint8 28x28 gray scaled to [-1, 1]):
  conv 3x3, 16 -> ReLU -> max-pool 2   (14x14)
  conv 3x3, 32 -> ReLU -> max-pool 2   (7x7)
  dense 1568 -> 128 -> ReLU            the 128-d penultimate features (what the Fréchet distance uses)
  dense 128 -> 10                      logits

Training: AdamW (lr 3e-3 after a 100-step linear warmup, cosine decay to 2% of it, weight decay
1e-4), batch 128, a jitted step, ``epochs`` (default 5) passes over the 60,000 train images,
reshuffled each epoch (the last partial batch is dropped so the step compiles once). On a 2-core
CPU that takes about 3-4 minutes and reaches about 91.5-92% on the official 10k test split. The cache directory holds

  ``weights.npz``  the parameters, one array per '/'-joined path (conv1/kernel, ...)
  ``meta.json``    format tag, test accuracy on the official 10k test split, md5 of the train and
                   test data and of weights.npz, training settings and time; written last, so a
                   directory with meta.json holds a complete classifier
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import traverse_util
from tqdm import tqdm

from pixeldit_jax.data import load_fashion_mnist

log = logging.getLogger(__name__)

FORMAT = "pixeldit-jax/fmnist-classifier/1"
WEIGHTS_FILE, META_FILE = "weights.npz", "meta.json"
NUM_CLASSES, IMAGE_SIZE, FEATURE_DIM = 10, 28, 128
DEFAULT_EPOCHS = 5
EVAL_BATCH = 1000


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/pixeldit_jax/fmnist_classifier, or ~/.cache/... when it is unset or relative."""
  base = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(base):  # the XDG spec says to ignore relative paths
    base = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "pixeldit_jax", "fmnist_classifier")


class FashionMNISTCNN(nnx.Module):
  """Two conv blocks, a 128-d penultimate layer and a 10-way head; input float (B, 28, 28, 1) in [-1, 1]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), padding="SAME", rngs=rngs)
    self.fc = nnx.Linear(7 * 7 * 32, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    return nnx.relu(self.fc(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def to_input(images_uint8) -> jax.Array:
  """uint8 (B, 28, 28) -> float32 (B, 28, 28, 1) in [-1, 1]."""
  x = jnp.asarray(images_uint8, jnp.float32)
  return (x / 127.5 - 1.0)[..., None]


class Classifier:
  """A trained FashionMNISTCNN plus its record; ``apply`` maps uint8 (N, 28, 28) to (features, logits)."""

  def __init__(self, model: FashionMNISTCNN, meta: dict, cache_dir: Optional[str] = None):
    self.model, self.meta, self.cache_dir = model, dict(meta), cache_dir
    self._reference_stats = None  # memo of fmnist.reference_stats: (key, (mu, sigma))
    graphdef, params = nnx.split(model, nnx.Param)
    self._params = params

    @jax.jit
    def forward(params, images):
      net = nnx.merge(graphdef, params)
      feats = net.features(to_input(images))
      return feats, net.head(feats)

    self._forward = forward

  @property
  def test_accuracy(self) -> Optional[float]:
    return self.meta.get("test_accuracy")

  @property
  def weights_md5(self) -> Optional[str]:
    return self.meta.get("weights_md5")

  def apply(self, images_uint8: np.ndarray, batch_size: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) -> (float64 features (N, 128), float32 logits (N, 10)), fixed-size batches."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
      raise ValueError(f"Classifier.apply wants uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    n = len(images)
    size = min(batch_size, max(n, 1))
    feats, logits = [], []
    for start in range(0, n, size):
      chunk = images[start:start + size]
      if len(chunk) < size:  # pad to the compiled batch size
        chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], np.uint8)])
      f, l = jax.device_get(self._forward(self._params, chunk))
      keep = min(size, n - start)
      feats.append(np.asarray(f[:keep], np.float64))
      logits.append(np.asarray(l[:keep]))
    if not feats:
      return np.zeros((0, FEATURE_DIM)), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(feats), np.concatenate(logits)

  def features(self, images_uint8: np.ndarray) -> np.ndarray:
    return self.apply(images_uint8)[0]

  def predict(self, images_uint8: np.ndarray) -> np.ndarray:
    return np.argmax(self.apply(images_uint8)[1], axis=-1)


def data_md5(images: np.ndarray, labels: np.ndarray) -> str:
  """md5 of the decoded split: the uint8 image bytes, then the labels as uint8."""
  h = hashlib.md5(np.ascontiguousarray(images, np.uint8).tobytes())
  h.update(np.asarray(labels).astype(np.uint8).tobytes())
  return h.hexdigest()


def file_md5(path: str) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(classifier.predict(images) == np.asarray(labels)))


@dataclasses.dataclass
class TrainSettings:
  epochs: float = DEFAULT_EPOCHS  # fractional values stop part-way through the last epoch
  batch_size: int = 128
  lr: float = 3e-3
  weight_decay: float = 1e-4
  seed: int = 0
  max_steps: Optional[int] = None  # caps the step count (tests)


def train(settings: Optional[TrainSettings] = None, data_path: Optional[str] = None,
          progress: bool = True) -> Classifier:
  """Train the CNN on the official train split; the returned meta holds its official test accuracy."""
  settings = settings or TrainSettings()
  start = time.perf_counter()
  train_x, train_y = load_fashion_mnist("train", path=data_path)
  test_x, test_y = load_fashion_mnist("test", path=data_path)
  steps_per_epoch = len(train_x) // settings.batch_size
  num_steps = max(1, int(round(settings.epochs * steps_per_epoch)))
  if settings.max_steps is not None:
    num_steps = min(num_steps, settings.max_steps)

  model = FashionMNISTCNN(rngs=nnx.Rngs(settings.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  warmup = min(100, num_steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, settings.lr, warmup, num_steps,
                                                end_value=0.02 * settings.lr)
  tx = optax.adamw(schedule, weight_decay=settings.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(to_input(images))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  order = np.zeros(0, np.int64)
  bar = tqdm(total=num_steps, desc="fmnist classifier", disable=not progress, dynamic_ncols=True)
  loss = None
  for i in range(num_steps):
    pos = (i % steps_per_epoch) * settings.batch_size
    if pos == 0:
      order = rng.permutation(len(train_x))
    idx = order[pos:pos + settings.batch_size]
    params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx])
    bar.update(1)
    if (i + 1) % 50 == 0 or i + 1 == num_steps:
      bar.set_postfix(loss=f"{float(loss):.3f}", epoch=f"{(i + 1) / steps_per_epoch:.2f}")
  bar.close()
  jax.block_until_ready(params)
  train_seconds = time.perf_counter() - start

  nnx.update(model, params)
  classifier = Classifier(model, {})
  test_acc = accuracy(classifier, test_x, test_y)
  classifier.meta = {
      "format": FORMAT,
      "test_accuracy": test_acc,
      "final_train_loss": float(loss),
      "train_md5": data_md5(train_x, train_y),
      "test_md5": data_md5(test_x, test_y),
      "steps": num_steps,
      "epochs": num_steps / steps_per_epoch,
      "settings": dataclasses.asdict(settings),
      "train_seconds": round(train_seconds, 1),
      "devices": str(jax.devices()[0].platform),
  }
  log.info("Fashion-MNIST classifier: %d steps in %.1f s, test accuracy %.4f",
           num_steps, train_seconds, test_acc)
  return classifier


def _atomic_write(path: str, write: Callable[[io.BufferedWriter], Any]):
  """Write `path` through a temporary file in the same directory, so readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save(classifier: Classifier, cache_dir: str) -> str:
  """Write weights.npz, then meta.json (with the weights' md5); returns the directory."""
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  os.makedirs(cache_dir, exist_ok=True)
  pure = nnx.to_pure_dict(nnx.state(classifier.model, nnx.Param))
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(pure).items()}
  weights_path = os.path.join(cache_dir, WEIGHTS_FILE)
  _atomic_write(weights_path, lambda f: np.savez(f, **flat))
  classifier.meta["weights_md5"] = file_md5(weights_path)
  text = json.dumps(classifier.meta, indent=2, sort_keys=True).encode()
  _atomic_write(os.path.join(cache_dir, META_FILE), lambda f: f.write(text))
  classifier.cache_dir = cache_dir
  return cache_dir


def is_cached(cache_dir: Optional[str] = None) -> bool:
  cache_dir = cache_dir or default_cache_dir()
  return all(os.path.isfile(os.path.join(cache_dir, name)) for name in (WEIGHTS_FILE, META_FILE))


def load(cache_dir: Optional[str] = None) -> Classifier:
  """Load a saved classifier; FileNotFoundError if the directory has none, ValueError if it is damaged."""
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
  if not is_cached(cache_dir):
    raise FileNotFoundError(f"No Fashion-MNIST classifier in {cache_dir} (train one with "
                            f"`python -m pixeldit_jax.evaluation.fmnist train --out {cache_dir}`)")
  with open(os.path.join(cache_dir, META_FILE)) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{cache_dir}/{META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
  weights_path = os.path.join(cache_dir, WEIGHTS_FILE)
  if meta.get("weights_md5") and file_md5(weights_path) != meta["weights_md5"]:
    raise ValueError(f"{weights_path} does not match the md5 in {META_FILE}: retrain with "
                     f"`python -m pixeldit_jax.evaluation.fmnist train --out {cache_dir}`")
  model = FashionMNISTCNN(rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  expected = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  with np.load(weights_path) as npz:
    loaded = {tuple(k.split("/")): npz[k] for k in npz.files}
  if set(loaded) != {tuple(map(str, k)) for k in expected}:
    raise ValueError(f"{weights_path} holds {sorted(loaded)}, expected {sorted(expected)}")
  flat = {}
  for key, ref in expected.items():
    value = loaded[tuple(map(str, key))]
    if value.shape != ref.shape:
      raise ValueError(f"{weights_path}: {'/'.join(map(str, key))} has shape {value.shape}, "
                       f"expected {ref.shape}")
    flat[key] = jnp.asarray(value, ref.dtype)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
  return Classifier(model, meta, cache_dir)


def load_or_train(cache_dir: Optional[str] = None, settings: Optional[TrainSettings] = None,
                  data_path: Optional[str] = None, progress: bool = True) -> Classifier:
  """The cached classifier in `cache_dir` (default: ``default_cache_dir()``); trained and saved if missing."""
  cache_dir = cache_dir or default_cache_dir()
  if is_cached(cache_dir):
    return load(cache_dir)
  log.warning("No Fashion-MNIST classifier in %s: training one (a few minutes on CPU).", cache_dir)
  classifier = train(settings or TrainSettings(), data_path=data_path, progress=progress)
  save(classifier, cache_dir)
  return classifier

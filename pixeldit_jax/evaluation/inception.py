"""InceptionV3 of the FID / ADM evaluation suite, in Flax NNX, with weights from a local file.

The network is the "2015-12-05" TensorFlow Inception graph (``classify_image_graph_def.pb``) that
both the TTUR FID code and OpenAI's ADM evaluator run, in the layout of pytorch-fid's port of it
(``FIDInceptionA/C/E_1/E_2`` over torchvision's ``Inception3(num_classes=1008, aux_logits=False)``):

* every convolution is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU;
* the 3x3 / stride-1 average pools of the A, C and first E blocks do not count the zero padding
  (TensorFlow's SAME average pool), and the last E block (``Mixed_7c``) max-pools instead;
* the classifier is 2048 -> 1008 (the graph's ``softmax`` layer).

Preprocessing is the graph's own: the float image in [0, 255] is resized to 299 x 299 with
TensorFlow 1.x ``ResizeBilinear`` (``align_corners=False`` and no half-pixel centres: source
coordinate = ``dst * in / out``), then mapped by ``(x - 128) / 128``. (pytorch-fid instead resizes
with half-pixel centres and maps ``x / 255 * 2 - 1``; we follow the graph that ADM scores with.)

Outputs (``InceptionOutputs``), mapped onto the tensors ADM reads from the graph:

* ``pool``   (N, 2048): ``pool_3:0``, the global average of ``Mixed_7c`` -> FID, precision, recall.
* ``spatial`` (N, 2023): ``mixed_6/conv:0[..., :7]`` flattened in (h, w, c) order -> sFID. The
  graph's ``mixed_6`` is the seventh mixed block, i.e. pytorch-fid's ``Mixed_6d`` (mixed,
  mixed_1, mixed_2 = 5b-5d; mixed_3 = 6a; mixed_4..mixed_7 = 6b-6e; mixed_8 = 7a; mixed_9/10 =
  7b/7c), and its un-towered ``conv`` is the 1x1 branch, so the tensor is the ReLU output of
  ``Mixed_6d.branch1x1`` (N, 17, 17, 192), of which ADM keeps the first 7 channels: 17*17*7 = 2023.
* ``logits`` (N, 1008): ``pool @ W`` **without the bias**: ADM's Inception Score multiplies the
  pool features by the weight of ``softmax/logits/MatMul`` and applies the softmax, so the bias
  is never added (torch-fidelity calls this ``logits_unbiased``). ``fc.bias`` is still loaded.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with
``torch.load(weights_only=True)``; torch is imported only there), or an ``.npz`` holding the same
state dict (same key names, same PyTorch layouts) written by

    python -m pixeldit_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
        --out pt_inception-2015-12-05.npz

so that evaluation machines need no torch. Nothing is ever downloaded: see ``WEIGHTS_HELP``.
Convolutions and the classifier run at ``Precision.HIGHEST`` so that GPUs/TPUs do not drop to
TF32/bfloat16 passes.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Dict, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit_jax import cli, fs

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST

WEIGHTS_ENV = "PIXELDIT_INCEPTION_WEIGHTS"
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + PYTORCH_FID_WEIGHTS)
WEIGHTS_HELP = (
    "The FID InceptionV3 weights are not shipped and are never downloaded by this package. On a "
    f"machine with internet access fetch pytorch-fid's release asset '{PYTORCH_FID_WEIGHTS}' "
    f"(GitHub mseitzer/pytorch-fid, release 'fid_weights': {PYTORCH_FID_URL}), copy it here and "
    f"pass its path with --inception /path/to/{PYTORCH_FID_WEIGHTS} (or set ${WEIGHTS_ENV}). "
    "Reading a .pth needs torch; to evaluate without torch convert it once with "
    f"'python -m pixeldit_jax.evaluation.inception --convert /path/to/{PYTORCH_FID_WEIGHTS} "
    "--out inception.npz' and pass the .npz instead.")


class InceptionWeightsError(ValueError):
  """A weights file that does not fit the network: the message lists every problem."""


class InceptionWeightsNotFound(FileNotFoundError):
  """No weights file at the given path (or none given)."""


class InceptionOutputs(NamedTuple):
  pool: jax.Array  # (N, 2048)
  spatial: jax.Array  # (N, 2023)
  logits: jax.Array  # (N, 1008), without the classifier bias (ADM)


# ----------------------------------------------------------------------------- preprocessing


def _tf1_bilinear_taps(in_size: int, out_size: int):
  """TF 1.x ResizeBilinear(align_corners=False, half_pixel_centers=False) taps along one axis."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src)
  frac = (src - lo).astype(np.float32)
  lo = np.maximum(lo.astype(np.int32), 0)
  hi = np.minimum(np.ceil(src).astype(np.int32), in_size - 1)
  return lo, hi, frac


def resize_bilinear_tf1(x: jax.Array, height: int, width: int) -> jax.Array:
  """(N, H, W, C) float -> (N, height, width, C), bit-for-bit TF1's legacy bilinear formula."""
  ylo, yhi, dy = _tf1_bilinear_taps(x.shape[1], height)
  xlo, xhi, dx = _tf1_bilinear_taps(x.shape[2], width)
  top, bottom = jnp.take(x, ylo, axis=1), jnp.take(x, yhi, axis=1)
  dx = jnp.asarray(dx)[None, None, :, None]
  top = jnp.take(top, xlo, axis=2) + (jnp.take(top, xhi, axis=2) - jnp.take(top, xlo, axis=2)) * dx
  bottom = (jnp.take(bottom, xlo, axis=2)
            + (jnp.take(bottom, xhi, axis=2) - jnp.take(bottom, xlo, axis=2)) * dx)
  return top + (bottom - top) * jnp.asarray(dy)[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (or float in [0, 255]) NHWC RGB -> the graph's 299x299 input in [-1, 1)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
  x = images.astype(jnp.float32)
  x = resize_bilinear_tf1(x, INPUT_SIZE, INPUT_SIZE)
  return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------- network


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool(x, stride: int, pad: int = 0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_3x3_same(x):
  """3x3 stride-1 average pool with 1 padding that averages over the real pixels only."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size, stride: int = 1, padding=0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(in_ch, out_ch, _pair(kernel_size), strides=stride,
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                         kernel_init=nnx.initializers.he_normal(), rngs=rngs)
    self.bn = nnx.BatchNorm(out_ch, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_ch, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  def __init__(self, in_ch: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

  def __call__(self, x, return_branch1x1: bool = False):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_3x3_same(x))
    out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
    return (out, b1) if return_branch1x1 else out


class InceptionD(nnx.Module):
  def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """`pool="avg"`: pytorch-fid's FIDInceptionE_1 (Mixed_7b); `pool="max"`: FIDInceptionE_2 (7c)."""

  def __init__(self, in_ch: int, pool: str, *, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(pool)
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_ch, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool(x, 1, pad=1)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """The FID InceptionV3; attribute names are pytorch-fid's (= torchvision's) module names."""

  def __init__(self, *, rngs: Optional[nnx.Rngs] = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

  def forward_preprocessed(self, x) -> InceptionOutputs:
    """(N, 299, 299, 3) in [-1, 1] -> outputs."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 2)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
    x, mixed_6_conv = self.Mixed_6d(x, return_branch1x1=True)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = jnp.mean(x, axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    logits = jnp.matmul(pool, self.fc.kernel[...], precision=HIGHEST)
    return InceptionOutputs(pool, spatial, logits)

  def __call__(self, images) -> InceptionOutputs:
    """uint8 NHWC RGB images of any size (values 0..255) -> outputs."""
    return self.forward_preprocessed(preprocess(images))


# ----------------------------------------------------------------------------- weights

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _variables(model: nnx.Module):
  """[(torch_key, variable)] for every parameter and batch statistic of `model`."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      *mods, leaf = (str(p) for p in path)
      out.append((".".join(mods + [_LEAF_TO_TORCH[leaf]]), node))
  return out


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv kernel (H, W, I, O) -> (O, I, H, W)
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:  # linear kernel (in, out) -> (out, in)
    return value.T
  return value


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def state_dict(model: InceptionV3) -> Dict[str, np.ndarray]:
  """The model's weights as pytorch-fid's state dict (torch key names and layouts), float32."""
  return {key: np.ascontiguousarray(_to_torch_layout(np.asarray(var.get_value(), np.float32)))
          for key, var in _variables(model)}


@functools.lru_cache(maxsize=1)
def _abstract_split():
  return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))


def abstract_inception() -> InceptionV3:
  """A fresh network with shape-only variables, to fill with ``load_state_dict``. (Tracing it
  takes a few seconds once per process; eager random init would take ~40 s on CPU because
  every initialiser compiles.)"""
  return nnx.merge(*_abstract_split(), copy=True)


def expected_shapes(model: Optional[InceptionV3] = None) -> Dict[str, tuple]:
  """Torch key -> torch shape for every tensor the loader needs (num_batches_tracked excluded)."""
  model = model if model is not None else abstract_inception()
  return {key: tuple(_to_torch_layout(np.empty(var.get_value().shape, np.uint8)).shape)
          for key, var in _variables(model)}


def load_state_dict(model: InceptionV3, weights: Mapping[str, np.ndarray]) -> InceptionV3:
  """Copy a pytorch-fid state dict into `model` in place. Every tensor of the model must be
  present with the right shape and every key must be used (``*.num_batches_tracked`` aside);
  otherwise ``InceptionWeightsError`` lists what is missing, unexpected or mis-shaped."""
  variables = _variables(model)
  wanted = {key for key, _ in variables}
  given = {k for k in weights if not k.endswith(_IGNORED_SUFFIXES)}
  missing, unexpected = sorted(wanted - given), sorted(given - wanted)
  bad_shapes, updates = [], []
  for key, var in variables:
    if key not in weights:
      continue
    value = _from_torch_layout(np.asarray(weights[key], np.float32))
    if value.shape != var.get_value().shape:
      bad_shapes.append(f"{key}: file {tuple(np.shape(weights[key]))}, model expects "
                        f"{tuple(_to_torch_layout(np.empty(var.get_value().shape, np.uint8)).shape)}")
    else:
      updates.append((var, value))
  if missing or unexpected or bad_shapes:
    lines = ["the weights do not fit the FID InceptionV3 (pytorch-fid layout):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shapes)):
      if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"  {len(items)} {title}: " + ", ".join(shown))
    raise InceptionWeightsError("\n".join(lines))
  for var, value in updates:
    var.set_value(jnp.asarray(value))
  return model


def _read_pth(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # only this explicit conversion path needs torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (CPU is enough). Without torch, convert the .pth "
                      "to .npz on a machine that has it: python -m pixeldit_jax.evaluation.inception "
                      f"--convert {path} --out inception.npz") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise InceptionWeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
  return {k: v.detach().cpu().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def read_weights(path: str) -> Dict[str, np.ndarray]:
  """A pytorch-fid state dict from a .pth/.pt (torch) or .npz (numpy) file."""
  resolved = resolve_weights_path(path)
  if resolved.endswith(".npz"):
    with np.load(resolved) as f:
      return {k: f[k] for k in f.files}
  if resolved.endswith((".pth", ".pt")):
    return _read_pth(resolved)
  raise InceptionWeightsError(f"unknown weights format {resolved!r}: expected .pth, .pt or .npz")


def resolve_weights_path(path: Optional[str]) -> str:
  """`path` (or $PIXELDIT_INCEPTION_WEIGHTS) if it is an existing file, else a clear error."""
  path = path or os.environ.get(WEIGHTS_ENV)
  if not path:
    raise InceptionWeightsNotFound(f"no InceptionV3 weights file was given. {WEIGHTS_HELP}")
  if not fs.isfile(path):
    raise InceptionWeightsNotFound(f"InceptionV3 weights file not found: {path!r}. {WEIGHTS_HELP}")
  return fs.local_file(path)  # a gs:// file is copied to the local cache once


def load_inception(path: Optional[str] = None) -> InceptionV3:
  """Build the network and load the weights from a local .pth/.npz (see ``WEIGHTS_HELP``)."""
  weights = read_weights(path)
  return load_state_dict(abstract_inception(), weights)


def random_weights(seed: int = 0) -> Dict[str, np.ndarray]:
  """A random state dict in pytorch-fid's names and layouts, for plumbing tests only: He-normal
  convolutions and randomised BatchNorm statistics keep activations O(1) through the network."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in expected_shapes().items():
    if key.endswith("conv.weight"):
      v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key == "fc.weight":
      v = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif key.endswith(("bn.weight", "running_var")):
      v = rng.uniform(0.5, 1.5, shape)
    else:  # BatchNorm bias / running_mean, fc.bias
      v = 0.1 * rng.standard_normal(shape)
    out[key] = v.astype(np.float32)
  return out


def random_inception(seed: int = 0) -> InceptionV3:
  """The network with ``random_weights(seed)`` (no pretrained meaning whatsoever)."""
  return load_state_dict(abstract_inception(), random_weights(seed))


def save_npz(weights: Mapping[str, np.ndarray], out: str) -> None:
  """Write a state dict (torch names and layouts, float32, num_batches_tracked dropped)."""
  arrays = {k: np.asarray(v, np.float32) for k, v in weights.items() if not k.endswith(_IGNORED_SUFFIXES)}
  fs.save_npz(out, **arrays)


def convert(pth: str, out: str) -> Dict[str, np.ndarray]:
  """pytorch-fid .pth -> .npz, after checking that it loads into the network strictly."""
  weights = read_weights(pth)
  load_state_dict(abstract_inception(), weights)
  save_npz(weights, out)
  return weights


# ----------------------------------------------------------------------------- batched extraction


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images) -> InceptionOutputs:
  # Module-level and keyed on the (hashable) graph definition, so that every extractor of the
  # same network and input shape shares one compiled program.
  return nnx.merge(graphdef, state)(images)


class FeatureExtractor:
  """Jitted batched feature extraction: fixed-size batches (the last one padded), one compile."""

  def __init__(self, model: InceptionV3, batch_size: int = 100):
    self.batch_size = batch_size
    self._graphdef, self._state = nnx.split(model)

  def __call__(self, images: np.ndarray) -> InceptionOutputs:
    """One batch of at most `batch_size` uint8 NHWC images -> numpy outputs."""
    n = images.shape[0]
    if n > self.batch_size:
      raise ValueError(f"batch of {n} > batch_size {self.batch_size}")
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad], axis=0)
    out = _forward(self._graphdef, self._state, jnp.asarray(images))
    return InceptionOutputs(*(np.asarray(o[:n]) for o in out))

  def extract(self, batches: Iterable[np.ndarray], total: Optional[int] = None, desc: str = "inception",
              progress: bool = True, want: Sequence[str] = InceptionOutputs._fields) -> Dict[str, np.ndarray]:
    """Run every batch (each at most `batch_size` images); returns the concatenated `want` outputs."""
    from tqdm import tqdm

    parts: Dict[str, list] = {name: [] for name in want}
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
      for batch in batches:
        out = self(np.asarray(batch))
        for name in want:
          parts[name].append(getattr(out, name))
        bar.update(batch.shape[0])
    return {name: (np.concatenate(v, axis=0) if v else np.zeros((0,), np.float32))
            for name, v in parts.items()}


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(
      prog="python -m pixeldit_jax.evaluation.inception",
      description="Convert pytorch-fid's InceptionV3 weights (.pth, needs torch) to a torch-free "
                  ".npz, or check a weights file.")
  parser.add_argument("--convert", metavar="PTH", help=f"the .pth to convert (e.g. {PYTORCH_FID_WEIGHTS})")
  parser.add_argument("--out", metavar="NPZ", help="where to write the .npz")
  parser.add_argument("--check", metavar="FILE", help="only check that a .pth/.npz loads strictly")
  args = parser.parse_args(argv)
  try:
    if args.check:
      model = load_inception(args.check)
      n = sum(int(np.prod(v.get_value().shape)) for _, v in _variables(model))
      print(f"{args.check}: OK ({n:,} values in {len(_variables(model))} tensors)")
      return 0
    if not (args.convert and args.out):
      parser.error("use --convert PTH --out NPZ (or --check FILE)")
    weights = convert(args.convert, args.out)
    print(f"wrote {args.out}: {len(weights)} tensors, "
          f"{sum(int(np.prod(np.shape(v))) for v in weights.values()):,} values")
    return 0
  except (InceptionWeightsError, InceptionWeightsNotFound, ImportError) as e:
    return cli.report(e, sys.argv)  # one line, exit code 2 as every entry point


if __name__ == "__main__":
  sys.exit(cli.guard(main))

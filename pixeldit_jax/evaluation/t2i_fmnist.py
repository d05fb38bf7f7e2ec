"""Faithfulness of text-to-image samples of the captioned Fashion-MNIST demo to their captions.

Each sample (uint8 (S, S, 3), S even >= 32, 32 in the demo) is checked against its parsed caption
("a red sneaker on a blue background, top left", see ``data.captioned_fmnist``):

  background  the median colour of the image (the garment covers < 1/5 of it) is nearest, among
              the 8 named colours, to the named background
  position    the quadrant with the largest mean distance from that background is the named one
  colour      in that quadrant, the pixels at least 35% as far from the background as the farthest
              are explained best by the named colour: the colour c minimising the
              mean squared residual of p ~ bg + a (c - bg), a in [0, 1]. A plain mean colour is
              pulled towards the background by the garment's shading and anti-aliasing; the blend
              line is how the data set draws garments.
  garment     the quadrant's centre garment_size(S) square as a Fashion-MNIST-like gray image
              (distance from the background / its maximum, x 255; resized to 28x28 when
              smaller, as the data set resized it down) is classified as the named class by the
              project's Fashion-MNIST CNN (``fmnist_classifier``, cached in ~/.cache/pixeldit_jax)
  all         every check passes

On the data set's own images the checks score ~1 (the garment check: the classifier's accuracy on
the Fashion-MNIST images drawn); with shuffled captions they fall to chance (1/4, ~1/8, ~1/8,
~1/10). Samples whose caption does not parse fail every check.

  python -m pixeldit_jax.evaluation.t2i_fmnist --samples samples.npz [--cache-dir DIR] [--no-classifier]

reads uint8 ``arr_0`` (N, S, S, 3) and ``captions`` (N,) and writes ``<samples stem>_t2i.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from pixeldit_jax import cli, fs
from pixeldit_jax.data import captioned_fmnist as cf

CHECKS = ("background", "position", "colour", "garment")
GARMENT_FRACTION = 0.35  # pixels this far (relative) from the background count as the garment
MIN_GARMENT_DISTANCE = 24.0  # below this (in RGB units) a quadrant holds no garment at all


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
  """Index of the nearest named colour of each (..., 3) colour."""
  d = ((np.asarray(rgb, np.float64)[..., None, :] - cf.COLOUR_RGB) ** 2).sum(-1)
  return np.argmin(d, axis=-1)


def _blend_colour(pixels: np.ndarray, bg: np.ndarray) -> int:
  """The named colour whose blend line from `bg` fits `pixels` (P, 3) best (least squares)."""
  v = pixels - bg  # (P, 3)
  best, best_err = -1, np.inf
  for c, rgb in enumerate(cf.COLOUR_RGB):
    d = rgb - bg
    dd = float(d @ d)
    a = np.clip(v @ d / dd, 0.0, 1.0) if dd > 0 else np.zeros(len(v))
    err = float(((v - a[:, None] * d) ** 2).sum(-1).mean())
    if err < best_err:
      best, best_err = c, err
  return best


def analyse(image: np.ndarray) -> dict:
  """What one image shows: background and garment colour indices, quadrant, 28x28 gray garment."""
  x = np.asarray(image, np.float64)
  size = x.shape[0]
  bg = np.median(x.reshape(-1, 3), axis=0)
  dist = np.sqrt(((x - bg) ** 2).sum(-1))
  half = size // 2
  quads = [dist[r * half:(r + 1) * half, c * half:(c + 1) * half] for r in (0, 1) for c in (0, 1)]
  pos = int(np.argmax([q.mean() for q in quads]))
  q_dist = quads[pos]
  top, left = cf.quadrant_origin(pos, size)
  q_pix = x[top:top + half, left:left + half]
  scale = float(q_dist.max())
  if scale < MIN_GARMENT_DISTANCE:
    colour = -1
  else:
    mask = q_dist >= GARMENT_FRACTION * scale
    colour = _blend_colour(q_pix[mask], bg)
  gray = np.clip(q_dist / max(scale, MIN_GARMENT_DISTANCE), 0.0, 1.0) * 255.0
  side = cf.garment_size(size)
  off = (half - side) // 2
  gray = np.rint(gray[off:off + side, off:off + side]).astype(np.uint8)
  gray = cf.resize_gray(gray, cf.GARMENT)
  return {"background": int(_nearest_colour(bg)), "position": pos, "colour": colour, "gray": gray}


def prepare_images(images) -> np.ndarray:
  x = np.asarray(images)
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
    raise ValueError(f"samples must be uint8 (N, S, S, 3), got {x.dtype} {x.shape}")
  cf.check_size(x.shape[1])
  if not len(x):
    raise ValueError("no samples")
  return x


def faithfulness(images, captions: Sequence[str], classifier=None, *, classify: bool = True,
                 class_names: Sequence[str] = cf.CLASS_NAMES, details: bool = False) -> dict:
  """Per-check accuracies ('t2i_background', 't2i_position', 't2i_colour', 't2i_garment') and
  't2i_all', the fraction of samples passing every check. classify=False leaves out the garment
  check (no classifier needed); classifier defaults to ``fmnist_classifier.load_or_train()``.
  details=True adds the per-sample boolean arrays under 'per_sample'."""
  x = prepare_images(images)
  captions = [str(c) for c in np.asarray(captions, object).reshape(-1)]
  if len(captions) != len(x):
    raise ValueError(f"{len(x)} samples but {len(captions)} captions")
  parsed = [cf.parse_caption(c, class_names) for c in captions]
  found = [analyse(im) for im in x]
  ok = {name: np.zeros(len(x), bool) for name in CHECKS}
  for i, (want, got) in enumerate(zip(parsed, found)):
    if want is None:
      continue
    cls, colour, bg, pos = want
    ok["background"][i] = got["background"] == bg
    ok["position"][i] = got["position"] == pos
    ok["colour"][i] = got["colour"] == colour
  checks = list(CHECKS)
  if classify:
    if classifier is None:
      from pixeldit_jax.evaluation.fmnist_classifier import load_or_train  # pylint: disable=g-import-not-at-top
      classifier = load_or_train()
    predicted = classifier.predict(np.stack([g["gray"] for g in found]))
    ok["garment"] = np.asarray([p is not None and int(k) == p[0] for k, p in zip(predicted, parsed)])
  else:
    checks.remove("garment")
    del ok["garment"]
  every = np.logical_and.reduce([ok[name] for name in checks])
  result = {f"t2i_{name}": float(ok[name].mean()) for name in checks}
  result["t2i_all"] = float(every.mean())
  result["num_samples"] = len(x)
  result["unparsed_captions"] = sum(p is None for p in parsed)
  if details:
    result["per_sample"] = dict(ok, all=every)
  return result


def load_samples_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  # Never unpickled: our sampler writes captions as a unicode array; object arrays are refused.
  with fs.load_npz(path) as npz:
    missing = [k for k in ("arr_0", "captions") if k not in npz.files]
    if missing:
      raise ValueError(f"{path} lacks {missing} (it holds {npz.files}); expected uint8 'arr_0' "
                       f"(N, S, S, 3) and 'captions' (N,)")
    return npz["arr_0"], npz["captions"]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(prog="python -m pixeldit_jax.evaluation.t2i_fmnist",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--samples", required=True, help="npz with uint8 arr_0 and captions")
  parser.add_argument("--cache-dir", default=None, help="Fashion-MNIST classifier directory")
  parser.add_argument("--no-classifier", action="store_true", help="skip the garment check")
  parser.add_argument("--out", default=None, help="JSON path (default: <samples stem>_t2i.json)")
  args = parser.parse_args(argv)
  try:
    images, captions = load_samples_npz(args.samples)
    classifier = None
    if not args.no_classifier:
      from pixeldit_jax.evaluation.fmnist_classifier import load_or_train  # pylint: disable=g-import-not-at-top
      classifier = load_or_train(args.cache_dir)
    start = time.perf_counter()
    result = faithfulness(images, captions, classifier, classify=not args.no_classifier)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  record = dict(result, samples=fs.resolve(args.samples),
                seconds=round(time.perf_counter() - start, 2))
  if classifier is not None:
    record.update(classifier_test_accuracy=classifier.test_accuracy,
                  classifier_weights_md5=classifier.weights_md5)
  out = args.out or os.path.splitext(args.samples)[0] + "_t2i.json"
  fs.write_text(out, json.dumps(record, indent=2))
  lines = [f"  {k}: {v:.4f}" for k, v in result.items() if k.startswith("t2i_")]
  print(f"Captioned Fashion-MNIST faithfulness of {len(images)} samples from {args.samples}\n"
        + "\n".join(lines) + f"\n  written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.guard(main))

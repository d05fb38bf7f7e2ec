"""Captioned Fashion-MNIST: the embedded text-to-image demo data set, rendered on the fly.

A record is a square RGB canvas (``size`` x ``size``, 32 in the demo) split into a 2x2 layout; one
Fashion-MNIST garment, centred in its quadrant, is drawn in a named colour on a background of
another named colour, with the garment's gray level as the blend weight::

  pixel = background * (1 - g / 255) + colour * g / 255      caption: "a red sneaker on a blue background, top left"

The garment is ``garment_size(size)`` = min(28, size // 2) pixels square: the 28x28 original on
canvases of 56 and more, resized (Lanczos) to fill the quadrant on smaller ones (16x16 at 32x32,
where the project's classifier still recognises 85% of real test garments, against 92% at 28x28).

Captions: 10 classes x 8 colours x 7 other background colours x 4 positions = 2,240. The colours
are the corners of the RGB cube (as far apart as colours get). ``heldout_captions(n)`` is a fixed,
class-balanced set (round-robin over the classes) that the record stream never shows, for the
demo's evaluation of unseen combinations; it is nested (the first n of a fixed order).

Record i is a pure function of i (and the split and held-out count): garment image i % N, and a
combination drawn from a generator seeded with (DATA_SEED, i) among the combinations of that
garment's class that are not held out. There are COLOURINGS_PER_IMAGE records per garment image.

Without Fashion-MNIST the MNIST fallback of ``fashion_mnist.resolve`` is used, with the digit
names ("a red three on ...").
"""

from __future__ import annotations

import functools
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from pixeldit_jax.data import fashion_mnist

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255)),
           ("yellow", (255, 255, 0)), ("magenta", (255, 0, 255)), ("cyan", (0, 255, 255)),
           ("white", (255, 255, 255)), ("black", (0, 0, 0)))
COLOUR_NAMES = tuple(name for name, _ in COLOURS)
COLOUR_RGB = np.asarray([rgb for _, rgb in COLOURS], np.float64)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant = 2 * row + col
GARMENT = 28  # Fashion-MNIST's side
MIN_SIZE = 32  # quadrants of 16x16: the smallest garments still recognisable
DATA_SEED, HELDOUT_SEED = 20240917, 1729
COLOURINGS_PER_IMAGE = 8
DEFAULT_HELDOUT = 100
# (colour, background, position) triples, background != colour: 8 * 7 * 4 = 224 per class.
COMBOS = tuple((c, b, p) for c in range(len(COLOURS)) for b in range(len(COLOURS)) if b != c
               for p in range(len(POSITIONS)))
NUM_CAPTIONS = 10 * len(COMBOS)
_CAPTION_RE = re.compile(r"^an? (?P<colour>[a-z]+) (?P<cls>[a-z -]+?) on an? (?P<bg>[a-z]+) "
                         r"background, (?P<pos>(?:top|bottom) (?:left|right))$")


def caption(cls: int, colour: int, bg: int, pos: int, class_names: Sequence[str] = CLASS_NAMES) -> str:
  return f"a {COLOUR_NAMES[colour]} {class_names[cls]} on a {COLOUR_NAMES[bg]} background, {POSITIONS[pos]}"


def parse_caption(text: str, class_names: Sequence[str] = CLASS_NAMES) -> Optional[tuple[int, int, int, int]]:
  """(class, colour, background, position) of a caption, or None if it is not one of ours."""
  m = _CAPTION_RE.match(str(text).strip().lower())
  if m is None or m["cls"] not in class_names or m["colour"] not in COLOUR_NAMES or m["bg"] not in COLOUR_NAMES:
    return None
  return (class_names.index(m["cls"]), COLOUR_NAMES.index(m["colour"]), COLOUR_NAMES.index(m["bg"]),
          POSITIONS.index(m["pos"]))


def all_captions(class_names: Sequence[str] = CLASS_NAMES) -> list[str]:
  """Every caption (2,240), ordered by class, colour, background, position."""
  return [caption(k, *combo, class_names=class_names) for k in range(10) for combo in COMBOS]


@functools.lru_cache(maxsize=1)
def _heldout_order() -> tuple[tuple[int, int], ...]:
  """(class, combo index) in the fixed held-out order: round-robin over classes, each permuted."""
  rng = np.random.default_rng(HELDOUT_SEED)
  perms = [rng.permutation(len(COMBOS)) for _ in range(10)]
  return tuple((k % 10, int(perms[k % 10][k // 10])) for k in range(NUM_CAPTIONS))


def heldout_keys(n: int) -> list[tuple[int, int, int, int]]:
  """(class, colour, background, position) of the first n held-out captions."""
  if not 0 <= n <= NUM_CAPTIONS - 10:
    raise ValueError(f"the held-out caption count must be in [0, {NUM_CAPTIONS - 10}], got {n}")
  return [(cls,) + COMBOS[combo] for cls, combo in _heldout_order()[:n]]


def heldout_captions(n: int = DEFAULT_HELDOUT, class_names: Sequence[str] = CLASS_NAMES) -> list[str]:
  """The first n held-out captions (class-balanced; never in the record stream with >= n held out)."""
  return [caption(*key, class_names=class_names) for key in heldout_keys(n)]


def garment_size(size: int) -> int:
  """Side of the garment drawn on a size x size canvas: 28, or the quadrant when that is smaller."""
  return min(GARMENT, size // 2)


def resize_gray(gray: np.ndarray, side: int) -> np.ndarray:
  """uint8 (side, side) Lanczos resize of a uint8 gray image (identity at its own size)."""
  gray = np.asarray(gray, np.uint8)
  if gray.shape == (side, side):
    return gray
  return np.asarray(Image.fromarray(gray).resize((side, side), Image.LANCZOS))


def render(garment: np.ndarray, colour: int, bg: int, pos: int, size: int = 64) -> np.ndarray:
  """uint8 (size, size, 3): the gray garment (28x28) blended in `colour` into quadrant `pos` on
  `bg`, resized to garment_size(size)."""
  check_size(size)
  side = garment_size(size)
  g = resize_gray(garment, side).astype(np.float64)[:, :, None] / 255.0
  tile = COLOUR_RGB[bg] * (1.0 - g) + COLOUR_RGB[colour] * g
  out = np.empty((size, size, 3), np.uint8)
  out[:] = COLOUR_RGB[bg].astype(np.uint8)
  top, left = quadrant_origin(pos, size)
  off = (size // 2 - side) // 2
  out[top + off:top + off + side, left + off:left + off + side] = np.rint(tile).astype(np.uint8)
  return out


def quadrant_origin(pos: int, size: int) -> tuple[int, int]:
  half = size // 2
  return (pos // 2) * half, (pos % 2) * half


def check_size(size: int):
  if size % 2 or size < MIN_SIZE:
    raise ValueError(f"captioned Fashion-MNIST needs an even square image size >= {MIN_SIZE} "
                     f"(e.g. 32, 56 or 64), got {size}")


class CaptionedFashionMNIST:
  """The record source: ``len`` = COLOURINGS_PER_IMAGE x the split's images."""

  def __init__(self, split: str = "train", path: Optional[str] = None, size: int = 64,
               heldout: int = DEFAULT_HELDOUT):
    check_size(size)
    self.kind, self.directory = fashion_mnist.resolve("fashion_mnist", split, path)
    self.class_names = CLASS_NAMES if self.kind == "fashion_mnist" else DIGIT_NAMES
    self.split, self.size, self.heldout = split, int(size), int(heldout)
    held = set(heldout_keys(self.heldout))
    # Per class, the combination indices the stream may use.
    self.allowed = tuple(np.asarray([i for i, combo in enumerate(COMBOS) if (k,) + combo not in held],
                                    np.int32) for k in range(10))
    self._cache = None
    images, _ = self._arrays()
    self.num_images = len(images)
    self.description = (f"captioned {self.kind} {split} ({len(self)} records from {self.num_images} "
                        f"images, {size}x{size}, {self.heldout} captions held out)")

  def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
    if self._cache is None:  # loaded on first use in each process, never pickled
      if self.kind == "fashion_mnist":
        self._cache = fashion_mnist.load_fashion_mnist(self.split, self.directory)
      else:
        self._cache = fashion_mnist.load_mnist_subset()
    return self._cache

  def __getstate__(self):
    return dict(self.__dict__, _cache=None)

  def __len__(self) -> int:
    return self.num_images * COLOURINGS_PER_IMAGE

  def record(self, index: int) -> tuple[int, int, int, int, int]:
    """(garment image index, class, colour, background, position) of record `index`."""
    images, labels = self._arrays()
    g = int(index) % self.num_images
    cls = int(labels[g])
    allowed = self.allowed[cls]
    combo = COMBOS[int(allowed[np.random.default_rng((DATA_SEED, int(index))).integers(len(allowed))])]
    return (g, cls) + combo

  def sizes(self) -> np.ndarray:
    return np.full((len(self), 2), self.size, np.int32)

  def __getitem__(self, index: int) -> dict:
    g, cls, colour, bg, pos = self.record(index)
    image = render(self._arrays()[0][g], colour, bg, pos, self.size)
    return {"image": image, "caption": caption(cls, colour, bg, pos, self.class_names),
            "converted": False}


def write_caption_files(out_dir: str, heldout: int = DEFAULT_HELDOUT, path: Optional[str] = None) -> dict:
  """captions.txt (every caption, for the embedding cache) and heldout.txt (the first `heldout`
  held-out captions, for evaluation), with the class names of the data actually present."""
  from pixeldit_jax import fs  # noqa: PLC0415
  kind, _ = fashion_mnist.resolve("fashion_mnist", "train", path)
  names = CLASS_NAMES if kind == "fashion_mnist" else DIGIT_NAMES
  files = {"captions": fs.join(out_dir, "captions.txt"), "heldout": fs.join(out_dir, "heldout.txt")}
  for key, lines in (("captions", all_captions(names)), ("heldout", heldout_captions(heldout, names))):
    fs.write_bytes(files[key], ("\n".join(lines) + "\n").encode("utf-8"))
  return files


def main(argv=None) -> int:
  from pixeldit_jax import cli  # noqa: PLC0415
  ap = cli.ArgumentParser(prog="python -m pixeldit_jax.data.captioned_fmnist",
                          description="Write the captioned Fashion-MNIST caption lists.")
  ap.add_argument("--out", required=True, help="directory for captions.txt and heldout.txt")
  ap.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT)
  ap.add_argument("--path", default=None, help="Fashion-MNIST directory (default: the Debian package)")
  a = ap.parse_args(argv)
  print(write_caption_files(a.out, a.heldout, a.path))
  return 0


if __name__ == "__main__":
  import sys  # noqa: PLC0415
  from pixeldit_jax import cli  # noqa: PLC0415
  sys.exit(cli.guard(main))

"""Which data a run trains on, recorded in every checkpoint so that a resume on other data refuses.

    record(source, data_cfg) -> {"source", "kind", "split", "path", "num_examples", "fingerprint",
                                 "description"}

The fingerprint is a hash of the number of examples and of a few examples themselves (the first
two, the middle one and the last two, as the source returns them: image bytes, shape, label or
caption). It costs five reads, and tells apart the MNIST fallback from Fashion-MNIST, two image
folders, or a folder whose first or last files changed; it does not prove two large data sets
equal. The path is informative only: the same data moved elsewhere has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import numpy as np

# The fields that must agree for a checkpoint to resume on the configured data.
MATCH = ("kind", "split", "num_examples", "fingerprint")


def _positions(n: int) -> list[int]:
  return sorted({i for i in (0, 1, n // 2, n - 2, n - 1) if 0 <= i < n})


def fingerprint(source) -> str:
  n = len(source)
  h = hashlib.sha256(str(n).encode())
  for i in _positions(n):
    try:
      example = source[i]
    except Exception as e:  # noqa: BLE001 - an unreadable example is part of what the data is
      h.update(f"{i}:unreadable:{type(e).__name__}".encode())
      continue
    image = np.ascontiguousarray(example["image"])
    h.update(f"{i}:{image.shape}:{image.dtype}:{example.get('label')}:{example.get('caption')}".encode())
    h.update(image.tobytes())
  return h.hexdigest()[:16]


def record(source, data) -> dict:
  """The data record of a built source and its config.data (JSON-ready)."""
  kind = getattr(source, "kind", None) or data.source  # e.g. the MNIST fallback of 'fashion_mnist'
  path = getattr(source, "directory", None) or getattr(source, "root", None) or data.get("path")
  return {"source": data.source, "kind": kind, "split": data.get("split"),
          "path": None if path is None else str(path), "num_examples": int(len(source)),
          "fingerprint": fingerprint(source), "description": source.description}


def mismatch(saved: Optional[dict], current: Optional[dict]) -> Optional[str]:
  """None when `current` may resume a run that trained on `saved` (also when either is
  unrecorded), else the differing fields, saved against current, in words."""
  if not saved or not current:
    return None
  diff = [k for k in MATCH if saved.get(k) != current.get(k)]
  if not diff:
    return None
  show = lambda r: ", ".join(f"{k} {_short(r.get(k))}" for k in diff)
  return (f"{saved.get('description', saved.get('kind'))} ({show(saved)}), but the config now "
          f"reads {current.get('description', current.get('kind'))} ({show(current)})")


def _short(v: Any) -> str:
  return json.dumps(v)

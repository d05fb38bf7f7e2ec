"""Score a sample batch with the ADM evaluation suite: FID, sFID, Inception Score, precision, recall.

    python -m pixeldit_jax.evaluate --samples samples.npz \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --inception /path/to/pt_inception-2015-12-05-6726825d.pth   # or the converted .npz
        [--batch_size 100] [--metrics fid,sfid,is,precision,recall] [--out metrics.json]

Both .npz files use the layout of OpenAI's guided-diffusion evaluator (spec §5): images in
``arr_0`` as uint8 NHWC RGB (any size; the network resizes to 299x299 itself; single-channel
images are repeated to RGB). A reference batch may also carry precomputed statistics: ``mu`` /
``sigma`` (pool features, FID) and ``mu_s`` / ``sigma_s`` (spatial features, sFID); they are used
when present, otherwise the statistics are computed from its ``arr_0``. Precision and recall
always need the reference images. As in ADM, the Inception Score uses the samples only, in
splits of 5000 (ten splits for 50K samples), and precision/recall use k = 3.

Images are streamed from the .npz in batches (50K ImageNet samples are ~10 GB), the feature
network is jitted once for a fixed batch size (the last batch is padded), and a tqdm bar shows
progress. The results are printed as a table and, with --out, written as JSON. The weights are
never downloaded: see ``pixeldit_jax.evaluation.inception.WEIGHTS_HELP``.
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from typing import Dict, Iterator, Optional, Sequence

import numpy as np

from pixeldit_jax import cli, fs

ALL_METRICS = ("fid", "sfid", "is", "precision", "recall")
_ALIASES = {"inception_score": "is", "isc": "is", "pr": "precision,recall", "all": ",".join(ALL_METRICS)}


# ----------------------------------------------------------------------------- npz streaming


class NpzArrayStream:
  """One array of an .npz read in row batches without loading it whole (plain, uncompressed or
  compressed archives alike); arrays numpy cannot stream (Fortran order, objects) load at once."""

  def __init__(self, path: str, key: str = "arr_0"):
    self.path, self.key = path, key
    with zipfile.ZipFile(path) as zf:
      if f"{key}.npy" not in zf.namelist():
        raise KeyError(f"{path} has no array {key!r} (arrays: "
                       f"{', '.join(n[:-4] for n in zf.namelist() if n.endswith('.npy'))})")
      with zf.open(f"{key}.npy") as f:
        self.shape, self.fortran, self.dtype, self._stream = _read_npy_header(f)

  def __len__(self) -> int:
    return int(self.shape[0])

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if not self._stream:
      with np.load(self.path) as f:
        arr = f[self.key]
      for i in range(0, arr.shape[0], batch_size):
        yield arr[i:i + batch_size]
      return
    row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
      _read_npy_header(f)
      for start in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - start)
        buf = _read_exactly(f, n * row)
        yield np.frombuffer(buf, self.dtype).reshape((n,) + tuple(self.shape[1:]))


def _read_npy_header(f):
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    return None, None, None, False
  return shape, fortran, dtype, not (fortran or dtype.hasobject)


def _read_exactly(f, size: int) -> bytes:
  chunks, got = [], 0
  while got < size:
    chunk = f.read(size - got)
    if not chunk:
      raise ValueError(f"unexpected end of array data ({got} of {size} bytes)")
    chunks.append(chunk)
    got += len(chunk)
  return b"".join(chunks)


def npz_keys(path: str) -> Sequence[str]:
  with zipfile.ZipFile(path) as zf:
    return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def image_batches(stream: NpzArrayStream, batch_size: int) -> Iterator[np.ndarray]:
  """NHWC batches as the network wants them: RGB, uint8 kept, other dtypes as float32 in [0, 255]."""
  for batch in stream.batches(batch_size):
    if batch.ndim == 3:
      batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
      raise ValueError(f"{stream.path}:{stream.key} must be NHWC images with 1 or 3 channels, "
                       f"got a batch of shape {batch.shape}")
    if batch.shape[-1] == 1:
      batch = np.repeat(batch, 3, axis=-1)
    yield batch if batch.dtype == np.uint8 else batch.astype(np.float32)


# ----------------------------------------------------------------------------- evaluation


def parse_metrics(spec: str) -> Sequence[str]:
  names = []
  for part in spec.split(","):
    part = part.strip().lower()
    if not part:
      continue
    for name in _ALIASES.get(part, part).split(","):
      if name not in ALL_METRICS:
        raise ValueError(f"unknown metric {name!r}: choose from {', '.join(ALL_METRICS)}")
      if name not in names:
        names.append(name)
  if not names:
    raise ValueError("no metric requested")
  return names


def _features(extractor, path: str, want: Sequence[str], batch_size: int, desc: str, progress: bool):
  stream = NpzArrayStream(path, "arr_0")
  feats = extractor.extract(image_batches(stream, batch_size), total=len(stream), desc=desc,
                            progress=progress, want=want)
  return feats, len(stream)


def evaluate(samples: str, reference: str, inception: Optional[str], *, batch_size: int = 100,
             metrics: Sequence[str] = ALL_METRICS, is_split_size: int = 5000, pr_k: int = 3,
             pr_batch_size: int = 10000, distance_dtype: str = "float32", fid_method: str = "sqrtm",
             progress: bool = True, model=None, save_sample_stats: Optional[str] = None) -> Dict:
  """Compute `metrics` of the sample batch against the reference batch; returns a JSON-able dict.
  `model` (an InceptionV3 with weights) overrides loading `inception` from disk."""
  from pixeldit_jax.evaluation import inception as inc
  from pixeldit_jax.evaluation import metrics as m

  metrics = list(metrics)
  for path, what in ((samples, "samples"), (reference, "reference")):
    if not fs.isfile(path):
      raise FileNotFoundError(f"{what} file not found: {path!r}")
  names = {"samples": fs.resolve(samples), "reference": fs.resolve(reference),
           "inception": None if inception is None else fs.resolve(inception)}
  # Batches stream from local files: remote ones (gs://) are copied to the cache once.
  samples, reference = fs.local_file(samples), fs.local_file(reference)
  if model is None:
    model = inc.load_inception(inception)  # fails early, before any other work, if missing
  extractor = inc.FeatureExtractor(model, batch_size=batch_size)
  timings = {}

  ref_keys = set(npz_keys(reference))
  need_pr = any(x in metrics for x in ("precision", "recall"))
  ref_stats = {}
  ref_want = []
  if "fid" in metrics:
    if {"mu", "sigma"} <= ref_keys:
      ref_stats["pool"] = "npz"
    else:
      ref_want.append("pool")
  if "sfid" in metrics:
    if {"mu_s", "sigma_s"} <= ref_keys:
      ref_stats["spatial"] = "npz"
    else:
      ref_want.append("spatial")
  if need_pr and "pool" not in ref_want:
    ref_want.append("pool")
  if ref_want and "arr_0" not in ref_keys:
    raise KeyError(f"{reference} has no images (arr_0) to compute {', '.join(ref_want)} features from")

  sample_want = []
  if any(x in metrics for x in ("fid", "precision", "recall")):
    sample_want.append("pool")
  if "sfid" in metrics:
    sample_want.append("spatial")
  if "is" in metrics:
    sample_want.append("logits")
  if save_sample_stats:
    sample_want += [w for w in ("pool", "spatial") if w not in sample_want]

  t0 = time.time()
  ref_feats, num_ref = ({}, None)
  if ref_want:
    ref_feats, num_ref = _features(extractor, reference, ref_want, batch_size, "reference", progress)
  timings["reference_features_s"] = time.time() - t0
  t0 = time.time()
  sample_feats, num_samples = _features(extractor, samples, sample_want, batch_size, "samples", progress)
  timings["sample_features_s"] = time.time() - t0

  t0 = time.time()
  results: Dict[str, float] = {}
  sample_stats = {}
  if "pool" in sample_want:
    sample_stats["mu"], sample_stats["sigma"] = m.feature_statistics(sample_feats["pool"])
  if "spatial" in sample_want:
    sample_stats["mu_s"], sample_stats["sigma_s"] = m.feature_statistics(sample_feats["spatial"])
  if save_sample_stats:
    fs.save_npz(save_sample_stats, **sample_stats)

  def ref_gaussian(kind):
    if ref_stats.get(kind) == "npz":
      suffix = "" if kind == "pool" else "_s"
      with np.load(reference) as f:
        return f["mu" + suffix], f["sigma" + suffix]
    return m.feature_statistics(ref_feats[kind])

  if "is" in metrics:
    results["is"] = m.inception_score(logits=sample_feats["logits"], split_size=is_split_size)
  if "fid" in metrics:
    results["fid"] = m.frechet_distance(sample_stats["mu"], sample_stats["sigma"], *ref_gaussian("pool"),
                                        method=fid_method)
  if "sfid" in metrics:
    results["sfid"] = m.frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"],
                                         *ref_gaussian("spatial"), method=fid_method)
  if need_pr:
    precision, recall = m.precision_recall(ref_feats["pool"], sample_feats["pool"], k=pr_k,
                                           row_batch_size=pr_batch_size, col_batch_size=pr_batch_size,
                                           distance_dtype=distance_dtype)
    if "precision" in metrics:
      results["precision"] = precision
    if "recall" in metrics:
      results["recall"] = recall
  timings["metrics_s"] = time.time() - t0

  return {
      "metrics": {k: float(results[k]) for k in metrics},
      "num_samples": int(num_samples),
      "num_reference_images": None if num_ref is None else int(num_ref),
      "reference_statistics": {k: ("from reference npz" if ref_stats.get(k) == "npz" else "computed")
                               for k, name in (("pool", "fid"), ("spatial", "sfid")) if name in metrics},
      **names,
      "settings": {"batch_size": batch_size, "is_split_size": is_split_size, "pr_k": pr_k,
                   "distance_dtype": distance_dtype, "fid_method": fid_method},
      "timings": {k: round(v, 2) for k, v in timings.items()},
  }


_LABELS = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "Precision",
           "recall": "Recall"}


def format_table(report: Dict) -> str:
  rows = [(_LABELS[k], f"{v:.4f}") for k, v in report["metrics"].items()]
  width = max(len(r[0]) for r in rows)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
  lines += [f"{name:<{width}}  {value}" for name, value in rows]
  ref = report["num_reference_images"]
  lines.append(f"({report['num_samples']} samples"
               + (f", {ref} reference images" if ref is not None else ", reference statistics only") + ")")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(prog="python -m pixeldit_jax.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--samples", required=True, help="sample batch .npz (uint8 NHWC arr_0)")
  parser.add_argument("--reference", required=True,
                      help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s), "
                           "e.g. VIRTUAL_imagenet256_labeled.npz")
  parser.add_argument("--inception", default=None,
                      help="local InceptionV3 weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                           "(needs torch) or its converted .npz (default: $PIXELDIT_INCEPTION_WEIGHTS)")
  parser.add_argument("--batch_size", type=int, default=100, help="images per Inception forward")
  parser.add_argument("--metrics", default=",".join(ALL_METRICS),
                      help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
  parser.add_argument("--out", default=None, help="write the report as JSON here")
  parser.add_argument("--is_split_size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
  parser.add_argument("--pr_k", type=int, default=3, help="k of the k-NN manifolds (ADM: 3)")
  parser.add_argument("--pr_batch_size", type=int, default=10000, help="distance block size (ADM: 10000)")
  parser.add_argument("--distance_dtype", default="float32", choices=("float32", "float16"),
                      help="precision/recall distances; float16 emulates ADM's float16 blocks")
  parser.add_argument("--fid_method", default="sqrtm", choices=("sqrtm", "eigh"),
                      help="matrix square root: scipy sqrtm as ADM (default) or symmetric eigh")
  parser.add_argument("--save_sample_stats", default=None,
                      help="also write the samples' mu, sigma, mu_s, sigma_s to this .npz")
  parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
  args = parser.parse_args(argv)

  from pixeldit_jax.evaluation.inception import InceptionWeightsError, InceptionWeightsNotFound

  try:
    metrics = parse_metrics(args.metrics)
    report = evaluate(args.samples, args.reference, args.inception, batch_size=args.batch_size,
                      metrics=metrics, is_split_size=args.is_split_size, pr_k=args.pr_k,
                      pr_batch_size=args.pr_batch_size, distance_dtype=args.distance_dtype,
                      fid_method=args.fid_method, progress=not args.no_progress,
                      save_sample_stats=args.save_sample_stats)
  except (InceptionWeightsNotFound, InceptionWeightsError, FileNotFoundError, KeyError, ValueError,
          ImportError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
    print(f"error: {msg}", file=sys.stderr)
    return 2
  print(format_table(report))
  if args.out:
    fs.write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.guard(main))

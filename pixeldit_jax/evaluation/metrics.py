"""The math of the ADM evaluation suite: Fréchet distance, Inception Score, precision / recall.

Everything here works on feature arrays and knows nothing about the network that made them
(``pixeldit_jax.evaluation.inception`` makes them). The conventions follow the evaluator of
OpenAI's guided-diffusion (``evaluations/evaluator.py``), which is what PixelDiT and the other
ImageNet papers report (spec §5):

* **Statistics**: ``mu`` = feature mean, ``sigma`` = ``np.cov(features, rowvar=False)`` (unbiased,
  N - 1), both float64.
* **Fréchet distance** ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The default
  ``method="sqrtm"`` takes ``scipy.linalg.sqrtm`` of the (non-symmetric) product as ADM does, retries
  with ``eps`` added to both diagonals when the result is not finite, drops a negligible imaginary
  part and raises when it is not negligible. ``method="eigh"`` uses the identity
  ``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` for symmetric PSD matrices: two
  symmetric eigendecompositions, no complex arithmetic, several times faster at 2048 dims.
* **Inception Score**: softmax of the 1008-way logits, consecutive splits of ``split_size = 5000``
  samples (ten splits for 50K samples), ``exp(mean_i KL(p(y|x_i) || p(y)))`` per split, and the
  mean over splits. (ADM's logits are ``pool3 @ W`` without the bias: see ``inception.py``.)
* **Precision / recall** (Kynkäänniemi et al. 2019, as ADM runs it): squared Euclidean
  distances; the manifold of a set is the union of balls around its points whose radius is the
  distance to the k-th nearest neighbour (k = 3, the point itself not counted); precision = the
  fraction of samples inside the reference manifold, recall = the fraction of reference points
  inside the sample manifold; a point on a ball's boundary is inside (``<=``). Distances are
  computed block by block (``row_batch_size`` x ``col_batch_size``, 10000 x 10000 as in ADM), and
  the k-NN search keeps only the k + 1 smallest distances per row between column blocks, so no
  N x N (nor, unlike ADM, any rows x N) matrix is ever held. ADM computes the distance blocks in
  float16 and falls back to float32 when a block overflows; ``distance_dtype="float16"`` emulates
  that, the default is float32.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- Fréchet distance


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> (mu (D,), sigma (D, D)) in float64, the unbiased covariance as in ADM."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError("at least 2 feature vectors are needed for a covariance")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  s1h = _sym_sqrt(sigma1)
  m = s1h @ sigma2 @ s1h
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  from scipy import linalg  # scipy ships with jax (a declared dependency of jax)

  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"Fréchet distance: singular product, adding {eps} to the covariance diagonals")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means {mu1.shape}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"unknown method {method!r}: use 'sqrtm' or 'eigh'")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(feats1: np.ndarray, feats2: np.ndarray, **kwargs) -> float:
  return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2), **kwargs)


# ----------------------------------------------------------------------------- Inception Score


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def inception_score_splits(*, logits: Optional[np.ndarray] = None, probs: Optional[np.ndarray] = None,
                           split_size: int = 5000) -> np.ndarray:
  """Per-split scores over consecutive chunks of `split_size` rows (the last may be shorter)."""
  if (logits is None) == (probs is None):
    raise ValueError("pass exactly one of logits= or probs=")
  p = softmax(logits) if logits is not None else np.asarray(probs, np.float64)
  if p.ndim != 2 or p.shape[0] == 0:
    raise ValueError(f"expected (N, classes) predictions, got shape {p.shape}")
  scores = []
  for i in range(0, p.shape[0], split_size):
    part = p[i:i + split_size]
    marginal = part.mean(axis=0, keepdims=True)
    # p log(p / p_y) with 0 log 0 = 0 (ADM's formula gives NaN for an exact zero probability).
    safe = np.where(part > 0, part, 1.0)
    kl = np.where(part > 0, part * (np.log(safe) - np.log(np.where(marginal > 0, marginal, 1.0))), 0.0)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return np.asarray(scores)


def inception_score(*, logits: Optional[np.ndarray] = None, probs: Optional[np.ndarray] = None,
                    split_size: int = 5000) -> float:
  """Mean over splits of exp(E_x KL(p(y|x) || p(y))), as ADM reports it."""
  return float(np.mean(inception_score_splits(logits=logits, probs=probs, split_size=split_size)))


# ----------------------------------------------------------------------------- precision / recall


def _sq_dist(u, v, dtype):
  u, v = u.astype(dtype), v.astype(dtype)
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu - 2 * uv + nv, 0).astype(jnp.float32)


def _block_distances(u, v, fp16: bool):
  """Squared distances (rows of u) x (rows of v) in float32; ADM's float16 path when `fp16`."""
  if not fp16:
    return _sq_dist(u, v, jnp.float32)
  d16 = _sq_dist(u, v, jnp.float16)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16, lambda: _sq_dist(u, v, jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "fp16"))
def _knn_block(u, v, *, k: int, fp16: bool):
  d = _block_distances(u, v, fp16)
  return -jax.lax.top_k(-d, min(k, d.shape[1]))[0]


@functools.partial(jax.jit, static_argnames=("fp16",))
def _pr_block(u, ru, v, rv, *, fp16: bool):
  d = _block_distances(u, v, fp16)
  u_in_v = jnp.any(d <= rv[None, :], axis=1)  # row point inside some ball of the column set
  v_in_u = jnp.any(d <= ru[:, None], axis=0)  # column point inside some ball of the row set
  return u_in_v, v_in_u


def _fp16(distance_dtype: str) -> bool:
  if distance_dtype not in ("float32", "float16"):
    raise ValueError(f"distance_dtype must be 'float32' or 'float16', got {distance_dtype!r}")
  return distance_dtype == "float16"


def manifold_radii(features: np.ndarray, *, k: int = 3, row_batch_size: int = 10000,
                   col_batch_size: int = 10000, distance_dtype: str = "float32") -> np.ndarray:
  """(N,) float32: squared distance from each point to its k-th nearest neighbour (self excluded:
  the self-distance 0 is the 0-th smallest, the radius is the k-th smallest counting from 0)."""
  features = np.asarray(features, np.float32)
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"need more than k={k} feature vectors for the k-NN manifold, got {n}")
  fp16 = _fp16(distance_dtype)
  radii = np.zeros([n], np.float32)
  for r0 in range(0, n, row_batch_size):
    rows = features[r0:r0 + row_batch_size]
    best = np.full([rows.shape[0], 0], np.inf, np.float32)
    for c0 in range(0, n, col_batch_size):
      cand = np.asarray(_knn_block(rows, features[c0:c0 + col_batch_size], k=k + 1, fp16=fp16))
      best = np.concatenate([best, cand], axis=1)
      if best.shape[1] > k + 1:
        best = np.partition(best, k, axis=1)[:, :k + 1]
    radii[r0:r0 + rows.shape[0]] = np.partition(best, k, axis=1)[:, k]
  return radii


def manifold_membership(features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray,
                        radii_2: np.ndarray, *, row_batch_size: int = 10000, col_batch_size: int = 10000,
                        distance_dtype: str = "float32") -> Tuple[np.ndarray, np.ndarray]:
  """(in_2, in_1): for each point of set 1 whether it lies in set 2's manifold, and vice versa."""
  fp16 = _fp16(distance_dtype)
  f1, f2 = np.asarray(features_1, np.float32), np.asarray(features_2, np.float32)
  r1, r2 = np.asarray(radii_1, np.float32).reshape(-1), np.asarray(radii_2, np.float32).reshape(-1)
  in_2 = np.zeros([f1.shape[0]], bool)
  in_1 = np.zeros([f2.shape[0]], bool)
  for a in range(0, f1.shape[0], row_batch_size):
    for b in range(0, f2.shape[0], col_batch_size):
      u_in, v_in = _pr_block(f1[a:a + row_batch_size], r1[a:a + row_batch_size],
                             f2[b:b + col_batch_size], r2[b:b + col_batch_size], fp16=fp16)
      in_2[a:a + row_batch_size] |= np.asarray(u_in)
      in_1[b:b + col_batch_size] |= np.asarray(v_in)
  return in_2, in_1


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, *, k: int = 3,
                     row_batch_size: int = 10000, col_batch_size: int = 10000,
                     distance_dtype: str = "float32") -> Tuple[float, float]:
  """(precision, recall) of samples against the reference set, ADM's ManifoldEstimator(k=3)."""
  kw = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, distance_dtype=distance_dtype)
  ref_radii = manifold_radii(ref_features, k=k, **kw)
  sample_radii = manifold_radii(sample_features, k=k, **kw)
  ref_in_samples, samples_in_ref = manifold_membership(
      ref_features, ref_radii, sample_features, sample_radii, **kw)
  return float(samples_in_ref.mean()), float(ref_in_samples.mean())

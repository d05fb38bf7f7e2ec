"""ADM-style evaluation suite: metric math against closed forms, the FID InceptionV3's plumbing
with random weights (no pretrained weights exist offline), its weight loaders, and the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import timeout
from pixeldit_jax import evaluate as ev
from pixeldit_jax.evaluation import inception as inc
from pixeldit_jax.evaluation import metrics as m

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _spd(rng, d, scale=1.0):
  a = rng.standard_normal((d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _rotation(rng, d):
  q, r = np.linalg.qr(rng.standard_normal((d, d)))
  return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_equal_covariances_is_squared_mean_distance(method):
  rng = np.random.default_rng(0)
  sigma = _spd(rng, 12)
  mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
  got = m.frechet_distance(mu1, sigma, mu2, sigma, method=method)
  assert got == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-8, abs=1e-8)
  assert m.frechet_distance(mu1, sigma, mu1, sigma, method=method) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_diagonal_covariances_closed_form(method):
  rng = np.random.default_rng(1)
  a, b = rng.uniform(0.1, 3.0, 9), rng.uniform(0.1, 3.0, 9)
  mu1, mu2 = rng.standard_normal(9), rng.standard_normal(9)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = m.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
  assert got == pytest.approx(want, rel=1e-9)


def test_frechet_rotation_invariant_and_methods_agree():
  rng = np.random.default_rng(2)
  d = 16
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _spd(rng, d), _spd(rng, d, scale=2.0)
  base = m.frechet_distance(mu1, s1, mu2, s2)
  q = _rotation(rng, d)
  rotated = m.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
  assert rotated == pytest.approx(base, rel=1e-8)
  assert m.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(base, rel=1e-8)
  assert m.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(base, rel=1e-8)  # symmetric
  assert base > 0


def test_feature_statistics_and_distance_from_features():
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((300, 5)), 2 + rng.standard_normal((200, 5))
  mu, sigma = m.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))  # unbiased, as ADM
  assert m.frechet_distance_from_features(x, y) == pytest.approx(
      m.frechet_distance(mu, sigma, *m.feature_statistics(y)))
  with pytest.raises(ValueError):
    m.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_uniform_predictions_is_one():
  assert m.inception_score(logits=np.zeros((40, 1008))) == pytest.approx(1.0)
  assert m.inception_score(probs=np.full((10, 4), 0.25)) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_inception_score_confident_equally_used_classes_is_k(k):
  n = 20 * k
  logits = np.full((n, 1008), -40.0)
  logits[np.arange(n), np.arange(n) % k] = 40.0
  assert m.inception_score(logits=logits) == pytest.approx(k, rel=1e-6)
  probs = np.zeros((n, k))
  probs[np.arange(n), np.arange(n) % k] = 1.0  # exact zeros: 0 log 0 = 0, no NaN
  assert m.inception_score(probs=probs) == pytest.approx(k)


def test_inception_score_splits_are_consecutive_chunks():
  # First chunk: 4 classes used equally (IS 4); second chunk: all the same class (IS 1).
  probs = np.zeros((16, 10))
  probs[np.arange(8), np.arange(8) % 4] = 1.0
  probs[8:, 0] = 1.0
  np.testing.assert_allclose(m.inception_score_splits(probs=probs, split_size=8), [4.0, 1.0])
  assert m.inception_score(probs=probs, split_size=8) == pytest.approx(2.5)
  # One split of 16: p(y) = (10, 2, 2, 2) / 16, so KL = log(16/10) for 10 rows and log 8 for 6.
  want = math.exp(10 / 16 * math.log(1.6) + 6 / 16 * math.log(8))
  assert m.inception_score(probs=probs, split_size=16) == pytest.approx(want)
  with pytest.raises(ValueError):
    m.inception_score(probs=probs, logits=probs)


# ----------------------------------------------------------------------------- precision / recall


def _brute_radii(x, k):
  d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  return np.sort(d, axis=1)[:, k]


def test_manifold_radii_batched_match_brute_force():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((37, 6)).astype(np.float32)
  want = _brute_radii(x.astype(np.float64), 3)
  for rb, cb in ((10000, 10000), (7, 5), (1, 2), (37, 1)):
    got = m.manifold_radii(x, k=3, row_batch_size=rb, col_batch_size=cb)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_precision_recall_identical_sets():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((60, 8)).astype(np.float32)
  assert m.precision_recall(x, x.copy(), row_batch_size=16, col_batch_size=9) == (1.0, 1.0)


@pytest.mark.parametrize("distance_dtype", ["float32", "float16"])
def test_precision_recall_disjoint_far_clusters(distance_dtype):
  rng = np.random.default_rng(6)
  ref = rng.standard_normal((50, 8)).astype(np.float32)
  samples = (rng.standard_normal((40, 8)) + 30.0).astype(np.float32)
  assert m.precision_recall(ref, samples, row_batch_size=13, col_batch_size=11,
                            distance_dtype=distance_dtype) == (0.0, 0.0)


def test_precision_recall_subset_and_batching_invariance():
  rng = np.random.default_rng(7)
  ref = rng.standard_normal((200, 8)).astype(np.float32)
  samples = ref[:50].copy()
  precision, recall = m.precision_recall(ref, samples)
  assert precision == 1.0
  assert 0.25 <= recall < 1.0  # the 50 shared points are covered, most of the others are not
  assert m.precision_recall(ref, samples, row_batch_size=17, col_batch_size=23) == (precision, recall)
  # Brute-force reference implementation of the same definition.
  d = ((samples[:, None].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
  rr, rs = _brute_radii(ref.astype(np.float64), 3), _brute_radii(samples.astype(np.float64), 3)
  assert recall == pytest.approx(np.mean(np.any(d <= rs[:, None], axis=0)))
  assert precision == pytest.approx(np.mean(np.any(d <= rr[None, :], axis=1)))


def test_precision_recall_needs_more_than_k_points():
  with pytest.raises(ValueError, match="more than k"):
    m.manifold_radii(np.zeros((3, 4), np.float32), k=3)


# ----------------------------------------------------------------------------- network pieces


def _tf1_resize_reference(img, oh, ow):
  """Per-pixel TF 1.x ResizeBilinear(align_corners=False) in float64, written independently."""
  ih, iw = img.shape[:2]
  out = np.zeros((oh, ow) + img.shape[2:])
  for y in range(oh):
    sy = y * (ih / oh)
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, ih - 1); fy = sy - y0
    for x in range(ow):
      sx = x * (iw / ow)
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, iw - 1); fx = sx - x0
      top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
      bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
      out[y, x] = top + (bottom - top) * fy
  return out


@pytest.mark.parametrize("shape,out", [((5, 7), (11, 4)), ((13, 9), (6, 6)), ((3, 3), (8, 8))])
def test_resize_bilinear_tf1_matches_formula(shape, out):
  rng = np.random.default_rng(8)
  img = rng.uniform(0, 255, (2,) + shape + (3,)).astype(np.float32)
  got = np.asarray(inc.resize_bilinear_tf1(img, *out))
  for i in range(2):
    np.testing.assert_allclose(got[i], _tf1_resize_reference(img[i].astype(np.float64), *out), atol=1e-3)


def test_resize_identity_constant_and_preprocess_range():
  rng = np.random.default_rng(9)
  img = rng.uniform(0, 255, (1, 6, 6, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(inc.resize_bilinear_tf1(img, 6, 6)), img)
  const = np.full((1, 17, 23, 3), 77.0, np.float32)
  np.testing.assert_allclose(np.asarray(inc.resize_bilinear_tf1(const, 299, 299)), 77.0)
  x = np.asarray(inc.preprocess(np.array([0, 128, 255], np.uint8).reshape(1, 1, 1, 3)))
  assert x.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(x[0, 0, 0], [-1.0, 0.0, 127 / 128])


def test_average_pool_excludes_padding_and_max_pool_pads_with_minus_inf():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  avg = np.asarray(inc._avg_pool_3x3_same(x))[0, ..., 0]
  assert avg[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))  # 4 real pixels, padding not counted
  assert avg[1, 1] == pytest.approx(np.mean(x[0, :3, :3, 0]))
  mx = np.asarray(inc._max_pool(-x - 1, 1, pad=1))[0, ..., 0]
  assert mx[0, 0] == -1.0  # not 0 from the padding


# ----------------------------------------------------------------------------- pytorch-fid layout


def _pytorch_fid_shapes():
  """Every tensor of pytorch-fid's FID Inception (torchvision Inception3 with num_classes=1008,
  aux_logits=False and the FIDInception blocks), restated from the torchvision architecture."""
  convs = []  # (module, in, out, kh, kw)

  def conv(name, cin, cout, k):
    kh, kw = (k, k) if isinstance(k, int) else k
    convs.append((name, cin, cout, kh, kw))

  conv("Conv2d_1a_3x3", 3, 32, 3); conv("Conv2d_2a_3x3", 32, 32, 3); conv("Conv2d_2b_3x3", 32, 64, 3)
  conv("Conv2d_3b_1x1", 64, 80, 1); conv("Conv2d_4a_3x3", 80, 192, 3)
  for blk, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    conv(f"{blk}.branch1x1", cin, 64, 1)
    conv(f"{blk}.branch5x5_1", cin, 48, 1); conv(f"{blk}.branch5x5_2", 48, 64, 5)
    conv(f"{blk}.branch3x3dbl_1", cin, 64, 1); conv(f"{blk}.branch3x3dbl_2", 64, 96, 3)
    conv(f"{blk}.branch3x3dbl_3", 96, 96, 3); conv(f"{blk}.branch_pool", cin, pool, 1)
  conv("Mixed_6a.branch3x3", 288, 384, 3); conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
  conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3); conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
  for blk, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    conv(f"{blk}.branch1x1", 768, 192, 1)
    conv(f"{blk}.branch7x7_1", 768, c7, 1); conv(f"{blk}.branch7x7_2", c7, c7, (1, 7))
    conv(f"{blk}.branch7x7_3", c7, 192, (7, 1))
    conv(f"{blk}.branch7x7dbl_1", 768, c7, 1); conv(f"{blk}.branch7x7dbl_2", c7, c7, (7, 1))
    conv(f"{blk}.branch7x7dbl_3", c7, c7, (1, 7)); conv(f"{blk}.branch7x7dbl_4", c7, c7, (7, 1))
    conv(f"{blk}.branch7x7dbl_5", c7, 192, (1, 7)); conv(f"{blk}.branch_pool", 768, 192, 1)
  conv("Mixed_7a.branch3x3_1", 768, 192, 1); conv("Mixed_7a.branch3x3_2", 192, 320, 3)
  conv("Mixed_7a.branch7x7x3_1", 768, 192, 1); conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7))
  conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)); conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
  for blk, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    conv(f"{blk}.branch1x1", cin, 320, 1)
    conv(f"{blk}.branch3x3_1", cin, 384, 1); conv(f"{blk}.branch3x3_2a", 384, 384, (1, 3))
    conv(f"{blk}.branch3x3_2b", 384, 384, (3, 1))
    conv(f"{blk}.branch3x3dbl_1", cin, 448, 1); conv(f"{blk}.branch3x3dbl_2", 448, 384, 3)
    conv(f"{blk}.branch3x3dbl_3a", 384, 384, (1, 3)); conv(f"{blk}.branch3x3dbl_3b", 384, 384, (3, 1))
    conv(f"{blk}.branch_pool", cin, 192, 1)
  shapes = {}
  for name, cin, cout, kh, kw in convs:
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{leaf}"] = (cout,)
  shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
  return shapes


def _random_state_dict(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: (rng.uniform(0.5, 1.5, s) if k.endswith("running_var") else 0.05 * rng.standard_normal(s))
          .astype(np.float32) for k, s in shapes.items()}


def test_state_dict_layout_matches_pytorch_fid():
  shapes = _pytorch_fid_shapes()
  assert inc.expected_shapes() == shapes
  # torchvision's inception_v3 has 27,161,264 parameters (aux head, 1000 classes); without the aux
  # head (3,326,696) and with 1008 classes (+8 x 2049) the FID network has 23,850,960.
  trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
  assert trainable == 27_161_264 - 3_326_696 + 8 * 2049 == 23_850_960


def test_pytorch_fid_state_dict_loads_with_every_key_used():
  shapes = _pytorch_fid_shapes()
  sd = _random_state_dict(shapes, seed=10)
  with_counters = dict(sd, **{k.replace("running_mean", "num_batches_tracked"): np.array(0)
                              for k in sd if k.endswith("running_mean")})
  model = inc.load_state_dict(inc.abstract_inception(), with_counters)
  back = inc.state_dict(model)
  assert back.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # Layout: torch (O, I, kh, kw) conv weights become (kh, kw, I, O) kernels; fc is transposed.
  np.testing.assert_array_equal(np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel[...]),
                                sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), sd["fc.weight"].T)


def test_load_state_dict_reports_missing_unexpected_and_misshaped():
  sd = _random_state_dict(_pytorch_fid_shapes(), seed=11)
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  sd["fc.bias"] = np.zeros((1000,), np.float32)
  with pytest.raises(inc.InceptionWeightsError) as info:
    inc.load_state_dict(inc.abstract_inception(), sd)
  msg = str(info.value)
  assert "1 missing: Mixed_7c.branch_pool.bn.running_var" in msg
  assert "1 unexpected: AuxLogits.fc.weight" in msg
  assert "fc.bias: file (1000,), model expects (1008,)" in msg


def test_missing_weights_file_gives_clear_error(tmp_path, monkeypatch):
  monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
  with pytest.raises(inc.InceptionWeightsNotFound) as info:
    inc.load_inception(str(tmp_path / "nope.pth"))
  msg = str(info.value)
  assert "nope.pth" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
  assert "--inception" in msg and "mseitzer/pytorch-fid" in msg and "--convert" in msg
  with pytest.raises(inc.InceptionWeightsNotFound, match="no InceptionV3 weights file was given"):
    inc.load_inception(None)
  assert isinstance(info.value, FileNotFoundError)


# ----------------------------------------------------------------------------- forward with random weights

IMG = 32  # small stored images; the network resizes to 299 itself


@pytest.fixture(scope="module")
def random_net(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "random_inception.npz")
  inc.save_npz(inc.random_weights(0), path)
  model = inc.load_inception(path)
  images = np.random.default_rng(12).integers(0, 256, (2, IMG, IMG, 3), dtype=np.uint8)
  extractor = inc.FeatureExtractor(model, batch_size=2)
  return dict(path=path, model=model, extractor=extractor, images=images, out=extractor(images))


def test_inception_outputs_shapes_and_values(random_net):
  out = random_net["out"]
  assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023) and out.logits.shape == (2, 1008)
  for o in out:
    assert o.dtype == np.float32 and np.all(np.isfinite(o))
  assert np.all(out.pool >= 0) and np.all(out.spatial >= 0)  # after ReLU / max pooling
  assert not np.allclose(out.pool[0], out.pool[1])  # different images, different features
  # ADM's IS logits: pool @ W without the classifier bias.
  w = inc.random_weights(0)["fc.weight"]
  np.testing.assert_allclose(out.logits, out.pool @ w.T, rtol=1e-4, atol=1e-3)


def test_inception_deterministic_jit_and_padding(random_net):
  ext, images, out = random_net["extractor"], random_net["images"], random_net["out"]
  again = ext(images)
  for a, b in zip(out, again):
    np.testing.assert_array_equal(a, b)
  single = ext(images[1:])  # padded to the batch size: same compiled program
  for a, b in zip(out, single):
    np.testing.assert_allclose(b[0], a[1], rtol=1e-5, atol=1e-5)
  assert inc._forward._cache_size() >= 1


def test_spatial_features_are_mixed_6d_branch1x1(random_net):
  import jax
  model, images = random_net["model"], random_net["images"]

  @jax.jit
  def branch(x):
    x = inc.preprocess(x)
    x = model.Conv2d_2b_3x3(model.Conv2d_2a_3x3(model.Conv2d_1a_3x3(x)))
    x = model.Conv2d_4a_3x3(model.Conv2d_3b_1x1(inc._max_pool(x, 2)))
    x = model.Mixed_5d(model.Mixed_5c(model.Mixed_5b(inc._max_pool(x, 2))))
    x = model.Mixed_6c(model.Mixed_6b(model.Mixed_6a(x)))
    return model.Mixed_6d.branch1x1(x)

  b = np.asarray(branch(images))
  assert b.shape == (2, 17, 17, 192)
  np.testing.assert_allclose(random_net["out"].spatial, b[..., :7].reshape(2, -1), rtol=1e-4, atol=1e-4)


def _torch_fid_inception(sd, x):
  """pytorch-fid's FID Inception as a functional torch program over a state dict (NCHW input in
  [-1, 1], already 299x299): an independent formulation to check the Flax network against."""
  import torch
  import torch.nn.functional as F

  def cbr(name, x, stride=1, padding=0):
    x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                     sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], training=False, eps=1e-3)
    return F.relu(x)

  def avg(x):  # TF SAME average pool: padding not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def block_a(n, x):
    b5 = cbr(f"{n}.branch5x5_2", cbr(f"{n}.branch5x5_1", x), padding=2)
    bd = cbr(f"{n}.branch3x3dbl_1", x)
    bd = cbr(f"{n}.branch3x3dbl_3", cbr(f"{n}.branch3x3dbl_2", bd, padding=1), padding=1)
    return torch.cat([cbr(f"{n}.branch1x1", x), b5, bd, cbr(f"{n}.branch_pool", avg(x))], 1)

  def block_c(n, x):
    h, v = (0, 3), (3, 0)
    b1 = cbr(f"{n}.branch1x1", x)
    b7 = cbr(f"{n}.branch7x7_3", cbr(f"{n}.branch7x7_2", cbr(f"{n}.branch7x7_1", x), padding=h), padding=v)
    bd = cbr(f"{n}.branch7x7dbl_1", x)
    for i, pad in ((2, v), (3, h), (4, v), (5, h)):
      bd = cbr(f"{n}.branch7x7dbl_{i}", bd, padding=pad)
    return torch.cat([b1, b7, bd, cbr(f"{n}.branch_pool", avg(x))], 1), b1

  def block_e(n, x, pool):
    b3 = cbr(f"{n}.branch3x3_1", x)
    b3 = torch.cat([cbr(f"{n}.branch3x3_2a", b3, padding=(0, 1)), cbr(f"{n}.branch3x3_2b", b3, padding=(1, 0))], 1)
    bd = cbr(f"{n}.branch3x3dbl_2", cbr(f"{n}.branch3x3dbl_1", x), padding=1)
    bd = torch.cat([cbr(f"{n}.branch3x3dbl_3a", bd, padding=(0, 1)), cbr(f"{n}.branch3x3dbl_3b", bd, padding=(1, 0))], 1)
    pooled = avg(x) if pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([cbr(f"{n}.branch1x1", x), b3, bd, cbr(f"{n}.branch_pool", pooled)], 1)

  x = cbr("Conv2d_1a_3x3", x, stride=2)
  x = cbr("Conv2d_2b_3x3", cbr("Conv2d_2a_3x3", x), padding=1)
  x = F.max_pool2d(x, 3, stride=2)
  x = F.max_pool2d(cbr("Conv2d_4a_3x3", cbr("Conv2d_3b_1x1", x)), 3, stride=2)
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(n, x)
  bd = cbr("Mixed_6a.branch3x3dbl_2", cbr("Mixed_6a.branch3x3dbl_1", x), padding=1)
  x = torch.cat([cbr("Mixed_6a.branch3x3", x, stride=2), cbr("Mixed_6a.branch3x3dbl_3", bd, stride=2),
                 F.max_pool2d(x, 3, stride=2)], 1)
  spatial = None
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x, b1 = block_c(n, x)
    if n == "Mixed_6d":
      spatial = b1
  b3 = cbr("Mixed_7a.branch3x3_2", cbr("Mixed_7a.branch3x3_1", x), stride=2)
  b7 = cbr("Mixed_7a.branch7x7x3_1", x)
  b7 = cbr("Mixed_7a.branch7x7x3_3", cbr("Mixed_7a.branch7x7x3_2", b7, padding=(0, 3)), padding=(3, 0))
  x = torch.cat([b3, cbr("Mixed_7a.branch7x7x3_4", b7, stride=2), F.max_pool2d(x, 3, stride=2)], 1)
  x = block_e("Mixed_7c", block_e("Mixed_7b", x, "avg"), "max")
  pool = x.mean(dim=(2, 3))
  spatial = spatial.permute(0, 2, 3, 1)[..., :7].reshape(x.shape[0], -1)
  return pool, spatial, pool @ sd["fc.weight"].T


def test_flax_network_matches_torch_formulation(random_net):
  torch = pytest.importorskip("torch")
  sd = {k: torch.from_numpy(v) for k, v in inc.random_weights(0).items()}
  x = np.asarray(inc.preprocess(random_net["images"])).transpose(0, 3, 1, 2)
  with torch.no_grad():
    want = [t.numpy() for t in _torch_fid_inception(sd, torch.from_numpy(np.ascontiguousarray(x)))]
  for name, got, ref in zip(("pool", "spatial", "logits"), random_net["out"], want):
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * scale, err_msg=name)


def test_npz_round_trip(random_net, tmp_path):
  back = inc.read_weights(random_net["path"])
  want = inc.random_weights(0)
  assert back.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(back[k], want[k])
  copy = str(tmp_path / "copy.npz")
  inc.save_npz(inc.state_dict(random_net["model"]), copy)
  again = inc.FeatureExtractor(inc.load_inception(copy), batch_size=2)(random_net["images"])
  for a, b in zip(random_net["out"], again):
    np.testing.assert_array_equal(a, b)


def test_torch_pth_path_and_converter(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _random_state_dict(_pytorch_fid_shapes(), seed=13)
  tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
  tsd.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(0, dtype=torch.long)
              for k in sd if k.endswith("running_mean")})
  pth = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  torch.save(tsd, pth)
  back = inc.state_dict(inc.load_inception(pth))
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  npz = str(tmp_path / "converted.npz")
  assert inc.main(["--convert", pth, "--out", npz]) == 0
  converted = inc.read_weights(npz)
  assert converted.keys() == sd.keys()  # num_batches_tracked dropped
  for k in sd:
    np.testing.assert_array_equal(converted[k], sd[k])
  assert inc.main(["--check", npz]) == 0


# ----------------------------------------------------------------------------- npz streaming and CLI


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_stream_batches(tmp_path, compressed):
  arr = np.random.default_rng(14).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
  path = str(tmp_path / "a.npz")
  (np.savez_compressed if compressed else np.savez)(path, arr_0=arr, other=np.zeros(3))
  stream = ev.NpzArrayStream(path)
  assert len(stream) == 7
  parts = list(stream.batches(3))
  assert [p.shape[0] for p in parts] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(parts), arr)
  with pytest.raises(KeyError, match="arr_1"):
    ev.NpzArrayStream(path, "arr_1")
  gray = str(tmp_path / "gray.npz")
  np.savez(gray, arr_0=arr[..., 0])
  batch = next(ev.image_batches(ev.NpzArrayStream(gray), 4))
  assert batch.shape == (4, 4, 5, 3) and batch.dtype == np.uint8


def test_parse_metrics():
  assert ev.parse_metrics("fid,is") == ["fid", "is"]
  assert ev.parse_metrics("all") == list(ev.ALL_METRICS)
  assert ev.parse_metrics("pr, fid") == ["precision", "recall", "fid"]
  with pytest.raises(ValueError, match="unknown metric"):
    ev.parse_metrics("kid")


def test_evaluate_cli_end_to_end(random_net, tmp_path, capsys):
  rng = np.random.default_rng(15)
  samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
  sample_images = rng.integers(0, 256, (6, IMG, IMG, 3), dtype=np.uint8)
  ref_images = rng.integers(0, 256, (8, IMG, IMG, 3), dtype=np.uint8)
  np.savez(samples, arr_0=sample_images)
  np.savez(ref, arr_0=ref_images)
  # Each 2048-dim Fréchet distance costs seconds on 2 cores: this test computes three.
  common = ["--inception", random_net["path"], "--batch_size", "2", "--fid_method", "eigh", "--no_progress"]

  # 1. Statistics of the reference images, written by a run that scores them as samples.
  stats = str(tmp_path / "ref_stats.npz")
  assert ev.main(["--samples", ref, "--reference", ref, "--metrics", "is", "--save_sample_stats", stats]
                 + common) == 0
  with np.load(stats) as f:
    ref_stats = {k: f[k] for k in f.files}
  assert ref_stats["mu"].shape == (2048,) and ref_stats["sigma"].shape == (2048, 2048)
  assert ref_stats["mu_s"].shape == (2023,) and ref_stats["sigma_s"].shape == (2023, 2023)

  # 2. All five metrics against a reference with images and the pool statistics only (ADM layout):
  #    FID from the stored mu/sigma, sFID and precision/recall from the images.
  ref_mixed = str(tmp_path / "ref_mixed.npz")
  np.savez(ref_mixed, arr_0=ref_images, mu=ref_stats["mu"], sigma=ref_stats["sigma"])
  out = str(tmp_path / "metrics.json")
  capsys.readouterr()
  assert ev.main(["--samples", samples, "--reference", ref_mixed, "--out", out] + common) == 0
  table = capsys.readouterr().out
  for label in ("FID", "sFID", "Inception Score", "Precision", "Recall"):
    assert label in table
  report = json.load(open(out))
  got = report["metrics"]
  assert list(got) == list(ev.ALL_METRICS)
  assert all(np.isfinite(v) for v in got.values())
  assert got["fid"] > 0 and got["sfid"] > 0 and got["is"] >= 1.0
  assert 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1
  assert report["num_samples"] == 6 and report["num_reference_images"] == 8
  assert report["reference_statistics"] == {"pool": "from reference npz", "spatial": "computed"}
  # IS and precision/recall by hand from the same features.
  out_s = [random_net["extractor"](sample_images[i:i + 2]) for i in range(0, 6, 2)]
  out_r = [random_net["extractor"](ref_images[i:i + 2]) for i in range(0, 8, 2)]
  s_pool, r_pool = np.concatenate([o.pool for o in out_s]), np.concatenate([o.pool for o in out_r])
  logits = np.concatenate([o.logits for o in out_s])
  assert got["is"] == pytest.approx(m.inception_score(logits=logits), rel=1e-5)
  assert (got["precision"], got["recall"]) == pytest.approx(m.precision_recall(r_pool, s_pool))
  np.testing.assert_allclose(ref_stats["mu"], r_pool.mean(0), rtol=1e-5, atol=1e-6)

  # 3. Statistics only, no images: the stored mu_s/sigma_s of the same images give the same sFID.
  out2 = str(tmp_path / "subset.json")
  assert ev.main(["--samples", samples, "--reference", stats, "--metrics", "sfid,is", "--out", out2]
                 + common) == 0
  report2 = json.load(open(out2))
  assert list(report2["metrics"]) == ["sfid", "is"]
  assert report2["num_reference_images"] is None
  assert report2["reference_statistics"] == {"spatial": "from reference npz"}
  for k in ("sfid", "is"):
    assert report2["metrics"][k] == pytest.approx(got[k], rel=1e-6)

  # 4. Precision/recall need the reference images.
  capsys.readouterr()
  assert ev.main(["--samples", samples, "--reference", stats, "--metrics", "precision"] + common) == 2
  assert "arr_0" in capsys.readouterr().err


def test_evaluate_cli_missing_weights_and_no_torch_import(random_net, tmp_path):
  samples = str(tmp_path / "s.npz")
  np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop(inc.WEIGHTS_ENV, None)
  proc = subprocess.run([sys.executable, "-m", "pixeldit_jax.evaluate", "--samples", samples, "--reference",
                         samples, "--inception", str(tmp_path / "missing.pth")],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout(120))
  assert proc.returncode == 2
  assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr and "--inception" in proc.stderr
  # Loading the converted .npz and importing the CLI never imports torch.
  code = ("import sys, pixeldit_jax.evaluate, pixeldit_jax.evaluation.inception as I;"
          f"I.read_weights({random_net['path']!r}); assert 'torch' not in sys.modules, 'torch imported'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=timeout(120))
  assert proc.returncode == 0, proc.stderr

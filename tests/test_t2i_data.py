"""Text-to-image data: tar shards, caption folders, aspect buckets, the bucket-per-step plan across
processes, iterator state, captioned Fashion-MNIST and its faithfulness metric."""

import io
import json
import logging
import tarfile

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pixeldit_jax.data import buckets, captioned_fmnist as cf, fashion_mnist, text_image as ti
from pixeldit_jax.evaluation import t2i_fmnist


def make_config(batch_size=4, image_size=(32, 32), seed=0, **data_kw):
  c = ml_collections.ConfigDict()
  c.seed, c.batch_size, c.image_size = seed, batch_size, image_size
  c.data = ti.default_text_image_config(**data_kw)
  return c


def take(config, n, process_index=0, process_count=1):
  it = iter(ti.build_text_image(config, process_index, process_count))
  batches = [next(it) for _ in range(n)]
  it.close()
  return batches


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def encode(array, fmt="PNG", mode=None):
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format=fmt)
  return buffer.getvalue()


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, payload in members:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


# ---------------------------------------------------------------- buckets


def test_bucket_tables():
  t512, t1024 = buckets.get_table("ASPECT_RATIO_512"), buckets.get_table("ASPECT_RATIO_1024")
  assert len(t512) == 40 and len(t1024) == 7
  assert t512.sizes[0] == (256, 1024) and t512.sizes[-1] == (1024, 256) and (512, 512) in t512.sizes
  assert t1024.sizes == ((752, 1344), (896, 1344), (896, 1200), (1024, 1024), (1200, 896),
                         (1344, 896), (1344, 752))  # spec §7.2
  assert all(h % 32 == 0 and w % 32 == 0 for h, w in t512.sizes)
  assert all(h % 16 == 0 and w % 16 == 0 for h, w in t1024.sizes)  # 752 and 1200 are not /32
  for table in (t512, t1024):
    assert len(set(table.sizes)) == len(table) and np.all(np.diff(table.ratios) > 0)
    assert all(abs(r - h / w) < 0.02 for r, (h, w) in zip(table.ratios, table.sizes))
  assert buckets.table_for("auto", (1024, 1024)).name == "ASPECT_RATIO_1024"
  assert buckets.table_for(None, (48, 64)).sizes == ((48, 64),)
  with pytest.raises(ValueError, match="Unknown bucket table"):
    buckets.table_for("ASPECT_RATIO_2048", (512, 512))


def test_nearest_bucket_matches_the_official_rule():
  table = buckets.get_table("ASPECT_RATIO_512")
  labels = [label for label, _, _ in buckets.ASPECT_RATIO_512]
  rng = np.random.default_rng(0)
  hw = rng.integers(16, 3000, (500, 2))
  got = table.nearest(hw[:, 0], hw[:, 1])
  for (h, w), b in zip(hw, got):  # the official min() over the table, in order
    assert labels[b] == min(labels, key=lambda r: abs(float(r) - h / w))
  assert table.sizes[table.nearest_one(512, 512)] == (512, 512)
  assert table.sizes[table.nearest_one(100, 4000)] == (256, 1024)
  assert table.sizes[table.nearest_one(3000, 500)] == (1024, 256)
  assert table.sizes[table.nearest_one(0, 0)] == (512, 512)  # unknown size
  t1024 = buckets.get_table("ASPECT_RATIO_1024")
  assert t1024.sizes[t1024.nearest_one(1080, 1920)] == (752, 1344)


def test_resize_to_bucket_covers_and_crops_the_centre():
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (90, 200, 3), dtype=np.uint8))
  out = buckets.resize_to_bucket(img, (64, 96))
  assert out.size == (96, 64)
  # cover: 64/90 > 96/200, so the height becomes 64 and the width int(200 * 64 / 90) = 142
  expected = img.resize((142, 64), Image.BICUBIC).crop((23, 0, 119, 64))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
  assert buckets.resize_to_bucket(img, (90, 200)) is img
  assert buckets.cover_size(100, 100, (64, 32)) == (64, 64)


def _released_fixed_transform(img, n):
  """The release's stage-1 PixelDataset transform, transcribed: torchvision Resize(n, BILINEAR)
  (short side to n, long side int(n * long / short), PIL's resize) then CenterCrop(n)."""
  w, h = img.size
  long = int(n * max(w, h) / min(w, h))
  new_w, new_h = (n, long) if w <= h else (long, n)
  img = img.resize((new_w, new_h), Image.BILINEAR)
  top, left = int(round((new_h - n) / 2.0)), int(round((new_w - n) / 2.0))
  return img.crop((left, top, left + n, top + n))


def test_t2i_stage1_resizes_bilinearly_as_released(tmp_path):
  from pixeldit_jax import config_lib
  stage1 = config_lib.load("configs/t2i_1024.py:stage1")
  assert (stage1.data.resize, stage1.data.buckets) == ("bilinear", None)
  for stage in ("stage2", "stage3"):  # the bucketed stages keep the release's bicubic
    assert config_lib.load(f"configs/t2i_1024.py:{stage}").data.resize == "bicubic"
  rng = np.random.default_rng(3)
  a = rng.integers(0, 256, (300, 703, 3), dtype=np.uint8)  # upscaled, odd crop margin
  Image.fromarray(a).save(tmp_path / "a.png")
  (tmp_path / "captions.tsv").write_text("a.png\ta wide image\n")
  stage1.batch_size = 1
  stage1.data.update(dict(source="caption_folder", path=str(tmp_path), num_workers=0))
  (batch,) = take(stage1, 1)
  expected = np.asarray(_released_fixed_transform(Image.fromarray(a), 512))
  np.testing.assert_array_equal(batch["image"][0], expected)
  assert not np.array_equal(expected, buckets.resize_to_bucket(Image.fromarray(a), (512, 512)))
  with pytest.raises(ValueError, match="resize must be one of"):
    ti.build_text_image(make_config(source="fake_text", resize="lanczos"), 0, 1)


# ---------------------------------------------------------------- sources


def make_shards(root):
  """Two shards; records b (empty caption) and e (corrupt image) are unreadable."""
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  images = {k: rgb(16, 16) for k in "acdfgh"}
  root.mkdir()
  write_tar(root / "0000.tar", [
      ("a.jpg", encode(images["a"], "JPEG")), ("a.txt", b"  a photo of a cat \n"),
      ("b.png", encode(rgb(16, 16))), ("b.txt", b"   "),
      ("c.png", encode(images["c"][..., 0])), ("c.json", json.dumps({"caption": "gray c"}).encode()),
      ("d.webp", encode(images["d"], "WEBP", None)), ("d.json", json.dumps({"prompt": "prompt d"}).encode()),
      ("lonely.json", b"{}"),  # no image: not a record
  ])
  whole = encode(rgb(16, 16))
  rgba = np.concatenate([images["g"], np.full((16, 16, 1), 255, np.uint8)], -1)
  write_tar(root / "0001.tar", [
      ("sub/e.png", whole[:len(whole) // 2]), ("sub/e.txt", b"truncated e"),
      ("sub/f.png", encode(images["f"])), ("sub/f.json", json.dumps({"text": "text f"}).encode()),
      ("sub/g.png", encode(rgba, mode="RGBA")), ("sub/g.txt", b"rgba g"),
      ("sub/h.png", encode(np.full((16, 16), 65535, np.uint16))), ("sub/h.txt", b"sixteen h"),
  ])
  (root / "notes.md").write_text("not a shard")
  return images


def test_webdataset_shards_skips_and_conversions(tmp_path, caplog, monkeypatch):
  images = make_shards(tmp_path / "wds")
  config = make_config(batch_size=8, image_size=(16, 16), source="webdataset",
                       path=str(tmp_path / "wds"), shuffle=False)
  with caplog.at_level(logging.WARNING, logger="pixeldit_jax.data.text_image"):
    (batch,) = take(config, 1)
  assert "empty caption" in caplog.text and "sub/e" in caplog.text
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["caption"].dtype == object and all(type(c) is str for c in batch["caption"])
  assert batch["caption"].tolist() == ["a photo of a cat", "gray c", "gray c", "prompt d", "text f",
                                       "text f", "rgba g", "sixteen h"]
  assert batch["skipped"].tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
  assert batch["converted"].tolist() == [0, 1, 1, 0, 0, 0, 1, 1]
  assert batch["index"].dtype == np.int64 and batch["index"].tolist() == [0, 2, 2, 3, 5, 5, 6, 7]
  np.testing.assert_array_equal(batch["image"][4], images["f"])
  np.testing.assert_array_equal(batch["image"][6], images["g"])  # opaque RGBA
  assert (batch["image"][7] == 255).all()  # 16-bit full scale
  np.testing.assert_array_equal(batch["image"][2][..., 0], images["c"][..., 0])  # gray -> RGB
  # The index is cached next to each shard and used by the next build.
  assert (tmp_path / "wds" / ("0000.tar" + ti.INDEX_SUFFIX)).is_file()
  ti._INDEX_MEMO.clear()
  monkeypatch.setattr(ti, "index_shard", lambda shard: pytest.fail("re-indexed " + shard))
  assert_batches_equal([batch], take(config, 1))
  source = ti.WebDatasetSource(str(tmp_path / "wds" / "*.tar"))
  assert len(source) == 8 and source.keys[4] == "sub/e" and source.sizes().tolist() == [[16, 16]] * 8
  with pytest.raises(ti.DataNotFoundError, match="No .tar shards"):
    ti.WebDatasetSource(str(tmp_path / "missing"))


def test_caption_folder_jsonl_and_tsv(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / "caps"
  folder.mkdir()
  a, c = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  Image.fromarray(a).save(folder / "a.png")
  (folder / "b.jpg").write_bytes(b"not a jpeg")
  Image.fromarray(c).save(folder / "c.png")
  lines = [{"file": "a.png", "caption": "wide a"}, {"file": "b.jpg", "caption": "broken b"},
           {"file": "c.png", "caption": "small c"}, {"file": "missing.png", "caption": "gone"}]
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  config = make_config(batch_size=4, image_size=(16, 16), source="caption_folder", path=str(folder),
                       shuffle=False)
  (batch,) = take(config, 1)
  assert batch["caption"].tolist() == ["wide a", "small c", "small c", "wide a"]
  assert batch["skipped"].tolist() == [0, 1, 0, 1] and not batch["converted"].any()
  expected = buckets.resize_to_bucket(Image.fromarray(a), (16, 16))
  np.testing.assert_array_equal(batch["image"][0], np.asarray(expected))
  (folder / "captions.jsonl").unlink()
  (folder / "captions.tsv").write_text("c.png\tsmall c from tsv\na.png\twide a\n")
  (batch,) = take(make_config(batch_size=2, image_size=(8, 8), source="caption_folder",
                              path=str(folder), shuffle=False), 1)
  assert batch["caption"].tolist() == ["small c from tsv", "wide a"]
  (folder / "captions.tsv").unlink()
  with pytest.raises(ti.DataNotFoundError, match="neither captions.jsonl nor captions.tsv"):
    take(config, 1)


def test_config_errors():
  with pytest.raises(ValueError, match="source must be one of"):
    ti.build_text_image(make_config(source="fake"), 0, 1)
  with pytest.raises(ValueError, match="Unknown data config field"):
    ti.default_text_image_config(bucket="ASPECT_RATIO_512")
  with pytest.raises(ValueError, match="positive multiple"):
    ti.build_text_image(make_config(batch_size=6, source="fake_text"), 0, 4)
  with pytest.raises(ValueError, match="no bucket with at least"):
    ti.build_text_image(make_config(batch_size=8, source="fake_text", num_records=7), 0, 1)


# ---------------------------------------------------------------- the bucket plan


def test_plan_one_bucket_per_step_on_every_process():
  rng = np.random.default_rng(0)
  record_buckets = rng.choice(5, 1000, p=[0.5, 0.3, 0.15, 0.049, 0.001]).astype(np.int32)
  plans = [ti.BucketPlan(record_buckets, 5, p, 2, 4, seed=3, shuffle=True) for p in range(2)]
  counts = np.bincount(record_buckets, minlength=5)
  assert plans[0].steps.tolist() == (counts // 2 // 4).tolist() and plans[0].steps[4] == 0
  per_epoch = plans[0].steps_per_epoch
  for epoch in range(2):
    used = []
    for p, plan in enumerate(plans):
      slots = [plan.slot(k) for k in range(epoch * per_epoch * 4, (epoch + 1) * per_epoch * 4)]
      steps = np.asarray([b for b, _ in slots]).reshape(per_epoch, 4)
      assert (steps == steps[:, :1]).all()  # one bucket per step
      records = [int(plan.shards[b][pos]) for b, pos in slots]
      assert len(set(records)) == len(records)  # no record twice in an epoch
      assert all(record_buckets[r] == b for r, (b, _) in zip(records, slots))
      used.append((steps[:, 0], set(records)))
    np.testing.assert_array_equal(used[0][0], used[1][0])  # the same bucket on both processes
    assert not used[0][1] & used[1][1]  # disjoint records
  assert plans[0].schedule(0)[0].tolist() != plans[0].schedule(1)[0].tolist()  # reshuffled


def test_bucketed_pipeline_two_processes_and_resume():
  config = make_config(batch_size=4, image_size=(512, 512), source="fake_text", num_records=800,
                       buckets="ASPECT_RATIO_512", read_threads=2)
  streams = [take(config, 6, process_index=p, process_count=2) for p in range(2)]
  shapes = [[b["image"].shape for b in s] for s in streams]
  assert shapes[0] == shapes[1] and len(set(shapes[0])) > 1
  table = buckets.get_table("ASPECT_RATIO_512")
  assert all(s[0] == 2 and s[1:3] in table.sizes for s in shapes[0])
  captions = [{c for b in s for c in b["caption"]} for s in streams]
  assert not captions[0] & captions[1]
  # Resuming from a saved state gives the identical continuation.
  it = iter(ti.build_text_image(config, 1, 2))
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it.close()
  fresh = iter(ti.build_text_image(config, 1, 2))
  fresh.set_state(state)
  assert_batches_equal(expected, [next(fresh) for _ in range(3)])
  assert_batches_equal(expected, streams[1][2:5])
  fresh.close()


def test_iterator_state_in_an_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  config = make_config(batch_size=4, image_size=(16, 16), source="fake_text", num_records=64)
  it = iter(ti.build_text_image(config, 0, 1))
  next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(1, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  it.close()
  fresh = iter(ti.build_text_image(config, 0, 1))
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(1, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(expected, [next(fresh) for _ in range(2)])
  fresh.close()


@pytest.mark.slow  # Grain's worker start-up and shutdown take ~40 s here
def test_workers_give_the_same_stream_and_state():
  config = make_config(batch_size=4, image_size=(16, 16), source="fake_text", num_records=64,
                       num_workers=2)
  it = iter(ti.build_text_image(config, 0, 1))
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close()
  assert all(type(b["image"]) is np.ndarray and b["caption"].dtype == object for b in expected)
  fresh = iter(ti.build_text_image(config, 0, 1))
  fresh.set_state(state)
  assert_batches_equal(expected, [next(fresh) for _ in range(2)])
  fresh.close()
  config.data.num_workers = 0  # the stream does not depend on the worker count
  assert_batches_equal(expected, take(config, 3)[1:])


# ---------------------------------------------------------------- captioned Fashion-MNIST


def test_small_canvases_draw_resized_garments():
  images, _ = fashion_mnist.load_fashion_mnist("test")
  assert [cf.garment_size(s) for s in (32, 40, 56, 64)] == [16, 20, 28, 28]
  image = cf.render(images[0], 0, 2, 3, 32)  # red on blue, bottom right
  assert image.shape == (32, 32, 3)
  assert (image[:16] == cf.COLOUR_RGB[2]).all() and (image[:, :16] == cf.COLOUR_RGB[2]).all()
  tile = image[16:, 16:].astype(float)
  expected = cf.COLOUR_RGB[2] + cf.resize_gray(images[0], 16)[:, :, None] / 255 * (cf.COLOUR_RGB[0] - cf.COLOUR_RGB[2])
  assert np.abs(tile - expected).max() <= 0.5 and tile[..., 0].max() > 200  # the garment is there
  for bad in (30, 33):
    with pytest.raises(ValueError, match=">= 32"):
      cf.render(images[0], 0, 2, 3, bad)


def test_captions_and_heldout_set():
  captions = cf.all_captions()
  assert len(captions) == len(set(captions)) == 2240 == cf.NUM_CAPTIONS
  assert "a red sneaker on a blue background, top left" in captions
  assert all(cf.caption(*cf.parse_caption(c)) == c for c in captions)
  assert cf.parse_caption("a red sneaker on a red carpet") is None
  held = cf.heldout_captions(100)
  assert len(set(held)) == 100 and held[:40] == cf.heldout_captions(40)  # nested
  assert np.bincount([cf.parse_caption(c)[0] for c in held]).tolist() == [10] * 10
  assert all(cf.parse_caption(c)[1] != cf.parse_caption(c)[2] for c in held)


def test_captioned_fmnist_is_deterministic_and_excludes_heldout():
  source = cf.CaptionedFashionMNIST("train", size=64, heldout=100)
  again = cf.CaptionedFashionMNIST("train", size=64, heldout=100)
  assert len(source) == 60000 * cf.COLOURINGS_PER_IMAGE
  for i in (0, 1, 59999, 60000, 123457):
    a, b = source[i], again[i]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"] and a["image"].shape == (64, 64, 3)
  images, labels = fashion_mnist.load_fashion_mnist("train")
  g, cls, colour, bg, pos = source.record(60000 + 5)
  assert g == 5 and cls == labels[5] and colour != bg
  image = source[60005]["image"]
  top, left = cf.quadrant_origin(pos, 64)
  outside = np.ones((64, 64), bool)
  outside[top:top + 32, left:left + 32] = False
  assert (image[outside] == cf.COLOUR_RGB[bg]).all()
  tile = image[top + 2:top + 30, left + 2:left + 30].astype(float)
  expected = cf.COLOUR_RGB[bg] + images[5][:, :, None] / 255 * (cf.COLOUR_RGB[colour] - cf.COLOUR_RGB[bg])
  assert np.abs(tile - expected).max() <= 0.5
  held = set(cf.heldout_captions(100))
  rng = np.random.default_rng(0)
  seen = {cf.caption(*source.record(int(i))[1:]) for i in rng.integers(0, len(source), 20000)}
  assert not seen & held and len(seen) > 1900  # nearly every other caption shows up
  batch = take(make_config(batch_size=8, image_size=(56, 56), source="captioned_fmnist"), 1)[0]
  assert batch["image"].shape == (8, 56, 56, 3) and not batch["converted"].any()
  assert all(cf.parse_caption(c) is not None for c in batch["caption"])


# ---------------------------------------------------------------- the faithfulness metric


@pytest.fixture(scope="module", params=[64, 32])
def rendered(request):
  """200 records of the training stream and 100 held-out captions drawn with test garments, on
  64x64 canvases (28x28 garments) and 32x32 ones (garments resized to 16x16, the demo's)."""
  size = request.param
  source = cf.CaptionedFashionMNIST("train", size=size)
  records = [source[int(i)] for i in np.random.default_rng(1).integers(0, len(source), 200)]
  images, labels = fashion_mnist.load_fashion_mnist("test")
  for k, (cls, colour, bg, pos) in enumerate(cf.heldout_keys(100)):
    g = int(np.flatnonzero(labels == cls)[k])
    records.append({"image": cf.render(images[g], colour, bg, pos, size),
                    "caption": cf.caption(cls, colour, bg, pos)})
  return np.stack([r["image"] for r in records]), [r["caption"] for r in records]


def test_metric_position_and_colours_without_classifier(rendered, tmp_path):
  images, captions = rendered
  truth = t2i_fmnist.faithfulness(images, captions, classify=False)
  assert truth["t2i_background"] == truth["t2i_position"] == truth["t2i_colour"] == truth["t2i_all"] == 1.0
  shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
  chance = t2i_fmnist.faithfulness(images, shuffled, classify=False)
  assert chance["t2i_position"] < 0.4 and chance["t2i_colour"] < 0.3 and chance["t2i_all"] < 0.05
  noisy = np.clip(images + np.random.default_rng(2).normal(0, 12, images.shape), 0, 255).astype(np.uint8)
  assert t2i_fmnist.faithfulness(noisy, captions, classify=False)["t2i_all"] >= 0.98
  broken = t2i_fmnist.faithfulness(images[:2], ["nonsense", captions[1]], classify=False, details=True)
  assert broken["unparsed_captions"] == 1 and broken["per_sample"]["all"].tolist() == [False, True]
  np.savez(tmp_path / "s.npz", images, captions=np.asarray(captions))
  assert t2i_fmnist.main(["--samples", str(tmp_path / "s.npz"), "--no-classifier"]) == 0
  with open(tmp_path / "s_t2i.json") as f:
    assert json.load(f)["t2i_all"] == 1.0
  with pytest.raises(ValueError, match="uint8"):
    t2i_fmnist.faithfulness(images.astype(np.float32), captions, classify=False)


def test_metric_garment_check_with_a_trained_classifier(rendered, fmnist_quick_classifier):
  images, captions = rendered
  classifier, _ = fmnist_quick_classifier  # the session's quickly trained one (conftest)
  truth = t2i_fmnist.faithfulness(images, captions, classifier)
  # The garment check scores the classifier's accuracy on the drawn garments: 0.83 for the quick
  # classifier on real Fashion-MNIST (test accuracy 0.84), >= 0.85 for the full one; at 32x32 the
  # garments went through 16x16 and back (the full classifier: 0.89 there, 0.93 on 28x28).
  print("garment check on real drawings", images.shape[1], truth["t2i_garment"], classifier.test_accuracy)
  margin = 0.05 if images.shape[1] >= 56 else 0.12
  assert truth["t2i_garment"] >= min(0.85, classifier.test_accuracy - margin)
  assert truth["t2i_all"] == truth["t2i_garment"]
  shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
  assert t2i_fmnist.faithfulness(images, shuffled, classifier)["t2i_garment"] < 0.3

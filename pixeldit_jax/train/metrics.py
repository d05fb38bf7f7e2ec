"""Step metrics (clu.metrics), metric writing (TensorBoard + metrics.jsonl) and the accelerator
peaks used for MFU.

One MetricWriter, two TensorBoard backends:

- ``clu``: ``clu.metric_writers`` (TensorFlow summaries plus a LoggingWriter that copies every
  scalar into the log file), as flax examples and big_vision use it. clu 0.0.12 imports
  TensorFlow for this, so it is picked only where TensorFlow imports (most TPU VMs).
- ``tensorboardx``: tensorboardX event files, which need no TensorFlow. The fallback.

Every scalar also goes to ``<workdir>/metrics.jsonl``, one strict JSON object per logged step:
``step`` is the number of steps done, and a non-finite value (NaN, Inf) is written as null. All files
go through the path layer ``pixeldit_jax.fs``: for a ``gs://`` workdir the event files are written
to a local temporary directory and copied to ``<workdir>/tensorboard/`` on each flush, and
metrics.jsonl (GCS objects cannot be appended to) is kept in memory, starting from what the
bucket already has, and rewritten on each flush.
"""

import contextlib
import json
import logging
import math
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from pixeldit_jax import fs

# Dense bf16 peak TFLOP/s per device, for MFU when config.train.peak_tflops is not set.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0,
}

BACKENDS = ("auto", "clu", "tensorboardx")


def device_peak_tflops(configured: Optional[float] = None) -> Optional[float]:
  if configured:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name) or name in kind:
      return peak
  return None


# ----------------------------------------------------------------------------- step metrics

@flax.struct.dataclass
class Sum(clu_metrics.Metric):
  """Sum of a per-step count (clu has Average and LastValue but no sum)."""
  total: jnp.ndarray

  @classmethod
  def from_model_output(cls, values: jnp.ndarray, **_) -> "Sum":
    return cls(total=jnp.sum(values))

  def merge(self, other: "Sum") -> "Sum":
    return type(self)(total=self.total + other.total)

  def compute(self):
    return self.total


def _last(name: str):
  """LastValue of `name` from a stack of per-step values: the last step's value."""
  return clu_metrics.LastValue.from_fun(lambda **out: jnp.asarray(out[name])[-1:])


# What the train step reports, reduced over a log interval. `loss` is the interval mean: the one
# "loss" figure of the bar, the log line, metrics.jsonl and the run summary.
_STEP_METRICS = dict(
    loss=clu_metrics.Average.from_output("loss"),
    flow_loss=clu_metrics.Average.from_output("flow_loss"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    param_norm=_last("param_norm"),
    learning_rate=_last("learning_rate"),
    data_skipped=Sum.from_output("data_skipped"),
    data_converted=Sum.from_output("data_converted"),
)
StepMetrics = clu_metrics.Collection.create(**_STEP_METRICS)
RepaStepMetrics = clu_metrics.Collection.create(
    **_STEP_METRICS, repa_loss=clu_metrics.Average.from_output("repa_loss"))


def _host_device():
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return None


def reduce_steps(steps: list[Mapping[str, Any]], repa: bool = False) -> dict[str, float]:
  """Per-step metric dicts (already fetched to the host) -> the interval's scalars.

  One clu Collection over the stacked steps; its few small ops run on the host CPU so they never
  queue behind (or wait for) the accelerator.
  """
  cls = RepaStepMetrics if repa else StepMetrics
  names = [n for n in cls.__annotations__ if not n.startswith("_")]
  stacked = {k: np.stack([np.asarray(s[k]) for s in steps]) for k in names}
  device = _host_device()
  with jax.default_device(device) if device is not None else contextlib.nullcontext():
    computed = cls.single_from_model_output(**stacked).compute()
  return {k: float(v) for k, v in computed.items()}


# ----------------------------------------------------------------------------- writers

def clu_metric_writers():
  """clu.metric_writers, or None where it does not import (it needs TensorFlow)."""
  try:
    from clu import metric_writers  # noqa: PLC0415
    return metric_writers
  except Exception as e:  # noqa: BLE001 - a broken TensorFlow fails in many ways
    logging.info("clu.metric_writers is not available (%s: %s); TensorBoard via tensorboardX",
                 type(e).__name__, e)
    return None


def clu_periodic_actions():
  """clu.periodic_actions (ReportProgress, Profile), or None where it does not import."""
  try:
    from clu import periodic_actions  # noqa: PLC0415
    return periodic_actions
  except Exception as e:  # noqa: BLE001
    logging.info("clu.periodic_actions is not available (%s: %s)", type(e).__name__, e)
    return None


class _TensorboardX:
  name = "tensorboardx"

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    self._tb = SummaryWriter(logdir)

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def write_images(self, step, images):
    for k, v in images.items():
      self._tb.add_image(k, v, step, dataformats="HWC")

  def write_texts(self, step, texts):
    for k, v in texts.items():
      self._tb.add_text(k, v, step)

  def write_hparams(self, hparams):
    # Into this run's own event file (SummaryWriter.add_hparams would open a sub-run per call).
    from tensorboardX.summary import hparams as hparams_summary  # noqa: PLC0415
    for summary in hparams_summary(dict(hparams), {"loss": 0.0}):
      self._tb.file_writer.add_summary(summary)

  def flush(self):
    self._tb.flush()

  def close(self):
    self._tb.close()


class _Clu:
  """A clu MetricWriter (normally create_default_writer's logging + TF summary writers)."""
  name = "clu"

  def __init__(self, writer):
    self._w = writer

  def write_scalars(self, step, scalars):
    self._w.write_scalars(step, scalars)

  def write_images(self, step, images):
    self._w.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})

  def write_texts(self, step, texts):
    self._w.write_texts(step, texts)

  def write_hparams(self, hparams):
    self._w.write_hparams(hparams)

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


class _Jsonl:
  """metrics.jsonl: appended locally; for URLs kept in memory (after what is already there, so a
  resumed run continues the file) and rewritten whole on flush."""

  def __init__(self, path: str):
    self.path = path
    self.remote = fs.is_remote(path)
    if self.remote:
      self._lines = fs.read_text(path).splitlines(keepends=True) if fs.exists(path) else []
      self._dirty = False
    else:
      self._f = fs.open(path, "a")

  def write(self, record: Mapping[str, Any]):
    # Strict JSON: NaN/Infinity (which strict readers reject) are written as null.
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    line = json.dumps(record, allow_nan=False) + "\n"
    if self.remote:
      self._lines.append(line)
      self._dirty = True
    else:
      self._f.write(line)

  def flush(self):
    if self.remote:
      if self._dirty:
        fs.write_text(self.path, "".join(self._lines))
        self._dirty = False
    else:
      self._f.flush()

  def close(self):
    self.flush()
    if not self.remote:
      self._f.close()


def flat_hparams(config) -> dict[str, Any]:
  """A ConfigDict as flat TensorBoard hparams: 'train.lr' -> 1e-4; tuples, None etc. as text."""
  out = {}

  def walk(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, (bool, int, float, str)):
      out[prefix] = value
    else:
      out[prefix] = str(value)

  walk("", json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config)
  return out


class MetricWriter:
  """Scalars, images, texts and hparams to TensorBoard, and scalars to metrics.jsonl; the writes of
  every process but 0 are no-ops.

  backend: "auto" (clu where clu.metric_writers imports, else tensorboardX), "clu" or
  "tensorboardx". `clu_writer` injects a clu MetricWriter (tests; or a writer of your own).
  """

  def __init__(self, workdir: str, enabled: bool = True, backend: str = "auto", clu_writer=None):
    if backend not in BACKENDS:
      raise ValueError(f"metric writer backend must be one of {BACKENDS}, got {backend!r}")
    self.enabled = enabled
    self.backend = None
    if not enabled:
      return
    workdir = fs.resolve(workdir)
    fs.makedirs(workdir)
    self._mirror = fs.LocalMirror(fs.join(workdir, "tensorboard"), prefix="pixeldit_tb_")
    if clu_writer is None and backend != "tensorboardx":
      mw = clu_metric_writers()
      if mw is not None:
        clu_writer = mw.create_default_writer(self._mirror.local, asynchronous=True)
      elif backend == "clu":
        raise ImportError("metric writer backend 'clu' needs clu.metric_writers, which needs "
                          "TensorFlow (pip install tensorflow-cpu tensorboard)")
    self._tb = _Clu(clu_writer) if clu_writer is not None else _TensorboardX(self._mirror.local)
    self.backend = self._tb.name
    self._jsonl = _Jsonl(fs.join(workdir, "metrics.jsonl"))

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._tb.write_scalars(step, scalars)
    self._jsonl.write({"step": int(step), **scalars})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """HWC uint8 images (C = 1 or 3)."""
    if self.enabled:
      self._tb.write_images(step, {k: np.repeat(v, 3, -1) if v.shape[-1] == 1 else v
                                   for k, v in images.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    if self.enabled:
      self._tb.write_texts(step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]):
    if self.enabled:
      self._tb.write_hparams(hparams)

  def write_config(self, config, step: int = 0):
    """The run's config, once at start: as hparams and as JSON text (indented: markdown code)."""
    if not self.enabled:
      return
    self.write_hparams(flat_hparams(config))
    text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else (
        json.dumps(config, indent=2))
    self.write_texts(step, {"config": "\n".join("    " + line for line in text.splitlines())})

  def flush(self):
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()
      self._mirror.sync()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self._mirror.close()
      self.enabled = False

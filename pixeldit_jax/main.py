"""Training entry point: python -m pixeldit_jax.main --config=configs/<name>.py --workdir=DIR.

The run resumes from the newest checkpoint in DIR. Config overrides: --config.train.lr=3e-4.
--check_model builds the model and runs one jitted forward + backward pass instead of training.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags, logging

def _define_flags():
  """Flags exist only when this module runs as the program (so modules can import each other)."""
  from pixeldit_jax import config_lib  # noqa: PLC0415 - also finds shipped configs by name
  config_lib.define_config_file("config", "configs/fashion_mnist.py", "Experiment config file: a path "
                                "or a shipped name (fashion_mnist.py:steps=20).")
  flags.DEFINE_string("workdir", "workdir/demo", "Where the run writes its outputs.")
  flags.DEFINE_bool("check_model", False, "Only check the model (forward + backward), no training.")


def check_model(config, workdir: str) -> dict:
  """Build the model, jit forward + grad on a random batch, and report size, FLOPs and timing."""
  import jax
  import jax.numpy as jnp
  import optax  # noqa: F401  (imported here so a broken install fails before compiling)
  from flax import nnx

  from pixeldit_jax import config_lib
  from pixeldit_jax.model import build
  from pixeldit_jax.model.cost import count_params, forward_flops

  cfg = config_lib.model_config(config)
  h, w = config.image_size
  batch = min(int(config.batch_size), 8)
  model = build(cfg, seed=config.seed)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_and_grad(params, x, t, y):
    def loss_fn(p):
      v = nnx.merge(graphdef, p)(x, t, y)
      return jnp.mean(jnp.square(v - x))
    return jax.value_and_grad(loss_fn)(params)

  k1, k2, k3 = jax.random.split(jax.random.key(config.seed), 3)
  x = jax.random.normal(k1, (batch, h, w, cfg.in_channels))
  t = jax.random.uniform(k2, (batch,))
  if cfg.text_dim is None:
    y = jax.random.randint(k3, (batch,), 0, cfg.num_classes + 1)
  else:  # text-to-image: random caption embeddings stand in for the encoder's output
    y = jax.random.normal(k3, (batch, cfg.text_length, cfg.text_dim))
  start = time.perf_counter()
  loss, grads = jax.block_until_ready(loss_and_grad(params, x, t, y))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(loss_and_grad(params, x, t, y))
  step_s = time.perf_counter() - start
  grad_norm = float(optax.global_norm(grads))
  report = dict(params=count_params(model), gflops_per_image=forward_flops(cfg, h, w)["total"] / 1e9,
                image_size=[h, w], batch=batch, loss=float(loss), grad_norm=grad_norm,
                first_call_s=round(compile_s, 2), step_s=round(step_s, 4),
                devices=[str(d) for d in jax.devices()])
  if not (jnp.isfinite(loss) and grad_norm == grad_norm):
    raise FloatingPointError(f"Non-finite loss or gradient in the model check: {report}")
  from pixeldit_jax import fs
  fs.write_text(fs.join(workdir, "model_check.json"), json.dumps(report, indent=2))
  return report


def main(argv):
  del argv
  import jax
  from pixeldit_jax import distributed, logs

  def process_index():
    distributed.initialize()  # before anything else starts the backends
    return jax.process_index()

  f = flags.FLAGS
  if not f.check_model:
    from pixeldit_jax.train import workdir_lock  # noqa: PLC0415
    # Refuse before log.txt is opened: a second run must not write into a live run's log. A read
    # only, on every process (no jax call here: the backends must start after distributed init).
    workdir_lock.check_free(f.workdir, timeout_s=f.config.train.get("lock_timeout_s", 300.0))
  # Library INFO (Orbax, jax, grain...) goes to <workdir>/log.txt; --verbosity=0 shows it here too.
  logs.setup(f.workdir, process_index=process_index)
  try:
    _run(f)
  finally:
    logs.close()


def _run(f):
  from pixeldit_jax import config_lib, logs
  config = f.config
  config_lib.validate(config)
  if f.check_model:
    report = check_model(config, f.workdir)
    logging.info("model check: %s", report)
    print(f"PixelDiT: {report['params'] / 1e6:.2f} M parameters, {report['gflops_per_image']:.3f} "
          f"GFLOPs per {report['image_size'][0]}x{report['image_size'][1]} image; forward+backward on "
          f"a batch of {report['batch']}: loss {report['loss']:.4f}, grad norm {report['grad_norm']:.4f}, "
          f"{report['step_s'] * 1000:.1f} ms (first call with compile {report['first_call_s']:.1f} s).")
    return
  from pixeldit_jax.train import trainer
  start = time.perf_counter()
  summary = trainer.train(config, f.workdir)
  # The same loss as the bar and metrics.jsonl: the mean over the last log interval.
  loss = f"; loss {summary['loss']:.4f} (last log interval's mean)" if summary["loss"] is not None else ""
  compile_s = f" (compile {summary['compile_s']:.0f} s)" if summary["compile_s"] is not None else ""
  logs.console(f"Trained steps {summary['start_step']} -> {summary['step']} in "
               f"{time.perf_counter() - start:.0f} s{compile_s}{loss}. Workdir: {summary['workdir']}"
               + (f"; samples: {summary['last_sample']}" if summary["last_sample"] else ""))


def _disk_hint(e: BaseException):
  """For a failed write: the newest checkpoint step on disk, so the user knows what survives."""
  from pixeldit_jax import cli, fs  # noqa: PLC0415
  if cli.disk_problem(e) is None:
    return None
  ckpt = fs.join(flags.FLAGS.workdir, "checkpoints")
  try:
    steps = [int(n) for n in fs.listdir(ckpt) if n.isdigit()] if fs.isdir(ckpt) else []
  except Exception:  # noqa: BLE001 - the disk itself may be what fails
    steps = []
  where = f"last good checkpoint: step {max(steps)} in {ckpt}" if steps else f"no checkpoint in {ckpt} yet"
  return f"{where}; free space or use another --workdir, then rerun to resume"


if __name__ == "__main__":
  from pixeldit_jax import cli
  cli.run_absl(main, _define_flags, hint=_disk_hint)

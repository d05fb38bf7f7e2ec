"""One-command device check for a CUDA GPU (or TPU): parity, XL training throughput/MFU, T2I sampling.

    python bench/device_check.py [--out device_check.json] [--budget-s 440] [--smoke]

Parts, each guarded (a failure is recorded in the JSON under that part and the others still run):
  1. parity   forward of a small fp32 PixelDiT (random, perturbed weights) on the accelerator
              against the same weights on jax.devices("cpu") in this process: max abs / max rel
              error, at the default matmul precision and at "highest".
  2. train    PixelDiT-XL/16 at 256x256, bf16, the real jitted train step (flow loss, AdamW, EMA,
              non-finite guard; no REPA, no data pipeline) on one device, for scanned and unrolled
              blocks x cuDNN and XLA attention (the model's `attention_impl` switch). Trace+lower and
              compile are timed apart from the steps (2 warm-ups, then 5 timed). MFU = analytic
              FLOPs (pixeldit_jax.model.cost, 3x forward) / step time / the device's dense bf16 peak
              (table below, or --peak-tflops). The batch is chosen from the device's memory and
              checked against the compiled program's memory analysis before running.
  3. sample   PixelDiT-T2I (the 1.3 B preset of configs/t2i_1024.py, bf16, random weights) at
              512x512: DPM-Solver++(2M), 50 steps, CFG 2.75 (configs/t2i_1024.py:stage1 settings),
              300 random text-embedding tokens; images/s.
  4. memory   device.memory_stats() peak_bytes_in_use after each part and at the end.
Parts run in the order parity, the first train variant (scanned, cuDNN), sample, the other train
variants, then the scanned step with the recipe's full remat (--extra-remat): a part that would not
finish inside --budget-s (estimated from the parts before it) is skipped and says so; a watchdog
writes the JSON and exits with status 3 if the budget is overrun anyway. The JSON is rewritten after
every part; the exit status is 1 when a part failed.

`--smoke` runs the same code on tiny shapes (any backend; about a minute on a 2-core CPU). On a CPU the
cuDNN variants are skipped. Imports only jax, flax, optax, numpy and the model/train modules
(no ml_collections, clu, grain, tfds or PIL), so it runs from a plain copy of the repository:
    python3 bench/device_check.py --out $OUT/device_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
import traceback

# Let XLA take most of the device memory (the default is 75%) unless the caller chose.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pixeldit_jax.diffusion import samplers  # noqa: E402
from pixeldit_jax.model import PixelDiTConfig, abstract, preset  # noqa: E402
from pixeldit_jax.model.cost import forward_flops, train_step_flops  # noqa: E402
from pixeldit_jax.model.pixeldit import model_class  # noqa: E402
from pixeldit_jax.train import optimizer as optimizer_lib  # noqa: E402
from pixeldit_jax.train import state as state_lib  # noqa: E402
from pixeldit_jax.train import step as step_lib  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets.
# Matched in order against device_kind (lower case); the first hit wins.
PEAK_BF16_TFLOPS = (
    ("gh200", 989.0), ("h200 nvl", 835.0), ("h200", 989.0), ("h100 pcie", 756.0),
    ("h100 nvl", 835.0), ("h100", 989.0), ("h800", 989.0), ("b200", 2250.0), ("gb200", 2500.0),
    ("a100", 312.0), ("a800", 312.0), ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0),
    ("a10g", 70.0), ("a10", 125.0), ("rtx 4090", 165.0), ("rtx 6000 ada", 364.0),
    ("tpu v5p", 459.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v6", 918.0),
    ("tpu v4", 275.0),
)

# The released ImageNet-256 XL recipe's optimizer and flow settings (configs/imagenet256_xl.py;
# tests/test_device_check.py checks they agree), without importing ml_collections.
XL_TRAIN = dict(optimizer="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                warmup_steps=0, grad_clip=1.0, step_down_step=160 * (1_281_167 // 256),
                lr_after_step_down=1e-5, grad_clip_after_step_down=0.5, ema_decay=0.9999,
                ema_warmup=False, time_shift=1.0, label_dropout=0.1, t2i_integer_timesteps=True)
# configs/t2i_1024.py:stage1 sampling (the default `card` preset): 512x512, shift 3.
T2I_SAMPLE = dict(num_steps=50, cfg_scale=2.75, cfg_interval=(0.0, 1.0), time_shift=3.0)
T2I_TEXT_TOKENS = 300  # Gemma-2 prompts are padded to the model's text_length


class Attrs(dict):
  """A dict with attribute access: the little of ConfigDict that the train step reads."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError as e:
      raise AttributeError(key) from e


def peak_tflops(device_kind: str, override=None):
  if override:
    return float(override), "--peak-tflops"
  kind = device_kind.lower()
  for key, value in PEAK_BF16_TFLOPS:
    if key in kind:
      return value, f"table: {key}"
  return None, f"unknown device kind {device_kind!r}: pass --peak-tflops for MFU"


def memory_stats(device) -> dict:
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - some backends (CPU) have none
    stats = {}
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
  return {k: int(stats[k]) for k in keys if k in stats}


def compiled_memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001
    return {"error": repr(e)}
  if m is None:
    return {}
  out = {}
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes"):
    v = getattr(m, k, None)
    if v is not None:
      out[k] = int(v)
  if "argument_size_in_bytes" in out and "temp_size_in_bytes" in out:
    # Donated inputs alias outputs: arguments + outputs - aliased + temporaries.
    out["total_bytes_estimate"] = (out["argument_size_in_bytes"] + out.get("output_size_in_bytes", 0)
                                   - out.get("alias_size_in_bytes", 0) + out["temp_size_in_bytes"])
  return out


def _platform_version(dev):
  try:
    return str(dev.client.platform_version)
  except Exception:  # noqa: BLE001
    return None


def matmul_precision(name: str):
  """jax.default_matmul_precision(name) where this jax has it (a no-op context otherwise)."""
  ctx = getattr(jax, "default_matmul_precision", None)
  return ctx(name) if ctx is not None else contextlib.nullcontext()


def perturbed_params(params, scale=0.05, seed=1):
  """Host-side noise on every weight (zero-initialised gates and heads included), so that the
  forward output depends on every path."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype),
                      params)


def block(tree):
  return jax.block_until_ready(tree)


# ----------------------------------------------------------------------------- parts

def part_parity(args, dev, out):
  cpu = jax.devices("cpu")[0]
  if args.smoke:
    cfg = PixelDiTConfig(patch_size=8, hidden_size=64, num_heads=2, patch_depth=2, pixel_depth=1,
                         pixel_hidden_size=8, num_classes=10)
    b, res = 2, 32
  else:
    cfg = PixelDiTConfig(patch_size=16, hidden_size=384, num_heads=6, patch_depth=4, pixel_depth=2,
                         pixel_hidden_size=16, num_classes=1000)
    b, res = 4, 128
  out.update(model=dict(cfg.to_dict(), image_size=[res, res], batch=b), cpu=cpu.device_kind,
             device=dev.device_kind)
  cls = model_class(cfg)
  graphdef = nnx.graphdef(abstract(cfg))
  with jax.default_device(cpu):
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(cls(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)))()
  params = perturbed_params(params)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, res, res, cfg.in_channels)).astype(np.float32)
  t = rng.uniform(0.0, 1.0, (b,)).astype(np.float32)
  y = rng.integers(0, cfg.num_classes, (b,)).astype(np.int32)

  def fwd(p, x, t, y):  # params as a pure dict, as the train step merges them
    return nnx.merge(graphdef, p)(x, t, y)

  run = jax.jit(fwd)
  put = lambda d: jax.device_put((params, x, t, y), d)
  with matmul_precision("highest"):
    ref = np.asarray(run(*put(cpu)), np.float64)
  out["reference_abs_max"] = float(np.max(np.abs(ref)))
  for precision in ("default", "highest"):
    if precision == "highest":
      with matmul_precision("highest"):
        got = np.asarray(run(*put(dev)), np.float64)
    else:
      got = np.asarray(run(*put(dev)), np.float64)
    err = np.abs(got - ref)
    out[precision] = dict(max_abs_err=float(err.max()),
                          max_rel_err=float(err.max() / max(np.abs(ref).max(), 1e-30)),
                          mean_abs_err=float(err.mean()), finite=bool(np.isfinite(got).all()))


def xl_config(args, scan: bool, attention, remat=None):
  remat = remat or args.remat
  if args.smoke:
    return PixelDiTConfig(patch_size=8, hidden_size=64, num_heads=2, patch_depth=2, pixel_depth=1,
                          pixel_hidden_size=8, num_classes=10, dtype="bfloat16", scan_layers=scan,
                          attention_impl=attention, remat_policy=remat), 32
  return preset("XL", dtype="bfloat16", scan_layers=scan, attention_impl=attention,
                remat_policy=remat), 256


def choose_batch(args, dev) -> int:
  if args.xl_batch:
    return args.xl_batch
  if args.smoke:
    return 2
  limit = memory_stats(dev).get("bytes_limit")
  if not limit:
    return 8
  # XL@256 bf16, remat "none": about 25 GB of state, gradients and update buffers, plus about
  # 1.1 GB of activations per image (CPU memory analysis); keep 15% free.
  per_image = {"none": 1.2e9, "dots": 0.6e9, "dots_no_batch": 0.9e9, "full": 0.15e9}[args.remat]
  b = int((0.85 * limit - 26e9) / per_image)
  return int(max(8, min(128, b // 8 * 8)))


class Train:
  """The XL train state, built once and handed from variant to variant (the step donates it)."""

  def __init__(self, args, dev):
    self.args, self.dev = args, dev
    self.state = None
    self.batch_size = choose_batch(args, dev)
    self.config = None

  def make_state(self, cfg):
    tcfg = Attrs(XL_TRAIN)
    self.tx = optimizer_lib.make(tcfg)
    self.config = Attrs(train=tcfg, model=Attrs(cfg.to_dict()))
    if self.state is None:
      t0 = time.perf_counter()
      with jax.default_device(self.dev):
        self.state = block(jax.jit(lambda: state_lib.init(cfg, self.tx, 0))())
      self.init_s = time.perf_counter() - t0

  def batch(self, cfg, res, b):
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (b, res, res, cfg.in_channels), np.uint8),
            "label": rng.integers(0, cfg.num_classes, (b,), np.int32),
            "skipped": np.zeros((b,), np.int32), "converted": np.zeros((b,), np.int32)}
    return jax.device_put(host, self.dev)

  def run(self, scan, attention, out, remat=None):
    args = self.args
    cfg, res = xl_config(args, scan, attention, remat)
    self.make_state(cfg)
    out["init_s"] = getattr(self, "init_s", None)
    graphdef = nnx.graphdef(abstract(cfg))
    step = jax.jit(step_lib.make_train_step(graphdef, self.tx, self.config), donate_argnums=(0,))
    limit = memory_stats(self.dev).get("bytes_limit")
    b = self.batch_size
    while True:
      batch = self.batch(cfg, res, b)
      t0 = time.perf_counter()
      lowered = step.lower(self.state, batch, {})
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      mem = compiled_memory(compiled)
      out.setdefault("compiles", []).append(dict(batch=b, lower_s=t1 - t0, compile_s=t2 - t1, memory=mem))
      need = mem.get("total_bytes_estimate")
      if limit and need and need > 0.95 * limit and b > 1 and not args.xl_batch:
        b = max(1, b // 2)  # does not fit: halve and compile again (the next variants start here)
        self.batch_size = b
        continue
      break
    out.update(batch=b, image_size=[res, res], lower_s=t1 - t0, compile_s=t2 - t1, compiled_memory=mem,
               scan_layers=scan, attention_impl=attention, remat_policy=cfg.remat_policy, dtype=cfg.dtype)
    state = self.state
    self.state = None  # donated below
    warm0 = time.perf_counter()
    for _ in range(args.warmup_steps):
      state, metrics = compiled(state, batch, {})
    block(metrics)
    out["warmup_s"] = time.perf_counter() - warm0
    start = time.perf_counter()
    for _ in range(args.timed_steps):
      state, metrics = compiled(state, batch, {})
    block(metrics)
    elapsed = time.perf_counter() - start
    self.state = state
    step_s = elapsed / args.timed_steps
    flops = train_step_flops(cfg, res, res, b)
    peak, _ = peak_tflops(self.dev.device_kind, args.peak_tflops)
    out.update(timed_steps=args.timed_steps, step_s=step_s, images_per_s=b / step_s,
               train_tflop_per_step=flops / 1e12, achieved_tflops=flops / step_s / 1e12,
               mfu=(flops / step_s / 1e12 / peak) if peak else None,
               loss=float(metrics["loss"]), finite=bool(metrics["finite"]))
    out["run_s"] = out["warmup_s"] + elapsed


def t2i_config(args, attention):
  if args.smoke:
    return PixelDiTConfig(patch_size=8, hidden_size=64, num_heads=2, patch_depth=2, pixel_depth=1,
                          pixel_hidden_size=8, pixel_attn_size=32, pixel_num_heads=2, text_dim=32,
                          text_length=8, dtype="bfloat16", attention_impl=attention), 32, 8
  return preset("T2I", dtype="bfloat16", attention_impl=attention), 512, T2I_TEXT_TOKENS


def part_sample(args, dev, attention, out):
  cfg, res, n_txt = t2i_config(args, attention)
  s = dict(T2I_SAMPLE, num_steps=2) if args.smoke else dict(T2I_SAMPLE)
  b = args.sample_batch or (2 if args.smoke else 8)
  out.update(model="smoke T2I" if args.smoke else "preset('T2I') of configs/t2i_1024.py, bf16",
             image_size=[res, res], text_tokens=n_txt, batch=b, attention_impl=attention,
             sampler="dpm_solver_pp_2m", **s)
  cls = model_class(cfg)
  graphdef = nnx.graphdef(abstract(cfg))
  t0 = time.perf_counter()
  with jax.default_device(dev):
    params = block(jax.jit(lambda: nnx.to_pure_dict(nnx.state(cls(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)))())
  out["init_s"] = time.perf_counter() - t0

  def sample_batch(params, key, text, negative):
    apply = lambda x, t, c: nnx.merge(graphdef, params)(x, t, c)
    noise = jax.random.normal(key, (text.shape[0], res, res, cfg.in_channels), jnp.float32)
    x = samplers.dpm_solver_pp_2m(apply, noise, text, negative, num_steps=s["num_steps"],
                                  cfg_scale=s["cfg_scale"], interval=s["cfg_interval"],
                                  shift=s["time_shift"])
    return samplers.to_uint8(x)

  rng = np.random.default_rng(0)
  text = jax.device_put(rng.standard_normal((b, n_txt, cfg.text_dim)).astype(np.float32), dev)
  negative = jax.device_put(np.zeros((b, n_txt, cfg.text_dim), np.float32), dev)
  key = jax.device_put(jax.random.PRNGKey(0), dev)
  t0 = time.perf_counter()
  lowered = jax.jit(sample_batch).lower(params, key, text, negative)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out.update(lower_s=t1 - t0, compile_s=t2 - t1, compiled_memory=compiled_memory(compiled))
  w0 = time.perf_counter()
  imgs = block(compiled(params, key, text, negative))
  out["warmup_s"] = time.perf_counter() - w0
  start = time.perf_counter()
  for _ in range(args.sample_repeats):
    imgs = compiled(params, key, text, negative)
  block(imgs)
  per_batch = (time.perf_counter() - start) / args.sample_repeats
  fwd = forward_flops(cfg, res, res, n_txt)["total"]
  flops_per_image = fwd * (2 if s["cfg_scale"] != 1.0 else 1) * s["num_steps"]
  peak, _ = peak_tflops(dev.device_kind, args.peak_tflops)
  achieved = flops_per_image * b / per_batch / 1e12
  out.update(repeats=args.sample_repeats, batch_s=per_batch, images_per_s=b / per_batch,
             forward_gflops_per_image=fwd / 1e9, achieved_tflops=achieved,
             mfu=achieved / peak if peak else None,
             pixel_std=float(np.asarray(imgs, np.float32).std()))


# ----------------------------------------------------------------------------- driver

class Report:
  def __init__(self, path):
    self.path = path
    self.data = {}
    self.lock = threading.Lock()

  def write(self):
    with self.lock:
      if not self.path:
        return
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(self.data, f, indent=1, default=str)
      os.replace(tmp, self.path)


def guarded(report, name, fn, *a, inject=()):
  """Run one part; its dict (or its error and traceback) goes into the report."""
  out = report.data["parts"].setdefault(name, {})
  out["status"] = "running"
  report.write()
  start = time.perf_counter()
  try:
    if name in inject or name.split("/")[0] in inject:
      raise RuntimeError(f"injected failure in {name} (--inject-failure)")
    fn(*a, out)
    out["status"] = "ok"
  except Exception as e:  # noqa: BLE001 - every part is independent
    out["status"] = "error"
    out["error"] = f"{type(e).__name__}: {e}"[:4000]
    out["traceback"] = traceback.format_exc()[-6000:]
    print(f"[{name}] FAILED: {out['error'][:300]}", flush=True)
  out["wall_s"] = time.perf_counter() - start
  out["memory_after"] = memory_stats(report.device)
  report.write()
  return out


def skip(report, name, reason):
  report.data["parts"][name] = {"status": "skipped", "reason": reason}
  report.write()
  print(f"[{name}] skipped: {reason}", flush=True)


def watchdog(report, deadline, start):
  """Past the hard deadline: record the part that was running, write the JSON, exit 3."""
  while time.time() < deadline:
    time.sleep(1.0)
  for name, part in report.data.get("parts", {}).items():
    if part.get("status") == "running":
      part.update(status="killed", error=f"budget of {deadline - start:.0f} s overrun during this part")
  report.data["total_s"] = time.time() - start
  report.data["finished"] = False
  report.write()
  print(f"device check: hard budget overrun; partial results in {report.path}", flush=True)
  os._exit(3)


def fmt(v, spec):
  """format(v, spec), or a '-' as wide as the spec for a missing value."""
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return format(v, spec)
  width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
  return "-".rjust(int(width or 1))


def print_table(data):
  print(f"\ndevice: {data['device_kind']} ({data['backend']}, {data['device_count']} device(s)); "
        f"jax {data['jax_version']}; peak {data['peak_bf16_tflops']} TFLOP/s ({data['peak_source']})")
  parts = data["parts"]
  p = parts.get("parity", {})
  if p.get("status") == "ok":
    for prec in ("default", "highest"):
      r = p[prec]
      print(f"parity ({prec:7s} precision): max abs err {r['max_abs_err']:.3e}, max rel err "
            f"{r['max_rel_err']:.3e} (|ref| max {p['reference_abs_max']:.3g})")
  else:
    print(f"parity: {p.get('status')} {p.get('error') or p.get('reason') or ''}")
  header = (f"{'train XL@256 bf16':26s} {'batch':>5s} {'lower s':>8s} {'compile s':>9s} {'step ms':>9s} "
            f"{'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GB':>7s}  status")
  print(f"(remat {data['remat']} unless named; batch from the device memory unless --xl-batch)")
  print(header)
  print("-" * len(header))
  for name, r in parts.items():
    if not name.startswith("train/"):
      continue
    mem = (r.get("compiled_memory") or {}).get("total_bytes_estimate")
    print(f"{name[6:]:26s} {fmt(r.get('batch'), '5d')} {fmt(r.get('lower_s'), '8.1f')} "
          f"{fmt(r.get('compile_s'), '9.1f')} {fmt((r.get('step_s') or 0) * 1e3 or None, '9.1f')} "
          f"{fmt(r.get('images_per_s'), '8.1f')} {fmt(r.get('achieved_tflops'), '8.1f')} "
          f"{fmt(100 * r['mfu'] if r.get('mfu') is not None else None, '5.1f')}% "
          f"{fmt(mem / 1e9 if mem else None, '7.1f')}  {r.get('status')} "
          f"{(r.get('error') or r.get('reason') or '')[:80]}")
  s = parts.get("sample", {})
  if s.get("status") == "ok":
    print(f"sample T2I {s['image_size'][0]}^2 ({s['num_steps']} steps, CFG {s['cfg_scale']}, batch "
          f"{s['batch']}, attention {s['attention_impl']}): {s['images_per_s']:.3f} img/s, compile "
          f"{s['compile_s']:.1f} s, {s['achieved_tflops']:.1f} TFLOP/s")
  else:
    print(f"sample: {s.get('status')} {s.get('error') or s.get('reason') or ''}")
  mem = data.get("memory", {})
  if mem.get("peak_bytes_in_use") is not None:
    print(f"peak memory: {mem['peak_bytes_in_use'] / 2**30:.2f} GiB of "
          f"{mem.get('bytes_limit', 0) / 2**30:.2f} GiB")
  else:
    print("peak memory: not reported by this backend")
  print(f"total {data.get('total_s', 0):.1f} s")


def main(argv=None):
  start = time.time()
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="device_check.json")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes: runs on a CPU in seconds")
  ap.add_argument("--budget-s", type=float, default=440.0,
                  help="hard wall-clock budget from start; parts that would overrun it are skipped")
  ap.add_argument("--xl-batch", type=int, default=0, help="train batch (0: from the device memory)")
  ap.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
  ap.add_argument("--extra-remat", default="full",
                  help="last, budget permitting: the scanned step again with this remat policy ('' for none)")
  ap.add_argument("--warmup-steps", type=int, default=2)
  ap.add_argument("--timed-steps", type=int, default=5)
  ap.add_argument("--sample-batch", type=int, default=0, help="T2I images per batch (0: 8; smoke 2)")
  ap.add_argument("--sample-repeats", type=int, default=2)
  ap.add_argument("--peak-tflops", type=float, default=None, help="per-device bf16 peak for MFU")
  ap.add_argument("--parts", default="parity,train,sample", help="comma-separated subset")
  ap.add_argument("--blocks", default="scanned,unrolled")
  ap.add_argument("--attention", default="cudnn,xla")
  ap.add_argument("--inject-failure", default="", help=argparse.SUPPRESS)  # tests: parts that raise
  args = ap.parse_args(argv)
  parts = set(args.parts.split(","))
  inject = tuple(filter(None, args.inject_failure.split(",")))

  dev = jax.devices()[0]
  peak, source = peak_tflops(dev.device_kind, args.peak_tflops)
  report = Report(args.out)
  report.device = dev
  report.data = dict(
      script="bench/device_check.py", argv=sys.argv[1:], smoke=args.smoke, started_unix=start,
      backend=jax.default_backend(), device_kind=dev.device_kind, device_count=jax.device_count(),
      platform_version=_platform_version(dev), jax_version=jax.__version__,
      python=platform.python_version(), host=platform.node(), budget_s=args.budget_s,
      remat=args.remat,
      peak_bf16_tflops=peak, peak_source=source,
      xla_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), parts={})
  try:
    import flax  # noqa: PLC0415
    import optax  # noqa: PLC0415
    report.data.update(flax_version=flax.__version__, optax_version=optax.__version__)
  except Exception:  # noqa: BLE001
    pass
  report.write()
  deadline = start + args.budget_s
  threading.Thread(target=watchdog, args=(report, deadline, start), daemon=True).start()
  gpu = jax.default_backend() == "gpu"
  print(f"device check on {dev.device_kind} ({jax.default_backend()}), budget {args.budget_s:.0f} s",
        flush=True)

  if "parity" in parts:
    guarded(report, "parity", part_parity, args, dev, inject=inject)
    print(f"[parity] {report.data['parts']['parity']['status']} "
          f"({report.data['parts']['parity']['wall_s']:.1f} s)", flush=True)

  blocks = [b == "scanned" for b in args.blocks.split(",") if b]
  attentions = [a for a in args.attention.split(",") if a]
  train = Train(args, dev)
  cudnn_ok = None

  def estimate(scan):
    """Seconds a train variant should take, from the ones already run (unrolled: compile x3)."""
    done = [r for n, r in report.data["parts"].items() if n.startswith("train/") and r.get("status") == "ok"]
    if not done:
      return 30.0 if args.smoke else 90.0
    same = [r for r in done if r["scan_layers"] == scan]
    if same:
      return max(r["wall_s"] for r in same)
    r = max(done, key=lambda r: r["wall_s"])
    return r["wall_s"] + 2.0 * (r["lower_s"] + r["compile_s"])

  def over_budget(name, est):
    if time.time() + est > deadline - 5:
      skip(report, name, f"would overrun the budget (estimated {est:.0f} s, "
                         f"{deadline - time.time():.0f} s left)")
      return True
    return False

  def train_variant(scan, attention, remat=None):
    nonlocal cudnn_ok
    name = f"train/{'scanned' if scan else 'unrolled'}/{attention}" + (f"/remat={remat}" if remat else "")
    if attention == "cudnn" and not gpu:
      skip(report, name, f"cuDNN attention needs a CUDA GPU (backend {jax.default_backend()})")
      return
    if over_budget(name, estimate(scan)):
      return
    r = guarded(report, name, lambda o: train.run(scan, attention or None, o, remat=remat), inject=inject)
    if attention == "cudnn" and remat is None:
      cudnn_ok = r["status"] == "ok"
    print(f"[{name}] {r['status']} ({r['wall_s']:.1f} s"
          + (f", {r['images_per_s']:.1f} img/s, MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "")
          + ")", flush=True)

  def sample():
    attention = ("cudnn" if cudnn_ok else "xla") if gpu else None
    done = [r["wall_s"] for n, r in report.data["parts"].items() if n.startswith("train/") and "wall_s" in r]
    est = 20.0 if args.smoke else max(60.0, min(done) if done else 120.0)
    if over_budget("sample", est):
      return
    r = guarded(report, "sample", part_sample, args, dev, attention, inject=inject)
    if r["status"] == "error" and attention == "cudnn":  # retry once with XLA attention
      report.data["parts"]["sample_cudnn_error"] = report.data["parts"].pop("sample")
      r = guarded(report, "sample", part_sample, args, dev, "xla", inject=inject)
    print(f"[sample] {r['status']} ({r['wall_s']:.1f} s"
          + (f", {r['images_per_s']:.3f} img/s" if r.get("images_per_s") else "") + ")", flush=True)

  # The order makes sure that a slow compile still leaves one result of each kind: the first train
  # variant, then sampling, then the other variants, the recipe's remat policy last.
  plan = [("train", (scan, attention)) for scan in (True, False) if scan in blocks for attention in attentions]
  if "train" not in parts:
    plan = []
  if "sample" in parts:
    plan.insert(min(1, len(plan)), ("sample", None))
  if "train" in parts and args.extra_remat and args.extra_remat != args.remat and True in blocks:
    plan.append(("remat", None))
  for kind, what in plan:
    if kind == "train":
      train_variant(*what)
    elif kind == "sample":
      sample()
    else:  # the recipe's policy (configs/imagenet256_xl.py: full remat), scanned, the attention that worked
      attention = "cudnn" if (gpu and cudnn_ok) else ("xla" if "xla" in attentions else attentions[0])
      train_variant(True, attention, remat=args.extra_remat)

  report.data["memory"] = memory_stats(dev)
  report.data["total_s"] = time.time() - start
  report.data["finished"] = True
  report.write()
  print_table(report.data)
  if args.out:
    print(f"wrote {args.out}")
  failed = [n for n, r in report.data["parts"].items() if r.get("status") == "error"]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

"""Our training step and sampling forward against the official PyTorch code, side by side.

    python bench/vs_official.py --official ~/src/PixelDiT [--rounds 3] [--steps 8]

The benchmark of record for speed claims. `--official` is a local checkout of the released code
(the folder holding `pixdit_core/`): it is imported at run time in a worker process and never
copied here; torch comes from the optional extra (`pip install "pixeldit-jax[torch]"`).

Configs (configs/tiny.py): tiny = 64^2, hidden 256, 4 heads, patch 8, depths 4+1, batch 8;
small = 256^2, hidden 768, 12 heads, patch 16, depths 2+1, batch 2. fp32 on the CPU; with
`--precision bf16` both sides compute in bf16 as their accelerator recipes do (official: autocast,
as Lightning's `bf16-mixed`; ours: the model's compute dtype), parameters, optimizer and EMA fp32.

  train    one optimisation step as each codebase trains: flow-matching loss (logit-normal t,
           10% label dropout), backward, global-norm clip 1.0, AdamW (lr 1e-4, wd 0), EMA update.
           Official: eager, or the module compiled with torch.compile as its trainer does
           (`denoiser.compile()`); ours: the trainer's jitted step (`make_train_step`, donated).
  forward  one sampling forward of the model (no gradient) on the same batch.

Every measurement runs in a fresh process (compile and warm-up excluded); sides alternate within
each round; each figure is the median step time over all rounds' steps, with the 10th-90th
percentile spread. It refuses to start a round while other processes use the CPU (`--max_busy`).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from pixeldit_jax import host_memory  # noqa: E402 - no JAX import; the workers import JAX themselves
SIDES = ("official_eager", "official_compiled", "ours")
CONFIGS = {  # configs/tiny.py sizes, as the official constructor takes them
    "tiny": dict(image=64, batch=8, patch_size=8, hidden_size=256, num_heads=4, patch_depth=4, pixel_depth=1),
    "small": dict(image=256, batch=2, patch_size=16, hidden_size=768, num_heads=12, patch_depth=2,
                  pixel_depth=1),
}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}  # --precision -> our model's compute dtype
NUM_CLASSES, PIXEL_DIM, LR, CLIP, EMA_DECAY, LABEL_DROPOUT = 1000, 16, 1e-4, 1.0, 0.9999, 0.1


# ----------------------------------------------------------------------------- machine load

def _cpu_times():
  with open("/proc/stat", encoding="ascii") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  return sum(fields) - idle, sum(fields)


def busy_fraction(seconds: float = 2.0) -> float:
  """Share of all cores' time spent busy over `seconds` (this process sleeps meanwhile)."""
  if not os.path.exists("/proc/stat"):
    return 0.0
  b0, t0 = _cpu_times()
  time.sleep(seconds)
  b1, t1 = _cpu_times()
  return (b1 - b0) / max(1, t1 - t0)


# ----------------------------------------------------------------------------- workers

def time_steps(step, steps: int, warmup: int) -> list:
  """Seconds of each of `steps` calls of `step()` after `warmup` untimed ones (compile included)."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def _official_worker(cfg: dict, what: str, compiled: bool, steps: int, warmup: int, official: str,
                     precision: str = "fp32"):
  import contextlib  # noqa: PLC0415
  import copy  # noqa: PLC0415
  import torch  # noqa: PLC0415
  sys.path.insert(0, official)
  from pixdit_core.pixeldit_c2i import PixDiT  # noqa: PLC0415 - the user's checkout

  torch.manual_seed(0)
  net = PixDiT(in_channels=3, num_groups=cfg["num_heads"], hidden_size=cfg["hidden_size"],
               pixel_hidden_size=PIXEL_DIM, patch_depth=cfg["patch_depth"], pixel_depth=cfg["pixel_depth"],
               patch_size=cfg["patch_size"], num_classes=NUM_CLASSES)
  ema = copy.deepcopy(net).requires_grad_(False)
  if compiled:
    net.compile()
  b, s = cfg["batch"], cfg["image"]
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=gen)
  labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
  # bf16: what the official recipes' Lightning `precision: bf16-mixed` does, autocast around the
  # forward and the loss (fp32 parameters, optimizer and EMA).
  mixed = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16"
           else contextlib.nullcontext)

  if what == "forward":
    net.eval()
    x, t = torch.randn(b, 3, s, s), torch.rand(b)

    def step():
      with torch.inference_mode(), mixed():
        net(x, t, labels)
  else:
    params = list(net.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step():
      x = images.float() / 127.5 - 1.0
      y = torch.where(torch.rand(b) < LABEL_DROPOUT, torch.full_like(labels, NUM_CLASSES), labels)
      t = torch.randn(b).sigmoid()
      noise = torch.randn_like(x)
      tt = t.view(-1, 1, 1, 1)
      with mixed():
        loss = ((net(tt * x + (1 - tt) * noise, t, y) - (x - noise)) ** 2).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, CLIP)
      opt.step()
      with torch.no_grad():
        torch._foreach_mul_(ema_params, EMA_DECAY)
        torch._foreach_add_(ema_params, params, alpha=1.0 - EMA_DECAY)

  with torch.no_grad(), mixed():  # the dtype the model computes in, as the step runs it
    probe = net(images[:1].float() / 127.5 - 1.0, torch.rand(1), labels[:1])
  times = time_steps(step, steps, warmup)
  return dict(times=times, threads=torch.get_num_threads(), version=torch.__version__,
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
              compute_dtype=str(probe.dtype).replace("torch.", ""))


def ours_step(cfg_name: str, what: str, scan: bool = False, precision: str = "fp32"):
  """(step, compiled_text): one call of our train step or sampling forward, and the compiled HLO
  text of that program (bench/matmul_floor.py reads its products)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from pixeldit_jax import config_lib, xla_options  # noqa: PLC0415
  from pixeldit_jax.model import abstract, build  # noqa: PLC0415
  from pixeldit_jax.train import optimizer, state as state_lib, step as step_lib  # noqa: PLC0415

  config = config_lib.load(f"{ROOT}/configs/tiny.py:size={cfg_name}")
  config.model.scan_layers = scan
  config.model.dtype = PRECISIONS[precision]  # parameters, optimizer and EMA stay fp32
  config.train.lr, config.train.grad_clip, config.train.weight_decay = LR, CLIP, 0.0
  config.train.ema_decay, config.train.label_dropout = EMA_DECAY, LABEL_DROPOUT
  config.train.warmup_steps = 0
  model_cfg = config_lib.model_config(config)
  b, (h, w) = config.batch_size, config.image_size
  rng = np.random.default_rng(0)

  if what == "forward":
    graphdef, params = nnx.split(build(model_cfg))
    # compiled as the sampling binary compiles its programs (xla_options.sampling)
    fwd = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y), compiler_options=xla_options.sampling())
    args = (params, jnp.asarray(rng.standard_normal((b, h, w, 3)), jnp.float32),
            jnp.asarray(rng.random(b), jnp.float32), jnp.asarray(rng.integers(0, NUM_CLASSES, b), jnp.int32))

    def step():
      jax.block_until_ready(fwd(*args))

    return step, lambda: fwd.lower(*args).compile().as_text()
  tx = optimizer.make(config.train)
  graphdef = nnx.graphdef(abstract(model_cfg))
  holder = [jax.jit(lambda: state_lib.init(model_cfg, tx, 0))()]
  train_step = jax.jit(step_lib.make_train_step(graphdef, tx, config), donate_argnums=(0,))
  batch = {"image": jnp.asarray(rng.integers(0, 256, (b, h, w, 3), np.uint8)),
           "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (b,), np.int32)),
           "skipped": jnp.zeros((b,), jnp.int32), "converted": jnp.zeros((b,), jnp.int32)}

  def step():
    holder[0], metrics = train_step(holder[0], batch, {})
    jax.block_until_ready(metrics)

  return step, lambda: train_step.lower(holder[0], batch, {}).compile().as_text()


def _ours_worker(cfg_name: str, what: str, steps: int, warmup: int, scan: bool, precision: str):
  import jax  # noqa: PLC0415
  step, _ = ours_step(cfg_name, what, scan, precision)
  times = time_steps(step, steps, warmup)
  return dict(times=times, version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
              compute_dtype=PRECISIONS[precision])


def worker(spec: dict) -> dict:
  cfg = CONFIGS[spec["config"]]
  if spec["side"] == "ours":
    return _ours_worker(spec["config"], spec["what"], spec["steps"], spec["warmup"], spec.get("scan", False),
                        spec.get("precision", "fp32"))
  return _official_worker(cfg, spec["what"], spec["side"] == "official_compiled", spec["steps"],
                          spec["warmup"], spec["official"], spec.get("precision", "fp32"))


# ----------------------------------------------------------------------------- driver

def run_worker(spec: dict, tune_official: bool = False) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  if spec["side"] == "ours" or tune_official:
    env = host_memory.environ(env)  # as our commands start; the official side runs as it ships
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                        capture_output=True, text=True, env=env, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  # A side that cannot run (torch.compile's generated code has crashed on some shapes) is
  # reported as such, and the others are still measured.
  why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
  if proc.returncode < 0:
    import signal  # noqa: PLC0415
    why = f"killed by {signal.Signals(-proc.returncode).name}"
  tail = [l for l in (proc.stderr or proc.stdout).strip().splitlines()
          if l.strip() and "warn" not in l.lower()][-1:] or [""]
  return dict(times=[], error=f"{why} {tail[0].strip()[:200]}".strip())


def percentile(xs, q):
  xs = sorted(xs)
  k = (len(xs) - 1) * q
  lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
  return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def table_lines(report: dict) -> list:
  """The markdown table of a report (bench/results/vs_official.md)."""
  m = report["machine"]
  sides = [s for s in SIDES if s in report["rows"][0]]
  precision = report.get("precision", "fp32")
  lines = [f"{m['cpu']}, {m['cores']} cores, {precision}, {report['date']}: `{report['command']}`", "",
           "images/s from the median step (in brackets: from the 90th and 10th percentile step times)", ""]
  head = "| config | measure | " + " | ".join(sides) + (" | ours / best official |" if "ours" in sides else " |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  notes = []
  for row in report["rows"]:
    cells = []
    for s in sides:
      r = row[s]
      if "error" in r:
        cells.append("crashed" if r["error"].startswith("killed by") else "failed")
        notes.append(f"{s} on {row['config']} {row['what']}: {r['error']}")
      else:
        cells.append(f"{r['images_per_s']:.2f} ({row['batch'] / r['p90_s']:.2f}-{row['batch'] / r['p10_s']:.2f})")
    ratio = f" | **{row['ours_over_best_official']:.2f}x**" if "ours_over_best_official" in row else ""
    lines.append(f"| {row['config']} | {row['what']} | " + " | ".join(cells) + ratio + " |")
  return lines + ([""] + notes if notes else [])


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--official", help="local checkout of the official PixelDiT code (holds pixdit_core/)")
  ap.add_argument("--configs", default="tiny,small")
  ap.add_argument("--what", default="train,forward")
  ap.add_argument("--sides", default=",".join(SIDES))
  ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side and measurement")
  ap.add_argument("--steps", type=int, default=8, help="timed steps per process")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps per process (compile included)")
  ap.add_argument("--scan", action="store_true", help="ours with scanned blocks (default: unrolled)")
  ap.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                  help="compute precision of both sides (bf16: autocast / bf16 model dtype, fp32 params)")
  ap.add_argument("--max_busy", type=float, default=0.15,
                  help="refuse to start a round while more than this share of the CPU is busy")
  ap.add_argument("--tune_official_malloc", action="store_true",
                  help="run the official side with our glibc malloc settings too (pixeldit_jax.host_memory)")
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "vs_official.json"))
  ap.add_argument("--markdown_only", action="store_true", help="rewrite the .md of --out's JSON")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.markdown_only:
    with open(args.out, encoding="utf-8") as f:
      lines = table_lines(json.load(f))
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
  if args.worker:
    print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
    return 0

  sides = [s for s in args.sides.split(",") if s]
  if any(s not in SIDES for s in sides):
    print(f"error: --sides takes {','.join(SIDES)}; got {args.sides!r}", file=sys.stderr)
    return 2
  needs_official = any(s.startswith("official") for s in sides)
  if needs_official:
    if not args.official or not os.path.isfile(os.path.join(args.official, "pixdit_core", "pixeldit_c2i.py")):
      print(f"error: --official={args.official!r} is not a checkout of the official PixelDiT code "
            "(no pixdit_core/pixeldit_c2i.py there); clone it and pass its folder", file=sys.stderr)
      return 2
    try:
      import torch  # noqa: F401, PLC0415
    except ImportError:
      print('error: torch is not installed; pip install "pixeldit-jax[torch]" (CPU build is enough)',
            file=sys.stderr)
      return 2
  official = os.path.abspath(args.official) if args.official else None

  plan = [(c, w) for c in args.configs.split(",") for w in args.what.split(",")]
  results = {(c, w, s): [] for c, w in plan for s in sides}
  meta, errors = {}, {}
  for r in range(args.rounds):
    for c, w in plan:
      order = sides if r % 2 == 0 else sides[::-1]  # alternate which side runs first
      for side in order:
        busy = busy_fraction()
        if busy > args.max_busy:
          print(f"error: the machine is busy ({100 * busy:.0f}% of the CPU used by other processes); "
                f"stop them, or raise --max_busy (now {args.max_busy})", file=sys.stderr)
          return 1
        spec = dict(side=side, config=c, what=w, steps=args.steps, warmup=args.warmup, official=official,
                    scan=args.scan, precision=args.precision)
        out = run_worker(spec, args.tune_official_malloc)
        if out.get("error"):
          errors.setdefault((c, w, side), out["error"])
          print(f"round {r + 1}/{args.rounds}  {c:5s} {w:7s} {side:17s} failed: {out['error']}", flush=True)
          continue
        results[(c, w, side)].extend(out["times"])
        meta[side] = {k: v for k, v in out.items() if k != "times"}
        med = percentile(out["times"], 0.5)
        print(f"round {r + 1}/{args.rounds}  {c:5s} {w:7s} {side:17s} "
              f"{CONFIGS[c]['batch'] / med:8.2f} img/s", flush=True)

  rows = []
  for c, w in plan:
    b = CONFIGS[c]["batch"]
    row = dict(config=c, what=w, batch=b)
    for side in sides:
      ts = results[(c, w, side)]
      if not ts:
        row[side] = dict(error=errors.get((c, w, side), "no measurement"))
        continue
      row[side] = dict(median_s=percentile(ts, 0.5), p10_s=percentile(ts, 0.1), p90_s=percentile(ts, 0.9),
                       images_per_s=b / percentile(ts, 0.5), n=len(ts))
    official_best = [row[s]["images_per_s"] for s in sides if s.startswith("official") and "error" not in row[s]]
    if "ours" in sides and official_best and "error" not in row["ours"]:
      row["ours_over_best_official"] = row["ours"]["images_per_s"] / max(official_best)
    rows.append(row)

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=dict(cpu=cpu, cores=os.cpu_count()), precision=args.precision,
                rounds=args.rounds, steps=args.steps,
                command=" ".join(["python", "bench/vs_official.py"] + sys.argv[1:]), sides=meta, rows=rows,
                official_malloc_tuned=args.tune_official_malloc)
  lines = table_lines(report)
  print("\n" + "\n".join(lines))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  md = os.path.splitext(args.out)[0] + ".md"
  with open(md, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print(f"\nwrote {args.out} and {md}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

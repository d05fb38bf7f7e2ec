"""Entry points: expected mistakes end in one `error:` line and exit code 2, --help exits 0, no user
file is ever unpickled, a full disk is named with the last good checkpoint."""

import contextlib
import errno
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from helpers import timeout
from pixeldit_jax import cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ARGPARSE_TOOLS = ["pixeldit_jax.evaluate", "pixeldit_jax.evaluation.fmnist", "pixeldit_jax.evaluation.t2i_fmnist",
                  "pixeldit_jax.evaluation.inception", "pixeldit_jax.text.cache", "pixeldit_jax.tools.import_official",
                  "pixeldit_jax.data.captioned_fmnist", "pixeldit_jax.data.fmnist_standin"]
ABSL_TOOLS = ["pixeldit_jax.main", "pixeldit_jax.sample", "pixeldit_jax.train.repa_features"]


def run(module, *args, cwd=None, env=None, limit=300):
  env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
  env.pop("PIXELDIT_DEBUG", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout(limit))


# ----------------------------------------------------------------------------- the machinery


def test_guard_turns_expected_errors_into_one_line_and_lets_bugs_through(capsys):
  def missing():
    raise FileNotFoundError("No checkpoint directory at /x\n(give --checkpoint)")
  assert cli.guard(missing, argv=["prog"]) == 2
  err = capsys.readouterr().err
  assert err == "error: No checkpoint directory at /x; (give --checkpoint)\n"
  assert cli.guard(lambda: (_ for _ in ()).throw(KeyError("no array 'arr_0'")), argv=["prog"]) == 2
  assert capsys.readouterr().err == "error: no array 'arr_0'\n"  # KeyError's repr quotes dropped
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    cli.guard(lambda: 1 / 0, argv=["prog"])
  assert cli.guard(missing, argv=["prog", "--debug"]) == 2
  assert "Traceback" in capsys.readouterr().err


def test_disk_problems_are_recognised_through_wrapping():
  full = OSError(errno.ENOSPC, "No space left on device")
  assert cli.disk_problem(full) == "no space left on device"
  try:
    try:
      raise full
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert cli.disk_problem(outer) == "no space left on device" and cli.is_expected(outer)
  assert cli.disk_problem(ValueError("Error writing x: No space left on device [tensorstore]"))
  assert cli.disk_problem(RuntimeError("unrelated")) is None


def test_argparse_tools_take_both_spellings_and_fail_in_one_line(capsys):
  p = cli.ArgumentParser(prog="tool")
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--cache-dir")
  assert vars(p.parse_args(["--batch-size=3", "--cache_dir", "c"])) == dict(debug=False, batch_size=3, cache_dir="c")
  with pytest.raises(SystemExit) as e:
    p.parse_args(["--nope"])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: unrecognized arguments: --nope (see tool --help)\n"


@pytest.mark.parametrize("module", ARGPARSE_TOOLS)
def test_help_exits_0_on_argparse_tools(module, capsys):
  import importlib
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0 and "--debug" in capsys.readouterr().out


def test_help_exits_0_on_absl_entry_points():
  # One interpreter for all three (each --help would otherwise pay for its own jax import).
  code = "\n".join([
      "import runpy, sys",
      "from absl import flags",
      "base = set(flags.FLAGS)",
      "for m in %r:" % (ABSL_TOOLS,),
      "  sys.argv = [m, '--help']",
      "  try:",
      "    runpy.run_module(m, run_name='__main__')",
      "  except SystemExit as e:",
      "    print(m, 'exit', e.code)",
      "  for name in set(flags.FLAGS) - base:",
      "    delattr(flags.FLAGS, name)",
  ])
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                       text=True, capture_output=True, timeout=timeout(300)).stdout
  for m in ABSL_TOOLS:
    assert f"{m} exit 0" in out, out[-2000:]


# ----------------------------------------------------------------------------- end to end


def test_training_mistakes_are_one_line_each(tmp_path):
  r = run("pixeldit_jax.main", "--config=fashion_mnist.py:smoke", "--config.train.lrr=1",
          "--config.modle.hidden_size=3", f"--workdir={tmp_path}")
  assert r.returncode == 2 and r.stderr.splitlines() == [
      "error: --config.train.lrr: train has no field 'lrr' (did you mean 'train.lr'?)",
      "error: --config.modle.hidden_size: config has no field 'modle' (did you mean 'model'?)"]
  r = run("pixeldit_jax.main", "--config=nothere.py", f"--workdir={tmp_path}")
  assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
  assert r.stderr.startswith("error: cannot load --config=nothere.py: [Errno 2] No such file or directory")
  assert "shipped config: fashion_mnist" in r.stderr
  # A stage whose three inputs are missing names all three at once.
  r = run("pixeldit_jax.main", "--config=t2i_1024.py:stage1", f"--workdir={tmp_path}")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
  assert r.stderr.startswith("error: 3 inputs are missing: (1) REPA is on")
  for field in ("config.repa.teacher_path", "config.text.path", "config.data.path"):
    assert field in r.stderr


def test_mesh_and_data_mistakes_are_one_line_each(tmp_path):
  common = ["--config=tiny.py:size=tiny", f"--workdir={tmp_path}/run", "--config.image_size=(16,16)"]
  r = run("pixeldit_jax.main", *common, "--config.batch_size=3", "--config.sharding.mesh_shape=(2,1,1)",
          "--config.data.source=fake", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: batch_size 3 is not divisible by the 2 devices of the mesh's data and fsdp axes"], r.stderr[-2000:]
  r = run("pixeldit_jax.main", *common, "--config.data.source=folder", f"--config.data.path={tmp_path}/nothing")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
  assert r.stderr.startswith(f"error: Image folder '{tmp_path}/nothing' does not exist")


def test_inception_converter_mistakes_are_one_line(tmp_path, capsys):
  from pixeldit_jax.evaluation import inception
  assert inception.main(["--convert", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "w.npz")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: InceptionV3 weights file not found")


def test_sampler_without_a_checkpoint_is_one_line(tmp_path):
  r = run("pixeldit_jax.sample", "--config=fashion_mnist.py", f"--checkpoint={tmp_path}/none")
  assert r.returncode == 2 and r.stderr == f"error: No checkpoint directory at {tmp_path}/none\n", r.stderr
  r = run("pixeldit_jax.sample", "--config=fashion_mnist.py")
  assert r.returncode == 2 and r.stderr.startswith("error: give exactly one of --workdir"), r.stderr


def _closed_port() -> int:
  with socket.socket() as s:  # bound, never listening: connecting is refused at once
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_cloud_storage_is_one_line_at_once(tmp_path):
  # No network (here: an emulator address nothing listens on): one line naming the URL and the
  # endpoint, within seconds, not gcsfs's ~40 s of retries and logged tracebacks first.
  env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{_closed_port()}"}
  for module, args in [("pixeldit_jax.sample", ["--config=fashion_mnist.py", "--checkpoint=gs://bkt/run/checkpoints"]),
                       ("pixeldit_jax.main", ["--config=configs/tiny.py", "--workdir=gs://bkt/run"])]:
    start = time.monotonic()
    r = run(module, *args, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: cannot reach Cloud Storage for gs://bkt/run") and r.stderr.count("\n") == 1, r.stderr
    assert "127.0.0.1" in r.stderr and time.monotonic() - start < 60


def test_reachability_is_checked_once_per_endpoint_and_not_behind_a_proxy(monkeypatch):
  from pixeldit_jax import cli, fs
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
  with pytest.raises(fs.RemoteUnreachable) as e:
    fs.check_reachable("gs://bkt/x")
  assert cli.is_expected(e.value)
  fs.check_reachable("/local/path")  # local paths are never checked
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
  fs.check_reachable("gs://bkt/x")  # behind a proxy a direct connection proves nothing
  monkeypatch.delenv("HTTPS_PROXY")
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.getsockname()[1]}")
    fs.check_reachable("gs://bkt/x")
  fs.check_reachable("gs://bkt/y")  # reached once: not connected again


@contextlib.contextmanager
def small_disk(size_mb: int):
  """A tmpfs of `size_mb`, mounted directly (root) or in a user+mount namespace (unshare)."""
  where = tempfile.mkdtemp(prefix="pixeldit-disk-")
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", where],
                           capture_output=True).returncode == 0
  try:
    yield where, ([] if mounted else ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                      f'mount -t tmpfs -o size={size_mb}m tmpfs "{where}" && exec "$@"', "-"])
  finally:
    if mounted:
      subprocess.run(["umount", where], capture_output=True)
    shutil.rmtree(where, ignore_errors=True)


def test_full_disk_names_the_last_good_checkpoint():
  # 16x16 tiny model: one checkpoint (params, EMA, two Adam moments) is ~117 MB; 200 MB holds one.
  with small_disk(200) as (disk, prefix):
    workdir = os.path.join(disk, "run")
    args = ["--config=tiny.py:size=tiny", f"--workdir={workdir}", "--config.image_size=(16,16)",
            "--config.batch_size=2", "--config.data.source=fake", "--config.train.num_steps=6",
            "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3",
            "--config.train.sample_every=0", "--config.train.sample_rows=0", "--config.train.log_every=1"]
    r = subprocess.run([*prefix, sys.executable, "-m", "pixeldit_jax.main", *args], cwd=REPO, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, timeout=timeout(400))
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert errors[0].startswith(f"error: no space left on device writing {workdir}/checkpoints/")
  assert re.search(r"\(last good checkpoint: step [24] in " + re.escape(f"{workdir}/checkpoints") + "; free space "
                   r"or use another --workdir, then rerun to resume\)$", errors[0]), errors[0]
  # The line ends the output. (Before it, tensorstore's native callbacks may print "Event loop is
  # closed" tracebacks for the failed save's pending writes; nothing in Python can route those.)
  assert r.stderr.rstrip().splitlines()[-1] == errors[0]


# ----------------------------------------------------------------------------- no unpickling


class _Payload:
  """Unpickling this runs code: it creates the marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _evil_npz(path, marker, key="arr_0"):
  np.savez(path, **{key: np.array([_Payload(marker)], dtype=object)})


def test_no_loader_unpickles_a_user_file(tmp_path, capsys):
  from pixeldit_jax import evaluate
  from pixeldit_jax.evaluation import fmnist, inception, t2i_fmnist
  from pixeldit_jax.train.repa_features import FeatureTable
  marker = tmp_path / "pwned"
  evil = tmp_path / "evil.npz"
  _evil_npz(evil, marker)
  np.savez(tmp_path / "evil_t2i.npz", arr_0=np.zeros((1, 4, 4, 3), np.uint8),
           captions=np.array([_Payload(str(marker))], dtype=object))
  np.savez(tmp_path / "evil_fm.npz", arr_0=np.zeros((1, 28, 28), np.uint8),
           labels=np.array([_Payload(str(marker))], dtype=object))
  np.save(tmp_path / "evil.npy", np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
  weights = tmp_path / "weights.npz"
  inception.save_npz(inception.random_weights(0), str(weights))
  good = tmp_path / "good.npz"
  np.savez(good, arr_0=np.zeros((2, 8, 8, 3), np.uint8))

  # The evil batch as the reference: it is read before any Inception forward is compiled.
  assert evaluate.main(["--samples", str(good), "--reference", str(evil), "--inception", str(weights),
                        "--metrics", "fid", "--no_progress"]) == 2
  assert t2i_fmnist.main(["--samples", str(tmp_path / "evil_t2i.npz"), "--no-classifier"]) == 2
  assert fmnist.main(["eval", "--samples", str(tmp_path / "evil_fm.npz")]) == 2
  _evil_npz(tmp_path / "evil_weights.npz", marker, key="fc.weight")
  with pytest.raises(ValueError, match="allow_pickle"):
    inception.read_weights(str(tmp_path / "evil_weights.npz"))
  with pytest.raises(ValueError, match="allow_pickle|Python objects"):
    FeatureTable(str(tmp_path / "evil.npy"), 1, 1)
  torch = pytest.importorskip("torch")
  torch.save({"w": _Payload(str(marker))}, tmp_path / "evil.pth")
  from pixeldit_jax.teacher import dinov2
  from pixeldit_jax.tools import import_official
  with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
    dinov2.read_state_dict(str(tmp_path / "evil.pth"))
  with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
    inception.read_weights(str(tmp_path / "evil.pth"))
  assert import_official.main(["--checkpoint", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")]) == 2
  assert "--allow-pickle" in capsys.readouterr().err
  assert not marker.exists(), "a loader unpickled a user file"

"""glibc malloc settings for CPU runs (pixeldit_jax.host_memory): the command-line entry points
restart once with GLIBC_TUNABLES extended, keep the user's own values, and can be turned off."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pixeldit_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environ_adds_tunables_and_keeps_the_users():
  env = host_memory.environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.other=x", "A": "b"})
  tunables = dict(item.split("=") for item in env["GLIBC_TUNABLES"].split(":"))
  assert tunables["glibc.malloc.arena_max"] == "4"  # the user's value wins
  assert tunables["glibc.other"] == "x"
  assert tunables["glibc.malloc.hugetlb"] == "1" and tunables["glibc.malloc.mmap_max"] == "0"
  assert env["A"] == "b"
  assert not host_memory.needs_restart(env)
  off = {host_memory.SWITCH: "0"}
  assert host_memory.environ(off) == off and not host_memory.needs_restart(off)


def _config_that_prints_env(tmp_path):
  path = tmp_path / "print_env.py"
  path.write_text(textwrap.dedent("""
      import os
      def get_config(arg=None):
        print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", "") + " PID=" + str(os.getpid()), flush=True)
        raise SystemExit(0)
      """))
  return path


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_cli_restarts_with_tunables(tmp_path, switch):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env[host_memory.SWITCH] = switch
  proc = subprocess.Popen([sys.executable, "-m", "pixeldit_jax.main", f"--config={_config_that_prints_env(tmp_path)}",
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=300)
  line = next((l for l in out.splitlines() if l.startswith("TUNABLES=")), None)
  assert line is not None, err[-2000:]
  tunables, pid = line[len("TUNABLES="):].split(" PID=")
  assert int(pid) == proc.pid  # re-executed in place: launchers' PIDs and signals still apply
  if switch == "1":
    assert set(host_memory.TUNABLES) <= {t.split("=")[0] for t in tunables.split(":")}
  else:
    assert tunables == ""


def test_cpu_hosts_skip_the_tpu_probe(tmp_path):
  from pixeldit_jax import no_tpu
  sysfs, dev = tmp_path / "pci", tmp_path / "dev"
  (sysfs / "0000:00:04.0").mkdir(parents=True)
  (sysfs / "0000:00:04.0" / "vendor").write_text("0x1af4\n")  # a virtio device
  dev.mkdir()
  kw = dict(sysfs=str(sysfs), dev=str(dev), libtpu_installed=True)
  env = {}
  assert no_tpu.cpu_only_env("pixeldit_jax.main", env, **kw) and env == {"JAX_PLATFORMS": "cpu"}
  for module in ("pixeldit_jax.aot", "other.tool", None):  # the AOT tool needs libtpu; not ours
    assert not no_tpu.cpu_only_env(module, {}, **kw)
  env = {"JAX_PLATFORMS": ""}  # the user's choice stays, even an empty one
  assert not no_tpu.cpu_only_env("pixeldit_jax.sample", env, **kw) and env == {"JAX_PLATFORMS": ""}
  assert not no_tpu.cpu_only_env("pixeldit_jax.main", {}, **dict(kw, libtpu_installed=False))
  (dev / "nvidia0").write_text("")
  assert not no_tpu.cpu_only_env("pixeldit_jax.main", {}, **kw)  # a GPU host
  (dev / "nvidia0").unlink()
  (sysfs / "0000:00:05.0").mkdir()
  (sysfs / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")  # a TPU chip
  assert not no_tpu.cpu_only_env("pixeldit_jax.main", {}, **kw)

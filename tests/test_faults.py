"""Fault injection on a 2-process CPU job under launch/local_multiprocess.sh's restart loop:
kill -9 one process at a random step (also with a local checkpoint tier), freeze one
(SIGSTOP: its peer's watchdog must fire, not hang), cut the newest checkpoint while the job
is down, make the object store refuse 30% of the writes for a while. Each job must finish on
its own and end with the uninterrupted job's parameters, bit for bit. Each test prints one
JSON line (steps recomputed, wall time lost, goodput) for benchmarks/RESULTS.md.

Slow (each job compiles in both processes, several times): `pytest -m slow tests/test_faults.py`.
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from helpers import SHAPES_TINY, checkpoint_params, environment, metrics

pytestmark = pytest.mark.slow

TOTAL = 16
TRAIN_FLAGS = (f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
               "--config.checkpoint_every_steps=4", "--config.eval_every_steps=0",
               "--config.watchdog.timeout_s=20",
               "--config.watchdog.long_timeout_s=600")


class Job:
  """local_multiprocess.sh -n 2 with restarts; collects the processes' pids as printed."""

  # The launcher sees a killed process at once; the coordination service's heartbeat timeout
  # only has to outlast a loaded host (10 s aborted a restarted job at its start barrier
  # while the machine's load was 50).
  def __init__(self, workdir, data_dir, heartbeat_s=120, backoff_s=1, env=None, flags=()):
    self.workdir = workdir
    argv = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "-n", "2",
            "--devices_per_process", "1", "--max-restarts", "3", "--restart-backoff",
            str(backoff_s), "--python", sys.executable, "--config", SHAPES_TINY,
            "--workdir", workdir, "--", *TRAIN_FLAGS, f"--config.data_dir={data_dir}",
            f"--heartbeat_timeout_seconds={heartbeat_s}",
            "--config.compilation_cache_dir=/tmp/mmjax_test_jax_cache", *flags]
    env = {**{k: v for k, v in environment().items() if k != "JAX_NUM_CPU_DEVICES"},
           **(env or {})}
    self.started = time.time()
    self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    self.pids, self.out = {}, []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.out.append(line)
      if ": pid " in line:  # "  process 1: pid 1234 -> ..."
        i = int(line.split("process ")[1].split(":")[0])
        self.pids[i] = int(line.split("pid ")[1].split()[0])

  def wait_for_step(self, step, timeout=900):
    deadline = time.time() + timeout
    path = os.path.join(self.workdir, "metrics.jsonl")
    while time.time() < deadline:
      if os.path.exists(path) and open(path).read().count("\n") >= step:
        return
      assert self.proc.poll() is None, self.finish()
      time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")

  def log(self, i):
    return open(os.path.join(self.workdir, "logs", f"process_{i}.log")).read()

  def finish(self, timeout=1800):
    _, err = self.proc.communicate(timeout=timeout)
    self._reader.join(timeout=10)
    self.wall_s = time.time() - self.started
    return err


def final_params(workdir):
  return checkpoint_params(workdir, TOTAL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("faults") / "reference")
  job = Job(workdir, data_dir)
  err = job.finish()
  assert job.proc.returncode == 0, err[-3000:]
  return final_params(workdir), job.wall_s


def check_and_report(fault, job, reference, restarted=True):
  err = job.finish()
  assert job.proc.returncode == 0, "".join(job.out)[-2000:] + err[-4000:]
  assert ("restart 1/3" in err) == restarted, err[-3000:]
  ref_params, ref_wall = reference
  params = final_params(job.workdir)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  assert [m["step"] for m in metrics(job.workdir)] == list(range(1, TOTAL + 1))
  good = json.load(open(os.path.join(job.workdir, "goodput.json")))
  print(json.dumps({"fault": fault, "steps_recomputed": good["steps_recomputed"],
                    "wall_s": round(job.wall_s, 1), "reference_wall_s": round(ref_wall, 1),
                    "lost_to_failures_s": good["seconds"]["lost_to_failures"],
                    "goodput": good["goodput"], "attempts": good["attempts"],
                    "storage_retries": good["storage_retries"],
                    "resumed_from": [(r["resumed_from_step"], r.get("tier"))
                                     for r in good["restarts"]],
                    "load": os.getloadavg()[0]}))
  return err, good


# 12: the kill lands as step 12's persistent save begins, so the newest persistent step
# committed is 8 (the kill -9 test resumes there).
KILL_AFTER = random.Random(0).randint(6, TOTAL - 4)


def test_kill_9_one_process_at_a_random_step(tmp_path, data_dir, reference):
  job = Job(str(tmp_path / "run"), data_dir)
  job.wait_for_step(KILL_AFTER)
  os.kill(job.pids[1], signal.SIGKILL)
  check_and_report("kill -9 process 1", job, reference)


def test_kill_9_with_a_local_tier_recomputes_fewer_steps(tmp_path, data_dir, reference):
  # The same kill with a local checkpoint every step (mmjax.local_checkpoint): the restart
  # resumes from a local step newer than the persistent tier's, bit for bit.
  job = Job(str(tmp_path / "run"), data_dir,
            flags=(f"--config.checkpoint.local_dir={tmp_path / 'local'}",
                   "--config.checkpoint.local_every_steps=1"))
  job.wait_for_step(KILL_AFTER)
  os.kill(job.pids[1], signal.SIGKILL)
  _, good = check_and_report("kill -9 process 1, local tier every step", job, reference)
  persistent = (KILL_AFTER - 1) // 4 * 4
  restart = good["restarts"][-1]
  assert restart["tier"] == "local" and restart["resumed_from_step"] > persistent, restart
  assert good["steps_recomputed"] < KILL_AFTER - persistent


def test_a_frozen_process_trips_its_peers_watchdog(tmp_path, data_dir, reference):
  # The coordination service's heartbeat timeout is longer than the watchdog's: the peer
  # blocked in a collective must be caught by its watchdog.
  job = Job(str(tmp_path / "run"), data_dir, heartbeat_s=300)
  job.wait_for_step(7)
  os.kill(job.pids[1], signal.SIGSTOP)
  err, _ = check_and_report("SIGSTOP process 1", job, reference)
  assert "exited with status 43" in err and "hang: no progress" in job.log(0)
  hang = open(os.path.join(job.workdir, "hangs", "0.txt")).read()
  assert "last completed step" in hang and "Thread MainThread" in hang


def test_a_cut_checkpoint_is_not_restored(tmp_path, data_dir, reference):
  job = Job(str(tmp_path / "run"), data_dir, backoff_s=5)
  job.wait_for_step(10)
  checkpoints = os.path.join(job.workdir, "checkpoints")
  sealed = os.path.join(checkpoints, "8", "mmjax_files.json")
  while not os.path.exists(sealed):  # step 8 committed and sealed (an async save: under
    assert job.proc.poll() is None and time.time() - job.started < 900  # load it can lag)
    time.sleep(0.05)
  os.kill(job.pids[0], signal.SIGKILL)
  newest = max(int(s) for s in os.listdir(checkpoints) if s.isdigit())
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(checkpoints, str(newest)))
           for f in fs if f != "mmjax_files.json"]
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  err, _ = check_and_report("truncated newest checkpoint", job, reference)
  warning = [line for line in job.log(0).splitlines() if "is incomplete" in line]
  assert len(warning) == 1 and f"checkpoint step {newest}" in warning[0], err[-3000:]


def test_a_flaky_store_failing_30_percent_of_writes_loses_nothing(tmp_path, data_dir,
                                                                  reference):
  # From step 1 to 15 every process's store refuses 30% of the writes it retries (checkpoint
  # saves and seals, goodput.json) with a 503 (mmjax.retry's injection): retried with
  # backoff, counted, and the job never stops.
  job = Job(str(tmp_path / "run"), data_dir, env={"MMJAX_DEBUG_STORE_FAILURES": "0.3:1-15"})
  _, good = check_and_report("object store fails 30% of writes", job, reference,
                             restarted=False)
  refused = [line for line in job.log(0).splitlines() if "(injected)" in line]
  assert refused and good["storage_retries"] == len(refused), refused
  assert any("checkpoint save of step" in line for line in refused + job.log(1).splitlines())

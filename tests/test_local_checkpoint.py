"""The local checkpoint tier (checkpoint.local_dir / local_every_steps), end to end through
mmjax.train: a process killed after a local save but before the next persistent one resumes
from the local step, and the resumed run's parameters equal an uninterrupted run's bit for
bit. Two-process jobs (launch/local_multiprocess.sh -n 2, one CPU device each, FSDP over
both: each process holds half the state) are marked slow: kill -9 one process, lose one
process's local folder (its peer's replica restores it), restart on one process (the
persistent tier is restored).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from helpers import (SHAPES_TINY, checkpoint_params, command, environment, metrics, run,
                     usage_error)
from mmjax import local_checkpoint

TOTAL = 12
# Persistent checkpoints at 5 and 10 (and 12, the end); local ones at 2, 4, 6, 8.
FLAGS = (f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=5", "--config.eval_every_steps=0")


def local_flags(local_dir, every=2):
  return (f"--config.checkpoint.local_dir={local_dir}",
          f"--config.checkpoint.local_every_steps={every}")


def final_params(workdir, step=TOTAL):
  return checkpoint_params(workdir, step)


def assert_same_params(workdir, reference_workdir):
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir),
               final_params(reference_workdir))


def wait_for(predicate, proc, what, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert proc.poll() is None, f"ended before {what}"
    time.sleep(0.002)
  raise AssertionError(f"timed out waiting for {what}")


def logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return open(path).read().count("\n") if os.path.exists(path) else 0


def local_steps(local_dir, process=0, kind="own"):
  folder = os.path.join(local_dir, f"process_{process}", kind)
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(
      folder) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run without the local tier."""
  workdir = str(tmp_path_factory.mktemp("local_reference"))
  run("mmjax.train", workdir, data_dir, *FLAGS)
  return workdir


def test_kill_9_after_a_local_save_resumes_from_it_bit_exact(tmp_path, data_dir, reference):
  workdir, local_dir = str(tmp_path / "run"), str(tmp_path / "local")
  proc = subprocess.Popen(command("mmjax.train", workdir, data_dir, *FLAGS,
                                  *local_flags(local_dir)),
                          cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  # Local step 6 committed, persistent step 10 not yet: kill -9 (no handler runs). The
  # restarted run saves local step 8 after restoring 6.
  wait_for(lambda: 6 in local_steps(local_dir) and logged_steps(workdir) >= 6, proc,
           "local step 6")
  proc.kill()
  proc.communicate(timeout=60)
  reached = json.load(open(os.path.join(workdir, "goodput.json")))["max_step"]
  newest = local_steps(local_dir)[-1]  # 6, or 8 if the kill came late
  persistent = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                      if s.isdigit())
  if persistent[-1] >= 10:
    pytest.skip("the loaded machine passed step 10 before the kill")
  out = run("mmjax.train", workdir, data_dir, *FLAGS, *local_flags(local_dir)).stdout
  line = [x for x in out.splitlines() if x.startswith("Resumed from")]
  assert line and "local tier" in line[0] and f"at step {newest}" in line[0], out[-2000:]
  assert "newer than the persistent tier's step 5" in line[0], line
  assert [m["step"] for m in metrics(workdir)] == list(range(1, TOTAL + 1))
  reference_losses = {m["step"]: m["loss"] for m in metrics(reference)}
  assert all(m["loss"] == reference_losses[m["step"]] for m in metrics(workdir))
  assert_same_params(workdir, reference)
  good = json.load(open(os.path.join(workdir, "goodput.json")))
  assert good["restarts"][-1]["resumed_from_step"] == newest
  assert good["restarts"][-1]["tier"] == "local"
  # Only the steps past the local step are redone (from the persistent step 5: more).
  assert good["steps_recomputed"] == reached - newest
  assert local_steps(local_dir) == [6, 8]


def test_the_last_two_local_steps_are_kept_and_not_restored_by_another_workdir(
    tmp_path, data_dir, reference):
  local_dir = str(tmp_path / "local")
  first = str(tmp_path / "first")
  run("mmjax.train", first, data_dir, *FLAGS, *local_flags(local_dir))
  assert local_steps(local_dir) == [6, 8]  # 10 and 12 are persistent steps
  assert_same_params(first, reference)  # saving locally changes nothing
  workdir = str(tmp_path / "second")
  out = run("mmjax.train", workdir, data_dir, *FLAGS, *local_flags(local_dir)).stdout
  assert "Resumed" not in out
  assert "Starting at step 0 (local tier not restored: " in out and "written for --workdir " \
      f"{os.path.abspath(first)}" in out, out[-2000:]
  assert_same_params(workdir, reference)


@pytest.mark.parametrize("overrides, key", [
    (("--config.checkpoint.local_every_steps=2",), "checkpoint.local_every_steps=2 needs "
                                                   "checkpoint.local_dir"),
    (("--config.checkpoint.local_dir=/tmp/x",), "checkpoint.local_every_steps > 0"),
    (("--config.checkpoint.local_dir=/tmp/x", "--config.checkpoint.local_every_steps=-1"),
     "checkpoint.local_every_steps=-1 must be >= 0"),
])
def test_local_tier_keys_are_checked_in_one_line(tmp_path, data_dir, overrides, key):
  proc = run("mmjax.train", str(tmp_path / "run"), data_dir, *FLAGS, *overrides, expect=2)
  assert key in usage_error(proc)


def test_an_unwritable_local_dir_is_one_line(tmp_path, data_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  proc = run("mmjax.train", str(tmp_path / "run"), data_dir, *FLAGS,
             *local_flags(str(blocker / "local")), expect=2)
  line = usage_error(proc)
  assert "checkpoint.local_dir=" in line and "writable" in line, line


def test_newest_covered_step_needs_every_process_shards():
  held = [{"own": [4, 6], "peer": [4, 6], "rejected": ""},
          {"own": [4], "peer": [4, 6], "rejected": ""}]
  # Process 1 lost its own step 6; process (1 + 1) % 2 = 0 holds its replica.
  step, why = local_checkpoint._newest_covered(held, 5)
  assert step == 6 and "process 1 restored from its peer's replica" in why
  held[0]["peer"] = [4]
  assert local_checkpoint._newest_covered(held, 5) == (
      None, "the newest whole local step, 4, is older")
  assert local_checkpoint._newest_covered(held, None)[0] == 4
  assert local_checkpoint._newest_covered([{"own": [], "peer": [], "rejected": ""}], 3) == (
      None, "no local checkpoint")


# --- two processes (slow) -------------------------------------------------------------------

FSDP = "--config.mesh.shape=(1,2,1)"  # each process holds (and saves) half of the state


class Job:
  """launch/local_multiprocess.sh -n 2 --devices_per_process 1; the processes' pids as
  printed ("  process 1: pid 1234 -> ...")."""

  def __init__(self, workdir, data_dir, *overrides, restarts=0):
    self.workdir = workdir
    argv = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "-n", "2",
            "--devices_per_process", "1", "--max-restarts", str(restarts),
            "--restart-backoff", "1", "--python", sys.executable, "--config", SHAPES_TINY,
            "--workdir", workdir, "--", *FLAGS, FSDP, *overrides,
            f"--config.data_dir={data_dir}", "--heartbeat_timeout_seconds=120",
            "--config.compilation_cache_dir=/tmp/mmjax_test_jax_cache"]
    env = {k: v for k, v in environment().items() if k != "JAX_NUM_CPU_DEVICES"}
    self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.pids = {}
    for line in self.proc.stdout:  # the pids come first
      if ": pid " in line:
        self.pids[int(line.split("process ")[1].split(":")[0])] = int(
            line.split("pid ")[1].split()[0])
      if len(self.pids) == 2:
        break

  def finish(self, failed=False):
    out = self.proc.communicate(timeout=1800)[0]
    assert (self.proc.returncode != 0) == failed, out[-2000:] + self.log(0)[-3000:]
    return out

  def log(self, i):
    return open(os.path.join(self.workdir, "logs", f"process_{i}.log")).read()

  def kill_9_after_local_step(self, local_dir, step, process=1):
    """kill -9 `process` once both processes committed local `step` and process 0 holds
    process 1's copy of the previous local step; the launcher then stops the other."""
    wait_for(lambda: all(step in local_steps(local_dir, p) for p in (0, 1))
             and step - 2 in local_steps(local_dir, 0, "peer"), self.proc,
             f"local step {step}")
    persistent = [int(s) for s in os.listdir(os.path.join(self.workdir, "checkpoints"))
                  if s.isdigit()]
    os.kill(self.pids[process], 9)
    return max(persistent)


def resumed_line(text):
  lines = [x for x in text.splitlines() if x.startswith("Resumed from")]
  assert lines, text[-3000:]
  return lines[-1]


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("local_two_process") / "reference")
  Job(workdir, data_dir).finish()
  return workdir


@pytest.mark.slow
def test_two_processes_kill_9_one_resume_from_the_local_step(tmp_path, data_dir,
                                                              two_process_reference):
  workdir, local_dir = str(tmp_path / "run"), str(tmp_path / "local")
  job = Job(workdir, data_dir, *local_flags(local_dir), restarts=1)
  persistent = job.kill_9_after_local_step(local_dir, 8)
  assert persistent == 5, "the loaded machine passed step 10 before the kill"
  job.finish()
  line = resumed_line(job.log(0))
  assert "local tier" in line and "at step 8" in line, line
  assert_same_params(workdir, two_process_reference)


@pytest.mark.slow
def test_two_processes_one_local_dir_lost_restores_from_the_peer_then_one_process_falls_back(
    tmp_path, data_dir, two_process_reference):
  workdir, local_dir = str(tmp_path / "run"), str(tmp_path / "local")
  job = Job(workdir, data_dir, *local_flags(local_dir))
  persistent = job.kill_9_after_local_step(local_dir, 8)
  assert persistent == 5, "the loaded machine passed step 10 before the kill"
  job.finish(failed=True)
  # The same job on one process (2 devices: the same mesh): the local tier was written by
  # two processes, so the persistent step 5 is restored; it must continue exactly as a
  # one-process run from that checkpoint without a local tier.
  single, alone = str(tmp_path / "single"), str(tmp_path / "alone")
  shutil.copytree(workdir, single)
  shutil.copytree(local_dir, str(tmp_path / "local_copy"))
  os.makedirs(os.path.join(alone, "checkpoints"))
  shutil.copytree(os.path.join(workdir, "checkpoints", "5"),
                  os.path.join(alone, "checkpoints", "5"))
  out = run("mmjax.train", single, data_dir, *FLAGS, FSDP,
            *local_flags(str(tmp_path / "local_copy")), devices=2).stdout
  line = resumed_line(out)
  assert "at step 5 (persistent tier; local tier: no usable local checkpoint" in line, line
  assert "written by 2 processes, this run has 1" in line, line
  run("mmjax.train", alone, data_dir, *FLAGS, FSDP, devices=2)
  assert_same_params(single, alone)
  # Process 1's host lost its local folder: process 0 holds its copy of step 6.
  shutil.rmtree(os.path.join(local_dir, "process_1"))
  job = Job(workdir, data_dir, *local_flags(local_dir))
  job.finish()
  line = resumed_line(job.log(0))
  assert "local tier" in line and "at step 6" in line, line
  assert "process 1 restored from its peer's replica" in line, line
  assert_same_params(workdir, two_process_reference)

"""Preemption-safe training, end to end through the CLI (real data, Grain, Orbax, jit).

One uninterrupted reference run is shared by the module; every interrupted run must
reproduce its losses bitwise after restarting (same device count, data from the step).
Faults are injected the way they happen in production: SIGTERM (via the test-only
MMJAX_DEBUG_SIGTERM_AT_STEP hook of mmjax.train, or from here), `kill -9` at a random step,
a NaN in one batch (MMJAX_DEBUG_NAN_AT_STEP).
"""
import glob
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO
from helpers import FLAVA_TINY, command, environment, metrics, run
from mmjax.objectives import flava

TOTAL = 40
FLAGS = (f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=5", "--config.eval_every_steps=0")


def train(workdir, data_dir, *overrides, expect=0, env=None):
  return run("mmjax.train", workdir, data_dir, *FLAGS, *overrides, expect=expect, env=env)


def steps_in(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def leftovers(workdir):
  return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("reference"))
  train(workdir, data_dir)
  logged = metrics(workdir)
  assert [m["step"] for m in logged] == list(range(1, TOTAL + 1))
  return workdir, {m["step"]: m["loss"] for m in logged}


def assert_resumed_exactly(workdir, reference_losses, resumed_at):
  """The restarted process logged exactly steps resumed_at+1..TOTAL with the reference's
  losses bitwise, and metrics.jsonl reads like the uninterrupted run's (no duplicates)."""
  logged = metrics(workdir)
  assert [m["step"] for m in logged] == list(range(1, TOTAL + 1))
  for m in logged[resumed_at:]:
    assert m["loss"] == reference_losses[m["step"]], m["step"]


def test_sigterm_at_step_7_commits_step_7_and_restart_begins_at_8(tmp_path, data_dir,
                                                                  reference):
  _, ref_losses = reference
  workdir = str(tmp_path / "run")
  proc = train(workdir, data_dir, expect=42, env={"MMJAX_DEBUG_SIGTERM_AT_STEP": "7"})
  assert "Preempted: saved step 7" in proc.stdout
  assert steps_in(workdir) == [5, 7] and not leftovers(workdir)
  assert metrics(workdir)[-1]["step"] == 7
  out = train(workdir, data_dir).stdout
  assert "at step 7" in out and "step 8/" in out
  assert_resumed_exactly(workdir, ref_losses, 7)


# One seed in CI; the other two with the multi-process suite (`pytest -m slow`).
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_kill_9_at_a_random_step_then_restart_loses_nothing(tmp_path, data_dir, reference,
                                                            seed):
  _, ref_losses = reference
  kill_after = random.Random(seed).randint(6, TOTAL - 10)
  workdir = str(tmp_path / "run")
  jsonl = os.path.join(workdir, "metrics.jsonl")
  proc = subprocess.Popen(command("mmjax.train", workdir, data_dir, *FLAGS), cwd=REPO,
                          env=environment(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = os.path.join(workdir, "checkpoints", "5")  # renamed into place when committed
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(first) and open(jsonl).read().count("\n") >= kill_after:
      break
    time.sleep(0.002)
  assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
  proc.kill()  # SIGKILL: no handler runs, async saves in flight are torn
  proc.communicate(timeout=60)
  committed = steps_in(workdir)
  assert committed and committed[-1] >= 5
  # A torn save of a later step looks like this; a restart must not pick it up.
  os.makedirs(os.path.join(workdir, "checkpoints",
                           f"{committed[-1] + 1}.orbax-checkpoint-tmp-1700000000"))
  out = train(workdir, data_dir).stdout
  assert f"at step {committed[-1]}" in out, out[-2000:]
  assert not leftovers(workdir)
  assert_resumed_exactly(workdir, ref_losses, committed[-1])


def start_and_wait_for(workdir, data_dir, logged_steps):
  """Starts a training process; returns it once metrics.jsonl has `logged_steps` lines and
  the step-5 checkpoint is committed."""
  jsonl = os.path.join(workdir, "metrics.jsonl")
  first = os.path.join(workdir, "checkpoints", "5")  # renamed into place when committed
  proc = subprocess.Popen(command("mmjax.train", workdir, data_dir, *FLAGS), cwd=REPO,
                          env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(first) and open(jsonl).read().count("\n") >= logged_steps:
      return proc
    time.sleep(0.002)
  raise AssertionError(f"finished before the signal: {proc.communicate()[1][-2000:]}")


def test_ctrl_c_checkpoints_the_step_reached_and_exits_42(tmp_path, data_dir, reference):
  _, ref_losses = reference
  workdir = str(tmp_path / "run")
  proc = start_and_wait_for(workdir, data_dir, 8)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 42, err[-3000:]
  assert "SIGINT: stopping after this step" in err and "Traceback" not in err, err[-3000:]
  reached = steps_in(workdir)[-1]
  assert f"Preempted: saved step {reached}" in out and not leftovers(workdir)
  assert metrics(workdir)[-1]["step"] == reached
  out = train(workdir, data_dir).stdout
  assert f"at step {reached}" in out
  assert_resumed_exactly(workdir, ref_losses, reached)


def test_second_ctrl_c_exits_at_once_keeping_only_committed_checkpoints(tmp_path, data_dir,
                                                                         reference):
  """The first Ctrl-C starts a save at the end of the step; the second, a moment later,
  lands while it is in flight: exit 130 at once, no uncommitted step left, the lock held to
  the end, and the restart resumes from a committed step exactly."""
  _, ref_losses = reference
  workdir = str(tmp_path / "run")
  proc = start_and_wait_for(workdir, data_dir, 8)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err[-3000:]
  assert "second SIGINT: exiting at once" in err and "Traceback" not in err, err[-3000:]
  committed = steps_in(workdir)
  out = train(workdir, data_dir).stdout
  assert f"at step {committed[-1]}" in out, out[-2000:]
  assert not leftovers(workdir)
  assert_resumed_exactly(workdir, ref_losses, committed[-1])


@pytest.mark.parametrize("cut", ["truncate", "delete"])
def test_a_cut_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
    tmp_path, data_dir, reference, cut):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  step_dir = os.path.join(workdir, "checkpoints", str(TOTAL))
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs]
  biggest = max(files, key=os.path.getsize)
  if cut == "truncate":
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  else:
    os.remove(biggest)
  proc = train(workdir, data_dir)
  warning = [line for line in proc.stderr.splitlines() if "is incomplete" in line]
  assert len(warning) == 1 and f"restoring step {TOTAL - 5} instead" in warning[0], \
      proc.stderr[-3000:]
  assert f"at step {TOTAL - 5}" in proc.stdout
  assert_resumed_exactly(workdir, reference[1], TOTAL - 5)
  assert steps_in(workdir)[-1] == TOTAL


def test_a_start_without_checkpoint_drops_the_metrics_of_an_attempt_that_died(tmp_path,
                                                                             data_dir):
  # What a job killed before its first checkpoint (or whose only checkpoint was cut) left:
  # its steps are trained again from step 0 and logged once.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 9.0}}\n'
                                                 for s in range(1, 4)))
  train(str(workdir), data_dir, "--config.total_steps=2")
  assert [m["step"] for m in metrics(str(workdir))] == [1, 2]
  assert all(m["loss"] != 9.0 for m in metrics(str(workdir)))


def test_restoring_with_different_shapes_names_the_parameter(tmp_path, data_dir, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(os.path.join(reference[0], "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  err = train(workdir, data_dir, "--config.model.text.width=48", expect=1).stderr
  message = [line for line in err.splitlines() if "mmjax.train: error" in line]
  assert message, err[-3000:]
  # e.g. "... step 40 does not match the config at params/text/...: checkpoint has shape
  # (32, ...), config expects shape (48, ...)"
  assert f"{workdir}/checkpoints step {TOTAL}" in message[0]
  assert "at params/" in message[0] and "checkpoint has shape" in message[0]
  assert "48" in message[0].split("config expects shape")[1]
  assert "Traceback" not in err


def test_allowed_config_changes_resume(tmp_path, data_dir, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  out = train(workdir, data_dir, f"--config.total_steps={TOTAL + 2}",
              "--config.log_every_steps=2", "--config.eval_batch_size=16").stdout
  assert f"at step {TOTAL}" in out and "Config differs" not in out
  assert [m["step"] for m in metrics(workdir)][-1] == TOTAL + 2


def test_nonfinite_skip_counts_and_continues(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  train(workdir, data_dir, "--config.total_steps=8", env={"MMJAX_DEBUG_NAN_AT_STEP": "3"})
  logged = {m["step"]: m for m in metrics(workdir)}
  assert [logged[s]["nonfinite_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 1, 1]
  assert logged[3]["loss"] != logged[3]["loss"]  # NaN
  assert all(logged[s]["loss"] == logged[s]["loss"] for s in (1, 2, 4, 5, 6, 7, 8))


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                           data_dir):
  workdir = str(tmp_path / "run")
  err = train(workdir, data_dir, "--config.total_steps=12", "--config.checkpoint_every_steps=4",
              "--config.nonfinite_policy=stop", expect=1,
              env={"MMJAX_DEBUG_NAN_AT_STEP": "8"}).stderr
  assert "non-finite loss or gradient at step 8" in err and "nonfinite_policy" in err, err[-2000:]
  # Step 8 is due for a checkpoint, but it contains the bad step: only step 4 is committed.
  assert steps_in(workdir) == [4] and not leftovers(workdir)
  assert [m["step"] for m in metrics(workdir)] == list(range(1, 8))


def test_preempted_in_the_unimodal_phase_resumes_into_the_joint_phase(tmp_path, data_dir):
  """SIGTERM at step 3 of 8 (unimodal phase: steps 1-4), restart: the resumed run switches
  to all six objectives at the same step and logs the uninterrupted run's losses bitwise."""
  small = ["--config.total_steps=8", "--config.batch_size=8", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=4", "--config.eval_every_steps=0",
           "--config.loss.unimodal_steps=4"]
  def logged(workdir):
    return {m["step"]: m for m in metrics(workdir) if "loss" in m}

  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  run("mmjax.train", reference, data_dir, *small, config=FLAVA_TINY)
  out = run("mmjax.train", resumed, data_dir, *small, expect=42, config=FLAVA_TINY,
            env={"MMJAX_DEBUG_SIGTERM_AT_STEP": "3"}).stdout
  assert "Preempted: saved step 3" in out
  out = run("mmjax.train", resumed, data_dir, *small, config=FLAVA_TINY).stdout
  assert "at step 3" in out and "step 4/" in out
  ref, res = logged(reference), logged(resumed)
  assert sorted(res) == sorted(ref) == list(range(1, 9))
  assert [ref[s]["joint_phase"] for s in ref] == [0, 0, 0, 0, 1, 1, 1, 1]
  for s in range(1, 9):
    assert {k: res[s][k] for k in flava.LOSS_KEYS + ("loss", "joint_phase")} == \
        {k: ref[s][k] for k in flava.LOSS_KEYS + ("loss", "joint_phase")}, s

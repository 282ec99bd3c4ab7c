"""The hang watchdog and the straggler log: a fake clock for the rules, a real trainer that
hangs (MMJAX_DEBUG_HANG_AT_STEP) for the exit status and the stacks file."""
import os

from helpers import run
from mmjax import watchdog


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def make(tmp_path, clock, **kwargs):
  hangs = []
  dog = watchdog.Watchdog(str(tmp_path), 3, **{"timeout_s": 10, "long_timeout_s": 100,
                                               "straggler_factor": 5, **kwargs},
                          clock=clock, on_hang=hangs.append)
  return dog, hangs


def test_first_step_and_long_phases_get_the_long_timeout(tmp_path):
  clock = Clock()
  dog, _ = make(tmp_path, clock)
  clock.now = 50  # first step: compilation of the loop's input, peers meeting
  assert dog.overdue() is None
  dog.beat(1)
  clock.now = 59
  assert dog.overdue() is None
  with dog.phase("checkpoint save"):
    clock.now = 150
    assert dog.overdue() is None
    clock.now = 160
    assert dog.overdue() == 101
  clock.now = 169  # the step clock restarts when the phase ends
  assert dog.overdue() is None
  clock.now = 171
  assert dog.overdue() == 11


def test_report_writes_every_threads_stack_and_the_last_step(tmp_path, capsys):
  clock = Clock()
  dog, _ = make(tmp_path, clock)
  dog.beat(7)
  dog.report(12.0)
  text = (tmp_path / "hangs" / "3.txt").read_text()
  assert "last completed step: 7" in text and "no progress for 12 s in training step" in text
  assert "Thread MainThread" in text and "test_report_writes_every_threads_stack" in text
  line = capsys.readouterr().err.strip()
  assert line.count("\n") == 0 and "after step 7" in line and "status 43" in line


def test_a_step_five_times_the_median_is_a_straggler(tmp_path, capsys):
  clock = Clock()
  dog, _ = make(tmp_path, clock)
  dog.beat(0)
  for step in range(1, 12):
    clock.now += 1.0
    dog.beat(step)
  with dog.phase("evaluation"):  # not step time
    clock.now += 60
  clock.now += 4.0
  dog.beat(12)
  assert dog.stragglers == 0
  clock.now += 6.0
  dog.beat(13)
  assert dog.stragglers == 1
  assert "straggler: process 3 step 13 took 6.000 s, 6.0x its median 1.000 s" in (
      capsys.readouterr().err)


def test_a_hung_trainer_exits_43_with_its_stacks(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  proc = run("mmjax.train", workdir, data_dir, "--config.total_steps=20",
             "--config.log_every_steps=1", "--config.eval_every_steps=0",
             "--config.watchdog.timeout_s=3", expect=watchdog.HANG_EXIT_CODE,
             env={"MMJAX_DEBUG_HANG_AT_STEP": "8"})
  assert "hang: no progress for" in proc.stderr and "Traceback" not in proc.stderr
  text = open(os.path.join(workdir, "hangs", "0.txt")).read()
  assert "last completed step: 7" in text
  assert "in train_and_evaluate" in text and "wait" in text

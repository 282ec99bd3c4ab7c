"""goodput.json: the buckets with a fake clock, across a restart; a real run's file."""
import json
import os

from helpers import run
from mmjax import goodput


class Clock:
  def __init__(self, now=1000.0):
    self.now = now

  def __call__(self):
    return self.now


def test_buckets_add_up_and_a_restart_counts_recomputed_steps_and_lost_time(tmp_path):
  clock = Clock()
  first = goodput.Goodput(str(tmp_path), True, clock=clock)
  first.resumed(0)
  with first.phase("compilation"):
    clock.now += 10
  first.start_steps()
  for step in range(1, 9):
    with first.phase("data wait"):
      clock.now += 0.5
    clock.now += 1.0
    first.step_done(step)
    if step == 5:
      with first.phase("checkpoint save"):
        clock.now += 2
  first.write()  # the last update before the process died at step 8
  clock.now += 30  # dead, then restarted
  second = goodput.Goodput(str(tmp_path), True, clock=clock)
  with second.phase("checkpoint restore"):
    clock.now += 3
  second.resumed(5)
  second.start_steps()
  for step in range(6, 11):
    clock.now += 1.0
    second.step_done(step)
  second.write()
  saved = json.loads((tmp_path / "goodput.json").read_text())
  s = saved["seconds"]
  assert s["compilation"] == 10 and s["checkpoint_save"] == 2 and s["data_wait"] == 4
  assert s["checkpoint_restore"] == 3 and s["lost_to_failures"] == 30
  assert s["productive_training"] == 8 + 2 and s["recomputed_training"] == 3
  assert s["total"] == 10 + 8 * 1.5 + 2 + 30 + 3 + 5 and s["other"] == 0
  assert saved["goodput"] == round(10 / s["total"], 4)
  assert saved["steps_recomputed"] == 3 and saved["attempts"] == 2
  assert saved["restarts"][0]["resumed_from_step"] == 5


def test_a_run_writes_its_goodput(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  run("mmjax.train", workdir, data_dir, "--config.total_steps=6", "--config.log_every_steps=2",
      "--config.eval_every_steps=0")
  saved = json.load(open(os.path.join(workdir, "goodput.json")))
  s = saved["seconds"]
  assert saved["max_step"] == 6 and saved["attempts"] == 1 and saved["steps_recomputed"] == 0
  assert s["productive_training"] > 0 and s["compilation"] > 0 and s["checkpoint_save"] > 0
  assert abs(sum(v for k, v in s.items() if k != "total") - s["total"]) < 0.01
